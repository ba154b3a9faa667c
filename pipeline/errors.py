"""The pipeline's exceptions: what the user got wrong, and what failed while running."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot be used; the message is one line meant for the user,
    naming the key, the bad value and what is allowed. ``run.py`` exits 2 on it."""


class UnsupportedDecoding(ConfigError):
    """A decoding or workload option a backend cannot honour (never silently dropped)."""

    @classmethod
    def option(cls, backend: str, key: str, value: object, instead: str) -> UnsupportedDecoding:
        """The one refusal every backend gives for a ``decoding.<key>`` it cannot honour:
        the backend, the key and its value, and what to use instead."""
        return cls(f"backend {backend}: decoding.{key}={value!r} is not supported; {instead}")


class JobFailed(RuntimeError):
    """The job ran but failed; results.json and MLflow hold the details."""
