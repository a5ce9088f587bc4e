"""bench/paired.py: two eval runs compared position by position."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_json(path: Path, nll: torch.Tensor, kl: torch.Tensor) -> Path:
    docs = [{"name": "a.txt", "scored": 100}, {"name": "b.txt", "scored": 92}]
    path.write_text(json.dumps({"per_position": {"documents": docs, "reference_nll": [0.0] * 192,
                                                 "methods": {"csr": {"nll": nll.tolist(), "kl": kl.tolist()}}}}))
    return path


def test_paired_difference_of_two_runs(tmp_path):
    g = torch.Generator().manual_seed(0)
    nll, kl = torch.rand(192, generator=g, dtype=torch.float64) * 3, torch.rand(192, generator=g, dtype=torch.float64) * 0.1
    a = run_json(tmp_path / "a.json", nll, kl)
    b = run_json(tmp_path / "b.json", nll + 0.01, kl - 0.002)  # every position 0.01 nats worse, KL 0.002 lower
    out = tmp_path / "out.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "paired.py"), str(a), str(b), "--json", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    row = json.loads(out.read_text())["methods"]["csr"]
    assert all(math.isclose(r, math.exp(0.01), rel_tol=1e-9) for r in row["ppl_ratio"])  # a constant shift: no spread
    assert all(math.isclose(c, -0.002, abs_tol=1e-12) for c in row["kl_change"])
    assert math.isclose(row["kl_a"], float(kl.mean()), rel_tol=1e-9)
    other = run_json(tmp_path / "c.json", nll[:150], kl[:150])
    json_c = json.loads(other.read_text())
    json_c["per_position"]["documents"] = [{"name": "a.txt", "scored": 100}, {"name": "b.txt", "scored": 50}]
    other.write_text(json.dumps(json_c))
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "paired.py"), str(a), str(other)], capture_output=True, text=True)
    assert res.returncode != 0 and "different documents" in res.stderr
