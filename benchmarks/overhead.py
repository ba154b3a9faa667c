"""Does the pipeline distort what it measures? Bare ``model.generate`` vs the pipeline's
``hf`` job, same prompts and settings, in one process.

    python benchmarks/overhead.py [--batch-size 4] [--new-tokens 32] [--rounds 6]

Rounds alternate bare / pipeline in ABBA order so that drift (thermal, a noisy
neighbour) hits both; medians, because single batches on a shared 2-core VM vary by ±15%.
Prints tokens/s of each, their ratio, and the pipeline job's time breakdown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bare_tokens_per_s(model_dir: str, prompts: list[str], batch_size: int, new_tokens: int
                      ) -> float:
    """The plainest honest loop: load, left-pad, generate fixed-length batches, time it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in prompts]
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.inference_mode():
        enc = tok(batches[0], return_tensors="pt", padding=True, add_special_tokens=False)
        model.generate(**enc, **kw)  # warm-up, untimed, as the pipeline does
        n, t0 = 0, time.perf_counter()
        for b in batches:
            enc = tok(b, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, **kw)
            n += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
        return n / (time.perf_counter() - t0)


def pipeline_job(overrides: list[str], out_dir: Path) -> dict:
    """Run the pipeline's job in this process exactly as run.py would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from pipeline.config import register_configs
    from pipeline.job import run_job

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    job_dir = out_dir / f"job-{time.time_ns()}"
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(job_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    task = cfg.copy()
    with open_dict(task):
        del task["hydra"]
    t0 = time.perf_counter()
    results = run_job(task).to_dict()
    results["job_wall_s"] = time.perf_counter() - t0
    return results


def main() -> int:
    """Alternate bare and pipeline rounds; print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()

    from pipeline.models import preset, resolve_model

    model_dir = resolve_model(preset("smollm2-135m"), ROOT / "outputs" / "cache")
    out = Path(tempfile.mkdtemp(prefix="overhead-"))
    overrides = [f"workload.batch_size={args.batch_size}",
                 f"workload.max_new_tokens={args.new_tokens}", "workload.fixed_length=true",
                 "workload.warmup=1", f"paths.output_dir={out}",
                 f"paths.cache_dir={ROOT / 'outputs' / 'cache'}", "print_table=false",
                 f"tracking.uri=sqlite:///{out}/mlflow.db"]  # a throwaway store
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        prompts = list(compose(config_name="config").workload.prompts)

    bare, piped, jobs = [], [], []
    for r in range(args.rounds):
        # ABBA order: a drift in machine speed within a round favours neither side
        order = ("bare", "pipeline") if r % 2 == 0 else ("pipeline", "bare")
        for side in order:
            if side == "bare":
                bare.append(bare_tokens_per_s(model_dir, prompts, args.batch_size,
                                              args.new_tokens))
            else:
                jobs.append(pipeline_job(overrides, out))
                piped.append(jobs[-1]["metrics"]["output_tokens_per_s"])
        print(f"round {r + 1} ({' then '.join(order)}): bare {bare[-1]:.2f} tok/s, "
              f"pipeline {piped[-1]:.2f} tok/s, ratio {piped[-1] / bare[-1]:.3f}", flush=True)
    b, p = statistics.median(bare), statistics.median(piped)
    paired = [q / c for q, c in zip(piped, bare, strict=True)]
    print(f"\n{len(prompts)} prompts, batch {args.batch_size}, {args.new_tokens} new tokens "
          f"fixed, fp32 sdpa, {args.rounds} rounds (medians)")
    print(f"{'':28}{'tok/s':>10}{'min':>9}{'max':>9}")
    print(f"{'bare model.generate':28}{b:10.2f}{min(bare):9.2f}{max(bare):9.2f}")
    print(f"{'pipeline hf job':28}{p:10.2f}{min(piped):9.2f}{max(piped):9.2f}")
    print(f"{'ratio of medians':28}{p / b:10.3f}")
    print(f"{'median of paired ratios':28}{statistics.median(paired):10.3f}"
          f"{min(paired):9.3f}{max(paired):9.3f}")
    job = jobs[-1]
    m = job["metrics"]
    phases = {k[5:-2]: v for k, v in m.items() if k.startswith("time_") and k.endswith("_s")}
    phases["tracking"] = job.get("time_tracking_s", 0.0)
    total = job["job_wall_s"]
    other = total - sum(phases.values())
    print(f"\njob time breakdown (last round), total {total:.2f} s")
    for k, v in [*phases.items(), ("other (validation, provenance, results.json)", other)]:
        print(f"  {k:44}{v:8.2f} s {100 * v / total:6.1f}%")
    outside = total - sum(phases.get(k, 0.0) for k in ("model_prepare", "load", "generate",
                                                        "scoring"))
    print(f"  {'outside load + generation + scoring':44}{outside:8.2f} s "
          f"{100 * outside / total:6.1f}%  (warm-up {phases.get('warmup', 0):.2f} s of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
