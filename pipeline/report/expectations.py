"""The course's published claims for each optimization, in one small table.

The report puts these beside the measured ratios ("Against the baseline", scaling with
length, prefix caching), so a reader sees what was expected next to what this machine
measured. Nothing here is measured: it is the claim being checked. The figures are the ones
the LLM-inference course states for each optimization, as docs/performance.md quotes them:
KV cache 2–3x, flash/sdpa 1.5–3x, batching 2–4x, vLLM 5–15x over naive HF.
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
    No ``candidates``: every value other than ``reference`` switches it on. ``low``/``high``:
    the expected throughput ratio (this / reference output tok/s), where the course gives one.
    ``reference_params``: what the reference job must also have (naive HF: eager attention,
    no KV cache); ``ignore_prefix``: params under it may differ between the two jobs (the
    engine's own settings when the engine is what changes).
    """

    name: str
    param: str
    reference: str
    candidates: tuple[str, ...]
    metrics: tuple[str, ...]
    expected: str
    length_param: str | None = None
    max_length: int | None = None
    low: float | None = None
    high: float | None = None
    reference_params: tuple[tuple[str, str], ...] = ()
    ignore_prefix: str | None = None

    def switches_on(self, value: object) -> bool:
        """Whether a value of :attr:`param` is one with the optimization."""
        v = str(value).lower()
        return v in self.candidates if self.candidates else v != self.reference

    def is_reference(self, params: dict[str, str]) -> bool:
        """Whether a job with these params is the configuration without the optimization."""
        return (str(params.get(self.param, "")).lower() == self.reference
                and all(str(params.get(k, "")).lower() == v for k, v in self.reference_params))

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
                ("sdpa", "sdpa_flash", "flash_attention_2", "flash_attention_3"),
                ("prefill_s_mean", "peak_rss_above_load_bytes"),
                "flash/sdpa 1.5–3x faster depending on sequence length, "
                "20–50% memory savings", low=1.5, high=3.0),
    Expectation("KV cache", "backend.use_cache", "false", ("true",),
                ("decode_tokens_per_s",), "2–3x faster generation at up to 200 tokens",
                length_param="workload.max_new_tokens", max_length=200, low=2.0, high=3.0),
    Expectation("batching", "workload.batch_size", "1", (), ("output_tokens_per_s",),
                "2–4x throughput over batch 1 (sequential)", low=2.0, high=4.0),
    Expectation("vLLM", "backend.name", "hf", ("vllm", "vllm_server"),
                ("output_tokens_per_s",), "5–15x throughput over naive HF (eager, no KV cache)",
                low=5.0, high=15.0,
                reference_params=(("backend.attn_implementation", "eager"),
                                  ("backend.use_cache", "false")),
                ignore_prefix="backend."),
    Expectation("prefix caching", "backend.enable_prefix_caching", "false", ("true",),
                ("ttft_ms_mean",), "TTFT of later requests in a group lower than the first"),
)
BY_NAME = {e.name: e for e in EXPECTATIONS}


def for_param(param: str) -> Expectation | None:
    """The expectation a config param switches, if any."""
    return next((e for e in EXPECTATIONS if e.param == param), None)
