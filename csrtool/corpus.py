"""Text sources: the built-in corpus, user files, and (optionally) local datasets.

The built-in corpus is CPython's `pydoc_data.topics` (~465k characters of the
language reference). Topics are sorted by name and every fifth one goes to the
held-out part, the rest to the calibration part: deterministic, and no tool is
evaluated on the text its dictionaries were trained on.
"""

from __future__ import annotations

import ast
import functools
import os
import random
import sysconfig
from pathlib import Path

from csrtool.errors import CsrError
from csrtool.formats.io import check_input

PARTS = ("calibration", "heldout")
BUILTIN_NAME = "builtin:pydoc_data.topics"


def builtin_text(part: str = "calibration") -> str:
    if part not in PARTS:
        raise CsrError(f"unknown corpus part {part!r}: use one of {', '.join(PARTS)}")
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise CsrError("this Python lacks pydoc_data.topics: pass your own text with --text FILE") from None
    names = sorted(topics)
    picked = [n for i, n in enumerate(names) if (i % 5 == 4) == (part == "heldout")]
    return "\n\n".join(topics[n].strip() for n in picked)


STDLIB_NAME = "builtin:stdlib-docstrings"
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}


@functools.lru_cache(maxsize=2)
def stdlib_docstrings(min_chars: int = 200) -> tuple[str, ...]:
    """Docstrings (module, top-level class and function) of this Python's standard library sources.

    English prose about many subjects that every Python user has offline; test packages are
    skipped, files sorted, so the list is deterministic for a given Python installation.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if _STDLIB_SKIP & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in [tree] + [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))]:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                docs.append(doc.strip())
    return tuple(docs)


def _pieces(blocks: list[str] | tuple[str, ...], size: int) -> list[str]:
    """Blocks cut at paragraph breaks into pieces of about `size` characters (at least one paragraph)."""
    out = []
    for block in blocks:
        cur = ""
        for para in block.split("\n\n"):
            if cur and len(cur) + len(para) > size:
                out.append(cur)
                cur = ""
            cur = f"{cur}\n\n{para}" if cur else para
        if cur.strip():
            out.append(cur)
    return out


def calibration_mixture(seed: int = 0, piece_chars: int = 1500) -> str:
    """The built-in calibration part (pydoc topics) interleaved with stdlib docstrings.

    Both are cut into pieces of ~`piece_chars` characters at paragraph breaks, shuffled with
    a fixed seed and alternated, so any prefix (collect reads the first --max-tokens tokens)
    mixes both sources and many subjects. The held-out part of pydoc_data.topics is not touched.
    """
    try:
        from pydoc_data.topics import topics as all_topics
    except ImportError:
        raise CsrError("this Python lacks pydoc_data.topics: pass your own text with --text FILE") from None
    names = sorted(all_topics)
    topics = _pieces([all_topics[n].strip() for i, n in enumerate(names) if i % 5 != 4], piece_chars)
    docs = _pieces(stdlib_docstrings(), piece_chars)
    rng = random.Random(seed)
    rng.shuffle(topics)
    rng.shuffle(docs)
    blocks = [b for pair in zip(topics, docs) for b in pair]
    n = min(len(topics), len(docs))
    blocks += topics[n:] + docs[n:]
    return "\n\n".join(blocks)


def read_text_file(path: Path) -> str:
    path = check_input(path, "text file", "pass a UTF-8 text file with --text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CsrError(f"{path} is not UTF-8 text (byte {exc.start}): convert it, e.g. iconv -t utf-8") from None
    except OSError as exc:
        raise CsrError(f"cannot read {path}: {exc.strerror}") from None
    if not text.strip():
        raise CsrError(f"{path} is empty")
    return text


def dataset_text(spec: str) -> str:
    """NAME[:CONFIG]:SPLIT through the `datasets` library, from local files/cache only."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise CsrError(f"--dataset {spec!r}: use NAME:SPLIT or NAME:CONFIG:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets
    except ImportError:
        raise CsrError("--dataset needs the datasets package: pip install datasets") from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types; all mean "not available here"
        raise CsrError(f"dataset {spec!r} is not available locally ({type(exc).__name__}): download it first or use --text FILE") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(str(t) for t in ds[column])


def load_text(paths: list[Path] | None = None, part: str = "calibration", dataset: str | None = None) -> str:
    """The text to run on: a dataset, the user's files (used whole), or the built-in part."""
    if dataset:
        return dataset_text(dataset)
    if paths:
        return "\n\n".join(read_text_file(p) for p in paths)
    return builtin_text(part)


def text_source(paths: list[Path] | None = None, part: str = "calibration", dataset: str | None = None) -> str:
    """A short description of the text source, recorded in output metadata."""
    if dataset:
        return f"dataset:{dataset}"
    if paths:
        return ",".join(str(p) for p in paths)
    return f"{BUILTIN_NAME}[{part}]"
