"""Speed-up of `torchrun --nproc-per-node 2 -m csrtool train-dict` over one process, same fixed workload.

Synthetic activations (L layers x 2 kinds x H heads of 2-sparse mixes), --scope head, --no-calibrate,
so the work is the dictionaries alone: 1 process and 2 processes (--dist shard) alternate `--repeat`
times in the same run (the machine is shared: the ratio of neighbouring runs is what is reported,
with its spread). Times are whole-command wall times, start-up included; the start-up alone
(`csrtool --version` under each launcher) is measured too, so the training part can be read off.

    python bench/distributed.py --json out/bench/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csrtool.formats.acts import ActsWriter  # noqa: E402


def make_acts(path: Path, layers: int, heads: int, dim: int, tokens: int) -> None:
    g = torch.Generator().manual_seed(0)
    w = ActsWriter(path, {"model": "synthetic", "key_space": "post-rope", "num_kv_heads": heads, "head_dim": dim,
                          "layers": list(range(layers))}, shard_tokens=tokens // 2)
    for _ in range(tokens // 256):
        block = {}
        for layer in range(layers):
            for kind in "kv":
                base = torch.nn.functional.normalize(torch.randn(heads, 64, dim, generator=g), dim=2)
                idx = torch.randint(64, (256, heads, 2), generator=g)
                block[(layer, kind)] = (torch.randn(256, heads, 2, 1, generator=g) * base[torch.arange(heads)[None, :, None], idx]).sum(2)
        w.add(block)
    w.close()


def run(procs: int, args: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] if procs > 1 else [sys.executable]
    cmd = [*launch, "-m", "csrtool", *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--atoms", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    opts = ["--atoms", str(a.atoms), "--sparsity", "4", "--epochs", str(a.epochs), "--scope", "head", "--no-calibrate",
            "--device", "cpu", "--dist", "shard"]
    with tempfile.TemporaryDirectory() as tmp:
        acts = Path(tmp) / "acts"
        make_acts(acts, a.layers, a.heads, a.dim, a.tokens)
        one, two, ratios, start1, start2 = [], [], [], [], []
        for _ in range(a.repeat):
            one.append(run(1, ["train-dict", str(acts), "-o", str(Path(tmp) / "d1.safetensors"), "--force", *opts]))
            two.append(run(2, ["train-dict", str(acts), "-o", str(Path(tmp) / "d2.safetensors"), "--force", *opts]))
            ratios.append(one[-1] / two[-1])
            start1.append(run(1, ["--version"]))
            start2.append(run(2, ["--version"]))
        identical = (Path(tmp) / "d1.safetensors").read_bytes() == (Path(tmp) / "d2.safetensors").read_bytes()
    result = {
        "workload": {**{k: v for k, v in vars(a).items() if k != "json"}, "dictionaries": a.layers * 2 * a.heads, "threads_per_rank": 1},
        "cpu_count": os.cpu_count(),
        "seconds_1proc": one,
        "seconds_2proc": two,
        "startup_seconds_1proc": start1,
        "startup_seconds_2proc": start2,
        "speedup_after_startup": statistics.median(o - s1 for o, s1 in zip(one, start1)) / statistics.median(t - s2 for t, s2 in zip(two, start2)),
        "speedup": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "all": ratios},
        "byte_identical": identical,
    }
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
