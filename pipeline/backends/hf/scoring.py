"""Scoring with the transformers backend's loaded model: lending it to the perplexity
scorer, and teacher-forced next-token log-probabilities for the gate."""

from __future__ import annotations

from typing import Any

from pipeline.backends.hf.config import HFBackendConfig
from pipeline.config import ModelConfig


class HFScoring:
    """The scoring methods of :class:`~pipeline.backends.hf.HFBackend` (mixed into it; the
    attributes below are set in its ``__init__`` and ``load``)."""

    cfg: HFBackendConfig
    model_cfg: ModelConfig
    model: Any
    device: str

    def scorer_model(self, dtype: Any) -> Any | None:
        """The loaded model, when it holds the real weights in ``dtype`` and is not
        compiled (a compiled forward would recompile for the scorer's shapes) and not
        quantized (perplexity is scored with the real weights)."""
        m = self.model
        if (m is None or self.cfg.compile or self.model_cfg.weights != "pretrained"
                or self.cfg.quantization
                or next(m.parameters()).dtype != dtype):
            return None
        return m

    def next_token_logprobs(self, prompt_ids: list[int], cont_ids: list[int]) -> Any:
        """Log-softmax (float32, on the CPU) of the next-token distribution at each position
        of ``cont_ids``, teacher-forced on prompt + continuation: one unpadded sequence, no
        cache, through this job's model as loaded (dtype, attention, quantization, compiled
        forward). The gate (``pipeline/gate.py``) compares two settings' answers."""
        import torch

        ids = torch.tensor([list(prompt_ids) + list(cont_ids)], device=self.device)
        with torch.inference_mode(), self._sdpa_context():
            logits = self.model(input_ids=ids, use_cache=False).logits
        n = len(prompt_ids)
        return torch.log_softmax(logits[0, n - 1 : n - 1 + len(cont_ids)].float(), -1).cpu()

