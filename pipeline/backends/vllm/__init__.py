"""vLLM, two ways: the offline engine in this process's children
(:mod:`pipeline.backends.vllm.engine`, ``backend=vllm``) and an OpenAI-compatible server
started on 127.0.0.1 (:mod:`pipeline.backends.vllm.server`, ``backend=vllm_server``).

Both start the same engine from the same settings, so what they share lives once in
:mod:`pipeline.backends.vllm.common`: the settings schema and its validation, the engine's
environment and cache key, the per-process cache of started engines and the reaping of
their processes. Importing this package imports neither vLLM nor torch.
"""
