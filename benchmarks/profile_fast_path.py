"""Where a decode step of an HF backend preset spends its time, against the roofline.

    python benchmarks/profile_fast_path.py [--backend hf_fast] [--batch-size 1]
                                           [--new-tokens 64] [--dtype bfloat16]

Loads the packaged model through the pipeline's own HF backend and config (so the preset
is exactly what a job runs), warms up (compiles, for compiled presets), then times one
fixed-length greedy batch three ways: the whole ``generate`` call, the model's forward
calls inside it (a timing wrapper), and the ops inside them (``torch.profiler``). Prints
the split per decode step, the roofline floor for the step, and the top ops.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    """Profile one batch and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="hf_fast", help="a conf/backend preset of the hf kind")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--top", type=int, default=12, help="rows of the op table")
    args = ap.parse_args()

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from pipeline.backends.hf import HFBackend
    from pipeline.config import register_configs, validate
    from pipeline.measure.roofline import DTYPE_BYTES, cached_rates, roofline_tokens_per_s
    from pipeline.models import resolve_model
    from pipeline.workload import make_requests

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"backend={args.backend}", f"model.dtype={args.dtype}"])
    with open_dict(cfg):
        cfg.paths.cache_dir = str(ROOT / "outputs" / "cache")
    spec = validate(cfg)
    if spec.backend.name != "hf":
        print(f"error: --backend={args.backend} is not an hf preset", file=sys.stderr)
        return 2
    cache = Path(spec.paths.cache_dir)
    model_dir = resolve_model(spec.model, cache)
    backend = HFBackend(str(model_dir), spec.model, spec.backend, seed=spec.seed)
    backend.load()
    prompts = (list(spec.workload.prompts) * args.batch_size)[: args.batch_size]
    reqs = make_requests(prompts, backend.tokenizer, use_chat_template=True)
    gen = dict(max_new_tokens=args.new_tokens, fixed_length=True)

    t0 = time.perf_counter()
    backend.generate(reqs, spec.decoding, **gen)
    warm = time.perf_counter() - t0

    # The forward's share comes from the profiler: for compiled models, dynamo's own
    # "Torch-Compiled Region" events (wrapping a compiled forward would change the module
    # and trigger a recompilation); otherwise a record_function around forward.
    compiled = backend.cfg.compile
    inner = backend.model.forward
    if not compiled:
        def marked_forward(*a: object, **kw: object) -> object:
            with torch.profiler.record_function("model.forward"):
                return inner(*a, **kw)

        backend.model.forward = marked_forward
    try:
        t0 = time.perf_counter()
        recs = backend.generate(reqs, spec.decoding, **gen)
        total = time.perf_counter() - t0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            backend.generate(reqs, spec.decoding, **gen)
            profiled = time.perf_counter() - t0
    finally:
        backend.model.forward = inner
    mark = "Torch-Compiled Region" if compiled else "model.forward"
    fwd = sorted((e for e in prof.events() if e.name.startswith(mark)),
                 key=lambda e: e.time_range.start)
    if compiled:  # graph breaks split a forward into regions: keep the outermost ones
        outer, end = [], -1.0
        for e in fwd:
            if e.time_range.start >= end:
                outer.append(e)
                end = e.time_range.end
        fwd = outer
    fwd_s = [e.time_range.elapsed_us() / 1e6 for e in fwd]
    applied = backend.applied_settings()
    steps = len(recs[0].output_token_ids)
    # per step from the profiled call (forward and total under the same profiler), scaled
    # to the unprofiled call's step time
    regions_per_step = max(1, len(fwd_s) // steps)
    prefill = sum(fwd_s[:regions_per_step])
    decode_fwd = sum(fwd_s[regions_per_step:])
    share = decode_fwd / max(1e-9, profiled - prefill)
    decode_step = (total - prefill) / max(1, steps - 1)
    fwd_step = share * decode_step
    rates = cached_rates(cache, "cpu", applied["dtype"])
    params = applied["num_parameters"]
    weight_bytes = params * DTYPE_BYTES[applied["dtype"]]
    roof = roofline_tokens_per_s(params, DTYPE_BYTES[applied["dtype"]], args.batch_size,
                                 rates["bandwidth_bytes_per_s"], rates["matmul_flops_per_s"])
    floor_ms = 1000 * args.batch_size / roof
    print(f"\nbackend={args.backend} dtype={applied['dtype']} batch={args.batch_size} "
          f"new_tokens={steps} threads={applied['torch_threads']} "
          f"compiled={applied['compiled']} (warm-up {warm:.1f} s)")
    print(f"machine: read {rates['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, matmul "
          f"{rates['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s; weights {weight_bytes / 1e6:.0f} MB"
          + ("; BUSY while measured (not cached): rates read low, the floor is too long"
             if rates["busy"] else ""))
    rows = [
        ("whole generate call", 1000 * total, ""),
        ("prefill forward", 1000 * prefill, ""),
        ("decode step (generate)", 1000 * decode_step,
         f"{args.batch_size / decode_step:.1f} tok/s"),
        ("  of which model forward", 1000 * fwd_step, f"{100 * fwd_step / decode_step:.0f}%"),
        ("  of which generate's own work", 1000 * (decode_step - fwd_step),
         f"{100 * (decode_step - fwd_step) / decode_step:.0f}%"),
        ("roofline floor per step", floor_ms, f"{roof:.1f} tok/s"),
        ("forward / floor", fwd_step * 1000 / floor_ms, "x"),
    ]
    print(f"\n{'':34}{'ms':>10}")
    for name, v, note in rows:
        print(f"{name:34}{v:10.2f}  {note}")
    print(f"\ntop {args.top} ops by self CPU time over one generate call "
          f"({steps} steps):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                    max_name_column_width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
