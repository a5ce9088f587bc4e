"""The documents an eval runs on: independent token windows, each fed from an empty cache.

- Built-in corpus: the held-out part (csrtool.corpus) tokenised as one stream and
  cut into consecutive, non-overlapping windows of `tokens` tokens; document i is
  tokens [i·tokens, (i+1)·tokens) of that stream. Document 0 is the text every
  earlier single-document eval used.
- User files (`--text`, repeatable): each file is one document, its first
  `tokens` tokens (shorter files are used whole).

    heldout_documents(tokenizer, n, tokens) -> [Document]
    file_documents(tokenizer, paths, tokens) -> [Document]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from csrtool.errors import CsrError

CHARS_PER_TOKEN_MAX = 16  # tokenise only a prefix of the text long enough for the tokens asked


@dataclass(frozen=True)
class Document:
    name: str
    ids: torch.Tensor  # [1, T]

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[1])


def token_ids(tokenizer, text: str, n: int) -> torch.Tensor:
    """The first n tokens of text as [1, <=n] ids (tokenising only a prefix long enough)."""
    from csrtool.collect import tokenize

    return tokenize(tokenizer, text[: n * CHARS_PER_TOKEN_MAX])[:n][None]


def heldout_documents(tokenizer, n: int, tokens: int, text: str | None = None) -> list[Document]:
    """n consecutive non-overlapping windows of `tokens` tokens of the held-out part (or of `text`)."""
    from csrtool.corpus import builtin_text

    if n < 1:
        raise CsrError(f"--docs must be >= 1, got {n}")
    body = builtin_text("heldout") if text is None else text
    stream = token_ids(tokenizer, body, n * tokens)[0]
    have = stream.numel() // tokens
    if have < n:
        if n == 1:  # a short text: evaluate all of it
            return [Document(f"heldout[0:{stream.numel()}]", stream[None])]
        raise CsrError(
            f"--docs {n} with --tokens {tokens} needs {n * tokens} held-out tokens but the corpus has {stream.numel()}: "
            f"use at most --docs {max(1, have)} or fewer --tokens"
        )
    return [Document(f"heldout[{i * tokens}:{(i + 1) * tokens}]", stream[i * tokens : (i + 1) * tokens][None]) for i in range(n)]


def file_documents(tokenizer, paths: list[Path], tokens: int) -> list[Document]:
    """One document per file: its first `tokens` tokens."""
    from csrtool.corpus import read_text_file

    return [Document(str(p), token_ids(tokenizer, read_text_file(p), tokens)) for p in paths]
