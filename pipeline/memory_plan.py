"""A job's memory estimate against its card, from the model folder's ``config.json`` alone.

The architecture (layers, hidden size, heads, KV heads, head size, MLP width, vocabulary,
tied embeddings) is read from ``config.json`` (``text_config`` for multimodal wrappers);
no weights are read, nothing is allocated, torch is not imported. ``b`` is the bytes per
value of the dtype (4 float32, 2 float16/bfloat16).

Parameters (decoder-only transformer, the Llama family exactly; biases and norms of other
families are within a fraction of a percent)::

    P = V*h (embeddings) + (0 if tied else V*h) (lm_head) + h (final norm)
        + L * ( h*(H*d) + 2*h*(K*d) + (H*d)*h      attention q, k, v, o
                + m*h*I                            MLP: m = 3 gated (SiLU), 2 plain
                + 2*h )                            two norms

    weights   = P * b
    KV cache  = 2 * L * K * d * b * tokens * sequences
                (tokens: the longest prompt + max_new_tokens; sequences: batch x beams)

HF (``generate`` in this process) needs, at most (the sum is an upper bound: the scorer
runs after generation, while the generating model stays cached)::

    weights + KV cache
    + scorer copy     (P * scorer b, when perplexity is on and the scorer is not the
                       generating model: another dtype, compiled, quantized, random weights
                       or a vLLM backend)
    + activations     (sequences * prompt tokens * (4*h + 2*I) * b for the prefill's hidden
                       states and MLP, + sequences * V * 4 for float32 next-token logits,
                       + sequences * H * prompt^2 * b with eager attention)
    + CUDA context    (0.5 GiB on CUDA: the context and the allocator's slack)

and fits when that is <= the card's memory. vLLM takes ``gpu_memory_utilization`` of the
card for itself and fits when ``weights + the KV cache of one max_model_len sequence``
<= ``gpu_memory_utilization x card``; the perplexity scorer (a transformers copy in
``scoring.scorer_dtype``) must then fit in the rest, ``(1 - gpu_memory_utilization) x card``
less the CUDA context. On the CPU there is no card to check against: the estimate is printed
only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError
from pipeline.hardware import GIB, Decisions, Hardware

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.records import Request

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
CUDA_CONTEXT_BYTES = GIB // 2
#: activations of the families whose MLP is gated (gate, up and down projections)
_GATED_ACTS = ("silu", "swiglu", "swish", "geglu")


def _first(node: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if isinstance(node.get(k), int | float) and not isinstance(node.get(k), bool):
            return node[k]
    return default


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only transformer, as ``config.json`` gives it."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    gated: bool

    @classmethod
    def from_config(cls, cfg: dict) -> Architecture:
        """From a parsed ``config.json`` (GPT-2 and Llama-style key names)."""
        node = cfg.get("text_config") or cfg
        hidden = int(_first(node, "hidden_size", "n_embd", "d_model"))
        heads = int(_first(node, "num_attention_heads", "n_head", "num_heads"))
        act = str(node.get("hidden_act") or node.get("activation_function") or "")
        return cls(
            layers=int(_first(node, "num_hidden_layers", "n_layer", "num_layers")),
            hidden=hidden, heads=heads,
            kv_heads=int(_first(node, "num_key_value_heads", "n_head_kv", default=heads)),
            head_dim=int(_first(node, "head_dim", default=hidden // heads)),
            intermediate=int(_first(node, "intermediate_size", "n_inner", "ffn_dim",
                                    default=4 * hidden)),
            vocab=int(_first(node, "vocab_size", default=0)),
            tied=bool(cfg.get("tie_word_embeddings", node.get("tie_word_embeddings", True))),
            gated=act in _GATED_ACTS)

    def parameters(self) -> int:
        """The parameter count (formula in the module docstring)."""
        h, hd = self.hidden, self.head_dim
        attn = h * self.heads * hd + 2 * h * self.kv_heads * hd + self.heads * hd * h
        mlp = (3 if self.gated else 2) * h * self.intermediate
        per_layer = attn + mlp + 2 * h
        emb = self.vocab * h * (1 if self.tied else 2)
        return emb + h + self.layers * per_layer

    def kv_bytes(self, dtype: str, tokens: int, sequences: int) -> int:
        """KV cache bytes: 2 x layers x kv_heads x head_dim x bytes x tokens x sequences."""
        return (2 * self.layers * self.kv_heads * self.head_dim * DTYPE_BYTES[dtype]
                * tokens * sequences)


def read_architecture(model_dir: str | Path) -> Architecture | None:
    """The architecture in ``model_dir/config.json``; None when there is none to read (a
    hub id outside the local cache) or it is not a decoder shape this formula knows."""
    path = Path(model_dir).expanduser() / "config.json"
    try:
        return Architecture.from_config(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, ZeroDivisionError):
        return None


@dataclass
class MemoryPlan:
    """The estimate's terms (name -> bytes), its budget and whether it fits."""

    items: dict[str, int] = field(default_factory=dict)
    budget: int | None = None
    budget_label: str = ""
    #: a second budget (vLLM: the scorer in the memory vLLM leaves)
    extra_check: tuple[str, int, int] | None = None

    @property
    def total(self) -> int:
        """The bytes the budget is checked against."""
        return sum(v for k, v in self.items.items() if not k.startswith("outside: "))

    @property
    def fits(self) -> bool:
        """Within the budget (always, with no budget: the CPU)."""
        ok = self.budget is None or self.total <= self.budget
        if self.extra_check is not None:
            ok = ok and self.extra_check[1] <= self.extra_check[2]
        return ok

    def line(self) -> str:
        """``memory: 0.27 GB weights + ... = 0.87 GB of 16.1 GB (5%): fits``."""
        terms = " + ".join(f"{_gb(v)} {k}" for k, v in self.items.items()
                           if not k.startswith("outside: "))
        out = f"memory: {terms} = {_gb(self.total)}"
        if self.budget is not None:
            out += (f" of {_gb(self.budget)} {self.budget_label} "
                    f"({100 * self.total / self.budget:.0f}%)")
        if self.extra_check is not None:
            name, need, room = self.extra_check
            out += f"; {name} {_gb(need)} in the {_gb(room)} left"
        return out + (": fits" if self.fits else ": does not fit")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _scorer_is_model(spec: Config, dtype: str, scorer_dtype: str) -> bool:
    """Whether perplexity reuses the generating model (experiment._scorer): an hf backend
    holding the real weights uncompiled, unquantized, in the scorer's dtype."""
    b = spec.backend
    return (hasattr(b, "attn_implementation") and not spec.scoring.scorer_path
            and dtype == scorer_dtype and not b.compile and not b.quantization
            and spec.model.weights == "pretrained")


