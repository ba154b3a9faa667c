"""Generating one batch with the transformers backend: ``generate``'s keyword arguments,
left padding, transformers' loop or the static loop, per-step timestamps and the count of
graphs torch.compile builds while a job runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from pipeline import hardware
from pipeline.backends.hf import speculative as hs
from pipeline.backends.hf import static as hst
from pipeline.backends.hf.config import HFBackendConfig
from pipeline.backends.hf.loading import _DECODERS
from pipeline.config import DecodingConfig
from pipeline.errors import UnsupportedDecoding
from pipeline.measure.timing import Sync, clock
from pipeline.records import Request, RequestRecord


def hf_generate_kwargs(d: DecodingConfig, max_new_tokens: int, fixed_length: bool) -> dict:
    """Keyword arguments for transformers' ``generate``."""
    sample = d.do_sample and d.temperature > 0
    kw: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sample,
        "num_beams": d.num_beams,
        "repetition_penalty": d.repetition_penalty,
        "no_repeat_ngram_size": d.no_repeat_ngram_size,
    }
    if sample:
        # All three always passed (0 / 1.0 = off) so a model's own generation_config
        # defaults (often top_k=50) never leak in; greedy and beam ignore them.
        kw.update(temperature=d.temperature, top_k=d.top_k, top_p=d.top_p)
    if d.num_beams > 1:
        kw["length_penalty"] = d.length_penalty
        kw["early_stopping"] = True
    elif d.length_penalty != 1.0:
        raise UnsupportedDecoding(
            "backend hf: decoding.length_penalty only applies to beam search "
            "(set decoding.num_beams > 1 or leave length_penalty at 1.0)"
        )
    if fixed_length:
        kw["min_new_tokens"] = max_new_tokens
    return kw


class _StepClock:
    """A stopping criterion that never stops: it only timestamps each decoding step.

    transformers calls stopping criteria once per generated position, for greedy, sampling
    and beam search alike (streamers refuse beam search), so step k's time is when token k
    of every sequence in the batch exists.
    """

    def __init__(self, sync: Sync) -> None:
        self.sync = sync
        self.times: list[float] = []
        #: (time, sequence length): an assisted step adds several tokens at once
        self.steps: list[tuple[float, int]] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        t = clock(self.sync)
        self.times.append(t)
        self.steps.append((t, int(input_ids.shape[-1])))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)



