"""Write the shipped sample trace, pipeline/workload/traces/mooncake_sample.jsonl.

A small request trace in Mooncake's format (one JSON object a line: ``timestamp`` in ms,
``input_length``, ``output_length``, ``hash_ids``: one id per 512-token block), drawn from a
seeded model of the published trace's shape, scaled down to a 135M model with a 2048-token
context on 2 CPU cores. No line comes from a real trace. The figures it follows:

- Mooncake's README (FAST25-release/README.md): "up to 50% cache hit ratio": here the
  blocks are laid out so that an unbounded prefix cache could serve about half of all
  prompt tokens (the script prints the exact share);
- the README's example lines: requests open with a run of blocks another request already
  sent (a shared system prompt or conversation history, e.g. ``[46, ..., 57, 2353, 2354]``
  and ``[46, ..., 57, 2366]``), then blocks of their own; ids are consecutive integers in
  order of first use; several requests can share one millisecond;
- the technical report (arXiv 2407.00079, section 4): long inputs, short outputs (means of
  7,590 and 182 tokens) at about 6.6 requests/s (23,608 requests in one hour).

Scaled: inputs 64-1024 tokens (at most two blocks, so a shared prefix is one full block),
outputs 8-64 (long-tailed, median about 16), 40 requests over about 20 s (2 requests/s).

    python benchmarks/make_sample_trace.py            # rewrites the shipped file
    python benchmarks/make_sample_trace.py --out x.jsonl --seed 2
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

BLOCK = 512
SHIPPED = Path(__file__).resolve().parent.parent / "pipeline/workload/traces/mooncake_sample.jsonl"


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(rng.lognormvariate(math.log(median), sigma))))


def make_trace(seed: int = 1, n: int = 40, rate: float = 2.0, prefixes: int = 4,
               share: float = 0.7) -> list[dict]:
    """``n`` requests at Poisson arrivals of ``rate``/s (a fifth in the same millisecond as
    the one before). A share ``share`` of them opens with one of ``prefixes`` shared
    512-token blocks, then up to 512 tokens of its own; the rest are single requests of
    64-1024 tokens with blocks of their own."""
    rng = random.Random(seed)
    next_id = 0
    shared: list[int] = []
    rows: list[dict] = []
    t = 0.0
    for i in range(n):
        if i and rng.random() >= 0.2:
            t += rng.expovariate(rate) * 1000.0
        if rng.random() < share:
            if len(shared) < prefixes and (not shared or rng.random() < 0.3):
                shared.append(next_id)
                next_id += 1
            own = _lognormal(rng, 160, 0.8, 16, BLOCK)
            n_in, head = BLOCK + own, [rng.choice(shared)]
        else:
            n_in, head = _lognormal(rng, 300, 0.7, 64, 2 * BLOCK), []
        n_blocks = -(-n_in // BLOCK)
        own_ids = list(range(next_id, next_id + n_blocks - len(head)))
        next_id += len(own_ids)
        rows.append({"timestamp": int(t), "input_length": n_in,
                     "output_length": _lognormal(rng, 16, 0.6, 8, 64),
                     "hash_ids": head + own_ids})
    return rows


def reusable_tokens(rows: list[dict]) -> int:
    """Prompt tokens an unbounded prefix cache could serve: per request, the longest
    prefix (in tokens) it shares with an earlier request under the block rule."""
    total = 0
    for i, r in enumerate(rows):
        best = 0
        for e in rows[:i]:
            k, n = 0, 0
            while (k < len(r["hash_ids"]) and k < len(e["hash_ids"])
                   and r["hash_ids"][k] == e["hash_ids"][k]):
                n += min(BLOCK, r["input_length"] - k * BLOCK, e["input_length"] - k * BLOCK)
                if n < (k + 1) * BLOCK:  # a partial block ends the shared run
                    break
                k += 1
            best = max(best, n)
        total += best
    return total


def render(rows: list[dict]) -> str:
    """The trace as JSON lines, keys in Mooncake's order."""
    return "".join(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=SHIPPED)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rows = make_trace(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows))
    inputs = sum(r["input_length"] for r in rows)
    print(f"wrote {args.out}: {len(rows)} requests over {rows[-1]['timestamp'] / 1000:.1f} s, "
          f"inputs {min(r['input_length'] for r in rows)}-"
          f"{max(r['input_length'] for r in rows)} tokens (mean {inputs / len(rows):.0f}), "
          f"outputs {min(r['output_length'] for r in rows)}-"
          f"{max(r['output_length'] for r in rows)}, prefix-cache hit ratio "
          f"{reusable_tokens(rows) / inputs:.0%} of prompt tokens")


if __name__ == "__main__":
    main()
