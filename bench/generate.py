"""End to end: prefill and decode speed and KV bytes, CSRCache vs DynamicCache (and transformers'
QuantizedCache with the quanto backend when it is installed), on SmolLM2.

A prompt of --tokens tokens of the built-in held-out text, then --new greedy tokens, one
forward per step (the loop generate() runs, timed per phase):
- prefill: the prompt's forward (both caches attend densely; CSRCache then codes the
  prompt inside the same forward, one encode call per layer side, right after each
  layer's attention);
- first step: the first decode step, timed apart (warm-up);
- decode: the remaining steps, tokens/s (CSRCache codes a block every --block steps).
Rounds alternate the caches; medians over rounds. Bytes: cache.nbytes() vs the
DynamicCache's tensors after the last step; for the QuantizedCache (--quanto-bits, the
transformers defaults otherwise: groups of 64, residual 128) every tensor it holds, down
to quanto's packed storage.

    OMP_WAIT_POLICY=ACTIVE PYTHONPATH=$PWD .venv/bin/python bench/generate.py --dicts D --json out.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def run_once(model, ids: torch.Tensor, cache, new: int) -> dict:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        t1 = time.perf_counter()
        tok = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        t2 = time.perf_counter()
        toks = [int(tok), int(out.logits[0, -1].argmax())]
        for _ in range(new - 2):
            tok = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            toks.append(int(out.logits[0, -1].argmax()))
        t3 = time.perf_counter()
    return {"prefill_s": t1 - t0, "first_step_s": t2 - t1, "decode_tps": (new - 2) / (t3 - t2), "tokens": toks}


def tensor_nbytes(t) -> int:
    """Bytes a tensor holds; quanto's tensor subclasses (qtensor, packed) are summed over their inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def quantized_nbytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            if t is not None:
                total += tensor_nbytes(t)
    return total


def main() -> None:
    from transformers import DynamicCache

    from csrtool.cache import CSRCache
    from csrtool.collect import tokenize
    from csrtool.corpus import builtin_text
    from csrtool.formats.dicts import load_dicts
    from csrtool.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dicts", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--bits", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--new", type=int, default=34)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1,024-token prompt, 1 round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quanto-bits", type=int, default=2, help="bits of the QuantizedCache row (2 or 4; 0: leave it out)")
    a = ap.parse_args()
    if a.quick:
        a.tokens, a.rounds = 1024, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    loaded = load_model("smollm2-135m", "cpu", "auto")
    model = loaded.model
    ids = tokenize(loaded.tokenizer, builtin_text("heldout"))[: a.tokens][None]
    dicts = load_dicts(a.dicts)
    from csrtool.eval.quanto import backend_missing

    names = ["dynamic", "csr"]
    if a.quanto_bits and backend_missing("quanto") is None:
        names.append("quanto")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    held = {}
    for _ in range(a.rounds):
        for name in names:
            if name == "quanto":
                from transformers import QuantizedCache

                cache = QuantizedCache(backend="quanto", config=model.config, nbits=a.quanto_bits)
                runs[name].append(run_once(model, ids, cache, a.new))
                held[name] = quantized_nbytes(cache)
            elif name == "dynamic":
                cache = DynamicCache(config=model.config)
                runs[name].append(run_once(model, ids, cache, a.new))
                held[name] = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
            else:
                with CSRCache.from_dicts(dicts, model, bits=a.bits, block=a.block, tokenizer=loaded.tokenizer) as cache:
                    runs[name].append(run_once(model, ids, cache, a.new))
                    held[name] = cache.nbytes()
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("prefill_s", "first_step_s", "decode_tps")} for n, rs in runs.items()}
    same = sum(x == y for x, y in zip(runs["csr"][0]["tokens"], runs["dynamic"][0]["tokens"]))
    doc = {
        "config": {"tokens": a.tokens, "new": a.new, "bits": a.bits, "quanto_bits": a.quanto_bits if "quanto" in held else None, "block": a.block, "rounds": a.rounds, "threads": torch.get_num_threads(), "dicts": str(a.dicts)},
        "median": med,
        "bytes": held,
        "ratios": {
            "decode_csr_vs_dynamic": med["csr"]["decode_tps"] / med["dynamic"]["decode_tps"],
            "prefill_csr_vs_dynamic": med["dynamic"]["prefill_s"] / med["csr"]["prefill_s"],
            "bytes_dynamic_over_csr": held["dynamic"] / held["csr"]["total"],
            **({
                "decode_quanto_vs_dynamic": med["quanto"]["decode_tps"] / med["dynamic"]["decode_tps"],
                "bytes_dynamic_over_quanto": held["dynamic"] / held["quanto"],
            } if "quanto" in held else {}),
        },
        "same_greedy_tokens": f"{same}/{a.new}",
    }
    a.json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(json.dumps(doc, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
