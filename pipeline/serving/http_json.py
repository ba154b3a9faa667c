"""Plain JSON GETs of a server's endpoints (health, models, metrics), never through a proxy."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def http_get_json(url: str, timeout_s: float, headers: Mapping[str, str] | None = None
                  ) -> tuple[int, Any]:
    """GET ``url`` without any proxy (loopback must stay loopback); returns the status and
    the decoded JSON body (or the text when it is not JSON). Connection errors raise
    ``OSError``."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")
