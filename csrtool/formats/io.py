"""Safe file output: check the destination first, write to a temporary file, rename.

No partial file is ever left under the output name: a crash or Ctrl-C while
writing leaves at most a hidden temporary file, which is removed when possible.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from csrtool.errors import CsrError


def check_output(path: Path, force: bool = False, is_dir: bool = False) -> Path:
    """Validate an output path before any work starts; return it as a Path."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CsrError(f"output directory {parent} does not exist: create it first (mkdir -p {parent})")
    if path.exists() and not force:
        raise CsrError(f"{path} already exists: pass --force to overwrite it")
    if path.exists() and is_dir != path.is_dir():
        kind = "a directory" if path.is_dir() else "a file"
        raise CsrError(f"{path} is {kind}: choose another output name")
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file, fsync, rename)."""
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """Parse '0-3,10,-1' into sorted unique layer indices; None means all layers."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(n_layers))
    picked: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo_s, hi_s = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                lo, hi = int(lo_s), int(hi_s)
                lo, hi = lo % n_layers if lo < 0 else lo, hi % n_layers if hi < 0 else hi
                if lo > hi:
                    raise ValueError
                rng = range(lo, hi + 1)
            else:
                v = int(part)
                rng = range(v % n_layers if v < 0 else v, (v % n_layers if v < 0 else v) + 1)
        except ValueError:
            raise CsrError(f"bad layer spec {spec!r}: use e.g. '0-3,10,-1'") from None
        for layer in rng:
            if not 0 <= layer < n_layers:
                raise CsrError(f"layer {layer} in {spec!r} is out of range: the model has {n_layers} layers (0-{n_layers - 1})")
            picked.add(layer)
    return sorted(picked)
