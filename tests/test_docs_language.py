"""The user-facing text speaks to users, not about how the project was built.

README.md, docs/*.md, the comments of conf/**/*.yaml and the string literals of
pipeline/report/*.py (what the generated report says) are scanned for build history:
issue numbers, commit hashes, build-machine paths, sessions, "other engineers", and "seed"
used for the published claims the report checks (the run's ``seed`` setting is fine).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: (name, pattern): each names what it rejects, so a failure says why.
FORBIDDEN = [
    ("issue number", re.compile(r"\bissues? #\d", re.I)),
    # "#5", "(#24)", "#9 ": an issue reference. Not a URL fragment (/#...), an HTML entity
    # (&#39;) or a CSS colour after a colon (color:#222).
    ("issue reference", re.compile(r"(?<![\w&:/#])#\d+(?=[\s),.;]|$)")),
    ("commit hash", re.compile(r"\bcommit [0-9a-f]{7}", re.I)),
    ("build-machine path", re.compile(r"/(?:tmp|work|home)/")),
    ("session", re.compile(r"\bsessions?\b", re.I)),
    ("other engineers", re.compile(r"\bother engineers", re.I)),
    # the course's published claims once called "the seed"
    ("'seed' for the published claims", re.compile(
        r"\bseed's|\(seed\)|\bseed (?:expectations?|claims?|figures?)\b|\bthe seed expects"
        r"|\bthe seed gives", re.I)),
]


def _yaml_comments(text: str) -> str:
    """The comment part of each line of a yaml file (after a ``#`` that starts a comment)."""
    out = []
    for line in text.splitlines():
        m = re.search(r"(?:^|\s)#(.*)$", line)
        out.append(m.group(1) if m else "")
    return "\n".join(out)


def _string_literals(text: str) -> str:
    """Every string constant of a Python module (docstrings and f-string parts included)."""
    tree = ast.parse(text)
    return "\n".join(n.value for n in ast.walk(tree)
                     if isinstance(n, ast.Constant) and isinstance(n.value, str))


def user_texts(root: Path = ROOT) -> dict[str, str]:
    """Path (relative to ``root``) -> the text a user reads in it."""
    texts: dict[str, str] = {}
    for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        texts[str(p.relative_to(root))] = p.read_text()
    for p in sorted((root / "conf").rglob("*.yaml")):
        texts[str(p.relative_to(root))] = _yaml_comments(p.read_text())
    for p in sorted((root / "pipeline" / "report").glob("*.py")):
        texts[str(p.relative_to(root))] = _string_literals(p.read_text())
    return texts


def findings(texts: dict[str, str]) -> list[str]:
    """``path:line: what (the matched text)`` for every forbidden phrase."""
    out = []
    for path, text in texts.items():
        for n, line in enumerate(text.splitlines(), 1):
            for name, pat in FORBIDDEN:
                for m in pat.finditer(line):
                    out.append(f"{path}:{n}: {name} ({m.group(0)!r} in {line.strip()[:90]!r})")
    return out


def test_user_text_has_no_build_history():
    """README, docs, conf comments and the report's wording carry no build history."""
    found = findings(user_texts())
    assert not found, "build history in user-facing text:\n" + "\n".join(found)


@pytest.mark.parametrize("text", [
    "## Batching (issue #5)", "see #24 for why", "git commit 3e7bded plus this change",
    "paths.output_dir=/tmp/x", "sqlite:////work/main/outputs/mlflow.db", "/home/me/model",
    "in this session's 15 minutes", "other engineers' tests", "the seed's figure",
    "expected (seed)", "a seed expectation", "What the seed expects",
])
def test_patterns_catch_build_history(text):
    """Each kind of build history the scan is for is caught."""
    assert findings({"x.md": text})


@pytest.mark.parametrize("text", [
    "seed: 0", "the run's `seed`", "seed=0,1,2", "vLLM `seed` other than the run's",
    "color:#222;", "http://127.0.0.1:5000/#/experiments/1/runs", "&#39;", "aiohttp.ClientSession",
    "PALETTE = ('#1f77b4', '#d62728')", "pooled over seeds", "the course's claim",
])
def test_patterns_leave_ordinary_text(text):
    """Ordinary user text (the seed setting, URL fragments, colours) is not flagged."""
    assert not findings({"x.md": text})


def test_yaml_scan_reads_comments_only():
    """A yaml value is not scanned, its comment is."""
    assert _yaml_comments("seed: 0   # see issue #5\nurl: http://x/#1") == \
        " see issue #5\n"
