"""Tiny random models and a byte-level tokenizer, built offline, for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "gemma3")


def byte_tokenizer():
    """A 256-symbol byte-level BPE tokenizer with no merges (every byte is a token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_config(arch: str = "llama", layers: int = 2):
    common = dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=256)
    if arch == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(**common)
    if arch == "qwen2":
        from transformers import Qwen2Config
        return Qwen2Config(**common)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"][:layers] + ["full_attention"] * max(0, layers - 2))
    raise ValueError(arch)


def tiny_model(arch: str = "llama", layers: int = 2, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, layers)).eval()


def save_tiny(folder: Path, arch: str = "llama", layers: int = 2) -> Path:
    """Save a tiny random model and the byte tokenizer as a local model folder."""
    folder = Path(folder)
    tiny_model(arch, layers).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
