"""The ``llamacpp`` backend: llama.cpp's own server (through the ``xllamacpp`` package)
started on 127.0.0.1 in a child process and driven by the shared streaming client.

Nothing here imports ``xllamacpp``: only the server's child process does.
"""
