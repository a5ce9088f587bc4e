"""Compress/decompress a saved cache: size vs fp16, bits, error, throughput (JSON).

    python bench/compress.py --cache out/cache.pt --dicts out/dicts.safetensors --bits 1 --json out/bench/compress.json

The peer in the same run is the fp16 cache itself (size) and `torch.save` of it
(time to write the uncompressed cache), so ratios are comparable across machines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from csrtool import codec
from csrtool.formats import csrfile
from csrtool.formats.dicts import load_dicts
from csrtool.eval.metrics import rel_sq_error
from csrtool.formats.kvcache import load_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--dicts", type=Path, required=True)
    ap.add_argument("--bits", type=float, default=1.0)
    ap.add_argument("--coef", default="fp8")
    ap.add_argument("--window", type=int, default=codec.DEFAULT_WINDOW)
    ap.add_argument("--method", default="omp")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="first 4 layers only")
    args = ap.parse_args()

    kv = load_cache(args.cache)
    if args.quick:
        kv.keys, kv.values = kv.keys[:4], kv.values[:4]
    ds = load_dicts(args.dicts)
    _, _, split = csrfile.check_fit(kv, ds)
    d = kv.keys[0].shape[-1]
    s_k, s_v = codec.choose_sparsity(args.bits, ds.n_atoms, d, split, args.coef)
    cfg = codec.CodecConfig(s_k, s_v, args.coef, args.method, args.window)
    tokens = kv.keys[0].shape[2]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.csr"
        t0 = time.perf_counter()
        header = csrfile.make_header(kv, ds, cfg)
        size = csrfile.write_csr(path, header, csrfile.encode_sections(kv, ds, header))
        t_compress = time.perf_counter() - t0
        t0 = time.perf_counter()
        restored = csrfile.read_csr(path, ds)
        t_decompress = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.save({"keys": [k.half() for k in kv.keys], "values": [v.half() for v in kv.values]}, Path(tmp) / "fp16.pt")
        t_save = time.perf_counter() - t0
        fp16_file = (Path(tmp) / "fp16.pt").stat().st_size
    tc = tokens - min(cfg.window, tokens)
    coded = lambda xs: torch.cat([x[:, :, :tc].float() for x in xs])  # noqa: E731 - all layers, coded tokens only
    err = {"k": rel_sq_error(coded(kv.keys), coded(restored.keys)), "v": rel_sq_error(coded(kv.values), coded(restored.values))}
    report = csrfile.size_report(header, size, args.dicts.stat().st_size)
    row = {
        "method": f"csr-{args.method}", "bits_target": args.bits, "S_k": s_k, "S_v": s_v, "coef": args.coef,
        "window": cfg.window, "layers": len(kv.keys), "tokens": tokens, "N": ds.n_atoms, "D": d,
        "file_bytes": size, "fp16_bytes": report["channels"] * 2, "fp16_torch_save_bytes": fp16_file,
        "ratio_vs_fp16": report["ratio_vs_fp16"], "bits_per_channel": report["bits_per_channel"],
        "code_bits_per_channel": report["code_bits_per_channel"], "rel_err_k": err["k"], "rel_err_v": err["v"],
        "compress_tokens_per_s": tokens / t_compress, "decompress_tokens_per_s": tokens / t_decompress,
        "compress_s": t_compress, "decompress_s": t_decompress, "fp16_save_s": t_save,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(row, indent=2, sort_keys=True))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": [row]}, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
