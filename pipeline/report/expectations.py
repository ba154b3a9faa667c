"""The seed's expected figures for each optimization, in one small table.

The report puts these beside the measured ratios (scaling with length, prefix caching), so
a reader sees what was expected next to what this machine measured. Nothing here is
measured: it is the claim being checked.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Expectation:
    """An optimization's expected effect.

    ``param`` is the config param that switches it, ``reference`` the value without it (what
    the others are compared against), ``candidates`` the values with it (lower case, as
    MLflow params are compared case-insensitively); ``metrics`` the figures it should move;
    ``length_param``/``max_length``: where set, the figure holds only up to that length.
    """

    name: str
    param: str
    reference: str
    candidates: tuple[str, ...]
    metrics: tuple[str, ...]
    expected: str
    length_param: str | None = None
    max_length: int | None = None

    def holds_at(self, length_param: str | None, length: int | None) -> bool:
        """Whether the expected figure speaks about this length (always, without a bound)."""
        if self.max_length is None:
            return True
        if length_param != self.length_param or length is None:
            return False
        return length <= self.max_length

    @property
    def text(self) -> str:
        """``name: expected`` as the report cites it."""
        return f"{self.name}: {self.expected}"


EXPECTATIONS = (
    Expectation("attention kernels", "backend.attn_implementation", "eager",
                ("sdpa", "flash_attention_2", "flash_attention_3"),
                ("prefill_s_mean", "peak_rss_above_load_bytes"),
                "flash/sdpa 1.5–3x faster depending on sequence length, "
                "20–50% memory savings"),
    Expectation("KV cache", "backend.use_cache", "false", ("true",),
                ("decode_tokens_per_s",), "2–3x faster generation at up to 200 tokens",
                length_param="workload.max_new_tokens", max_length=200),
    Expectation("prefix caching", "backend.enable_prefix_caching", "false", ("true",),
                ("ttft_ms_mean",), "TTFT of later requests in a group lower than the first"),
)
BY_NAME = {e.name: e for e in EXPECTATIONS}


def for_param(param: str) -> Expectation | None:
    """The expectation a config param switches, if any."""
    return next((e for e in EXPECTATIONS if e.param == param), None)
