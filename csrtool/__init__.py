"""csrtool: compress LLM KV caches with sparse codes over learned dictionaries (CSR)."""

__version__ = "0.1.0"
