"""Metrics over backend records: performance, quality (perplexity), diversity."""
