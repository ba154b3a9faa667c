"""A decode loop for the transformers backend without ``generate``'s per-step Python.

``generate`` spends a large share of each decoding step outside the model on a small model
on CPU (logits processors, stopping criteria, EOS bookkeeping, dynamo's guard checks on a
growing attention mask: 18% of an hf_fast step, docs/performance.md). This loop does what
``generate`` does for greedy and plain sampling, and nothing else:

- **prefill at the exact prompt length**, in eager mode (a compute-bound matmul that eager
  oneDNN runs well; compiling it would cost one graph per prompt length);
- **decode steps of fixed shapes**: a ``StaticCache`` of ``cache_len`` positions, a
  full-length 2-D attention mask filled in place, so every step of every request of a job
  calls the (compiled) forward with the same shapes and one graph serves them all;
- the same token choice as ``generate``: float32 logits, EOS suppressed while
  ``min_new_tokens`` is not reached, temperature -> top-k -> top-p -> ``multinomial`` with
  the same seed, finished rows padded with ``pad_token_id``.

Greedy output equals ``generate``'s token for token in float32 (tests/test_hf_static.py);
in bf16 both are correct and may round differently.

**CUDA graphs** (a compiled step under ``reduce-overhead`` / ``max-autotune``, what
``compile_mode=auto`` picks on CUDA): a replay writes its outputs into the same memory every
time and the cache is a graph input mutated in place. The loop does what transformers does
for its own compiled static-cache decoding: the cache's tensors are fixed addresses
(``torch._dynamo.mark_static_address``, as transformers' ``StaticLayer`` tags them when it
allocates them), each step's logits are copied out of the graph's memory before the next
replay, and ``torch.compiler.cudagraph_mark_step_begin()`` starts each step, so a replay
never overwrites a tensor still in use. On the CPU no graph is captured and the tokens are
the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import Config, DecodingConfig

DECODE_LOOPS = ("generate", "static", "auto")
#: static caches are allocated in multiples of this many positions, so that jobs whose
#: prompt + output lengths differ a little share one decode graph; small, because every
#: decode step attends over the whole cache (at batch 8, 64 new tokens, bf16 on a 2-core
#: CPU: attention was 42% of an eager step over 256 positions, 17% over the ~80 used)
CACHE_BUCKET = 64


def unsupported(decoding: DecodingConfig, backend: Any) -> str | None:
    """Why the static loop cannot run this job (None when it can): what it lacks, named by
    the key that asks for it."""
    if decoding.num_beams > 1:
        return f"decoding.num_beams={decoding.num_beams} (beam search)"
    if decoding.repetition_penalty != 1.0:
        return f"decoding.repetition_penalty={decoding.repetition_penalty}"
    if decoding.no_repeat_ngram_size:
        return f"decoding.no_repeat_ngram_size={decoding.no_repeat_ngram_size}"
    if not backend.use_cache:
        return "backend.use_cache=false"
    if backend.cache_implementation != "static":
        return f"backend.cache_implementation={backend.cache_implementation!r}"
    if backend.prompt_lookup_num_tokens or backend.draft_model:
        return "speculative decoding (backend.prompt_lookup_num_tokens / draft_model)"
    return None


def check_decode_loop(spec: Config) -> None:
    """Refuse ``backend.decode_loop=static`` for a job it cannot run, before loading
    (``auto`` falls back to ``generate`` instead, and the job records which loop ran)."""
    b = spec.backend
    if b.decode_loop != "static":
        return
    why = unsupported(spec.decoding, b)
    if why:
        raise ConfigError(
            f"backend.decode_loop='static' is invalid with {why}: the static loop runs greedy "
            "and temperature/top-k/top-p sampling over backend.cache_implementation=static; "
            "use backend.decode_loop=auto (falls back to generate) or generate")


def chosen_loop(cfg: Any, decoding: DecodingConfig) -> str:
    """The loop a job runs: ``static`` or ``generate``."""
    if cfg.decode_loop == "generate":
        return "generate"
    return "generate" if unsupported(decoding, cfg) else "static"


def cache_length(prompt_width: int, max_new_tokens: int, limit: int | None) -> int:
    """Static cache positions for a batch: prompt + output rounded up to ``CACHE_BUCKET``,
    never beyond the model's context (``limit``)."""
    need = prompt_width + max_new_tokens
    size = -(-need // CACHE_BUCKET) * CACHE_BUCKET
    return max(need, min(size, limit)) if limit else size


def _warp(scores: Any, d: DecodingConfig) -> Any:
    """temperature, top-k, top-p on float32 scores, in transformers' order and with its
    rules (top-p drops tokens whose cumulative probability is <= 1 - top_p, keeping one)."""
    import torch

    if d.temperature != 1.0:
        scores = scores / d.temperature
    if d.top_k and d.top_k > 0:
        k = min(d.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if d.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= (1 - d.top_p)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


class StaticDecoder:
    """Greedy / sampling decode over a static cache; one cache kept per (batch, length),
    reused (reset) across calls so a compiled forward sees the same buffers."""

    def __init__(self, model: Any, eager_forward: Callable[..., Any],
                 step_forward: Callable[..., Any], graph_steps: bool = False) -> None:
        self.model = model
        self.eager_forward = eager_forward
        self.step_forward = step_forward
        #: the step forward is compiled in a mode that captures CUDA graphs (replays
        #: overwrite their outputs; the loop marks steps and copies logits out)
        self.graph_steps = graph_steps
        self._caches: dict[tuple[int, int], Any] = {}

    def _cache(self, batch: int, length: int) -> Any:
        from transformers import StaticCache

        key = (batch, length)
        if key not in self._caches:
            self._caches.clear()  # one at a time: a cache is batch x layers x length x dim
            self._caches[key] = StaticCache(config=self.model.config, max_cache_len=length)
        cache = self._caches[key]
        cache.reset()
        return cache

    def run(self, input_ids: Any, prompt_mask: Any, *, max_new_tokens: int,
            decoding: DecodingConfig, eos_ids: set[int], min_new_tokens: int, pad_id: int,
            cache_len: int, clock: Callable[[], float]) -> tuple[Any, float, list[float]]:
        """Generate up to ``max_new_tokens`` for left-padded ``input_ids``; returns the new
        tokens (batch x steps), the start time and each step's time (the time token k of
        every row exists)."""
        import torch

        batch, width = input_ids.shape
        dev = input_ids.device
        cache = self._cache(batch, cache_len)
        mask = torch.zeros((batch, cache_len), dtype=prompt_mask.dtype, device=dev)
        mask[:, :width] = prompt_mask
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        eos = torch.tensor(sorted(eos_ids), device=dev) if eos_ids else None
        sample = decoding.do_sample and decoding.temperature > 0
        finished = torch.zeros(batch, dtype=torch.bool, device=dev)
        tokens: list[Any] = []
        times: list[float] = []
        t_start = clock()
        logits = self._last(self.eager_forward(input_ids=input_ids, attention_mask=mask,
                                               position_ids=positions, past_key_values=cache,
                                               use_cache=True))
        if self.graph_steps:  # allocated by the prefill (eager): fixed addresses from here
            static_addresses(cache)
        pos = positions[:, -1:]
        for k in range(max_new_tokens):
            scores = logits
            if eos is not None and k < min_new_tokens:
                scores[:, eos] = float("-inf")
            if sample:
                probs = _warp(scores, decoding).softmax(-1)
                nxt = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                nxt = scores.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            tokens.append(nxt)
            times.append(clock())
            if eos is not None:
                finished |= torch.isin(nxt, eos)
                if bool(finished.all()):
                    break
            if k + 1 == max_new_tokens:
                break
            pos = pos + 1
            mask[:, width + k] = 1
            if self.graph_steps:
                # a new step: the previous replay's outputs were copied out (``_last``), so
                # cudagraph trees may overwrite them now
                torch.compiler.cudagraph_mark_step_begin()
            logits = self._last(self.step_forward(input_ids=nxt[:, None], attention_mask=mask,
                                                  position_ids=pos, past_key_values=cache,
                                                  use_cache=True))
        return torch.stack(tokens, 1), t_start, times

    def _last(self, out: Any) -> Any:
        """The last position's logits in float32 (what ``generate`` scores), copied out of
        a CUDA graph's output memory when steps are graphs (the next replay overwrites it);
        otherwise copied only where the dtype changes, as before."""
        import torch

        return out.logits[:, -1].to(dtype=torch.float32, copy=self.graph_steps)


def static_addresses(cache: Any) -> int:
    """Tag every allocated tensor of a static cache (keys, values, the position counter) as
    a fixed address for torch.compile/CUDA graphs, as transformers' ``StaticLayer`` does when
    it allocates them, so that a graph mutating them in place is captured and replayed
    rather than skipped; returns how many tensors are tagged. Idempotent."""
    import torch

    n = 0
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values", "cumulative_length"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                if getattr(t, "_dynamo_static_input_type", None) is None:
                    torch._dynamo.mark_static_address(t)
                n += 1
    return n