def plan(spec: Config, decisions: Decisions, arch: Architecture, requests: list[Request]
         ) -> MemoryPlan | None:
    """The job's memory estimate on ``decisions.hardware`` (None for backends that load no
    weights here, e.g. an OpenAI endpoint)."""
    s = decisions.settings
    if "dtype" not in s:
        return None
    hw: Hardware = decisions.hardware
    dtype, b = s["dtype"], DTYPE_BYTES[s["dtype"]]
    w = spec.workload
    params = arch.parameters()
    weights = params * b
    scorer = 0
    scorer_dtype = s.get("scorer_dtype")
    if scorer_dtype and not _scorer_is_model(spec, dtype, scorer_dtype):
        scorer = params * DTYPE_BYTES[scorer_dtype]
    ctx = CUDA_CONTEXT_BYTES if hw.cuda else 0
    if spec.backend.reserves_gpu_share:  # vLLM: its share of the card
        kv = arch.kv_bytes(dtype, spec.backend.max_model_len, 1)
        p = MemoryPlan({"weights": weights, "KV cache (1 x max_model_len)": kv})
        if hw.memory_bytes:
            util = spec.backend.gpu_memory_utilization
            p.budget = int(util * hw.memory_bytes)
            p.budget_label = f"(gpu_memory_utilization {util} of {hw.name})"
            if scorer:
                room = int((1 - util) * hw.memory_bytes) - ctx
                p.extra_check = (f"scorer ({scorer_dtype})", scorer, room)
        return p
    longest = max(len(q.prompt_token_ids) for q in requests)
    new = max((getattr(q, "max_new_tokens", None) or w.max_new_tokens) for q in requests)
    seqs = min(w.batch_size, len(requests)) * max(1, spec.decoding.num_beams)
    items = {"weights": weights}
    if getattr(spec.backend, "use_cache", True):
        items[f"KV cache ({seqs} x {longest + new} tokens)"] = arch.kv_bytes(
            dtype, longest + new, seqs)
    if scorer:
        items[f"scorer ({scorer_dtype})"] = scorer
    act = seqs * longest * (4 * arch.hidden + 2 * arch.intermediate) * b + seqs * arch.vocab * 4
    # eager attention materialises the score matrix; backends without the setting never do
    if getattr(spec.backend, "attn_implementation", None) == "eager":
        act += seqs * arch.heads * (longest + new) ** 2 * b
    items["activations"] = act
    if ctx:
        items["CUDA context"] = ctx
    p = MemoryPlan(items)
    if hw.memory_bytes:
        p.budget, p.budget_label = hw.memory_bytes, f"({hw.name})"
    return p


def check_plan(p: MemoryPlan, hw: Hardware, spec: Config) -> None:
    """Refuse an estimate over its budget in one line, naming the bytes."""
    if p.fits:
        return
    if p.extra_check is not None and p.extra_check[1] > p.extra_check[2] and (
            p.budget is None or p.total <= p.budget):
        name, need, room = p.extra_check
        raise ConfigError(
            f"scoring.perplexity=true does not fit on {hw.describe()}: the {name} needs "
            f"{need:,} bytes ({_gb(need)}) beside vLLM's backend.gpu_memory_utilization="
            f"{spec.backend.gpu_memory_utilization}, which leaves {room:,} bytes; set "
            f"scoring.perplexity=false, a lower gpu_memory_utilization or a smaller "
            f"scoring.scorer_dtype")
    weights_alone = p.items.get("weights", 0) > (p.budget or 0)
    if weights_alone:
        fix = "a card with more memory, a smaller model or a half-precision dtype"
    elif spec.backend.reserves_gpu_share:  # vLLM: one max_model_len sequence's KV
        fix = ("a smaller backend.max_model_len, a higher backend.gpu_memory_utilization, "
               "or a card with more memory")
    else:
        fix = ("a smaller workload.batch_size or shorter lengths, scoring.perplexity=false, "
               "or a card with more memory")
    raise ConfigError(
        f"{'model=' + str(spec.model.path or spec.model.name)} does not fit on "
        f"{hw.describe()}: the estimate is {p.total:,} bytes ({_gb(p.total)}: "
        f"{', '.join(f'{k} {_gb(v)}' for k, v in p.items.items())}) against "
        f"{p.budget:,} bytes {p.budget_label}; use {fix}")
