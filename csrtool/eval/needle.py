"""Passkey retrieval through the compressed cache.

A five-digit pass key is hidden at a given depth of repeated filler text; the
prompt ends by asking for it. The prompt is fed in chunks through a
`CompressedFeed` (so the key is compressed unless it sits in the last W tokens),
then the answer is decoded greedily; a trial succeeds when the decoded text
contains the key. Decoded tokens are not compressed (a few tokens, all in the window).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from csrtool.eval.runner import CompressedFeed

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class Trial:
    ids: torch.Tensor  # [1, T]
    key: str
    depth: float


def make_trials(tokenizer, context_tokens: int, depths: tuple[float, ...], seed: int = 0) -> list[Trial]:
    """One prompt of about `context_tokens` tokens per depth, each with its own key."""
    rng = random.Random(seed)
    per = max(1, len(tokenizer(FILLER, add_special_tokens=False).input_ids))
    n_filler = max(1, context_tokens // per)
    trials = []
    for depth in depths:
        key = str(rng.randint(10000, 99999))
        cut = round(depth * n_filler)
        text = FILLER * cut + NEEDLE.format(key=key) + FILLER * (n_filler - cut) + QUESTION
        ids = torch.tensor([tokenizer(text).input_ids])
        trials.append(Trial(ids, key, depth))
    return trials


@torch.no_grad()
def retrieve(model, tokenizer, trial: Trial, method, chunk: int, window: int, max_new: int = 8, sink: int = 0) -> str:
    """Greedy answer to one trial through `method`'s compressed cache."""
    device = model.device
    feed = CompressedFeed(model, method, window=window, sink=sink)
    ids = trial.ids.to(device)
    logits = None
    for start in range(0, ids.shape[1], chunk):
        logits = feed.step(ids[:, start : start + chunk], last=True)  # only the last position's answer is read
    out = []
    nxt = logits[-1].argmax()
    for _ in range(max_new):
        out.append(int(nxt))
        if tokenizer.eos_token_id is not None and int(nxt) == tokenizer.eos_token_id:
            break
        nxt = feed.step(nxt.view(1, 1), age=False, last=True)[-1].argmax()
    return tokenizer.decode(out, skip_special_tokens=True)


def accuracy(model, tokenizer, trials: list[Trial], method, chunk: int, window: int, sink: int = 0) -> dict:
    """{'accuracy', 'by_depth': {depth: bool}, 'answers'} for one method."""
    by_depth, answers = {}, {}
    for trial in trials:
        answer = retrieve(model, tokenizer, trial, method, chunk, window, sink=sink)
        by_depth[f"{trial.depth:g}"] = trial.key in answer
        answers[f"{trial.depth:g}"] = answer
    hits = sum(by_depth.values())
    return {"accuracy": hits / max(1, len(trials)), "by_depth": by_depth, "answers": answers}
