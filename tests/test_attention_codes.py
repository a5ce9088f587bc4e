"""Attention on the codes (engine/attention.py) against reconstruct-then-attend and torch SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csrtool import codec
from csrtool.engine import packing, rope
from csrtool.engine.attention import Codes, Pred, Rope, Segment, attend, attend_reference, reconstruct

D = 16


def _atoms(g, c, n, dc, gen):
    a = torch.randn(g, c, n, dc, generator=gen)
    return a / a.norm(dim=-1, keepdim=True)


def _codes(b, h, t, c, s, n, g, gen, centred, idx_dtype=torch.int16, fmt=None, pred=None):
    atoms = _atoms(g, c, n, D // c, gen)
    idx = torch.randint(0, n, (b, h, t, c, s), generator=gen).to(idx_dtype)
    coef = torch.randn(b, h, t, c, s, generator=gen)
    scale = None
    if fmt in ("fp8", "fp16"):  # the .csr's storage: fp8 e4m3 (or fp16) with a float32 scale per (batch, head)
        q, g_, _ = packing.quantize(coef.reshape(b * h, t, c * s), fmt)
        coef, scale = q.reshape(b, h, t, c, s), g_.reshape(b, h)
    elif fmt == "int8":  # int8 with a float16 scale per vector: pass g·v per token
        q, g_, v = packing.quantize(coef.reshape(b * h, t, c * s), fmt)
        coef, scale = q.reshape(b, h, t, c, s), (g_[:, None] * v.float()).reshape(b, h, t)
    mean = torch.randn(g, D, generator=gen) if centred else None
    p = None
    if pred:  # a token predictor's part: 7 table rows shared by the tokens (float32, or int8 with a scale per row)
        table, rows = torch.randn(h, 7, D, generator=gen), torch.randint(0, 7, (b, t), generator=gen).to(torch.int32)
        if pred in ("int8", "int8-chan"):  # int8 rows with a scale per row (and per channel: the predictor's channel scales)
            chan = 0.5 + 4 * torch.rand(h, D, generator=gen) if pred == "int8-chan" else None
            p = Pred(torch.randint(-127, 128, (h, 7, D), generator=gen).to(torch.int8), rows, (0.02 * torch.rand(h, 7, generator=gen)).half(), chan)
        else:
            p = Pred(table, rows)
    return Codes(idx, coef, atoms, scale, mean, p)


def _problem(*, b=2, h=2, rep=3, tq=1, tc=50, sink=2, win=5, kc=1, vc=2, g=2, centred=True, fmt=None, pad=(0, 7),
             pre_rope=False, window=None, seed=0, n=64, pos_shift=0, kidx=torch.int16, vidx=torch.int32, pred=None):
    gen = torch.Generator().manual_seed(seed)
    g = h if g == "h" else g
    keys = _codes(b, h, tc, kc, 3, n, g, gen, centred, idx_dtype=kidx, fmt=fmt, pred=pred)
    values = _codes(b, h, tc, vc, 2, n, g, gen, centred, idx_dtype=vidx, fmt=fmt, pred=pred)
    total = sink + tc + win
    dense = [Segment(torch.randn(b, h, sink, D, generator=gen), torch.randn(b, h, sink, D, generator=gen), 0),
             Segment(torch.randn(b, h, win, D, generator=gen), torch.randn(b, h, win, D, generator=gen), sink + tc)]
    valid = torch.ones(b, total, dtype=torch.bool)
    for i, p in enumerate(pad[:b]):
        valid[i, :p] = False
    q = torch.randn(b, h * rep, tq, D, generator=gen)
    kw = dict(coded_start=sink, valid=valid, q_start=total - tq, window=window, scale=0.3)
    if pre_rope:
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        kw.update(rope=Rope(inv, 1.0), key_pos0=torch.tensor([sink - p + pos_shift for p in pad[:b]]))
    return q, keys, values, dense, kw


CASES = {
    "post-centred-perhead-C2": dict(),
    "post-uncentred-shared-C1": dict(centred=False, g=1, vc=1),
    "pre-centred-perhead-C2": dict(pre_rope=True, g="h"),
    "pre-uncentred-shared-C1": dict(pre_rope=True, centred=False, g=1, vc=1),
    "fp8-scales": dict(fmt="fp8"),
    "pre-fp8-scales": dict(fmt="fp8", pre_rope=True),
    "int8-token-scales": dict(fmt="int8", g=1),
    "pre-int8-token-scales": dict(fmt="int8", pre_rope=True),
    "fp16-coefficients": dict(fmt="fp16", pre_rope=True, g=1),
    "pre-far-positions": dict(pre_rope=True, pos_shift=5000, tq=2),
    "sliding-window": dict(window=20, tq=3),
    "chunked-prefill": dict(tq=4, pre_rope=True),
    "no-gqa-batch1": dict(b=1, rep=1, pad=(3,)),
    "key-chunks": dict(kc=2),
    "uint8-int64-indices": dict(kidx=torch.uint8, vidx=torch.int64, pre_rope=True),
    "uint8-indices-post": dict(kidx=torch.uint8, vidx=torch.uint8),
    "predictor-post": dict(pred=True),
    "predictor-pre": dict(pred=True, pre_rope=True, g="h"),
    "predictor-pre-int8-window": dict(pred=True, pre_rope=True, fmt="int8", window=20, tq=3),
    "predictor-post-fp8-uncentred": dict(pred=True, fmt="fp8", centred=False, g=1, vc=1),
    "predictor-int8-pre": dict(pred="int8", pre_rope=True),
    "predictor-int8-post": dict(pred="int8"),
    "predictor-int8-chan-pre": dict(pred="int8-chan", pre_rope=True),
    "predictor-int8-chan-post-window": dict(pred="int8-chan", window=20, tq=3),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("block", [16, 4096])
def test_codes_match_reconstruct_then_attend(name, block):
    q, keys, values, dense, kw = _problem(**CASES[name])
    ref = attend_reference(q, keys, values, dense, **kw)
    out = attend(q, keys, values, dense, block=block, **kw)
    assert out.shape == q.shape
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_reference_matches_sdpa_on_codec_decode():
    """The reference itself: codec.decode_codes + rope.rotate, then torch SDPA with an explicit mask."""
    q, keys, values, dense, kw = _problem(pre_rope=True, window=30, tq=2)
    ref = attend_reference(q, keys, values, dense, **kw)
    b, h, tc = keys.idx.shape[:3]
    k = codec.shift(codec.decode_codes(keys.idx.long(), keys.coef.float(), keys.atoms), keys.mean, 1.0)
    pos = kw["key_pos0"][:, None] + torch.arange(tc)[None]
    k = torch.stack([rope.rotate(k[i], pos[i], kw["rope"].inv_freq) for i in range(b)])
    v = codec.shift(codec.decode_codes(values.idx.long(), values.coef.float(), values.atoms), values.mean, 1.0)
    k_all = torch.cat([dense[0].k, k, dense[1].k], 2)
    v_all = torch.cat([dense[0].v, v, dense[1].v], 2)
    t = k_all.shape[2]
    qs = kw["q_start"] + torch.arange(q.shape[2])[:, None]
    ks = torch.arange(t)[None, :]
    mask = (ks <= qs) & (ks > qs - kw["window"])
    mask = mask[None, None] & kw["valid"][:, None, None, :]
    want = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=kw["scale"], enable_gqa=True)
    torch.testing.assert_close(ref, want, rtol=1e-4, atol=1e-5)


def test_no_visible_key_gives_zeros():
    q, keys, values, dense, kw = _problem(tq=1)
    kw["valid"][0] = False
    out = attend(q, keys, values, dense, **kw)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1], attend_reference(q, keys, values, dense, **kw)[1], rtol=1e-4, atol=1e-5)


def test_dense_only_and_codes_only():
    q, keys, values, dense, kw = _problem(pad=(0, 0))
    kw["valid"] = None
    torch.testing.assert_close(attend(q, None, None, dense, **kw), attend_reference(q, None, None, dense, **kw), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attend(q, keys, values, (), **kw), attend_reference(q, keys, values, (), **kw), rtol=1e-4, atol=1e-5)


def test_predictor_part_is_added_to_each_token():
    """reconstruct adds table[h, rows[b, t]] to token t of sequence b: checked against the codes without it."""
    _, keys, _, _, _ = _problem(pred=True, centred=True)
    plain = Codes(keys.idx, keys.coef, keys.atoms, keys.scale, keys.mean)
    got = reconstruct(keys) - reconstruct(plain)
    b, t = 1, 9
    for h in range(keys.idx.shape[1]):
        assert torch.allclose(got[b, h, t], keys.pred.table[h, int(keys.pred.rows[b, t])], atol=1e-5)
    assert keys.pred.table.std() > 0.5  # the part is not negligible
    _, keys, _, _, _ = _problem(pred="int8")  # an int8 table: row times its scale
    got = reconstruct(keys) - reconstruct(Codes(keys.idx, keys.coef, keys.atoms, keys.scale, keys.mean))
    row = int(keys.pred.rows[b, t])
    torch.testing.assert_close(got[b, 1, t], keys.pred.table[1, row].float() * keys.pred.scale[1, row].float(), atol=1e-5, rtol=1e-5)
    _, keys, _, _, _ = _problem(pred="int8-chan")  # and times the channel scales
    got = reconstruct(keys) - reconstruct(Codes(keys.idx, keys.coef, keys.atoms, keys.scale, keys.mean))
    row = int(keys.pred.rows[b, t])
    want = keys.pred.table[1, row].float() * keys.pred.scale[1, row].float() * keys.pred.channel[1]
    torch.testing.assert_close(got[b, 1, t], want, atol=1e-5, rtol=1e-5)


def test_reconstruct_matches_codec_decode():
    gen = torch.Generator().manual_seed(1)
    for g in (1, 3):
        c = _codes(2, 3, 7, 2, 3, 32, g, gen, centred=True)
        want = codec.shift(codec.decode_codes(c.idx.long(), c.coef, c.atoms), c.mean, 1.0)
        torch.testing.assert_close(reconstruct(c), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    q, keys, values, dense, kw = _problem(pre_rope=True, fmt="fp8", tq=2, window=25)
    cpu = attend(q, keys, values, dense, block=16, **kw)
    mv = lambda x: None if x is None else x.cuda()  # noqa: E731
    cu = lambda c: Codes(c.idx.cuda(), c.coef.cuda(), c.atoms.cuda(), mv(c.scale), mv(c.mean))  # noqa: E731
    kw = {**kw, "valid": kw["valid"].cuda(), "key_pos0": kw["key_pos0"].cuda(), "rope": Rope(kw["rope"].inv_freq.cuda())}
    out = attend(q.cuda(), cu(keys), cu(values), [Segment(s.k.cuda(), s.v.cuda(), s.start) for s in dense], block=16, **kw)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pre_rope", [False, True])
def test_codes_held_in_capacity_buffers(pre_rope):
    """A cache grows codes in preallocated [B, H, capacity, C, S] buffers and passes views of the filled part."""
    q, keys, values, dense, kw = _problem(pre_rope=pre_rope, fmt="int8", tq=2)

    def in_buffer(c: Codes) -> Codes:
        t = c.tokens
        grow = lambda x: torch.cat([x, torch.zeros_like(x)], 2)[:, :, :t]  # noqa: E731
        return Codes(grow(c.idx), grow(c.coef), c.atoms, grow(c.scale), c.mean)

    kb, vb = in_buffer(keys), in_buffer(values)
    assert not kb.idx.is_contiguous() and not kb.scale.is_contiguous()
    want = attend_reference(q, keys, values, dense, **kw)
    torch.testing.assert_close(attend(q, kb, vb, dense, block=16, **kw), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attend(q, kb, vb, dense, **kw), want, rtol=1e-4, atol=1e-5)


def test_half_precision_queries_and_dense_tokens():
    q, keys, values, dense, kw = _problem(fmt="fp8")
    dense16 = [Segment(s.k.to(torch.bfloat16), s.v.to(torch.bfloat16), s.start) for s in dense]
    out = attend(q.to(torch.bfloat16), keys, values, dense16, **kw)
    assert out.dtype == torch.bfloat16
    want = attend_reference(q.to(torch.bfloat16).float(), keys, values, [Segment(s.k.float(), s.v.float(), s.start) for s in dense16], **kw)
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)


def test_balanced_block_leaves_no_tiny_remainder():
    """Default blocks are round(T / target) equal parts: 4,120 tokens at a 4,096 target are one block, not 4,096 + 24."""
    from csrtool.engine.attention import balanced_block

    assert balanced_block(4120, 4096) == 4120
    assert balanced_block(6200, 4096) == 3100  # two equal blocks
    assert balanced_block(100, 4096) == 100
    assert balanced_block(0, 4096) == 4096
    for t in (1, 255, 4097, 6143, 6145, 10000, 40000):
        blk = balanced_block(t, 4096)
        n = -(-t // blk)
        assert blk <= 1.5 * 4096 + 1 and n * blk >= t and (n - 1) * blk < t  # covers t, no empty block
