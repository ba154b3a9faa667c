"""The ``llamacpp`` backend: llama.cpp's OpenAI-compatible server, started by the pipeline
on 127.0.0.1 on the model's GGUF file (:mod:`~pipeline.backends.llamacpp.server_process`),
benchmarked by the same streaming client as any OpenAI-compatible endpoint.

It is the ``vllm_server`` backend with another server behind it: the server process is
started, health-checked, logged, shared by the jobs of a sweep and reaped exactly as the
vLLM server is (:class:`~pipeline.backends.vllm.server.VLLMServerBackend`, whose
per-process cache it shares, so that at most one idle server of either kind holds the
cores). What differs is here: the GGUF the model axis names, the server's parameters, and
the request body in llama.cpp's terms (its sampler fields and order, so that sampling means
what it means for hf and vLLM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.adapters import adapter_dir
from pipeline.backends.llamacpp.config import (
    LLAMACPP_INHERENT,
    LLAMACPP_SETTINGS,
    LlamaCppBackendConfig,
    validate_llamacpp_settings,
)
from pipeline.backends.llamacpp.gguf_convert import converted_gguf, read_config
from pipeline.backends.llamacpp.server_process import server_params
from pipeline.backends.openai import OpenAIBackend, openai_body
from pipeline.backends.vllm.server import VLLMServerBackend, _job_dir
from pipeline.backends.vllm.server_process import SERVERS
from pipeline.config import ModelConfig, looks_local
from pipeline.errors import ConfigError, UnsupportedDecoding
from pipeline.records import Request
from pipeline.serving.http_json import http_get_json
from pipeline.workload.limits import check_requests_fit

if TYPE_CHECKING:
    from pipeline.config import Config

#: the project root, put on the server child's PYTHONPATH so that ``-m`` finds its module
#: whatever directory run.py runs in
ROOT = Path(__file__).resolve().parents[3]

#: llama.cpp's sampler chain for every request: penalties, then temperature, then top-k and
#: top-p, the order transformers and vLLM apply them in (llama.cpp's default order puts the
#: temperature last, which changes what top-p keeps)
SAMPLERS = ["penalties", "temperature", "top_k", "top_p"]

#: llama.cpp's other samplers, switched off in every request: its defaults (min_p=0.05,
#: DRY, XTC...) would otherwise filter what hf and vLLM sample from
SAMPLERS_OFF: dict[str, Any] = {
    "min_p": 0.0, "typical_p": 1.0, "top_n_sigma": -1.0, "xtc_probability": 0.0,
    "dry_multiplier": 0.0, "mirostat": 0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
}


def gguf_path(m: ModelConfig) -> Path | None:
    """The GGUF file llama.cpp runs as it is for model ``m``: the packaged model's own file,
    else ``model.gguf_file``; None for an HF folder without one (converted at load,
    :func:`~pipeline.backends.llamacpp.gguf_convert.converted_gguf`)."""
    if m.source == "packaged":
        from pipeline.models import packaged_gguf

        return packaged_gguf(m)
    if not m.gguf_file:
        return None
    path = Path(m.gguf_file).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"model.gguf_file={m.gguf_file!r} is invalid: no such file")
    return path


def check_conversion(spec: Config) -> None:
    """What can be known before loading about the GGUF a job runs: ``backend.gguf_type``
    only where a folder is converted; a folder that converts (config.json of a llama
    model, safetensors, a BPE tokenizer.json); no ``api=chat`` on a converted GGUF (it has
    no pre-tokenizer name, so text would be split by llama.cpp's default)."""
    m, b = spec.model, spec.backend
    if gguf_path(m) is not None:
        if b.gguf_type is not None:
            where = "the packaged model's GGUF" if m.source == "packaged" else "model.gguf_file"
            raise ConfigError(
                f"backend.gguf_type={b.gguf_type!r} is invalid with {where}: that GGUF runs "
                f"as it is; set backend.gguf_type=null, or use model=hf model.path=FOLDER to "
                f"convert a folder")
        return
    assert m.path
    if not looks_local(m.path):
        raise ConfigError(
            f"model.path={m.path!r} is invalid for backend=llamacpp: a hub id is not "
            f"converted to GGUF; use a local folder or set model.gguf_file")
    if adapter_dir(m) is None:  # an adapter's merged folder is checked when it exists
        read_config(Path(m.path).expanduser().resolve())
    if b.api == "chat":
        raise ConfigError(
            "backend.api='chat' is invalid for backend=llamacpp on an HF folder converted "
            "to GGUF: the file names no pre-tokenizer, so the server would split the text "
            "with its default one; use backend.api=completion or completions (token ids)")


class LlamaCppBackend(VLLMServerBackend):
    """Starts (or reuses) a local llama.cpp server on the model's GGUF, then streams to it
    with prompts sent as token ids, llama.cpp's sampler fields and ``ignore_eos`` for
    ``workload.fixed_length``."""

    name = "llamacpp"
    config_class = LlamaCppBackendConfig  # type: ignore[assignment]
    settings = LLAMACPP_SETTINGS
    inherent_optimizations = LLAMACPP_INHERENT

    def __init__(self, model_dir: str, model: ModelConfig, cfg: LlamaCppBackendConfig,
                 seed: int) -> None:
        super().__init__(model_dir, model, cfg, seed)  # type: ignore[arg-type]
        self._gguf: Path | None = None
        self._convert_s = 0.0
        # llama.cpp's own /completion takes the OpenAI completions body (its parser is
        # shared) and streams each chunk's token ids (return_tokens)
        self.native = cfg.api == "completion"
        if self.native:
            self.api = "completions"

    # ------------------------------------------------------------------ plug-in points

    @classmethod
    def validate_settings(cls, cfg: LlamaCppBackendConfig) -> None:  # type: ignore[override]
        """Range and choice checks of ``backend.*``."""
        validate_llamacpp_settings(cfg)

    @classmethod
    def check(cls, spec: Config) -> None:
        """Refuse before starting anything: beam search, decoding options llama.cpp's
        request has no field for, random weights, a model without a GGUF, CUDA without
        offloaded layers."""
        d, w = spec.decoding, spec.workload
        if d.num_beams > 1:
            raise UnsupportedDecoding.option(
                cls.name, "num_beams", d.num_beams,
                "llama.cpp's server has no beam search; use backend=hf or backend=vllm")
        # the same refusals as every OpenAI-compatible server with vLLM's extra fields,
        # each of which is mapped to llama.cpp's (see _payload)
        openai_body(d, w.max_new_tokens, w.fixed_length, spec.seed,
                    "chat" if spec.backend.api == "chat" else "completions",
                    extensions=True, backend=cls.name)
        m = spec.model
        if m.weights != "pretrained":
            raise ConfigError(f"model.weights={m.weights!r} is invalid for backend=llamacpp: "
                              f"it runs the GGUF's weights; use model.weights=pretrained")
        check_conversion(spec)
        if m.device == "cuda" and spec.backend.n_gpu_layers == 0:
            raise ConfigError(
                "model.device='cuda' is invalid for backend=llamacpp with "
                "backend.n_gpu_layers=0: nothing would run on the GPU; set "
                "backend.n_gpu_layers=-1 (a GPU build of llama.cpp) or model.device=cpu")

    @classmethod
    def gpus_needed(cls, spec: Config) -> int:
        """A GPU when layers are offloaded on CUDA or the perplexity scorer runs."""
        offload = spec.backend.n_gpu_layers != 0 and str(spec.model.device) != "cpu"
        return 1 if offload or spec.scoring.perplexity else 0

    @classmethod
    def cached_engines(cls) -> int:
        """llama.cpp servers of this process not stopped yet."""
        return sum(s.key[:1] == (cls.name,) for s in SERVERS.live())

    # ------------------------------------------------------------------ life cycle

    def gguf_file(self) -> Path:
        """The GGUF the server runs; an HF folder is converted here (once per folder
        content and type, then cached), never in ``check``."""
        if self._gguf is None:
            self._gguf = gguf_path(self.model_cfg)
            if self._gguf is None:
                self._gguf, self._convert_s = converted_gguf(
                    Path(self.model_dir), self.server_cfg.gguf_type or "F16",
                    Path(self.server_cfg.gguf_dir))
        return self._gguf

    def server_command(self, port: int) -> list[str]:
        """The server child's command line (its parameters as one JSON argument)."""
        params = server_params(self.server_cfg, str(self.gguf_file()), port,
                               self.model_cfg.name)
        return [sys.executable, "-m", "pipeline.backends.llamacpp.server_process",
                "--params", json.dumps(params)]

    def _key(self) -> tuple:
        """Every setting that shapes a started server (the per-request ones do not)."""
        c = dataclasses.asdict(self.server_cfg)
        for per_request in ("seed", "api", "startup_timeout_s", "log_dir", "gguf_type",
                            "gguf_dir"):  # the GGUF's path below says both
            c.pop(per_request)
        return (self.name, str(self.gguf_file()), self.model_cfg.name,
                tuple(sorted(c.items())))

    def load(self) -> None:
        """Reuse the server started for these settings or start one (stopping idle
        servers with other settings), then check it like any endpoint."""
        self._job_dir = _job_dir()
        key = self._key()
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        server, self._reused = SERVERS.take(key, lambda: self._start(key, {"PYTHONPATH": path}))
        self._log_offset = server.log_size() if self._reused else 0
        self.server = server
        self.base_url = server.base_url
        OpenAIBackend.load(self)
        self._read_server_info()

    server_backend, server_engine = "llamacpp", "llama.cpp"

    def _prepare_device(self) -> None:
        """Nothing to free: n_gpu_layers offloads into what the card has left."""

    def _read_server_info(self) -> None:
        s = self.server
        if s is None or s.info:
            return
        with contextlib.suppress(metadata.PackageNotFoundError):
            s.info["xllamacpp_version"] = metadata.version("xllamacpp")
        s.info["gguf_file"] = str(self.gguf_file())
        with contextlib.suppress(OSError, ValueError, AttributeError):
            props = http_get_json(f"{s.base_url.removesuffix('/v1')}/props", 5.0)[1]
            s.info["gguf_ftype"] = props.get("model_ftype")
            s.info["server_slots"] = props.get("total_slots")
        meta = self.server_model_info.get("meta") or {}
        if isinstance(meta.get("n_ctx"), int):
            # one KV pool for all slots: its size in tokens is the context
            s.info["kv_cache_tokens"] = meta["n_ctx"]
        params, size = meta.get("n_params"), meta.get("size")
        if isinstance(params, int) and params > 0 and isinstance(size, int) and size > 0:
            # the roofline reads the GGUF's real weight bytes (Q4_1: about 0.72 per
            # parameter), not the float width of model.dtype
            s.info["num_parameters"] = params
            s.info["bytes_per_parameter"] = round(size / params, 4)

    # ------------------------------------------------------------------ requests

    def _check_length(self, requests: list[Request], max_new_tokens: int) -> None:
        """Each prompt plus its output length must fit the server's context."""
        meta = self.server_model_info.get("meta") or {}
        limit = int(meta.get("n_ctx") or self.server_cfg.n_ctx)
        if self.prompt_format() == "token_ids":  # else the count is the server's
            check_requests_fit(requests, max_new_tokens, limit,
                               f"backend llamacpp's n_ctx of {limit}")

    def _payload(self, r: Request, base: dict[str, Any]) -> dict[str, Any]:
        """The OpenAI body with vLLM's extra fields, in llama.cpp's terms."""
        body = super()._payload(r, base)
        # llama.cpp's names; min_tokens has no counterpart, ignore_eos alone fixes the length
        body["repeat_penalty"] = body.pop("repetition_penalty")
        body.pop("min_tokens", None)
        # token ids come back free from llama.cpp's own endpoint (return_tokens); its
        # OpenAI stream has none, and asking there (n_probs=1 puts the sampled id in each
        # chunk's logprobs) makes the server sort the whole vocabulary for every token,
        # which would slow what is measured: there counts come from usage
        body.pop("return_token_ids", None)
        if self.native:
            body["return_tokens"] = True
        body["seed"] = self.server_seed
        body.update(SAMPLERS_OFF, samplers=SAMPLERS,
                    # transformers penalises every token of the sequence, prompt included:
                    # a window of the whole context (this server refuses -1)
                    repeat_last_n=self.server_cfg.n_ctx,
                    cache_prompt=self.server_cfg.cache_prompt)
        return body

    def endpoint(self) -> str:
        """llama.cpp's own ``/completion`` (token ids back), else the OpenAI endpoint."""
        if self.native:
            return f"{self.base_url.removesuffix('/v1')}/completion"
        return super().endpoint()

    # ------------------------------------------------------------------ read-back

    def applied_settings(self) -> dict[str, Any]:
        """The client's settings plus the server's: its parameters, pid, version and the
        GGUF it runs (type as the server reports it)."""
        out = OpenAIBackend.applied_settings(self)
        out.pop("vllm_extensions", None)  # the client's switch, on for every llamacpp job
        out["api"] = self.server_cfg.api
        s = self.server
        if s is None:
            return out
        out.update({
            "server_pid": s.pid,
            "server_reused": self._reused,
            "server_log": str(s.log_path),
            "server_params": s.cmd[-1],
            "sampler_order": ",".join(SAMPLERS),
        })
        # where the GGUF came from: the report notes that the packaged GGUF and hf's
        # de-quantized copy of it are the same weights
        m = self.model_cfg
        out["gguf_origin"] = ("packaged" if m.source == "packaged" else
                              "model.gguf_file" if m.gguf_file else "converted")
        if self._gguf is not None and gguf_path(self.model_cfg) is None:
            # converted from the HF folder: the type written and this job's conversion
            # time (0.0: the cached file was reused)
            out["gguf_type"] = self.server_cfg.gguf_type or "F16"
            out["gguf_convert_s"] = self._convert_s
        out.update({k: v for k, v in s.info.items() if v is not None})
        return out
