"""`csrtool train-dict`: learn NeuralDict dictionaries from a `csrtool collect` directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from csrtool.cli import app
from csrtool.cli.common import DeviceOpt, ForceOpt, JsonOpt, LayersOpt, err, guarded, out, write_json
from csrtool.engine.neuraldict import TrainConfig
from csrtool.errors import CsrError
from csrtool.formats.dicts import dict_name, parse_dict_name
from csrtool.formats.io import check_json_output, check_output, parse_layers

_DEF = TrainConfig()


@app.command("train-dict")
@guarded
def train_dict(
    acts_dir: Annotated[Path, typer.Argument(help="Activation directory written by csrtool collect.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Dictionary file to write (.safetensors).")],
    atoms: Annotated[int, typer.Option("--atoms", "-n", help="Atoms N per dictionary (index bits = log2 N).")] = _DEF.atoms,
    sparsity: Annotated[int, typer.Option("--sparsity", "-s", help="Atoms per vector S used while training; compress may pick another S.")] = _DEF.sparsity,
    value_split: Annotated[Optional[int], typer.Option("--value-split", help="Split value vectors into this many channel chunks, one dictionary each (keys: 1). Default: chunks of 128 channels where head_dim is a larger multiple of 128 (Gemma-3's 256: 2, lower KL at 1 bit and level at 2: docs/quality.md, fifteenth pass), else 1.", show_default=False)] = None,
    scope: Annotated[str, typer.Option("--scope", help="'head': one dictionary per KV head; 'layer': one per layer shared by its heads.")] = _DEF.scope,
    layers: LayersOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", "-e", help="Maximum training epochs per dictionary (0 = k-means only).")] = _DEF.epochs,
    encoder: Annotated[str, typer.Option("--encoder", help="Pursuit used in training: mp or omp.")] = _DEF.encoder,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Vectors per optimiser step.")] = _DEF.batch_size,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate (cosine schedule).")] = _DEF.lr,
    max_vectors: Annotated[int, typer.Option("--max-vectors", help="Training vectors per dictionary (random subsample above).")] = _DEF.max_vectors,
    seed: Annotated[int, typer.Option("--seed", help="Seed of splits, initialisation and batches.")] = _DEF.seed,
    center: Annotated[bool, typer.Option("--center/--no-center", help="Code each vector minus its dictionary's training mean (stored in the file; keys before RoPE carry most of their energy in it).")] = _DEF.center,
    predictor: Annotated[Optional[bool], typer.Option("--predictor/--no-predictor", help="Code what the token predictor leaves: the part of each key and value its token alone decides (the model's K/V of the token after a newline, mapped per head by least squares) is subtracted first and costs no bits. Dictionaries then cover tokens the calibration text never had (docs/quality.md, sixth pass). Compress, decompress, eval and generate load the model to use them; a live cache (generate) holds each distinct token's prediction (as much as one dense token). Default: on where the collection allows it (token ids and pre-RoPE keys, as csrtool collect writes them; not with --dist data).", show_default=False)] = None,
    predictor_context: Annotated[int, typer.Option("--predictor-context", help="Tokens each prediction reads with the predictor: 1 the token alone, 2 the token after its predecessor (one more token per model pass; better on SmolLM2's development texts, worse on Gemma-3's: docs/quality.md).")] = _DEF.predictor_context,
    predictor_depth: Annotated[int, typer.Option("--predictor-depth", help="Predict only the first N layers (0: every layer): a live cache then holds N layers' predictions per distinct token instead of all; the first 4 or 8 keep little of the quality gain (docs/quality.md).")] = _DEF.predictor_depth,
    device: DeviceOpt = "cpu",
    cross_layer: Annotated[Optional[bool], typer.Option("--cross-layer/--no-cross-layer", help="Predict each layer's keys and values from the decoded layers below (--cross-depth of them; the values also from the layer's own keys) before coding: the dictionaries code what that leaves, 15-35% less coding error in the middle and deep layers and 16-39% less KL off the calibration domain (docs/quality.md, thirteenth pass). Trains the layers in order, in one process. Compress, decompress and eval use these dictionaries; a live cache (generate) cannot yet: train with --no-cross-layer for it. Default: on unless --layers picks a subset or torchrun runs several processes.", show_default=False)] = None,
    cross_depth: Annotated[int, typer.Option("--cross-depth", help="Layers below each cross-layer prediction reads (1 to 8). 2, measured with a 10x stronger ridge than the fit has now, was worse at 2 bits on both models' other-domain texts (KL +5% to +29%) and trained 7-12% slower: docs/quality.md, fourteenth pass.")] = _DEF.cross_depth,
    calibrate: Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="After training, load the model and measure each layer's sensitivity on the held-out probe window collect kept, so compress --bits spends bits where they matter.")] = True,
    dist_mode: Annotated[str, typer.Option("--dist", help="Under torchrun: 'shard' gives each rank its share of the dictionaries (same bytes as one process); 'data' trains each dictionary on all ranks, each reading its own activation shards (for a few huge --scope layer dictionaries); 'auto' shards unless there are fewer dictionaries than ranks. See docs/scaling.md.")] = "auto",
    json_out: JsonOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train one dictionary per layer, K/V, head (or layer) and channel chunk; write them to one file.

    Each dictionary is k-means centroids (the defaults: 8,192 atoms per layer, the best
    setting measured); with --epochs > 0 NeuralDict refines them (Adam through sparse
    codes, with an atom-diversity penalty). An interrupted run resumes from
    OUTPUT.partial/ when re-run with the same options (one process only).

    Several processes or GPUs: torchrun --nproc-per-node P -m csrtool train-dict ... (see --dist, docs/scaling.md).
    """
    from csrtool.distributed import Dist
    from csrtool.formats.acts import ActsReader
    from csrtool.models import resolve_device
    from csrtool.train import default_value_split, partial_dir, train_dicts, training_vectors

    dist = Dist.from_env(resolve_device(device))

    def setup():
        check_output(output, force=force)
        check_json_output(json_out)
        reader = ActsReader(acts_dir)
        why_not: dict[str, str | None] = {}  # why a default that is on where it can be was left out
        use = predictor
        if use is None:  # the default: on where the collection allows it
            why_not["predictor"] = _predictor_unavailable(reader, dist_mode)
            use = why_not["predictor"] is None
        picked = parse_layers(layers, max(reader.layers) + 1) if layers is not None else None
        cross = cross_layer
        if cross is None:  # the default: on where the layers can be trained in order, in one process
            why_not["cross_layer"] = _cross_unavailable(reader, picked, dist.world, cross_depth)
            cross = why_not["cross_layer"] is None
        split = default_value_split(reader.head_dim) if value_split is None else value_split
        cfg = TrainConfig(atoms=atoms, sparsity=sparsity, value_split=split, scope=scope, encoder=encoder, epochs=epochs,
                          batch_size=batch_size, lr=lr, max_vectors=max_vectors, seed=seed, center=center, predictor=use,
                          predictor_context=predictor_context, predictor_depth=predictor_depth, cross_layer=cross,
                          cross_depth=cross_depth)
        return cfg, reader, picked, why_not

    cfg, reader, picked, why_not = dist.settle(setup, "checking the options")
    dev = dist.device

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not dist.root) as bar:
        overall = bar.add_task("dictionaries", total=None)
        current = bar.add_task("", total=cfg.epochs, visible=False)

        def on_event(event: str, info: dict) -> None:
            if event == "start":
                bar.update(overall, total=info["total"])
                if dist.root:  # after train_dicts checked the options
                    _note_few_vectors(training_vectors(reader, cfg), cfg.atoms)
                if info["resumed"]:
                    err.print(f"resuming from {partial_dir(output)}: {info['resumed']} of {info['total']} dictionaries already trained")
            elif event == "dict":
                bar.reset(current, total=max(info["epochs"], 1), description=f"  {info['name']}", visible=True)
            elif event == "epoch":
                bar.update(current, completed=info["epoch"], description=f"  {info['name']} val {info['val_rel_err']:.4f}")
            elif event == "done":
                bar.advance(overall)

        predict = token_predictor = None
        if cfg.predictor:
            token_predictor = dist.settle(lambda: _token_predictor(reader, dev, cfg.predictor_context), "loading the model for the token predictor")
            predict = token_predictor.kv
        calib = None
        if calibrate and reader.manifest.get("probe_ids") and picked is None:
            def calib(atoms, source, means, maps, xmaps, config):
                from csrtool.calibration.calibrate import calibrate as run_calibration, merge
                from csrtool.models import load_model

                task = bar.add_task("sensitivity", total=None)

                def mine() -> dict:  # this rank's share of the layers
                    try:
                        loaded = token_predictor.loaded if token_predictor is not None else load_model(reader.manifest["model"], device=str(dev))
                    except CsrError as exc:
                        kept = f"the trained dictionaries are kept in {partial_dir(output)}" if dist.world == 1 else "nothing was written"
                        raise CsrError(f"cannot load {reader.manifest['model']} to calibrate layer sensitivities ({exc}); {kept}: "
                                       "re-run with --no-calibrate to write them") from None
                    return run_calibration(loaded, atoms, source, reader.manifest["probe_ids"], means=means,
                                           progress=lambda done, total: bar.update(task, completed=done, total=total),
                                           layers=dist.share(sorted({int(n.split(".")[1]) for n in atoms})), maps=maps, predictor=token_predictor,
                                           xmaps=xmaps, config=config)

                return merge(dist.gather(dist.settle(mine, "sensitivity calibration")))
        elif calibrate and dist.root:
            why = "--layers picks a subset" if picked is not None else f"{acts_dir} has no probe window (collected by an older csrtool or with too little text)"
            err.print(f"not calibrating layer sensitivities ({why}): compress --bits will give every layer the same sparsity")
        report = train_dicts(reader, output, cfg, picked, dev, on_event, calibrate=calib, dist=dist, dist_mode=dist_mode, predict=predict)
    if dist.root:
        _show(report, cfg, output, json_out, why_not)
    dist.close()  # ranks leave together, after rank 0 reported


