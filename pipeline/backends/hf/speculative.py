"""Speculative decoding for the transformers backend: prompt lookup and a draft model.

transformers calls both "assisted generation": a cheap proposer (n-grams copied from the
prompt, or a small draft model) suggests K tokens, the target model scores them in one
forward pass and keeps the longest prefix it agrees with plus one token of its own. Under
greedy decoding the output is, up to floating-point rounding of the wider verification
matmuls, the target model's own greedy output; the gain is fewer target forward passes.

transformers 5.19 refuses (``generation/utils.py``, ``_assisted_decoding``): batch size > 1
("assisted generate is only supported for batch_size = 1"), ``use_cache=False``, a static
cache, and beam search (assisted generation is a greedy/sampling mode). This module refuses
the same combinations before anything loads, with the key to change.

What a job can read back: the target model's forward calls during ``generate`` (a forward
pre-hook), and the width of each call's input (1 + the candidates being verified), hence
tokens per target step, proposed and accepted candidates, and the acceptance rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError, UnsupportedDecoding

if TYPE_CHECKING:
    from pipeline.config import Config


def speculation_on(cfg: Any) -> bool:
    """Whether ``backend.*`` asks for speculative decoding (0 / null = off)."""
    return bool(getattr(cfg, "prompt_lookup_num_tokens", None)) or bool(
        getattr(cfg, "draft_model", None))


def validate_speculative(cfg: Any) -> None:
    """Range checks of the speculative keys; no model, no heavy import."""
    k = cfg.prompt_lookup_num_tokens
    if k is not None and k < 0:
        raise ConfigError(f"backend.prompt_lookup_num_tokens={k!r} is invalid: must be >= 0 "
                          "(0 or null = off)")
    if k and cfg.draft_model:
        raise ConfigError(
            f"backend.draft_model={cfg.draft_model!r} is invalid together with "
            f"backend.prompt_lookup_num_tokens={k}: transformers uses one proposer at a time; "
            "set one of them to null")
    if cfg.draft_model:
        path = Path(str(cfg.draft_model)).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"backend.draft_model={cfg.draft_model!r} is invalid: a local model folder "
                "(config.json + weights) is required; hub ids are not downloaded by this "
                "pipeline (fetch it first, e.g. `hf download ID --local-dir DIR`, and pass DIR)")
        if not (path / "config.json").is_file():
            raise ConfigError(f"backend.draft_model={cfg.draft_model!r} is invalid: "
                              f"{path / 'config.json'} does not exist")


def check_speculative(spec: Config) -> None:
    """Refuse what transformers' assisted generation cannot do, before loading."""
    b = spec.backend
    if not speculation_on(b):
        return
    what = (f"backend.prompt_lookup_num_tokens={b.prompt_lookup_num_tokens}"
            if b.prompt_lookup_num_tokens else f"backend.draft_model={b.draft_model!r}")
    if spec.decoding.num_beams > 1:
        raise UnsupportedDecoding(
            f"backend hf: {what} is invalid with decoding.num_beams={spec.decoding.num_beams}: "
            "transformers' assisted generation is greedy or sampling only; use decoding=greedy "
            "or set the speculative key to null")
    if spec.workload.batch_size > 1:
        raise ConfigError(
            f"backend hf: {what} is invalid with workload.batch_size="
            f"{spec.workload.batch_size}: transformers 5.19 runs assisted generation at batch "
            "size 1 only; use workload.batch_size=1 (or backend=vllm, which batches ngram "
            "speculation)")
    if not b.use_cache or b.cache_implementation != "dynamic":
        raise ConfigError(
            f"backend hf: {what} needs backend.use_cache=true and "
            f"backend.cache_implementation=dynamic (transformers refuses assisted generation "
            f"without a cache or with a static one); got use_cache={b.use_cache}, "
            f"cache_implementation={b.cache_implementation!r}")
    if b.compile:
        raise ConfigError(
            f"backend hf: {what} is invalid with backend.compile=true: verification passes have "
            "a different width every step (1 + accepted candidates), each a new shape to "
            "compile; use backend.compile=false")


