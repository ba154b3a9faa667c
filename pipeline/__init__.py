"""infersweep: config-driven experiments on LLM inference speed, memory and quality."""

__version__ = "0.1.0"
