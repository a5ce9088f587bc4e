"""Probe: code keys in a query-weighted, mean-centred space (x' = (x - mu) * sqrt(w)).

Attention sees a key only through q . R(p) k. Averaged over positions, RoPE
mixes each channel pair (i, i + D/2), so the expected logit error of a key error
e (pre-RoPE) is sum_i w_i (e_i^2 + e_{i+D/2}^2) with w_i the mean query energy of
pair i (over the KV head's query group). Coding keys after scaling channels by
sqrt(w) makes the pursuit minimise that error instead of plain ||e||^2; removing
the per-head key mean mu (stored exactly) frees the atom that codes it.

Key dictionaries here are k-means only (epochs 0, N=1024) for every variant, so
the variants compare the key space alone; values use the given dictionary file.

    python bench/key_metric.py --acts out/acts-pre --dicts out/dicts-pre.safetensors --json out/bench/keymetric.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from csrtool import codec  # noqa: E402
from csrtool.corpus import load_text  # noqa: E402
from csrtool.formats.dicts import load_dicts  # noqa: E402
from csrtool.engine.neuraldict import TrainConfig, train_dictionary  # noqa: E402
from csrtool.eval import runner  # noqa: E402
from csrtool.eval.suite import summarize  # noqa: E402
from csrtool.models import rope_info  # noqa: E402
from heldout import heldout_reference  # noqa: E402


@torch.no_grad()
def query_pair_energy(model, ids: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """w [L, H, D]: mean query energy of each channel's RoPE pair, per layer and KV head (pre-RoPE queries)."""
    layers = model.model.layers
    acc = {}

    def hook(i):
        def fn(mod, inp, out):
            q = out[0].float().reshape(out.shape[1], -1, head_dim)  # [T, Hq, D]
            hq = q.shape[1]
            q = q.reshape(q.shape[0], heads, hq // heads, head_dim)
            e = q.pow(2).mean(dim=(0, 2))  # [H, D]
            half = head_dim // 2
            pair = e[:, :half] + e[:, half:]
            acc[i] = acc.get(i, 0) + torch.cat([pair, pair], dim=1)
        return fn

    hs = [layer.self_attn.q_proj.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for start in range(0, ids.shape[1], 512):
            model(input_ids=ids[:, start : start + 512])
    finally:
        for h in hs:
            h.remove()
    w = torch.stack([acc[i] for i in range(len(layers))])  # [L, H, D]
    return w / w.mean(dim=-1, keepdim=True)


class KeyAffineCSR:
    """Keys: unrotate, x' = (x - mu) * s, OMP over k-means atoms, fp8; values: the dictionary file."""

    def __init__(self, katoms, mu, scale, vdicts, s_k, s_v, rope, name):
        self.katoms, self.mu, self.scale, self.vdicts = katoms, mu, scale, vdicts
        self.s_k, self.s_v, self.rope, self.name = s_k, s_v, rope, name
        n = katoms[0].shape[2]
        self.bits_k = codec.vector_bits(n, s_k, 1, "fp8") / katoms[0].shape[-1]
        self.bits_v = codec.vector_bits(vdicts.n_atoms, s_v, 1, "fp8") / katoms[0].shape[-1]
        self.side_bits = 0

    def reconstruct(self, layer, kind, x, positions):
        if kind == "v":
            return codec.roundtrip(x, self.vdicts.get(layer, "v"), self.s_v, "fp8", "omp")
        rp = codec.RopeParams.from_meta({"rope": self.rope, "position_offset": int(positions[0])}).for_layer(layer)
        kc = codec.to_code_space(x, "pre-rope", "post-rope", rp)  # [B, H, T, D]
        mu, s = self.mu[layer][None, :, None], self.scale[layer][None, :, None]
        y = codec.roundtrip((kc - mu) * s, self.katoms[layer], self.s_k, "fp8", "omp")
        return codec.from_code_space(y / s + mu, "pre-rope", "post-rope", rp).to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--acts", default="out/acts-pre")
    ap.add_argument("--dicts", default="out/dicts-pre.safetensors")
    ap.add_argument("--variants", default="plain,center,weight,center+weight")
    ap.add_argument("--sparsity", default="3/4")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    s_k, s_v = (int(v) for v in args.sparsity.split("/"))

    loaded, (n_layers, heads, head_dim), ids, ref = heldout_reference(1024, 64)
    model = loaded.model
    rope = rope_info(model)
    calib = torch.tensor([loaded.tokenizer(load_text(None, "calibration")[: 2048 * 16]).input_ids[:2048]])
    w = query_pair_energy(model, calib, heads, head_dim)
    print("query pair weights: max/min per head, layer 15:", (w[15].amax(-1) / w[15].amin(-1)).tolist(), flush=True)

    f = safe_open(str(Path(args.acts) / "shard-00000.safetensors"), "pt")
    keys = {}
    for layer in range(n_layers):
        x = f.get_tensor(f"layer.{layer}.k").float()  # [T, H, D]
        keep = (torch.arange(x.shape[0]) % 512) >= 4  # leave the sequence-start (sink) tokens out
        keys[layer] = x[keep]
    vd = load_dicts(Path(args.dicts))

    rows = []
    for variant in args.variants.split(","):
        katoms, mus, scales = [], [], []
        for layer in range(n_layers):
            x = keys[layer]
            mu = x.mean(0) if "center" in variant else torch.zeros(heads, head_dim)
            sc = w[layer].sqrt() if "weight" in variant else torch.ones(heads, head_dim)
            per_head = []
            for h in range(heads):
                a, _ = train_dictionary((x[:, h] - mu[h]) * sc[h], TrainConfig(atoms=1024, epochs=0, sparsity=s_k), seed=layer * 10 + h)
                per_head.append(a)
            katoms.append(torch.stack(per_head)[:, None])  # [H, 1, N, D]
            mus.append(mu)
            scales.append(sc)
        m = KeyAffineCSR(katoms, mus, scales, vd, s_k, s_v, rope, f"keys-{variant}")
        res = runner.method_pass(model, ids, m, ref, 64, 32, sink=args.sink)
        summ, _ = summarize(res, n_layers)
        row = {"variant": variant, "ppl": res.ppl, "ref_ppl": ref.ppl, "dppl": res.ppl / ref.ppl - 1, "kl": res.kl,
               "rel_err_k": summ["rel_err_k"], "rel_err_v": summ["rel_err_v"], "attn_err": summ["attn_err"],
               "bits": (m.bits_k + m.bits_v) / 2, "sparsity": [s_k, s_v], "sink": args.sink}
        rows.append(row)
        print(f"{variant:16s} s={s_k}/{s_v} bits {row['bits']:.3f} ppl {res.ppl:.3f} d {100 * row['dppl']:+.1f}% KL {res.kl:.4f} "
              f"errK {row['rel_err_k']:.4f} errV {row['rel_err_v']:.4f} attn {row['attn_err']:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
