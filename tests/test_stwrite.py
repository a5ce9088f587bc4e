"""The deterministic safetensors writer: exact bytes, and safetensors reads it back."""

import torch
from safetensors.torch import load_file, safe_open

from csrtool.formats.stwrite import safetensors_bytes, save_safetensors


def test_exact_bytes_of_a_small_file():
    data = safetensors_bytes({"a": torch.tensor([1.0, -2.0])}, {"z": "1", "b": "2"})
    header = b'{"__metadata__":{"b":"2","z":"1"},"a":{"data_offsets":[0,8],"dtype":"F32","shape":[2]}}'
    header += b" " * (-len(header) % 8)
    assert data == len(header).to_bytes(8, "little") + header + b"\x00\x00\x80\x3f\x00\x00\x00\xc0"


def test_roundtrip_through_safetensors_reader_and_determinism(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 4, generator=g),
        "h": torch.randn(5, generator=g).half(),
        "b": torch.randn(2, 2, generator=g).bfloat16(),
        "i": torch.arange(7, dtype=torch.int64),
        "e": torch.zeros(0, 3),
    }
    meta = {f"k{i}": str(i) for i in range(20)}
    save_safetensors(tmp_path / "a.safetensors", tensors, meta)
    save_safetensors(tmp_path / "b.safetensors", dict(reversed(list(tensors.items()))), dict(reversed(list(meta.items()))))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    back = load_file(str(tmp_path / "a.safetensors"))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as fh:
        assert fh.metadata() == meta
