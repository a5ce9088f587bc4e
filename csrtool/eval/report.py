"""Render an evaluation document: rich table, JSON-safe dict, PNG plot.

The document is what `suite.run_eval` returns; this module only formats it.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.markup import escape
from rich.table import Table

PPL_PLOT_MAX = 2.0  # the quality plot clips perplexity at this multiple of the reference


def json_safe(obj):
    """Replace NaN and ±inf (not valid JSON) by None, recursively; tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _f(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def table(doc: dict) -> Table:
    cfg = doc["config"]
    t = Table(
        title=(
            f"csrtool eval: {cfg.get('model', '?')}, {cfg['tokens']} tokens in chunks of {cfg['chunk']}, "
            f"fp16 window {cfg['window']}, sink {cfg.get('sink', 0)}, {cfg.get('documents', 1)} document(s), "
            f"{cfg['scored_predictions']} scored predictions (pooled)"
        ),
        caption="bits: payload per channel (indices, coefficients, scales counted); +win: with the fp16 window and sink tokens; "
        "+side: dictionaries/codebooks amortised over the evaluated tokens. Errors: mean over layers of "
        "Σ‖x−x̂‖²/Σ‖x‖²; attn: attention-output relative error with the real queries. "
        f"intervals: {_level(doc)} paired block bootstrap ({_block(doc)}-position blocks within documents).",
    )
    has_needle = any("needle" in r for r in doc["methods"])
    cols = ["method", "bits", "+win", "+side", "ratio", "K err", "V err", "attn err", "ppl", "Δppl", "Δppl interval", "KL", "KL interval", "top-1"]
    if has_needle:
        cols.append("passkey")
    for c in cols:
        t.add_column(c, justify="left" if c == "method" else "right")
    for r in doc["methods"]:
        cells = [
            r["name"] + (f" (pooled, {r['runs']} trainings)" if r.get("runs") else ""),
            _f(r["bits_per_channel"], ".3g"),
            _f(r.get("bits_with_window"), ".3g"),
            _f(r.get("bits_total"), ".3g"),
            _f(r.get("ratio_vs_fp16"), ".1f") + "x" if r.get("ratio_vs_fp16") else "-",
            _f(r.get("rel_err_k"), ".4f"),
            _f(r.get("rel_err_v"), ".4f"),
            _f(r.get("attn_err"), ".4f"),
            _f(r["ppl"], ".3f"),
            _f(100 * r["ppl_increase"], "+.1f") + "%",
            _ci(r.get("ci", {}).get("ppl_increase"), 100, "+.1f"),
            _f(r["kl"], ".4f"),
            _ci(r.get("ci", {}).get("kl"), 1, ".4f"),
            _f(r["top1_agreement"], ".3f"),
        ]
        if has_needle:
            nd = r.get("needle")
            cells.append(f"{nd['accuracy']:.2f}" if nd else "-")
        t.add_row(*cells)
    return t


def _level(doc: dict) -> str:
    return f"{100 * doc['config'].get('bootstrap', {}).get('level', 0.95):g}%"


def _block(doc: dict) -> int:
    return doc["config"].get("bootstrap", {}).get("block", 64)


def _ci(iv: dict | None, scale: float, fmt: str) -> str:
    if not iv or iv.get("lo") is None or iv.get("hi") is None:
        return "-"
    return f"[{format(scale * iv['lo'], fmt)}, {format(scale * iv['hi'], fmt)}]"


def documents_table(doc: dict) -> Table | None:
    """Δppl of every method on each document (None for a single document)."""
    docs = doc.get("documents", [])
    if len(docs) < 2:
        return None
    t = Table(title="Δppl per document (each fed from an empty cache) and pooled")
    t.add_column("method", justify="left")
    for i, d in enumerate(docs):
        t.add_column(f"doc {i + 1}", justify="right")
    t.add_column("pooled", justify="right")
    t.add_row("reference ppl", *[f"{d['reference_ppl']:.3f}" for d in docs], f"{doc['reference_ppl']:.3f}")
    for r in doc["methods"][1:]:
        t.add_row(r["name"], *[_f(100 * d["methods"][r["name"]]["ppl_increase"], "+.1f") + "%" for d in docs], _f(100 * r["ppl_increase"], "+.1f") + "%")
    t.caption = escape("; ".join(f"doc {i + 1}: {d['name']}" for i, d in enumerate(docs)))  # file names may hold [tags]
    return t


def lines(doc: dict) -> list[str]:
    """Plain-text notes printed under the table: skipped methods and the bar with its verdicts."""
    out = [f"skipped {s['name']}: {s['reason']}" for s in doc.get("skipped", [])]
    for key, label in (("one_bit", "<= 1 bit"), ("two_bit", "<= 2 bits")):
        e = doc.get("bar", {}).get(key)
        if not e:
            continue
        pooled = f", pooled over {e['runs']} trainings" if e.get("runs") else ""
        msg = (f"bar {label}: best {e['method']} ({e['bits_per_channel']:.3g} b/ch{pooled}) ppl {100 * e['ppl_increase']:+.1f}% "
               f"{_ci(e.get('ppl_increase_ci'), 100, '+.1f')} vs {doc['bar']['baseline']}")
        if "kivi2_ppl_increase" in e:
            msg += f"; KIVI-2 {100 * e['kivi2_ppl_increase']:+.1f}% {_ci(e.get('kivi2_ppl_increase_ci'), 100, '+.1f')}"
        if "ratio_to_kivi2_ci" in e:
            iv = e["ratio_to_kivi2_ci"]
            msg += f"; ratio to KIVI-2 {_f(iv['point'], '.2f')} {_ci(iv, 1, '.2f')}"
        if "verdict" in e:
            msg += f"; target {e['target']}: {e['verdict']} ({_level(doc)} interval)"
        elif "met" in e:
            msg += f"; target {e['target']}: {'met' if e['met'] else 'NOT met'} (point estimate only)"
        out.append(msg)
    out.append(f"total time {doc.get('seconds', 0):.0f} s")
    return out


def plot(doc: dict, path: Path) -> None:
    """PNG: relative error per layer for K and V, and quality (ppl) vs payload bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from csrtool.formats.io import atomic_path

    # near-lossless rows (fp16) would stretch the log axis by orders of magnitude: leave them out here
    rows = [r for r in doc["methods"] if r.get("layers") and max(r.get("rel_err_k") or 0, r.get("rel_err_v") or 0) > 1e-5]
    color = {r["name"]: f"C{i % 10}" for i, r in enumerate(doc["methods"][1:])}  # same colour in every panel
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, kind in zip(axes[:2], ("k", "v")):
        for r in rows:
            pts = [(x["layer"], x[f"rel_err_{kind}"]) for x in r["layers"] if x.get(f"rel_err_{kind}") is not None]
            if pts:
                ax.plot([p[0] for p in pts], [max(p[1], 1e-8) for p in pts], marker=".", label=r["name"], color=color[r["name"]])
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("relative squared error")
        ax.set_title("keys" if kind == "k" else "values")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    ax = axes[2]
    ref_ppl = doc["methods"][0]["ppl"]
    top = ref_ppl * PPL_PLOT_MAX
    ax.axhline(ref_ppl, color="gray", linestyle="--", label="reference")
    for r in doc["methods"][1:]:
        y, clipped = min(r["ppl"], top), r["ppl"] > top
        ax.scatter([r["bits_per_channel"]], [y], marker="^" if clipped else "o", color=color[r["name"]])
        label = r["name"] + (f" (ppl {r['ppl']:.3g})" if clipped else "")
        ax.annotate(label, (r["bits_per_channel"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_ylim(ref_ppl * 0.97, top * 1.05)
    ax.set_xlabel("payload bits per channel (log scale)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"quality vs bits (clipped at {PPL_PLOT_MAX:g}x reference)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
