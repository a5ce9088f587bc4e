"""Run a causal LM over text and capture its K/V per layer and KV head.

`capture_kv` runs one window through the model with a fresh full-length
DynamicCache (no sliding-window truncation, so Gemma-style sliding layers keep
every token) and returns each layer's keys and values, optionally rotated back
to before RoPE. `collect` streams windows into safetensors shards (under torchrun,
each rank runs every world-th window into its own shards `shard-r{rank}-*`, and
rank 0 writes the manifest listing all of them once every rank finished); `save_prompt_cache`
writes the cache of one prompt in the format `csrtool compress` reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from csrtool.distributed import Dist
from csrtool.formats.acts import ActsWriter
from csrtool.engine import rope
from csrtool.errors import CsrError
from csrtool.formats.kvcache import KVCache
from csrtool.keyspace import RopeParams
from csrtool.models import Loaded, kv_shape, last_logits, rope_info

KEY_SPACES = ("auto", "post-rope", "pre-rope")  # auto: pre-rope where the model allows it (codes better), else post-rope
PROBE_TOKENS = 512  # tokens after the collected ones kept (as ids) for train-dict's sensitivity calibration
# Without --max-tokens: up to this many. train-dict still trains on 16,384 vectors per dictionary, but
# drawn from 4x the text they cover 2.3x the distinct tokens: both models' held-out and development
# texts code better, Gemma-3's licence check too, SmolLM2's not (docs/quality.md, fifth pass); the
# cost is collect time and disk only.
DEFAULT_TOKENS = 32768


def tokens_to_collect(max_tokens: int | None, available: int) -> int:
    """Tokens collect takes from a text of `available` tokens: max_tokens (an error when the text is
    shorter), or by default up to DEFAULT_TOKENS, leaving up to PROBE_TOKENS after them for calibration."""
    if max_tokens is not None:
        if available < max_tokens:
            raise CsrError(f"the text has only {available} tokens, fewer than --max-tokens {max_tokens}: pass more text or lower --max-tokens")
        return max_tokens
    return min(DEFAULT_TOKENS, available - min(PROBE_TOKENS, available // 2))


@dataclass(frozen=True)
class CollectConfig:
    max_tokens: int | None = None  # None: tokens_to_collect's default
    seq_len: int = 512
    key_space: str = "auto"
    layers: tuple[int, ...] | None = None  # None: all
    shard_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise CsrError(f"--max-tokens must be positive, got {self.max_tokens}")
        if self.seq_len <= 0:
            raise CsrError(f"--seq-len must be positive, got {self.seq_len}")
        if self.key_space not in KEY_SPACES:
            raise CsrError(f"--keys {self.key_space!r} is not one of {', '.join(KEY_SPACES)}")

    def resolved(self, available: int) -> "CollectConfig":
        """This config with max_tokens fixed for a text of `available` tokens (tokens_to_collect)."""
        return replace(self, max_tokens=tokens_to_collect(self.max_tokens, available))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [T] of a text (no special tokens: windows are cut from one stream)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() == 0:
        raise CsrError("the text produced no tokens")
    return ids


def resolve_key_space(model, key_space: str) -> str:
    """'auto' -> 'pre-rope' where key_rope supports it (keys code far better before RoPE), else 'post-rope'."""
    if key_space != "auto":
        return key_space
    try:
        key_rope(model, "pre-rope")
    except CsrError:
        return "post-rope"
    return "pre-rope"


def key_rope(model, key_space: str) -> dict | None:
    """RoPE parameters needed to un-rotate keys (models.rope_info, per layer where layers differ), or a clear error."""
    info = rope_info(model)
    if key_space == "post-rope" or info is not None:
        return info
    mtype = getattr(getattr(model, "config", None), "model_type", "")
    raise CsrError(
        f"--keys pre-rope is not supported for {mtype or type(model).__name__} models "
        "(needs static rotary embeddings, as Llama/Qwen2/Mistral/Gemma 3 have): use --keys post-rope"
    )


@torch.inference_mode()
def capture_kv(model, input_ids: torch.Tensor, key_space: str = "post-rope", rope_params: dict | None = None,
               position_offset: int = 0):
    """Run ids [B, T] and return (keys, values), L x [B, H, T, D] each (the vocabulary head runs on the last
    position only: nobody here reads the logits).

    Pre-RoPE keys are the cached keys rotated back with each layer's own rotation (exactly the keys
    before RoPE, k_norm included on models that normalise keys before rotating them, as Gemma 3 does)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, **last_logits(model))
    cache = out.past_key_values
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    if key_space == "pre-rope":
        assert rope_params is not None
        rp = RopeParams.from_meta({"rope": rope_params, "position_offset": position_offset})
        rp.check_layers(len(keys))
        rots = [rp.for_layer(i) for i in range(len(keys))]
        dev = input_ids.device
        keys = [rope.unrotate(k, r.positions(k.shape[2], dev), r.inv_freq_tensor(dev), r.scaling) for k, r in zip(keys, rots)]
    return keys, values


