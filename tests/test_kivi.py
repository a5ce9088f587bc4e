"""KIVI baseline against a direct, loop-by-loop implementation of its formula."""

import pytest
import torch

from csrtool.errors import CsrError
from csrtool.eval.kivi import KIVI, quantize_groups


def kivi_direct(x: torch.Tensor, bits: int, group: int, per_channel: bool) -> torch.Tensor:
    """Literal formula: per group, min m and scale s = (max − m)/(2^b − 1) stored in fp16,
    q = clamp(round((x − m)/s), 0, 2^b − 1), x̂ = q·s + m. Keys (per_channel): groups of
    tokens for each channel; values: groups of channels for each token."""
    out = torch.empty_like(x)
    b_, h_, t_, d_ = x.shape
    levels = 2**bits - 1
    for b in range(b_):
        for h in range(h_):
            outer, inner = (d_, t_) if per_channel else (t_, d_)
            for o in range(outer):
                for g0 in range(0, inner, group):
                    sl = slice(g0, min(inner, g0 + group))
                    vals = x[b, h, sl, o] if per_channel else x[b, h, o, sl]
                    m = vals.min().half().float()
                    s = ((vals.max() - vals.min()) / levels).half().float()
                    q = torch.clamp(torch.round((vals - m) / s), 0, levels) if s > 0 else torch.zeros_like(vals)
                    res = q * s + m
                    if per_channel:
                        out[b, h, sl, o] = res
                    else:
                        out[b, h, o, sl] = res
    return out


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("tokens", [32, 45])
def test_kivi_matches_direct_formula(bits, tokens):
    torch.manual_seed(bits * 100 + tokens)
    x = torch.randn(1, 2, tokens, 40) * 3 + 1
    method = KIVI(bits, group=16)
    k_hat = method.reconstruct(0, "k", x, torch.arange(tokens))
    v_hat = method.reconstruct(0, "v", x, torch.arange(tokens))
    torch.testing.assert_close(k_hat, kivi_direct(x, bits, 16, per_channel=True), rtol=0, atol=1e-5)
    torch.testing.assert_close(v_hat, kivi_direct(x, bits, 16, per_channel=False), rtol=0, atol=1e-5)


def test_kivi_levels_error_and_bits():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32)
    # 1 bit: each key channel takes at most 2 values (its group's min and max) over 32 tokens
    k1 = KIVI(1, group=32).reconstruct(0, "k", x, torch.arange(32))
    assert all(len(torch.unique(k1[0, 0, :, d])) <= 2 for d in range(32))
    errs = [((KIVI(b).reconstruct(0, "v", x, torch.arange(32)) - x) ** 2).sum() / (x**2).sum() for b in (1, 2, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert KIVI(2, group=32).bits_k == KIVI(2, group=32).bits_v == 3.0  # 2 + 32/32
    assert KIVI(4, group=64).bits_v == 4.5
    # constant groups are exact (scale 0)
    c = torch.full((1, 1, 8, 4), 2.5)
    assert torch.equal(quantize_groups(c, 2, dim=2, group=4), c)
    with pytest.raises(CsrError, match="bits"):
        KIVI(5)