def _predictor_unavailable(reader, dist_mode: str) -> str | None:
    """Why the default token predictor cannot be used with this collection (None: it can)."""
    from csrtool.predictor import collection_ids

    if dist_mode == "data":
        return "--dist data cannot fit it (use --dist shard)"
    try:
        collection_ids(reader)
    except CsrError as exc:
        return str(exc)
    return None


def _cross_unavailable(reader, picked: list[int] | None, world: int, depth: int) -> str | None:
    """Why the default cross-layer prediction is left out (None: it is used)."""
    from csrtool.train import XREF_TOKENS_PER_INPUT

    if picked is not None and sorted(picked) != list(range(len(picked))):
        return "--layers picks a subset; each layer is predicted from the one below"
    if world > 1:
        return "torchrun: the layers train in order, in one process"
    below = min(depth, max(reader.layers))  # the widest map, the top layer's values, reads this many layers below
    need = XREF_TOKENS_PER_INPUT * (2 * below + 1) * reader.num_kv_heads * reader.head_dim
    if reader.tokens < need:
        return f"{reader.tokens:,} collected tokens are too few to fit its maps; collect at least {need:,}"
    return None


def _token_predictor(reader, device, context: int):
    """The collection's model as a TokenPredictor (its `.loaded` serves calibration too)."""
    from csrtool.models import load_model
    from csrtool.predictor import TokenPredictor, collection_ids

    collection_ids(reader)  # before the model loads: can this collection train a predictor at all?
    try:
        loaded = load_model(reader.manifest["model"], device=str(device))
    except CsrError as exc:
        raise CsrError(f"cannot load {reader.manifest['model']} for the token predictor ({exc}): make it loadable, "
                       "or train without the predictor (--no-predictor)") from None
    return TokenPredictor.for_model(loaded, "pre-rope", context)


