"""Decode-step attention latency on the codes vs dense SDPA, for one layer (issue 10).

    PYTHONPATH=$PWD .venv/bin/python bench/attention.py --json bench/attention.json [--quick] [--plan 1bit|paper] [--threads T] [--atoms N]

One SmolLM2-135M layer: 3 KV heads, 9 query heads, head_dim 64, batch 1, one query
token, N = 4096 atoms in one dictionary shared by the layer's heads (as the demo
dictionaries), centred (a mean per dictionary), 4 sink + 4 window tokens dense.
Plans: `1bit` = the product's --bits 1 plan at N = 4096 (4 key atoms, 2 value
atoms, values unsplit); `paper` = the paper's "1 bit at d = 128" (4 key atoms,
values split in 2 chunks of 2 atoms). Codes are synthetic (random indices, fp8
e4m3 coefficients with a float32 scale per head: the .csr's storage), as a cache
holds them: indices int16. --atoms N (default 4096) changes the dictionary size; where a
CSRCache holds the indices split-packed (cache.packs_indices: N = 257..2048, e.g. 1024),
codes-post-packed / codes-pre-packed also time reading them back (engine.packing.unpack_split,
as CSRCache._Side.codes does at every step) before the same attend call.

Rows, at 1k/4k/16k/32k cached tokens (--quick: 1k and 4k): per round, every
method runs one untimed call then a burst of 5 timed back-to-back calls (steady
state, as in a decode loop); the row is the median over rounds of the burst
medians. Methods take turns in every round (machine noise hits all alike);
same process and thread count:
- codes-post / codes-pre: engine.attention.attend on post-RoPE / pre-RoPE key codes;
- reconstruct: engine.attention.attend_reference (decode everything, then attend);
- sdpa-fp16 / sdpa-fp32: torch scaled_dot_product_attention (enable_gqa) over the
  same history held dense.
Ratios are dense time / codes time (> 1: the codes are faster). Bytes: what the
cache holds for the layer (codes, scales, dense tokens; the dictionaries, shared by
every length, separately) vs the dense K+V in fp16, and with the indices
bit-packed to 12 bits (what the .csr stores) for reference.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from csrtool.engine import packing
from csrtool.engine.attention import Codes, Rope, Segment, attend, attend_reference

H, REP, D, N = 3, 3, 64, 4096
SINK, WINDOW = 4, 4
PLANS = {"1bit": ((1, 4), (1, 2)), "paper": ((1, 4), (2, 2))}  # (C, S) for keys, values
ROPE_THETA = 100000.0  # SmolLM2-135M


def _side(t: int, c: int, s: int, gen: torch.Generator, n: int = N) -> Codes:
    atoms = torch.randn(1, c, n, D // c, generator=gen)
    atoms = atoms / atoms.norm(dim=-1, keepdim=True)
    idx = torch.randint(0, n, (1, H, t, c, s), generator=gen).to(torch.int16)
    q, g, _ = packing.quantize(torch.randn(H, t, c * s, generator=gen) * 0.5, "fp8")
    return Codes(idx, q.reshape(1, H, t, c, s), atoms, g.reshape(1, H), torch.randn(1, D, generator=gen) * 0.1)


def _unpacker(codes: Codes, n: int):
    """What CSRCache holds for codes.idx when it packs them, and a function reading them back as it does."""
    from csrtool.cache import index_dtype

    b, h, t, c, s = codes.idx.shape
    bits = packing.index_bits(n)
    lo, hi = packing.pack_split(codes.idx.reshape(b, h, t, c * s), bits)
    held = (0 if lo is None else lo.numel()) + hi.numel()
    return held, lambda: Codes(packing.unpack_split(lo, hi, c * s, bits, index_dtype(n)).view(b, h, t, c, s), codes.coef, codes.atoms, codes.scale, codes.mean)


def setup(t: int, plan: str, seed: int = 0, n: int = N) -> dict:
    from csrtool.cache import packs_indices

    gen = torch.Generator().manual_seed(seed)
    (kc, ks), (vc, vs) = PLANS[plan]
    tc = t - SINK - WINDOW
    keys, values = _side(tc, kc, ks, gen, n), _side(tc, vc, vs, gen, n)
    dense_k = torch.randn(1, H, SINK + WINDOW, D, generator=gen)
    dense_v = torch.randn(1, H, SINK + WINDOW, D, generator=gen)
    segs = [Segment(dense_k[:, :, :SINK], dense_v[:, :, :SINK], 0), Segment(dense_k[:, :, SINK:], dense_v[:, :, SINK:], SINK + tc)]
    q = torch.randn(1, H * REP, 1, D, generator=gen)
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    rope = Rope(inv)
    kw = dict(coded_start=SINK, q_start=t - 1)
    pre = dict(kw, rope=rope, key_pos0=torch.tensor([SINK]))
    k_full = torch.randn(1, H, t, D, generator=gen)
    v_full = torch.randn(1, H, t, D, generator=gen)
    code_bytes = sum(x.idx.numel() * x.idx.element_size() + x.coef.numel() * x.coef.element_size() + x.scale.numel() * 4 for x in (keys, values))
    atom_refs = sum(x.idx.numel() for x in (keys, values))
    packed = code_bytes - atom_refs * 2 + packing.packed_nbytes(keys.idx.numel(), packing.index_bits(n)) + packing.packed_nbytes(values.idx.numel(), packing.index_bits(n))
    dense_bytes = (dense_k.numel() + dense_v.numel()) * 2  # the sink/window held in fp16, as the fp16 peer
    fp16 = (k_full.numel() + v_full.numel()) * 2
    dict_bytes = sum(x.atoms.numel() * 4 + x.mean.numel() * 4 for x in (keys, values))
    rope.table(SINK, tc, q.device)  # the position table a model builds once for all its layers
    methods = {
        "codes-post": lambda: attend(q, keys, values, segs, **kw),
        "codes-pre": lambda: attend(q, keys, values, segs, **pre),
        "reconstruct": lambda: attend_reference(q, keys, values, segs, **pre),
        "sdpa-fp16": (lambda qh, kh, vh: lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True))(q.half(), k_full.half(), v_full.half()),
        "sdpa-fp32": lambda: F.scaled_dot_product_attention(q, k_full, v_full, enable_gqa=True),
    }
    held = code_bytes
    if packs_indices(n):  # as a CSRCache holds them: split-packed, read back at every step
        (hk, uk), (hv, uv) = _unpacker(keys, n), _unpacker(values, n)
        held = code_bytes - atom_refs * 2 + hk + hv
        methods["codes-post-packed"] = lambda: attend(q, uk(), uv(), segs, **kw)
        methods["codes-pre-packed"] = lambda: attend(q, uk(), uv(), segs, **pre)
    parity = {
        "post": float((attend(q, keys, values, segs, **kw) - attend_reference(q, keys, values, segs, **kw)).abs().max()),
        "pre": float((attend(q, keys, values, segs, **pre) - attend_reference(q, keys, values, segs, **pre)).abs().max()),
    }
    sizes = {"cache_bytes": code_bytes + dense_bytes, "cache_bytes_packed": packed + dense_bytes, "cache_bytes_held": held + dense_bytes,
             "fp16_bytes": fp16, "dict_bytes": dict_bytes}
    return {"methods": methods, "parity_max_abs": parity, **sizes}


def measure(methods: dict, rounds: int, skip: set[str], burst: int = 5) -> dict:
    """Median over rounds of each method's median over a burst of back-to-back calls (after one
    untimed call): steady state, as in a decode loop where the CPU stays busy. Methods take turns
    within every round, so slow phases of a shared machine hit all of them."""
    times: dict[str, list[float]] = {m: [] for m in methods if m not in skip}
    for _ in range(rounds):
        for name in times:
            f = methods[name]
            f()
            burst_t = []
            for _ in range(burst):
                t0 = time.perf_counter()
                f()
                burst_t.append(time.perf_counter() - t0)
            times[name].append(statistics.median(burst_t))
    return {m: statistics.median(v) * 1e3 for m, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="1k and 4k tokens, fewer repeats")
    ap.add_argument("--plan", choices=sorted(PLANS), default="1bit")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for every method (default: torch's)")
    ap.add_argument("--atoms", type=int, default=N, help=f"atoms N of the synthetic dictionaries (default {N})")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 9, --quick 3); each round times a burst of 5 calls per method")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [1024, 4096] if args.quick else [1024, 4096, 16384, 32768]
    repeats = args.repeats or (3 if args.quick else 9)
    rows = []
    for t in lengths:
        case = setup(t, args.plan, n=args.atoms)
        skip = {"reconstruct"} if t > 16384 and not args.quick else set()
        ms = measure(case["methods"], repeats, skip)
        if "reconstruct" in skip:  # slow: fewer rounds
            ms["reconstruct"] = measure({"reconstruct": case["methods"]["reconstruct"]}, 1, set(), 3)["reconstruct"]
        row = {"tokens": t, "ms": ms, "parity_max_abs": case["parity_max_abs"],
               "cache_bytes": case["cache_bytes"], "cache_bytes_packed": case["cache_bytes_packed"], "cache_bytes_held": case["cache_bytes_held"],
               "fp16_bytes": case["fp16_bytes"],
               "fp16_over_cache": case["fp16_bytes"] / case["cache_bytes"], "fp16_over_cache_packed": case["fp16_bytes"] / case["cache_bytes_packed"]}
        for ks in ("post", "pre"):
            for dense in ("fp16", "fp32"):
                row[f"{dense}_over_{ks}"] = ms[f"sdpa-{dense}"] / ms[f"codes-{ks}"]
            if f"codes-{ks}-packed" in ms:
                row[f"packed_over_plain_{ks}"] = ms[f"codes-{ks}-packed"] / ms[f"codes-{ks}"]
        rows.append(row)
        print(f"{t:>6} tokens  " + "  ".join(f"{m} {v:.3f} ms" for m, v in ms.items()), file=sys.stderr)
    cross = {}
    for ks in ("post", "pre"):
        for dense in ("fp16", "fp32"):
            faster = [r["tokens"] for r in rows if r[f"{dense}_over_{ks}"] > 1.0]
            cross[f"{ks}_vs_{dense}"] = min(faster) if faster and all(r[f"{dense}_over_{ks}"] > 1.0 for r in rows if r["tokens"] >= min(faster)) else None
    out = {
        "shape": {"kv_heads": H, "query_heads": H * REP, "head_dim": D, "atoms": args.atoms, "plan": args.plan, "keys_C_S": PLANS[args.plan][0],
                  "values_C_S": PLANS[args.plan][1], "sink": SINK, "window": WINDOW, "dictionary_groups": 1, "centred": True},
        "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats,
        "dict_bytes": setup(1024, args.plan, n=args.atoms)["dict_bytes"],
        "rows": rows,
        "crossover_tokens": cross,
        "note": "crossover: the smallest measured length from which the codes stay faster (None: never within the lengths measured)",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("crossover_tokens",)}), file=sys.stderr)


if __name__ == "__main__":
    main()
