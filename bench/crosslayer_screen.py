"""Screen cross-layer prediction by reconstruction: OMP error with and without it, per layer, on texts of other domains.

For each --layers layer and kind, the vectors of a --test collection (`csrtool collect --text ...`)
are coded at each --sparsity in two ways, both after the token predictor of --dicts (a
dictionary file trained without cross-layer maps):
- before: with --dicts' own dictionary;
- after: minus a cross-layer prediction (csrtool.crosslayer: from the layer below's keys and values,
  and for values the layer's own keys) fitted by least squares on the calibration set --acts, its
  inputs decoded as a decoder has them (--dicts' dictionaries at --decode-sparsity atoms, OMP), with
  a dictionary of the same size trained on what it leaves (k-means, as train-dict).
Reported: Σ‖x − x̂‖² / Σ‖x − x̄‖², the same denominator for both (docs/quality.md, thirteenth pass).

    python bench/crosslayer_screen.py --dicts out/dicts-plain.safetensors --acts out/acts \
        --test vim=out/acts-vim --test lic=out/acts-lic --layers 2,5,8,12,20,28 --json screen.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csrtool import crosslayer  # noqa: E402
from csrtool.engine import pursuit  # noqa: E402
from csrtool.engine.kmeans import kmeans  # noqa: E402
from csrtool.formats.acts import ActsReader  # noqa: E402
from csrtool.formats.dicts import load_dicts  # noqa: E402
from csrtool.models import load_model  # noqa: E402
from csrtool.predictor import TokenPredictor, apply_map  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dicts", required=True, type=Path)
    ap.add_argument("--acts", required=True, type=Path, help="calibration collection (the maps and new dictionaries train on it)")
    ap.add_argument("--test", action="append", required=True, help="NAME=DIR: a collection of another text")
    ap.add_argument("--layers", default="2,5,8,12,20,28")
    ap.add_argument("--sparsity", default="1,2,4")
    ap.add_argument("--decode-sparsity", type=int, default=3)
    ap.add_argument("--cal-tokens", type=int, default=16384)
    ap.add_argument("--test-tokens", type=int, default=2048)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dicts = load_dicts(args.dicts)
    if dicts.cross_layer or not dicts.predicted:
        sys.exit("--dicts: a dictionary file with the token predictor and without cross-layer maps (train-dict --no-cross-layer)")
    cal = ActsReader(args.acts)
    tp = TokenPredictor.for_dicts(load_model(cal.manifest["model"], device="cpu"), dicts)
    sets = {"cal": (cal, args.cal_tokens)} | {n: (ActsReader(Path(p)), args.test_tokens) for n, p in (t.split("=", 1) for t in args.test)}

    def vectors(name: str, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [T, H, D], the offset the plain dictionary subtracts: token prediction plus mean)."""
        reader, n = sets[name]
        x, ids = reader.load(layer, kind)[:n].float(), reader.ids()[:n]
        pred = apply_map(tp.kv(layer, kind, ids), dicts.pmap(layer, kind)).transpose(0, 1) + dicts.mean(layer, kind)[0]
        return x, pred

    def code(r: torch.Tensor, atoms: torch.Tensor, s: int) -> torch.Tensor:
        flat = r.reshape(-1, r.shape[-1])
        idx, coef = pursuit.encode(flat, atoms, s, "omp")
        return pursuit.decode(idx, coef, atoms).reshape(r.shape)

    def decoded(name: str, layer: int, kind: str) -> torch.Tensor:
        x, off = vectors(name, layer, kind)
        return (off + code(x - off, dicts.get(layer, kind)[0, 0].float(), args.decode_sparsity)).transpose(0, 1)[None]

    sparsities = [int(s) for s in args.sparsity.split(",")]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for layer in (int(v) for v in args.layers.split(",")):
        for kind in ("k", "v"):
            parts = {n: [decoded(n, *src) for src in crosslayer.inputs(layer, kind)] for n in sets}
            x, off = vectors("cal", layer, kind)
            w = crosslayer.fit(crosslayer.features(parts["cal"])[0], x - off)
            left = (x - off - crosslayer.predict(w, parts["cal"])[0].transpose(0, 1)).reshape(-1, x.shape[-1])
            plain = dicts.get(layer, kind)[0, 0].float()
            sample = left[torch.randperm(left.shape[0], generator=gen)[:16384]]
            atoms = kmeans(sample, plain.shape[0], 4, gen, normalize=True)
            for name in sets:
                if name == "cal":
                    continue
                x, off = vectors(name, layer, kind)
                off2 = off + crosslayer.predict(w, parts[name])[0].transpose(0, 1)
                den = float((x - x.mean(0)).pow(2).sum())
                for s in sparsities:
                    before = float((x - off - code(x - off, plain, s)).pow(2).sum()) / den
                    after = float((x - off2 - code(x - off2, atoms, s)).pow(2).sum()) / den
                    rows.append({"layer": layer, "kind": kind, "text": name, "sparsity": s, "before": before, "after": after})
                    print(f"layer {layer:2d} {kind} {name:8s} S={s}: {before:.3f} -> {after:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
