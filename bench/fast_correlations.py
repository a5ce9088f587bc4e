"""bfloat16 correlation GEMMs: the raw GEMM, a naive bf16 pursuit, and the engine's `fast=True` path, against fp32 (JSON).

    python bench/fast_correlations.py --json out/bench/fast_correlations.json
    python bench/fast_correlations.py --acts out/acts --dicts out/dicts.safetensors --json out/bench/fast_correlations.json

The pursuit's floor is its correlation GEMM x·Dᵀ [B, N] (docs/quality.md, sixteenth pass); CPUs with
avx512_bf16 (and GPUs) run bf16 GEMMs 2-3x faster. Each question against fp32 in the same run, best of
--repeat, alternating:
  1. the GEMM alone, with a bf16 result and with that result converted to fp32, at whole-batch shapes and
     at the engine's chunk shapes (256 vectors; eval's 192);
  2. the Gram-form OMP chunk loop (`pursuit._pursuit`) run in bf16 throughout: the naive port;
  3. with --acts and --dicts (a collection and its train-dict file): the engine's `fast=True` on real rows
     of --layer, what train-dict uses it for: the cross-layer settle (every row of a layer and kind at
     4 atoms, OMP, the bf16 argmax alone as settle runs it: refine=False) and the k-means Lloyd steps'
     assignment; seconds and relative error against the exact path;
  4. and what compress, eval and the live cache use it for (codec.FAST, refined picks): the adaptive codes
     of --tokens tokens at the plans of 1 and 2 bits per channel (codec.encode_counted, as compress calls
     it), of the layer the plan gives the most atoms per vector, with the share of vectors whose codes
     (atoms, counts) come out the same, and whether fixed codes depend on the batch they are coded in.
  (Rows 3-4 code the collected rows, minus the dictionary's mean for 4, not what the predictions leave,
  which is what the dictionaries train on and the codec codes: the same calls, errors on the same inputs.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from csrtool import codec
from csrtool.engine import kmeans, pursuit

N_ATOMS = 8192
GEMM_SHAPES = ((1, 256, 64), (3, 192, 64), (3, 2048, 64), (1, 32768, 64), (1, 256, 128), (4, 192, 128), (4, 1024, 128))  # [G, B, D]


def best(fn, repeat: int) -> float:
    fn()
    out = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def gemm_rows(repeat: int) -> list[dict]:
    rows = []
    for g, b, d in GEMM_SHAPES:
        x = torch.randn(g, b, d)
        at = torch.randn(g, N_ATOMS, d).transpose(1, 2).contiguous()
        xb, atb = x.bfloat16(), at.bfloat16()
        fp32 = best(lambda: torch.bmm(x, at), repeat)
        bf16 = best(lambda: torch.bmm(xb, atb), repeat)
        bf16_to_fp32 = best(lambda: torch.bmm(xb, atb).float(), repeat)
        rows.append({"groups": g, "vectors": b, "dim": d, "atoms": N_ATOMS, "fp32_s": fp32, "bf16_s": bf16,
                     "bf16_to_fp32_s": bf16_to_fp32, "speedup_bf16": fp32 / bf16, "speedup_bf16_to_fp32": fp32 / bf16_to_fp32})
        print(f"GEMM [{g}, {b}, {d}] x {N_ATOMS} atoms: fp32 {fp32 * 1e3:.2f} ms, bf16 {bf16 * 1e3:.2f} ms "
              f"({fp32 / bf16:.2f}x), bf16 then fp32 {bf16_to_fp32 * 1e3:.2f} ms ({fp32 / bf16_to_fp32:.2f}x)", flush=True)
    return rows


def naive_row(repeat: int, vectors: int, sparsity: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    atoms = F.normalize(torch.randn(N_ATOMS, 64, generator=gen), dim=1)
    x = torch.randn(vectors, 64, generator=gen)
    chunk = max(256, pursuit._CHUNK_ELEMS // N_ATOMS)  # the engine's own chunk size

    def loop(dt: torch.dtype):
        a = atoms.to(dt)[None].contiguous()
        gram = (a[0] @ a[0].T)[None].contiguous()
        scratch = pursuit._Scratch()

        def run():
            for start in range(0, vectors, chunk):
                pursuit._pursuit(x[start : start + chunk].to(dt)[None], a, gram, sparsity, "omp", scratch)
        return run

    fp32 = best(loop(torch.float32), repeat)
    bf16 = best(loop(torch.bfloat16), repeat)
    print(f"naive bf16 OMP step loop, {vectors} vectors at {sparsity} atoms: fp32 {fp32:.2f} s, bf16 {bf16:.2f} s "
          f"({fp32 / bf16:.2f}x)", flush=True)
    return {"vectors": vectors, "sparsity": sparsity, "atoms": N_ATOMS, "fp32_s": fp32, "bf16_s": bf16, "speedup_bf16": fp32 / bf16}


def rel_err(x: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor, atoms: torch.Tensor) -> float:
    return float((x - pursuit.decode(idx, coef, atoms)).pow(2).sum() / x.pow(2).sum())


def engine_rows(repeat: int, acts: Path, dicts: Path, layer: int) -> list[dict]:
    from csrtool.formats.acts import ActsReader
    from csrtool.formats.dicts import load_dicts

    reader, ds = ActsReader(acts), load_dicts(dicts)
    rows = []
    for kind in ("k", "v"):
        x = reader.load(layer, kind).float()  # [T, H, D]
        a = ds.get(layer, kind)[0]  # [C, N, Dc] of group 0 (scope layer: the only one)
        mean = ds.means.get(f"layer.{layer}.{kind}")
        v = x.reshape(-1, x.shape[-1])[:, : a.shape[-1]]
        if mean is not None:
            v = v - mean[0, : a.shape[-1]]
        v, atoms = v.contiguous(), a[0].float().contiguous()
        out = {}
        for name, fast in (("exact", False), ("fast", True)):
            out[name] = pursuit.encode(v, atoms, 4, "omp", fast=fast, refine=False)
        t = {name: best(lambda f=fast: pursuit.encode(v, atoms, 4, "omp", fast=f, refine=False), repeat) for name, fast in (("exact", False), ("fast", True))}
        row = {"what": "settle", "layer": layer, "kind": kind, "vectors": v.shape[0], "atoms": atoms.shape[0], "sparsity": 4,
               "exact_s": t["exact"], "fast_s": t["fast"], "speedup": t["exact"] / t["fast"],
               "exact_rel_err": rel_err(v, *out["exact"], atoms), "fast_rel_err": rel_err(v, *out["fast"], atoms),
               "same_atoms": float((out["exact"][0] == out["fast"][0]).all(1).float().mean())}
        rows.append(row)
        print(f"settle, layer {layer} {kind}: {v.shape[0]} rows at 4 atoms: exact {row['exact_s']:.2f} s, fast {row['fast_s']:.2f} s "
              f"({row['speedup']:.2f}x); relative error {row['exact_rel_err']:.5f} -> {row['fast_rel_err']:.5f}; "
              f"same atoms on {100 * row['same_atoms']:.1f}% of rows", flush=True)
        u = kmeans.unit_rows(v[torch.randperm(v.shape[0], generator=torch.Generator().manual_seed(0))[:16384]])
        c = kmeans.unit_rows(u[torch.randperm(u.shape[0], generator=torch.Generator().manual_seed(1))[:N_ATOMS]] + 0.05 * torch.randn(N_ATOMS, u.shape[1], generator=torch.Generator().manual_seed(2)))
        t = {name: best(lambda f=fast: kmeans.assign(u, c, True, fast=f), repeat) for name, fast in (("exact", False), ("fast", True))}
        lab = {name: kmeans.assign(u, c, True, fast=fast)[0] for name, fast in (("exact", False), ("fast", True))}
        cos = {name: float((u * c[lab[name]]).sum(1).abs().mean()) for name in lab}
        row = {"what": "kmeans_assign", "layer": layer, "kind": kind, "rows": u.shape[0], "centroids": N_ATOMS,
               "exact_s": t["exact"], "fast_s": t["fast"], "speedup": t["exact"] / t["fast"],
               "exact_mean_abs_cos": cos["exact"], "fast_mean_abs_cos": cos["fast"], "same_label": float((lab["exact"] == lab["fast"]).float().mean())}
        rows.append(row)
        print(f"k-means assignment, layer {layer} {kind}: {u.shape[0]} rows to {N_ATOMS} centroids: exact {row['exact_s']:.3f} s, "
              f"fast {row['fast_s']:.3f} s ({row['speedup']:.2f}x); mean |cos| {cos['exact']:.5f} -> {cos['fast']:.5f}; "
              f"same label on {100 * row['same_label']:.1f}% of rows", flush=True)
    return rows


def codec_rows(repeat: int, acts: Path, dicts: Path, tokens: int) -> list[dict]:
    from csrtool.calibration import allocate
    from csrtool.formats.acts import ActsReader
    from csrtool.formats.dicts import load_dicts

    reader, ds = ActsReader(acts), load_dicts(dicts)
    n_layers, h, d = len(reader.layers), reader.num_kv_heads, reader.head_dim
    rows = []
    for bits in (1.0, 2.0):
        plan = allocate.codec_plan(ds, n_layers, h, d, bits=bits, coef=codec.DEFAULT_COEF, method="omp", adaptive=True)
        for kind, j in (("k", 0), ("v", 1)):
            layer = max(range(n_layers), key=lambda lay: plan.for_layer(lay).sparsity_k if j == 0 else plan.for_layer(lay).sparsity_v)
            s = (plan.for_layer(layer).sparsity_k, plan.for_layer(layer).sparsity_v)[j]
            x = reader.load(layer, kind).float()[:tokens]  # [T, H, D]
            x = codec.shift(x.permute(1, 0, 2)[None].contiguous(), ds.means.get(f"layer.{layer}.{kind}"), -1.0)  # [1, H, T, D]
            atoms = ds.atoms[f"layer.{layer}.{kind}"].float()

            def run(fast: bool):
                codec.FAST = fast
                try:
                    return codec.encode_counted(x, atoms, s, "omp", True, codec.DEFAULT_COEF, kind)
                finally:
                    codec.FAST = True

            out = {name: run(fast) for name, fast in (("exact", False), ("fast", True))}
            t = {name: best(lambda f=fast: run(f), repeat) for name, fast in (("exact", False), ("fast", True))}
            err = {name: float((x - codec.decode_codes(i, c, atoms)).pow(2).sum() / x.pow(2).sum()) for name, (i, c, _) in out.items()}
            same = ((out["exact"][0] == out["fast"][0]).all(-1) & (out["exact"][2] == out["fast"][2])).float().mean()
            row = {"what": "codec_adaptive", "bits": bits, "layer": layer, "kind": kind, "vectors": x.shape[1] * x.shape[2], "sparsity": s,
                   "max_atoms": out["exact"][0].shape[-1], "exact_s": t["exact"], "fast_s": t["fast"], "speedup": t["exact"] / t["fast"],
                   "exact_rel_err": err["exact"], "fast_rel_err": err["fast"], "same_codes": float(same)}
            # batch independence (what compress, eval and the live cache need to agree): fixed codes at S of all vectors
            # at once against the same vectors coded a few at a time (a decode step codes one token's heads)
            xg = x[0].reshape(1, -1, x.shape[-1]).contiguous()  # [1, H*T, D]
            ag = atoms.reshape(-1, atoms.shape[-2], atoms.shape[-1])[:1]
            for name, fast in (("exact", False), ("fast", True)):
                whole = pursuit.encode_groups(xg, ag, s, "omp", fast=fast)[0]
                parts = torch.cat([pursuit.encode_groups(xg[:, i : i + 3], ag, s, "omp", fast=fast)[0] for i in range(0, xg.shape[1], 3)], 1)
                row[f"{name}_same_across_batches"] = float((whole == parts).all(-1).float().mean())
            rows.append(row)
            print(f"  fixed codes at S {s}, all vectors at once against 3 at a time: identical on "
                  f"{100 * row['exact_same_across_batches']:.2f}% (exact) / {100 * row['fast_same_across_batches']:.2f}% (fast) of vectors", flush=True)
            print(f"adaptive codes at {bits:g} b, layer {layer} {kind}: {row['vectors']} vectors, S {s} (up to {row['max_atoms']}): "
                  f"exact {row['exact_s']:.2f} s, fast {row['fast_s']:.2f} s ({row['speedup']:.2f}x); relative error "
                  f"{err['exact']:.5f} -> {err['fast']:.5f}; same codes on {100 * row['same_codes']:.1f}% of vectors", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--vectors", type=int, default=32768, help="vectors for the naive bf16 OMP loop")
    ap.add_argument("--acts", type=Path, help="a csrtool collect directory (with --dicts): time the engine's fast path on its rows")
    ap.add_argument("--dicts", type=Path, help="its csrtool train-dict file")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of --layer the codec rows code (eval compresses ~1,000 per document)")
    ap.add_argument("--codec-only", action="store_true", help="only the codec rows (4.)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = {"threads": torch.get_num_threads(), "native_bf16": pursuit.fast_correlations(torch.float32, "cpu")}
    if not args.codec_only:
        report["gemm"], report["naive_bf16_omp"] = gemm_rows(args.repeat), naive_row(args.repeat, args.vectors, 4)
        if args.acts and args.dicts:
            report["engine"] = engine_rows(args.repeat, args.acts, args.dicts, args.layer)
    if args.acts and args.dicts:
        report["codec"] = codec_rows(args.repeat, args.acts, args.dicts, args.tokens)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
