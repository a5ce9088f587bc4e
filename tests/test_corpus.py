"""The built-in text sources: the calibration mixture is deterministic and mixes its two sources."""

from __future__ import annotations

from csrtool.corpus import _pieces, builtin_text, calibration_mixture, stdlib_docstrings


def test_pieces_cut_at_paragraphs_and_keep_every_paragraph():
    block = "\n\n".join(f"p{i} " + "x" * 40 for i in range(10))
    out = _pieces([block, "short"], 100)
    assert all(len(p) <= 100 for p in out[:-1]) and out[-1] == "short"
    assert "\n\n".join(out[:-1]) == block


def test_calibration_mixture_is_deterministic_mixed_and_disjoint_from_heldout():
    docs = "\n\n".join(stdlib_docstrings())
    assert len(docs) > 100_000
    mix = calibration_mixture()
    assert mix == calibration_mixture()
    calib = builtin_text("calibration")
    # about what collect reads (8,192 tokens): paragraphs of both sources, nothing else
    paras = [p for p in mix[:40_000].split("\n\n") if len(p) > 80]
    from_docs, from_topics = sum(p in docs for p in paras), sum(p in calib for p in paras)
    assert from_docs > 10 and from_topics > 10
    assert all(p in docs or p in calib for p in paras)
