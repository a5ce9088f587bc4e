"""Generate text on a compressed cache (CSRCache), with its speed and bytes.

    run(model, tokenizer, prompt, cache, max_new_tokens, on_text, do_sample=False, keep_last=False) -> Generation

A cache that already holds tokens (CSRCache.from_csr) is continued: `prompt` follows them.

Timings: prefill = from the call to the first new token (the prompt's forward, its
sampling); decode = the remaining new tokens over the time after it. Bytes: the
cache's nbytes() next to what a DynamicCache would hold for the same tokens
(keys and values of every layer in the model's dtype).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    cache_bytes: dict
    dynamic_bytes: int

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tps(self) -> float:
        n = self.new_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "prefill_seconds": round(self.prefill_s, 4),
            "decode_seconds": round(self.decode_s, 4),
            "prefill_tokens_per_s": round(self.prefill_tps, 2),
            "decode_tokens_per_s": round(self.decode_tps, 2),
            "cache_bytes": self.cache_bytes,
            "dynamic_cache_bytes": self.dynamic_bytes,
            "smaller": round(self.dynamic_bytes / max(1, self.cache_bytes["total"]), 2),
        }


class _Stream:
    """A transformers streamer: decodes new tokens as they come, notes when the first one came."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False
        self.first_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() passes the prompt first
            self.prompt_seen = True
            return
        if self.first_at is None:
            self.first_at = time.perf_counter()
        self.ids.extend(int(t) for t in value.reshape(-1))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        if self.on_text is not None and len(text) > len(self.shown):
            self.on_text(text[len(self.shown) :])
        self.shown = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.on_text is not None and len(text) > len(self.shown):
            self.on_text(text[len(self.shown) :])
        self.shown = text


def dynamic_nbytes(model, tokens: int, batch: int = 1) -> int:
    """Bytes a DynamicCache holds for `tokens` tokens: K and V of every layer, in the model's dtype."""
    from csrtool.models import kv_shape

    layers, heads, head_dim = kv_shape(model.config)
    return 2 * layers * batch * heads * tokens * head_dim * next(model.parameters()).element_size()


@torch.no_grad()
def run(
    model, tokenizer, prompt: str, cache, max_new_tokens: int, on_text: Callable[[str], None] | None = None, do_sample: bool = False,
    keep_last: bool = False,
) -> Generation:
    """Generate up to max_new_tokens after `prompt` through `cache`, streaming the text to on_text.

    generate() never runs its last new token through the model; keep_last=True does, after the
    timings and byte counts, so the cache then holds the prompt and every new token (to save it)."""
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    stream = _Stream(tokenizer, on_text)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    held_before = cache.get_seq_length()
    if held_before:  # a resumed cache: generate() runs only the tokens after the cached ones, so their ids are placeholders
        ids = torch.cat([torch.full((1, held_before), pad, device=model.device), enc["input_ids"]], 1)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    t0 = time.perf_counter()
    out = model.generate(**enc, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=do_sample, streamer=stream, pad_token_id=pad)
    t1 = time.perf_counter()
    stream.end()
    n_prompt = enc["input_ids"].shape[1] - held_before
    new = out.shape[1] - enc["input_ids"].shape[1]
    first = stream.first_at or t1
    held = cache.nbytes() if hasattr(cache, "nbytes") else {"total": dynamic_nbytes(model, out.shape[1] - 1)}
    result = Generation(stream.shown, n_prompt, new, first - t0, t1 - first, held, dynamic_nbytes(model, cache.get_seq_length()))
    if keep_last and new:
        model(input_ids=out[:, -1:], past_key_values=cache, use_cache=True)
    return result
