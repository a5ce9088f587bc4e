"""Real-model tests on the embedded SmolLM2-135M (first run converts the GGUF once)."""

import pytest
import torch

from csrtool.collect import capture_kv, tokenize
from csrtool.corpus import builtin_text
from csrtool.errors import CsrError
from csrtool.models import builtin_gguf, kv_shape, load_model, rope_info


@pytest.fixture(scope="module")
def smollm2():
    try:
        builtin_gguf("smollm2-135m")
    except CsrError as exc:
        pytest.skip(str(exc))
    return load_model("smollm2-135m", device="cpu")


@pytest.mark.slow
def test_smollm2_short_window_shapes(smollm2):
    assert kv_shape(smollm2.config) == (30, 3, 64)
    ids = tokenize(smollm2.tokenizer, builtin_text("heldout"))[:48][None]
    keys, values = capture_kv(smollm2.model, ids, "pre-rope", rope_info(smollm2.model))
    assert len(keys) == len(values) == 30
    assert keys[0].shape == values[29].shape == (1, 3, 48, 64)
    # a real language model: it predicts its own text far better than chance (vocab 49k)
    with torch.no_grad():
        logits = smollm2.model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert nll.exp() < 200