def _note_few_vectors(rows: int, atoms: int) -> None:
    """Say so when a dictionary has fewer training vectors than atoms: many atoms then repeat others, yet every index
    still pays for all of them."""
    from csrtool.engine.packing import index_bits

    if rows >= atoms:
        return
    fits = 1 << max(1, (max(rows, 4) // 2).bit_length() - 1)  # the defaults' ratio: 8,192 atoms from 16,384 vectors
    err.print(f"note: each dictionary trains on {rows:,} vectors, fewer than its {atoms:,} atoms: many atoms will repeat "
              f"while every index costs {index_bits(atoms)} bits; collect more tokens (csrtool collect "
              f"--max-tokens) or pass --atoms {fits}")


def _show(report: dict, cfg: TrainConfig, output: Path, json_out: Optional[Path], why: Optional[dict] = None) -> None:
    """The result table and the --json report (rank 0 only under torchrun); why: why the default token predictor
    ("predictor") and cross-layer prediction ("cross_layer") were left out, where they were."""
    why_not, why_cross = (why or {}).get("predictor"), (why or {}).get("cross_layer")
    centred = " (x: vectors minus their dictionary's mean)" if cfg.center else ""
    table = Table(title=f"{output}: held-out relative error ‖x − x̂‖²/‖x‖² at S={cfg.sparsity} ({cfg.encoder}){centred}")
    table.add_column("layer", justify="right")
    table.add_column("K val", justify="right")
    table.add_column("V val", justify="right")
    table.add_column("K train", justify="right")
    table.add_column("V train", justify="right")
    rows = []
    for layer in sorted({parse_dict_name(name)[0] for name in report["errors"]}):
        k, v = report["errors"][dict_name(layer, "k")], report["errors"][dict_name(layer, "v")]
        rows.append({"layer": layer, "k_val_rel_err": k["mean_val_rel_err"], "v_val_rel_err": v["mean_val_rel_err"],
                     "k_train_rel_err": k["mean_train_rel_err"], "v_train_rel_err": v["mean_train_rel_err"]})
        table.add_row(str(layer), *(f"{rows[-1][c]:.4f}" for c in ("k_val_rel_err", "v_val_rel_err", "k_train_rel_err", "v_train_rel_err")))
    out.print(table)
    if report["sensitivity"]:
        kl = report["sensitivity"]["kl"]
        top = sorted(kl, key=kl.get, reverse=True)[:4]
        out.print("most sensitive (KL at the 1-bit sparsity): " + ", ".join(f"{n} {kl[n]:.4f}" for n in top))
    if cfg.predictor:
        out.print("token predictor: on (compress, decompress, eval and generate load the model to use these dictionaries)")
    else:
        out.print(f"token predictor: off ({why_not or '--no-predictor'})")
    if cfg.cross_layer:
        out.print("cross-layer prediction: on (compress, decompress and eval; a live cache cannot use it yet: train with --no-cross-layer for generate)")
    else:
        out.print(f"cross-layer prediction: off ({why_cross or '--no-cross-layer'})")
    if cfg.value_split > 1:
        out.print(f"values: {cfg.value_split} chunks of {report['source']['head_dim'] // cfg.value_split} channels, one dictionary each (--value-split)")
    out.print(f"trained {report['trained']}, resumed {report['resumed']} dictionaries; wrote {output} (fingerprint {report['fingerprint'][:12]})")
    write_json(json_out, {**report, "layers": rows, "predictor": cfg.predictor, **({"predictor_off": why_not} if why_not else {}),
                          "cross_layer": cfg.cross_layer, **({"cross_layer_off": why_cross} if why_cross else {})})
