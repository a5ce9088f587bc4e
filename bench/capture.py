"""Collecting K/V with the vocabulary head on every position against the last one only (JSON).

    python bench/capture.py --model smollm2-135m --json out/bench/capture.json
    python bench/capture.py --model gemma3-270m --json out/bench/capture_gemma.json

`collect`, the token predictor and the calibration read only the K/V cache of a forward pass, so
`collect.capture_kv` asks the model for the last position's logits only (transformers'
`logits_to_keep`). The peer in the same run is the same forward pass with every position's logits,
as before; both give the same keys and values (checked bit for bit). Best of --repeat, alternating.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from csrtool.collect import capture_kv, tokenize
from csrtool.corpus import builtin_text
from csrtool.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per forward pass (collect's default window)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    loaded = load_model(args.model, device="cpu")
    ids = tokenize(loaded.tokenizer, builtin_text("calibration"))[: args.tokens][None]

    @torch.inference_mode()
    def every_position():
        out = loaded.model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
        return [x.keys for x in out.past_key_values.layers], [x.values for x in out.past_key_values.layers]

    times: dict[str, list[float]] = {"every_position": [], "last_position": []}
    outs = {}
    for _ in range(args.repeat):
        for name, run in (("every_position", every_position), ("last_position", lambda: capture_kv(loaded.model, ids))):
            t0 = time.perf_counter()
            outs[name] = run()
            times[name].append(time.perf_counter() - t0)
    same = all(torch.equal(a, b) for part in range(2) for a, b in zip(outs["every_position"][part], outs["last_position"][part]))
    row = {"model": args.model, "tokens": int(ids.shape[1]), "threads": torch.get_num_threads(),
           "every_position_s": min(times["every_position"]), "last_position_s": min(times["last_position"]), "same_kv": same}
    row["speedup"] = row["every_position_s"] / row["last_position_s"]
    print(f"{args.model}, {row['tokens']} tokens: head on every position {row['every_position_s']:.2f} s, on the last "
          f"{row['last_position_s']:.2f} s ({row['speedup']:.2f}x), same K/V bit for bit: {same}")
    if args.json:
        args.json.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
