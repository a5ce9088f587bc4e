"""`csrtool collect` and `csrtool cache`: capture K/V activations, save one prompt's cache."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from tqdm import tqdm

from csrtool.cli import app
from csrtool.collect import CollectConfig
from csrtool.cli.common import (
    AllowDownloadOpt, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, LayersOpt, ModelOpt, TextOpt, err, guarded, out, write_json,
)
from csrtool.errors import CsrError
from csrtool.formats.io import check_json_output, check_output, parse_layers

_DEF = CollectConfig()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clear_acts_dir(path: Path) -> None:
    """--force replaces an earlier activation directory, never an unrelated one."""
    import shutil

    from csrtool.formats.acts import MANIFEST

    if any(path.iterdir()) and not (path / MANIFEST).is_file():
        raise CsrError(f"{path} is not empty and not a csrtool activation directory: choose another --output")
    shutil.rmtree(path)


@app.command()
@guarded
def collect(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the activation shards.")],
    model: ModelOpt = "smollm2-135m",
    text: TextOpt = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="NAME[:CONFIG]:SPLIT from a local datasets cache.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", help="Tokens to collect. Default: up to 32,768 (fewer if the text is shorter, keeping 512 after them "
        "for train-dict's calibration); train-dict samples its 16,384 vectors per dictionary from them.")] = _DEF.max_tokens,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per forward window.")] = _DEF.seq_len,
    layers: LayersOpt = None,
    keys: Annotated[str, typer.Option("--keys", help="Key space: pre-rope (codes better), post-rope (as cached), or auto: pre-rope where the model allows it.")] = _DEF.key_space,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_download: AllowDownloadOpt = False,
    device_map: Annotated[Optional[str], typer.Option("--device-map", help="'auto': spread a model larger than one device over all visible GPUs (and CPU), through accelerate; one process, not under torchrun.")] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Run the model over text and save keys/values per layer and KV head as safetensors shards.

    Uses the calibration part of the built-in corpus unless --text or --dataset is given.
    Several processes or GPUs: torchrun --nproc-per-node P -m csrtool collect ... (each rank
    runs its share of the text windows into its own shards; docs/scaling.md).
    """
    from csrtool.collect import collect as run_collect, tokenize
    from csrtool.corpus import load_text, text_source
    from csrtool.distributed import Dist, launched
    from csrtool.models import kv_shape, load_model, resolve_device

    if device_map is not None and launched():
        raise CsrError("--device-map spreads one model over all visible devices: run it as one process, without torchrun")
    dist = Dist.from_env(resolve_device(device) if device_map is None else "cpu")

    def setup():
        check_output(output, force=force, is_dir=True)
        check_json_output(json_out)
        body = load_text(text, "calibration", dataset)
        loaded = load_model(model, str(dist.device) if device_map is None else device, dtype, allow_download, device_map=device_map)
        n_layers = kv_shape(loaded.config)[0]
        cfg = CollectConfig(max_tokens=max_tokens, seq_len=seq_len, key_space=keys, layers=tuple(parse_layers(layers, n_layers)))
        ids = tokenize(loaded.tokenizer, body)  # tokenized once: the bar's total needs the resolved count
        return ids, loaded, cfg.resolved(ids.numel())

    ids, loaded, cfg = dist.settle(setup, "loading")
    if dist.root and output.exists():
        dist.settle(lambda: _clear_acts_dir(output), "clearing --output")
    elif dist.world > 1:
        dist.settle(lambda: None, "clearing --output")  # wait for rank 0 before writing shards
    mine = sum(min(cfg.seq_len, cfg.max_tokens - s) for s in dist.share(range(0, cfg.max_tokens, cfg.seq_len)))  # rank 0's bar
    with tqdm(total=mine, unit="tok", desc="collect", file=None, dynamic_ncols=True, disable=None if dist.root else True) as bar:
        manifest = run_collect(loaded, ids, output, cfg, text_source(text, "calibration", dataset), bar.update, dist=dist)
    if dist.root:
        _show(manifest, loaded, output, json_out)
    dist.close()  # ranks leave together, after rank 0 reported


def _show(manifest: dict, loaded, output: Path, json_out: Optional[Path]) -> None:
    """The result table and the --json manifest (rank 0 only under torchrun)."""
    manifest["tokens_per_s"] = manifest["tokens"] / max(manifest["seconds"], 1e-9)
    manifest["load_seconds"] = loaded.load_seconds
    manifest["peak_rss_mib"] = _peak_rss_mib()
    table = Table(title=f"collected {output}")
    table.add_column("item")
    table.add_column("value", justify="right")
    for key in ("model", "key_space", "tokens", "num_layers", "num_kv_heads", "head_dim", "seq_len"):
        table.add_row(key, str(manifest[key]))
    table.add_row("layers stored", str(len(manifest["layers"])))
    table.add_row("shards", str(len(manifest["shards"])))
    table.add_row("tokens/s", f"{manifest['tokens_per_s']:.0f}")
    table.add_row("model load (s)", f"{loaded.load_seconds:.1f}")
    table.add_row("peak memory (MiB)", f"{manifest['peak_rss_mib']:.0f}")
    out.print(table)
    write_json(json_out, manifest)


@app.command()
@guarded
def cache(
    output: Annotated[Path, typer.Option("--output", "-o", help="Cache file to write (.pt).")],
    model: ModelOpt = "smollm2-135m",
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text.")] = None,
    text: TextOpt = None,
    heldout: Annotated[bool, typer.Option("--heldout", help="Use the built-in corpus's held-out part as the prompt.")] = False,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Truncate the prompt to N tokens.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_download: AllowDownloadOpt = False,
    force: ForceOpt = False,
) -> None:
    """Save the KV cache of one prompt as a plain dict of tensors (the input of compress)."""
    from csrtool.collect import prompt_cache
    from csrtool.corpus import load_text, text_source
    from csrtool.formats.kvcache import save_cache
    from csrtool.models import load_model

    check_output(output, force=force)
    if sum(x is not None and x is not False for x in (prompt, text or None, heldout or None)) != 1:
        raise CsrError("give exactly one of --prompt STR, --text FILE or --heldout")
    if prompt is not None:
        body, source = prompt, "prompt"
    else:
        body, source = load_text(text, "heldout"), text_source(text, "heldout")
    loaded = load_model(model, device, dtype, allow_download)
    with err.status("running the prompt"):
        kv = prompt_cache(loaded, body, max_tokens, source)
    save_cache(output, kv)
    b, h, t, d = kv.shape
    out.print(f"saved {output}: {kv.n_layers} layers x {h} KV heads x {t} tokens x {d} channels ({kv.keys[0].dtype})")