def collect(loaded: Loaded, text: str | torch.Tensor, out_dir: Path, cfg: CollectConfig, text_source: str,
            progress: Callable[[int], None] | None = None, dist: Dist | None = None) -> dict:
    """Collect K/V activations into shards under out_dir; returns the manifest (every rank's shards with `dist`).

    `text`: the text, or its token ids [T] from `tokenize` (a caller that sized its progress bar
    with cfg.resolved has them already)."""
    dist = dist or Dist()
    n_layers, n_kv, head_dim = kv_shape(loaded.config)
    layers = list(cfg.layers) if cfg.layers is not None else list(range(n_layers))
    key_space = resolve_key_space(loaded.model, cfg.key_space)
    rope_params = key_rope(loaded.model, key_space)
    ids = text if isinstance(text, torch.Tensor) else tokenize(loaded.tokenizer, text)
    cfg = cfg.resolved(ids.numel())
    meta = {
        "model": loaded.name,
        "model_type": getattr(loaded.config, "model_type", ""),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "key_space": key_space,
        "seq_len": cfg.seq_len,
        "text_source": text_source,
        "layers": layers,
        "num_layers": n_layers,
        "num_kv_heads": n_kv,
        "head_dim": head_dim,
        "rope": rope_params,
    }
    writer = ActsWriter(out_dir, meta, shard_tokens=cfg.shard_tokens, prefix=f"shard-r{dist.rank}-" if dist.world > 1 else "shard-")
    t0 = time.perf_counter()

    def run_windows() -> tuple[list[str], int]:
        for done in dist.share(range(0, cfg.max_tokens, cfg.seq_len)):
            n = min(cfg.seq_len, cfg.max_tokens - done)
            window = ids[done : done + n][None].to(loaded.device)
            keys, values = capture_kv(loaded.model, window, key_space, rope_params)
            blocks = {}
            for layer in layers:
                blocks[(layer, "k")] = keys[layer][0].transpose(0, 1)  # [H, T, D] -> [T, H, D]
                blocks[(layer, "v")] = values[layer][0].transpose(0, 1)
            writer.add(blocks, window[0])
            if progress:
                progress(n)
        writer.flush()
        return writer.shards, writer.tokens

    parts = dist.gather(dist.settle(run_windows, "collecting activations"))
    writer.shards = [name for shards, _ in parts for name in shards]
    writer.tokens = sum(tokens for _, tokens in parts)
    probe = ids[cfg.max_tokens : cfg.max_tokens + min(cfg.seq_len, PROBE_TOKENS)]
    if probe.numel() >= 2:  # held-out tokens for train-dict's sensitivity calibration (csrtool.calibration.sensitivity)
        writer.meta["probe_ids"] = [int(i) for i in probe]
    manifest = dist.settle(lambda: writer.close() if dist.root else None, "writing the manifest")
    manifest = dist.gather(manifest)[0]
    manifest["seconds"] = time.perf_counter() - t0
    return manifest


def prompt_cache(loaded: Loaded, text: str, max_tokens: int | None, text_source: str) -> KVCache:
    """The KV cache of one prompt (keys after RoPE, as transformers stores them)."""
    ids = tokenize(loaded.tokenizer, text)
    if max_tokens is not None:
        if max_tokens <= 0:
            raise CsrError(f"--max-tokens must be positive, got {max_tokens}")
        ids = ids[:max_tokens]
    keys, values = capture_kv(loaded.model, ids[None].to(loaded.device))
    meta = {
        "model": loaded.name,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "key_space": "post-rope",
        "rope": rope_info(loaded.model),
        "position_offset": 0,
        "tokens": int(ids.numel()),
        "text_source": text_source,
        "ids": [[int(i) for i in ids]],  # the token predictor's input (dictionaries trained with it, train-dict's default)
    }
    return KVCache([k.cpu() for k in keys], [v.cpu() for v in values], meta)
