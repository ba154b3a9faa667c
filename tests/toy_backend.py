"""A minimal backend, written the way a new contributor adds one: this module plus one
yaml (tests/conf/backend/toy.yaml), and no other file of the pipeline touched.

It "generates" by echoing the prompt's last tokens, so its records are checkable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pipeline.backends.base import Backend, BackendConfig, task
from pipeline.errors import UnsupportedDecoding
from pipeline.records import Request, RequestRecord


@dataclass
class ToyConfig(BackendConfig):
    """The toy's own settings."""

    name: str = "toy"
    impl: str = "tests.toy_backend:ToyBackend"
    echo_offset: int = 0


class ToyBackend(Backend):
    """Echoes prompt tokens back; refuses beam search."""

    name = "toy"
    config_class = ToyConfig
    #: every field is declared for the gate: the offset changes what is "generated"
    settings = {"echo_offset": task()}

    def __init__(self, model_dir: str, model: Any, cfg: ToyConfig, seed: int) -> None:
        self.cfg = cfg
        self.loaded = False

    @classmethod
    def check(cls, spec: Any) -> None:
        if spec.decoding.num_beams > 1:
            raise UnsupportedDecoding("backend toy: decoding.num_beams is not supported; "
                                      "use decoding=greedy")

    @classmethod
    def gpus_needed(cls, spec: Any) -> int:
        return 0

    def load(self) -> None:
        self.loaded = True

    def generate(self, requests: list[Request], decoding: Any, max_new_tokens: int,
                 fixed_length: bool) -> list[RequestRecord]:
        out = []
        for r in requests:
            t0 = time.perf_counter()
            ids = list(r.prompt_token_ids[self.cfg.echo_offset:])[:max_new_tokens]
            times = [time.perf_counter() for _ in ids]
            out.append(RequestRecord(
                index=r.index, prompt=r.prompt, text=" ".join(map(str, ids)),
                prompt_tokens=len(r.prompt_token_ids), output_token_ids=ids, t_start=t0,
                t_first_token=times[0] if times else None, t_end=time.perf_counter(),
                token_times=times))
        return out

    def applied_settings(self) -> dict[str, Any]:
        return {"echo_offset": self.cfg.echo_offset, "loaded": self.loaded}
