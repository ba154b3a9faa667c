"""vLLM, two ways: the offline engine in this process's children
(:mod:`pipeline.backends.vllm.engine`, ``backend=vllm``) and an OpenAI-compatible server
started on 127.0.0.1 (:mod:`pipeline.backends.vllm.server`, ``backend=vllm_server``).

Both start the same engine from the same settings, so what they share lives once:
the settings schema and its validation (:mod:`~pipeline.backends.vllm.config`), the
engine's environment (:mod:`~pipeline.backends.vllm.environment`), the cache key, the
per-process cache of started engines and the reaping of their processes
(:mod:`~pipeline.backends.vllm.engine_cache`), the plug-in points both classes answer alike
(:mod:`~pipeline.backends.vllm.plugins`), the sampling mapping
(:mod:`~pipeline.backends.vllm.sampling`) and the quantization allow-list
(:mod:`~pipeline.backends.vllm.quantization`). The offline engine's processes, generation
and speculative decoding are in :mod:`~pipeline.backends.vllm.engine_process`,
:mod:`~pipeline.backends.vllm.engine_generation` and
:mod:`~pipeline.backends.vllm.speculative`; the server's process in
:mod:`~pipeline.backends.vllm.server_process`. Importing this package imports neither vLLM
nor torch.
"""