def generate_kwargs(cfg: Any, draft: Any) -> dict[str, Any]:
    """The extra ``generate`` keyword arguments for the configured proposer."""
    if cfg.prompt_lookup_num_tokens:
        return {"prompt_lookup_num_tokens": int(cfg.prompt_lookup_num_tokens)}
    if draft is not None:
        return {"assistant_model": draft}
    return {}


# (folder, dtype, device) -> the draft model; one kept, like the target model cache
_DRAFTS: dict[tuple, Any] = {}


def load_draft(path: str, dtype: Any, device: str, attn: str) -> Any:
    """The draft model from a local folder, in the target's dtype and device (transformers
    feeds it the target's token ids, so both must share a tokenizer)."""
    from transformers import AutoModelForCausalLM

    key = (str(Path(path).expanduser().resolve()), str(dtype), device, attn)
    if key not in _DRAFTS:
        _DRAFTS.clear()
        m = AutoModelForCausalLM.from_pretrained(key[0], dtype=dtype, attn_implementation=attn)
        _DRAFTS[key] = m.to(device).eval()
    return _DRAFTS[key]


def clear_drafts() -> None:
    """Forget the cached draft model (the backend's ``shutdown_cached`` calls it)."""
    _DRAFTS.clear()


@dataclass
class ForwardCounter:
    """Counts a model's forward calls and the width of each call's input.

    Installed as a forward pre-hook for the duration of one ``generate``; with a KV cache a
    verification pass takes 1 + (candidates) new positions, the first pass the whole prompt
    plus its candidates.
    """

    widths: list[int] = field(default_factory=list)
    handle: Any = None

    def hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.widths.append(int(ids.shape[1]) if ids is not None else 1)

    def attach(self, model: Any) -> ForwardCounter:
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def step_stats(widths: list[int], prompt_width: int, new_tokens: int) -> dict[str, float]:
    """Speculation figures of one generate call from the target's forward input widths.

    Each target pass verifies ``c`` candidates (input width ``c + 1`` after the first pass,
    ``prompt_width + c`` for the first) and yields the accepted ones plus one of its own, so
    ``accepted = new_tokens - passes`` and ``proposed = sum(c)``. A pass at the length limit
    may verify candidates it then discards: the figures are what the target computed.
    """
    passes = len(widths)
    if passes == 0 or new_tokens <= 0:
        return {}
    proposed = max(widths[0] - prompt_width, 0) + sum(max(w - 1, 0) for w in widths[1:])
    accepted = max(new_tokens - passes, 0)
    return {
        "target_forward_passes": float(passes),
        "proposed_tokens": float(proposed),
        "accepted_tokens": float(accepted),
    }


def summarize(calls: list[dict[str, float]], k: int | None) -> dict[str, float]:
    """Job-level speculation metrics from the per-call figures of :func:`step_stats`.

    ``spec_tokens_per_target_step``: generated tokens per target forward pass (1.0 = no gain;
    at most K + 1); ``spec_acceptance_rate``: accepted / proposed candidates;
    ``spec_mean_accepted_tokens``: accepted candidates per verification pass;
    ``spec_acceptance_rate_of_k`` (prompt lookup, fixed K): (tokens per step - 1) / K.
    """
    passes = sum(c.get("target_forward_passes", 0.0) for c in calls)
    if not passes:
        return {}
    proposed = sum(c.get("proposed_tokens", 0.0) for c in calls)
    accepted = sum(c.get("accepted_tokens", 0.0) for c in calls)
    tokens = accepted + passes
    out = {
        "spec_target_forward_passes": passes,
        "spec_proposed_tokens": proposed,
        "spec_accepted_tokens": accepted,
        "spec_tokens_per_target_step": tokens / passes,
        "spec_mean_accepted_tokens": accepted / passes,
    }
    if proposed:
        out["spec_acceptance_rate"] = accepted / proposed
    if k:
        out["spec_acceptance_rate_of_k"] = (tokens / passes - 1.0) / k
    return out


def step_times(calls: list[tuple[float, int]], prompt_width: int, n_tokens: int
               ) -> list[float]:
    """Per-token times from (time, sequence length) pairs taken once per decoding step.

    Plain decoding adds one token per step; an assisted step adds several at once, which
    all exist at that step's time.
    """
    times: list[float] = []
    for t, length in calls:
        while len(times) < min(length - prompt_width, n_tokens):
            times.append(t)
    return times[:n_tokens]
