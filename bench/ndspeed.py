"""NeuralDict / k-means training time: this tree against a git ref, in the same run.

Each tree (the working tree, and `--ref`'s files via `git archive`) trains the
dictionaries of --layers x {k, v} of one activation set with the same TrainConfig,
each in its own subprocess pinned to the calling process's CPUs with 1 thread.
Reported per tree: wall seconds of train_dictionary per dictionary and in total,
a sha256 over the atoms (equal across trees when nothing changed what is
computed), the validation error, and with --held the relative error of OMP codes
at S=4 on held-out activations (the vectors minus the training mean). Ratios are
new / ref. A --config-new JSON object changes the config of this tree only (e.g.
a larger batch with its learning rate), to measure a new setting against the old.

    taskset -c 1 python bench/ndspeed.py --acts /work/nd/acts-32k --layers 15 \\
        --config '{"epochs": 1, "max_vectors": 65536}' --ref main --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(acts: str, layers: list[int], config: dict, held: str | None) -> dict:
    import torch

    torch.set_num_threads(1)
    from csrtool.engine import pursuit
    from csrtool.engine.neuraldict import TrainConfig, rel_err, train_dictionary
    from csrtool.formats.acts import ActsReader
    from csrtool.train import group_vectors, unit_name, unit_seed

    cfg = TrainConfig(**config)
    reader, held_r = ActsReader(Path(acts)), (ActsReader(Path(held)) if held else None)
    out, digest, total = [], hashlib.sha256(), 0.0
    for layer in layers:
        for kind in ("k", "v"):
            x = group_vectors(reader.load(layer, kind), "layer", 0, 0, 1)
            mu = x.mean(0)
            name = unit_name(layer, kind, 0, 0)
            t0 = time.perf_counter()
            atoms, stats = train_dictionary(x - mu, cfg, seed=unit_seed(cfg.seed, name))
            dt = time.perf_counter() - t0
            total += dt
            digest.update(atoms.numpy().tobytes())
            row = {"name": name, "seconds": dt, "val_rel_err": stats["val_rel_err"], "epochs": stats["epochs"]}
            if held_r is not None:
                xh = group_vectors(held_r.load(layer, kind), "layer", 0, 0, 1) - mu
                idx, coef = pursuit.encode(xh, atoms, 4, "omp")
                row["held_rel_err_s4"] = rel_err(xh, pursuit.decode(idx, coef, atoms))
            out.append(row)
    return {"torch": torch.__version__, "seconds": total, "atoms_sha256": digest.hexdigest(), "dicts": out}


def run_tree(src: Path, args: argparse.Namespace, config: dict) -> dict:
    payload = json.dumps({"acts": args.acts, "layers": args.layers, "config": config, "held": args.held})
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code = f"import json, sys; sys.path.insert(0, {str(src)!r}); sys.argv[1:] = []; " \
           f"from importlib.util import spec_from_file_location, module_from_spec; " \
           f"s = spec_from_file_location('ndspeed', {str(ROOT / 'bench' / 'ndspeed.py')!r}); m = module_from_spec(s); s.loader.exec_module(m); " \
           f"print(json.dumps(m.child(**json.loads(sys.stdin.read()))))"
    res = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True, env=env, cwd=src)
    if res.returncode:
        sys.exit(f"tree {src} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--acts", required=True)
    ap.add_argument("--layers", default="15", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--config", default="{}", help="TrainConfig fields (JSON) for both trees")
    ap.add_argument("--config-new", default="{}", help="TrainConfig fields (JSON) for this tree only, over --config")
    ap.add_argument("--ref", default="main", help="git ref to compare against ('' to time this tree only)")
    ap.add_argument("--held", help="held-out activation directory (same layers)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    base = json.loads(args.config)
    result = {"acts": args.acts, "layers": args.layers, "config": base, "config_new": json.loads(args.config_new),
              "new": run_tree(ROOT, args, {**base, **json.loads(args.config_new)})}
    if args.ref:
        with tempfile.TemporaryDirectory() as tmp:
            arch = subprocess.run(["git", "-C", str(ROOT), "archive", args.ref, "csrtool"], capture_output=True, check=True).stdout
            tar_path = Path(tmp) / "ref.tar"
            tar_path.write_bytes(arch)
            with tarfile.open(tar_path) as tf:
                tf.extractall(tmp, filter="data")
            result["ref_name"] = args.ref
            result["ref"] = run_tree(Path(tmp), args, base)
        result["time_ratio_new_over_ref"] = result["new"]["seconds"] / result["ref"]["seconds"]
        result["same_atoms"] = result["new"]["atoms_sha256"] == result["ref"]["atoms_sha256"]
        if args.held:
            mean = lambda r: sum(d["held_rel_err_s4"] for d in r["dicts"]) / len(r["dicts"])  # noqa: E731
            result["held_rel_err_ratio_new_over_ref"] = mean(result["new"]) / mean(result["ref"])
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
