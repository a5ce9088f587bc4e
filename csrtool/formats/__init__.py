"""File formats and safe output: activation shards, dictionary files, saved caches, .csr files,
a deterministic safetensors writer and atomic file writes. No model code, no math beyond packing."""
