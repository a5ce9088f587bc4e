"""Shared by the quality benches: the model, the held-out eval tokens and their reference pass."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from csrtool.corpus import load_text
from csrtool.eval import runner
from csrtool.models import Loaded, kv_shape, load_model


def heldout_reference(tokens: int, chunk: int, text_file: Path | None = None) -> tuple[Loaded, tuple[int, int, int], torch.Tensor, runner.Reference]:
    """(loaded SmolLM2, (layers, KV heads, head_dim), ids [1, tokens] of the held-out text (or of
    `text_file`), its reference pass)."""
    loaded = load_model("smollm2-135m", "auto", "auto")
    text = load_text([text_file] if text_file else None, "heldout")
    ids = torch.tensor([loaded.tokenizer(text[: tokens * 16]).input_ids[:tokens]], dtype=torch.long)
    ref = runner.reference_pass(loaded.model, ids, chunk)
    print(f"reference ppl {ref.ppl:.4f} ({ref.seconds:.0f} s)", flush=True)
    return loaded, kv_shape(loaded.config), ids, ref


def add_eval_args(ap: argparse.ArgumentParser) -> None:
    """--tokens, --chunk, --window (as csrtool eval's defaults) and --json."""
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--json", type=Path)
