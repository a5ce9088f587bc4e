"""Safe file output: check the destination first, write to a temporary file, rename.

No partial file is ever left under the output name: a crash or Ctrl-C while
writing leaves at most a hidden temporary file, which is removed when possible.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from pathlib import Path
from typing import Iterator

from csrtool.errors import CsrError


# Our temporaries are named `.{output name}.csrtmp-{pid}-{random}{.tmp|.scratch}`: the pid lets a
# later run tell a leftover of a dead process (removed) from one of a live run (kept).
_TMP_TAG = ".csrtmp-"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.csrtmp-(?P<pid>\d+)-[A-Za-z0-9_]{8}\.(tmp|scratch)$")
# errno values that mean "the output cannot be written here", not a bug
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Remove our own leftover temporaries in `folder` (for output `name`, or all) whose process is gone.

    Only names matching our pattern are touched (see _TMP_RE). Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for f in entries:
        m = _TMP_RE.match(f.name)
        if m is None or (name is not None and m["name"] != name) or _pid_alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            f.unlink()
            removed.append(f)
    return removed


def _writable_dir(parent: Path, what: str) -> None:
    """`what` names the directory, e.g. 'output directory'."""
    if not parent.is_dir():
        if parent.exists():
            raise CsrError(f"{what} {parent} is a file, not a directory: choose an output inside a directory")
        raise CsrError(f"{what} {parent} does not exist: create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CsrError(f"{what} {parent} is not writable (permission denied): choose another location or fix its permissions")


def check_output(path: Path, force: bool = False, is_dir: bool = False) -> Path:
    """Validate an output path before any work starts; return it as a Path.

    Also removes our own stale temporaries for it left by a killed run."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    _writable_dir(parent, "output directory")
    if path.exists() and is_dir != path.is_dir():
        kind = "a directory" if path.is_dir() else "a file"
        raise CsrError(f"{path} is {kind}: choose another output name")
    if path.exists() and not force:
        raise CsrError(f"{path} already exists: pass --force to overwrite it")
    remove_stale_temporaries(parent, path.name)
    return path


def check_json_output(path: Path | None) -> None:
    """Validate a --json destination before any work starts ('-' is stdout; an existing file is replaced)."""
    if path is None or str(path) == "-":
        return
    path = Path(path)
    if path.is_dir():
        raise CsrError(f"--json {path} is a directory: give a file name, e.g. --json {path / 'report.json'}")
    parent = path.parent if str(path.parent) else Path(".")
    _writable_dir(parent, f"--json {path}: directory")
    remove_stale_temporaries(parent, path.name)


def check_input(path: Path, what: str, hint: str = "") -> Path:
    """An input file that must exist and be a readable regular file: one clear CsrError otherwise."""
    path = Path(path)
    fix = f": {hint}" if hint else ""
    if path.is_dir():
        raise CsrError(f"{what} {path} is a directory, not a file{fix}")
    if not path.exists():
        raise CsrError(f"{what} {path} not found{fix}")
    if not os.access(path, os.R_OK):
        raise CsrError(f"{what} {path} is not readable (permission denied): fix its permissions")
    return path


def _tmp_name(path: Path, suffix: str) -> str:
    return f".{path.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


_LINKABLE: dict[int, bool] = {}  # st_dev -> can an O_TMPFILE file be linked into a name there?


def _anonymous_file(folder: Path, linkable: bool = False) -> int | None:
    """An unnamed file in `folder` (Linux O_TMPFILE): it vanishes with the process, however it ends.

    With `linkable`, only where linking it to a name later works (probed once per filesystem:
    some kernels and sandboxes refuse linkat through /proc). None: use a named temporary."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not Path("/proc/self/fd").is_dir():
        return None
    try:
        fd = os.open(folder, flag | os.O_RDWR, 0o666)
    except OSError:  # filesystem or kernel without O_TMPFILE
        return None
    if not linkable:
        return fd
    dev = os.fstat(fd).st_dev
    if dev not in _LINKABLE:
        probe = Path(folder) / _tmp_name(Path("probe"), ".tmp")
        try:
            os.link(f"/proc/self/fd/{fd}", probe, follow_symlinks=True)
            probe.unlink()
            _LINKABLE[dev] = True
        except OSError:
            _LINKABLE[dev] = False
    if not _LINKABLE[dev]:
        os.close(fd)
        return None
    return fd


def write_error(path: Path, exc: OSError) -> CsrError:
    """A CsrError for an OSError met while writing `path` (disk full, file too large, permissions)."""
    return CsrError(f"cannot write {path}: {exc.strerror or exc} (nothing was written under that name): "
                    f"free space, raise the file-size limit or choose another location")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    On Linux the temporary is an unnamed O_TMPFILE file (yielded as /proc/self/fd/N) that
    cannot outlive the process, even under kill -9; it is linked to a named temporary
    only at the end, then renamed. Elsewhere it is a named `.NAME.csrtmp-PID-XXXXXXXX.tmp`,
    removed on errors and signals and by the next run otherwise (remove_stale_temporaries).
    Disk-full and similar write errors become a CsrError."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    named = folder / _tmp_name(path, ".tmp")
    fd = _anonymous_file(folder, linkable=True)
    try:
        if fd is not None:
            yield Path(f"/proc/self/fd/{fd}")
            os.link(f"/proc/self/fd/{fd}", named, follow_symlinks=True)
        else:
            with open(named, "xb"):
                pass
            yield named
        os.replace(named, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            named.unlink()
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            raise write_error(path, exc) from None
        raise
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def scratch_path(output: Path) -> Iterator[Path]:
    """A scratch file beside `output` (same disk), gone when the block ends or the process dies (Linux)."""
    output = Path(output)
    folder = output.parent if str(output.parent) else Path(".")
    fd = _anonymous_file(folder)
    if fd is not None:
        try:
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    named = folder / _tmp_name(output, ".scratch")
    with open(named, "xb"):
        pass
    try:
        yield named
    finally:
        with contextlib.suppress(OSError):
            named.unlink()


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
