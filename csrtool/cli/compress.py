"""`csrtool compress`, `decompress`, `inspect`: the .csr file (docs/format.md)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm import tqdm

from csrtool.cli import app
from csrtool.cli.common import ForceOpt, JsonOpt, err, guarded, out, write_json
from csrtool.codec import ADAPTIVE_DEFAULT, DEFAULT_COEF
from csrtool.errors import CsrError
from csrtool.formats.io import check_input, check_json_output, check_output
from csrtool.formats.kvcache import open_cache

DictsOpt = Annotated[Path, typer.Option("--dicts", "-d", help="Dictionary file from csrtool train-dict.")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Output file.")]


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, unit="layer", desc=desc, disable=None, dynamic_ncols=True)


# ---------------------------------------------------------------- commands


def _parse_sparsity(spec: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in spec.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise CsrError(f"--sparsity {spec!r} is not valid: pass S (keys and values) or SK,SV, positive integers")
    return (parts[0], parts[-1])


def _check_sparsity(s_k: int, s_v: int, n_atoms: int, d_k: int, d_v: int) -> None:
    """S atoms per vector can be at most the atoms N and the channels per (chunk) vector."""
    for kind, s, d in (("keys", s_k, d_k), ("values", s_v, d_v)):
        if s > min(n_atoms, d):
            raise CsrError(f"--sparsity {s} for {kind} is more than the {min(n_atoms, d)} atoms a vector can use "
                           f"({n_atoms} atoms, {d} channels per vector): pass --sparsity {min(n_atoms, d) // 2} or less")


@app.command()
@guarded
def compress(
    cache: Annotated[Path, typer.Argument(help="KV cache: csrtool cache .pt, legacy tuple .pt, or safetensors.")],
    dicts: DictsOpt,
    output: OutputOpt,
    bits: Annotated[Optional[float], typer.Option("--bits", "-b", help="Target code bits per channel (K and V averaged). Default 1.")] = None,
    sparsity: Annotated[Optional[str], typer.Option("--sparsity", "-s", help="Atoms per vector: S, or SK,SV (values: per chunk).")] = None,
    coef: Annotated[str, typer.Option("--coef", help="Coefficient format: fp8, fp16, int8, int4 or int3 for keys and values alike, or KEYS/VALUES such as fp8/int3 or fp16/fp8 (the default: fp8 keys; values as 4-bit integers with an fp8 scale per vector, which buy more atoms at the same bits, where a layer has at most an eighth of a chunk's channels in atoms, fp8 beyond).")] = DEFAULT_COEF,
    window: Annotated[Optional[int], typer.Option("--window", "-w", help="Most recent tokens kept uncompressed, in the original dtype (default 4).")] = None,
    sink: Annotated[Optional[int], typer.Option("--sink", help="First tokens kept uncompressed (attention sinks; default 4).")] = None,
    method: Annotated[str, typer.Option("--method", help="Pursuit: omp or mp.")] = "omp",
    uniform: Annotated[bool, typer.Option("--uniform", help="With --bits: same sparsity in every layer, even when the dictionaries carry train-dict's sensitivity calibration.")] = False,
    adaptive: Annotated[bool, typer.Option("--adaptive/--fixed", help="Adaptive: each vector gets as many atoms as its fit needs (up to twice S), the same bits on average with the counts paid for, each vector's indices coded as one sorted set so their order costs nothing (format version 6). Fixed: S atoms for every vector (what CSRCache.from_csr and generate --resume read).")] = ADAPTIVE_DEFAULT,
    force: ForceOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Compress a KV cache into a .csr file with sparse codes over a dictionary.

    With --bits (default 1) and calibrated dictionaries (train-dict --calibrate),
    the atoms are spread over layers and K/V where the model is most sensitive,
    at the same average bits; --sparsity or --uniform give every layer the same.
    """
    from csrtool.calibration import allocate
    from csrtool.formats import csrfile
    from csrtool.formats.dicts import load_dicts

    check_output(output, force=force)
    check_json_output(json_out)
    ds = load_dicts(check_input(dicts, "dictionary file", "train one with csrtool train-dict"))
    kv = open_cache(check_input(cache, "cache file", "save one with csrtool cache"))
    _, _, v_split = csrfile.check_fit(kv, ds)
    predictor = _predictor(ds, kv.meta, kv.keys[0].shape[0], kv.keys[0].shape[2])
    _, kv_heads, _, head_dim = kv.keys[0].shape
    parsed = None if sparsity is None else _parse_sparsity(sparsity)
    if parsed is not None and bits is None:
        _check_sparsity(*parsed, ds.n_atoms, head_dim, kv.values[0].shape[-1] // v_split)
    cfg = allocate.codec_plan(
        ds, len(kv.keys), kv_heads, head_dim,
        bits=1.0 if bits is None and sparsity is None else bits,
        sparsity=parsed,
        coef=coef, method=method, window=window, sink=sink, uniform=uniform, adaptive=adaptive,
    )
    s_k, s_v, per_layer = cfg.sparsity_k, cfg.sparsity_v, cfg.layer_sparsity
    header = csrfile.make_header(kv, ds, cfg)
    if sparsity is None:
        _note_capped(1.0 if bits is None else bits, header)
    with _bar(len(header.layers), "compress") as bar:
        size = csrfile.write_csr(output, header, csrfile.encode_sections(kv, ds, header, predictor), on_layer=lambda _: bar.update())
    report = {"output": str(output), "sparsity_k": s_k, "sparsity_v": s_v, "coef": coef, "method": method, "adaptive": adaptive,
              "layer_sparsity": None if per_layer is None else [list(p) for p in per_layer],
              "window": cfg.window, "sink": cfg.sink, "target_bits": bits, **csrfile.size_report(header, size)}
    cb = report["code_bits_per_channel"]
    (err if str(json_out) == "-" else out).print(
        f"wrote {output}: {size:,} bytes, {report['ratio_vs_fp16']:.2f}x smaller than fp16; "
        f"{'S_k/S_v per layer ' + ' '.join(f'{a}/{b}' for a, b in per_layer) if per_layer else f'S_k={s_k} S_v={s_v}'} ({coef}"
        f"{', adaptive' if adaptive else ''}), code bits/channel K {cb['k']:.4f} V {cb['v']:.4f} avg {cb['avg']:.4f}; "
        f"file bits/channel {report['bits_per_channel']['with_header']:.4f} (window {cfg.window}, sink {cfg.sink})"
    )
    write_json(json_out, report)


def _predictor(ds, meta: dict, b: int, t: int):
    """The dictionaries' model as a TokenPredictor when they were trained with the token predictor (else None)."""
    if not ds.predicted:
        return None
    from csrtool.models import load_model
    from csrtool.predictor import TokenPredictor, cache_ids

    cache_ids(meta, b, t, 1 << 31)  # before the model loads: are the ids there at all?
    model = ds.source.get("model")
    err.print(f"loading {model} for the token predictor (the dictionaries were trained with it)")
    return TokenPredictor.for_dicts(load_model(model, "cpu", "float32"), ds)


@app.command()
@guarded
def decompress(
    file: Annotated[Path, typer.Argument(help="A .csr file from csrtool compress.")],
    dicts: DictsOpt,
    output: OutputOpt,
    force: ForceOpt = False,
) -> None:
    """Rebuild a KV cache (.pt, loadable with csrtool.formats.kvcache.load_cache) from a .csr file."""
    from csrtool.formats import csrfile
    from csrtool.formats.dicts import load_dicts

    check_output(output, force=force)
    reader = csrfile.open_csr(check_input(file, ".csr file", "pass a file written by csrtool compress"))
    ds = load_dicts(check_input(dicts, "dictionary file", "pass the one the file was compressed with"))
    reader.check_dicts(ds)
    hd = reader.header
    predictor = _predictor(ds, hd.meta, hd.layers[0][0], hd.n_tokens)
    with csrfile.scratch_layers(output, hd) as (keys, values):
        with _bar(len(hd.layers), "decompress") as bar:
            for i, k, v in reader.layers(ds, predictor):
                keys[i].copy_(k)
                values[i].copy_(v)
                bar.update()
        from csrtool.formats.kvcache import KVCache, save_cache

        save_cache(output, KVCache(keys, values, dict(hd.meta)))
    out.print(f"wrote {output}: {len(hd.layers)} layers, {hd.n_tokens} tokens, {hd.dtype}")


@app.command()
@guarded
def inspect(
    file: Annotated[Path, typer.Argument(help="A .csr file from csrtool compress.")],
    dicts: Annotated[Optional[Path], typer.Option("--dicts", "-d", help="Dictionary file: amortise its real size.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the header and sizes as JSON on stdout.")] = False,
) -> None:
    """Show a .csr file's header, sizes, bits per channel and compression ratios (verifies the checksum)."""
    import json

    from csrtool.formats import csrfile

    reader = csrfile.open_csr(check_input(file, ".csr file", "pass a file written by csrtool compress"))
    hd = reader.header
    dict_bytes = None
    if dicts is not None:
        dict_bytes = check_input(dicts, "dictionary file").stat().st_size
    report = {"file": str(file), "header": hd.to_json(), **csrfile.size_report(hd, reader.size, dict_bytes),
              "section_coefs": [list(hd.section_coefs(i)) for i in range(len(hd.layers))]}
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    cfg, bpc = hd.config, report["bits_per_channel"]
    b, h, t, dk, dv = hd.layers[0]
    out.print(f"[bold]{file}[/bold]  .csr v{hd.version}  model {hd.model or '?'}  dtype {hd.dtype}")
    out.print(f"  shape     {len(hd.layers)} layers x [B={b}, H={h}, T={t}, Dk={dk}, Dv={dv}]")
    out.print(f"  codec     N={hd.n_atoms} ({report['header']['codec']['index_bits']}-bit indices), S_k={cfg.sparsity_k}, "
              f"S_v={cfg.sparsity_v} x {hd.value_split} chunks, coef {cfg.coef}, {cfg.method}, window {cfg.window}, sink {cfg.sink}"
              f"{_adaptive_note(cfg)}")
    if len({tuple(f) for f in report["section_coefs"]}) > 1:  # narrow formats give way to fp8 in layers with many atoms
        kinds = Counter("/".join(f) for f in report["section_coefs"])
        out.print("  sections  K/V coefficients " + ", ".join(f"{k} in {n} layers" for k, n in kinds.items()))
    if cfg.layer_sparsity is not None:
        out.print("  per layer S_k/S_v " + " ".join(f"{a}/{b}" for a, b in cfg.layer_sparsity) + " (the two above are the maxima)")
    out.print(f"  keys      coded {hd.key_space}, cache {hd.cache_key_space}; dictionary {hd.dict_fingerprint[:16]} ({hd.dict_scope} scope)")
    out.print(f"  size      {reader.size:,} bytes = header {report['header_bytes']:,} + payload {report['payload_bytes']:,} + checksum 32")
    cb = report["code_bits_per_channel"]
    out.print(f"  bits/ch   codes K {cb['k']:.4f} V {cb['v']:.4f}; payload {bpc['payload']:.4f}; with header {bpc['with_header']:.4f}; "
              f"with dictionary {bpc['with_dict']:.4f} ({report['dict_bytes']:,} bytes over {hd.n_tokens} tokens)")
    out.print(f"  ratio     {report['ratio_vs_fp16']:.2f}x vs fp16, {report['ratio_vs_original']:.2f}x vs {hd.dtype}")
    out.print("  checksum  ok")


def _note_capped(bits: float, header) -> None:
    """Say so when --bits asks for more than codes can use (codec.max_sparsity caps every layer)."""
    from csrtool import codec

    n, c, (_, _, _, d, _) = header.n_atoms, header.value_split, header.layers[0]
    cfg = header.config
    if header.config.layer_sparsity is None and codec.bits_per_channel(n, d, cfg.sparsity_k + 1, cfg.sparsity_v + 1, c, cfg.coef) <= bits:
        used = codec.bits_per_channel(n, d, cfg.sparsity_k, cfg.sparsity_v, c, cfg.coef)
        err.print(f"note: --bits {bits:g} is more than sparse codes can use: at most S_k={cfg.sparsity_k}, S_v={cfg.sparsity_v} atoms "
                  f"(half the channels) at {used:.4f} bits per channel")


def _adaptive_note(cfg) -> str:
    """inspect's words for adaptive codes ('' for fixed ones)."""
    if not cfg.adaptive:
        return ""
    sets = ", indices set-coded" if cfg.set_indices else ""
    return f", adaptive counts (up to twice S per vector, the bits of S on average{sets})"