class HFGeneration:
    """Batched generation of :class:`~pipeline.backends.hf.HFBackend` (mixed into it; the
    attributes below are set in its ``__init__`` and ``load``)."""

    cfg: HFBackendConfig
    seed: int
    model: Any
    tokenizer: Any
    draft: Any
    device: str
    compile_mode: str
    compile_s: float | None
    compiled_graphs: int
    late_compiled_graphs: int
    graphs_from_disk: int
    decode_loop: str | None
    _calls: int
    _spec_calls: list[dict[str, float]]
    sync: Callable[[], None]

    def _sdpa_context(self) -> Any:
        if self.cfg.attn_implementation != "sdpa_flash":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])

    def generate(
        self, requests: list[Request], decoding: DecodingConfig, max_new_tokens: int = 32,
        fixed_length: bool = False,
    ) -> list[RequestRecord]:
        """Generate one batch (all ``requests`` padded on the left together)."""
        import torch

        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos_ids = self._eos_ids()
        loop = hst.chosen_loop(self.cfg, decoding)
        width = max(len(r.prompt_token_ids) for r in requests)
        if self.cfg.compile and loop == "generate":
            # few distinct shapes -> few recompilations inside the measured phase (the
            # static loop prefills eagerly at the exact length)
            width = -(-width // self.cfg.pad_bucket) * self.cfg.pad_bucket
        input_ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            n = len(r.prompt_token_ids)
            input_ids[i, width - n :] = torch.tensor(r.prompt_token_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        torch.manual_seed(self.seed)
        graphs_before = _compiled_graph_count() if self.cfg.compile else 0
        hits_before = _disk_cache_hits() if self.cfg.compile else 0
        with torch.inference_mode(), self._sdpa_context():
            if loop == "static":
                new, t_start, t_end, times_of = self._static(
                    input_ids, mask, decoding, max_new_tokens, fixed_length, eos_ids, pad_id)
            else:
                new, t_start, t_end, times_of = self._generate(
                    input_ids, mask, decoding, max_new_tokens, fixed_length, eos_ids, pad_id)
        self.decode_loop = loop
        self._calls += 1
        if self.cfg.compile:
            self._count_compilation(_compiled_graph_count() - graphs_before, t_end - t_start)
            self.graphs_from_disk += _disk_cache_hits() - hits_before
        records = []
        for i, r in enumerate(requests):
            ids = _cut_at_eos(new[i].tolist(), eos_ids, keep_all=fixed_length)
            times = times_of(len(ids))
            records.append(RequestRecord(
                index=r.index, prompt=r.prompt,
                text=tok.decode(ids, skip_special_tokens=True),
                prompt_tokens=len(r.prompt_token_ids), output_token_ids=ids,
                t_start=t_start, t_first_token=times[0] if times else None, t_end=t_end,
                token_times=times,
            ))
        return records

    def _generate(self, input_ids: Any, mask: Any, decoding: DecodingConfig,
                  max_new_tokens: int, fixed_length: bool, eos_ids: set[int], pad_id: int
                  ) -> tuple[Any, float, float, Callable[[int], list[float]]]:
        """transformers' ``generate``: (new tokens, start, end, step times of n tokens)."""
        width = input_ids.shape[1]
        kw = hf_generate_kwargs(decoding, max_new_tokens, fixed_length)
        if self.cfg.cache_implementation != "dynamic":
            kw["cache_implementation"] = self.cfg.cache_implementation
        kw.update(hs.generate_kwargs(self.cfg, self.draft))
        step_clock = _StepClock(self.sync)
        speculative = hs.speculation_on(self.cfg)
        counter = hs.ForwardCounter().attach(self.model) if speculative else None
        try:
            t_start = clock(self.sync)
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids), use_cache=self.cfg.use_cache,
                stopping_criteria=[step_clock], **kw,
            )
            t_end = clock(self.sync)
        finally:
            if counter is not None:
                counter.detach()
        if counter is not None:  # warm-up calls included: acceptance is the proposer's
            self._spec_calls.append(hs.step_stats(counter.widths, width, out.shape[1] - width))

        def times_of(n: int) -> list[float]:
            if speculative:  # a step may add several tokens at once
                return hs.step_times(step_clock.steps, width, n)
            return step_clock.times[:n]

        return out[:, width:], t_start, t_end, times_of

    def _static(self, input_ids: Any, mask: Any, decoding: DecodingConfig,
                max_new_tokens: int, fixed_length: bool, eos_ids: set[int], pad_id: int
                ) -> tuple[Any, float, float, Callable[[int], list[float]]]:
        """The static loop (static.py): (new tokens, start, end, step times)."""
        m = self.model
        dec = _DECODERS.get(id(m))
        if dec is None or dec.model is not m:
            # prefill through the class's own (eager) forward; steps through the instance's,
            # which is the compiled one under backend.compile
            dec = _DECODERS[id(m)] = hst.StaticDecoder(
                m, type(m).forward.__get__(m), m.forward,
                graph_steps=self.cfg.compile and self.compile_mode in hardware.CUDA_GRAPH_MODES)
        limit = getattr(m.config, "max_position_embeddings", None)
        new, t_start, times = dec.run(
            input_ids, mask, max_new_tokens=max_new_tokens, decoding=decoding,
            eos_ids=eos_ids, min_new_tokens=max_new_tokens if fixed_length else 0,
            pad_id=pad_id, clock=lambda: clock(self.sync),
            cache_len=hst.cache_length(input_ids.shape[1], max_new_tokens, limit))
        return new, t_start, times[-1], lambda n: times[:n]

    def _count_compilation(self, new_graphs: int, call_s: float) -> None:
        """A call that compiled (a new model, or a new shape for a cached one) costs
        compilation + one generation; the sum is this job's compile_s."""
        if not new_graphs:
            return
        self.compile_s = (self.compile_s or 0.0) + call_s
        self.compiled_graphs += new_graphs
        if self._calls > 1:  # after the warm-up: inside the measured phase
            self.late_compiled_graphs += new_graphs
            hint = (f"prompt lengths within {self.cfg.pad_bucket}-token buckets "
                    "(backend.pad_bucket)" if self.decode_loop == "generate" else
                    f"prompt + output lengths within {hst.CACHE_BUCKET}-position cache buckets")
            print(f"warning: torch.compile built {new_graphs} graph(s) during the "
                  f"measured phase (a new batch shape); its time is in the figures "
                  f"- use equal batch sizes and {hint}", flush=True)


    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for v in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, list | tuple):
                ids.update(int(x) for x in v)
        return ids



def _compiled_graph_count() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _disk_cache_hits() -> int:
    """Graphs inductor loaded from its on-disk FX graph cache so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_hit"])


def _cut_at_eos(ids: list[int], eos_ids: set[int], keep_all: bool) -> list[int]:
    """Output tokens up to and including the first EOS (what follows is padding)."""
    if keep_all:
        return ids
    for j, t in enumerate(ids):
        if t in eos_ids:
            return ids[: j + 1]
    return ids
