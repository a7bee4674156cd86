"""Micro-batches for the train_step entry: B examples flattened into one packed token batch.

  Batch.input_ids[T], positions[T], seq_ids[T], targets[T]   (T = total tokens of the B examples)
The forward graph takes a flattened batch of sequences (models/llama.py): every sequence of every
example gets its own seq id, numbered through the batch, so nothing attends across examples or
across the documents packed into one block.

Order: each epoch visits the examples in a permutation drawn from (seed, epoch) alone, so the
loader's whole state is (epoch, position) plus what identifies the data; `state_dict()` /
`load_state_dict()` carry it through a checkpoint and a resumed run continues with the very batch
the interrupted one would have taken next. The last batch of an epoch may hold fewer examples.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ...errors import ReftError
from .data import IGNORE, Example


@dataclass
class Batch:
    input_ids: np.ndarray   # int32[T]
    positions: np.ndarray   # int32[T]
    seq_ids: np.ndarray     # int32[T]
    targets: np.ndarray     # int32[T], IGNORE (-100) where no loss
    examples: int

    @property
    def tokens(self) -> int:
        return len(self.input_ids)

    @property
    def target_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    def feeds(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "positions": self.positions, "seq_ids": self.seq_ids,
                "targets": self.targets}


def collate(examples: list[Example]) -> Batch:
    seq, offset = [], 0
    for e in examples:
        seq.append(e.segments + offset)
        offset += int(e.segments[-1]) + 1 if len(e) else 0
    cat = lambda k: np.concatenate([getattr(e, k) for e in examples]).astype(np.int32)  # noqa: E731
    return Batch(cat("input_ids"), cat("positions"), np.concatenate(seq).astype(np.int32), cat("targets"),
                 len(examples))


def fingerprint(examples: list[Example]) -> str:
    """Identifies the tokenized data (a resumed run must see the same)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(np.int64(len(e)).tobytes())
        h.update(e.input_ids.tobytes())
        h.update(e.targets.tobytes())
    return h.hexdigest()[:16]


def split_eval(examples: list[Example], eval_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a fraction (< 1) or a count (>= 1) of the examples, drawn from the seed."""
    if eval_split <= 0:
        return examples, []
    n = len(examples)
    k = int(eval_split) if eval_split >= 1 else int(round(n * eval_split))
    if not 0 < k < n:
        raise ReftError(f"--eval-split {eval_split} leaves {n - k} of {n} examples for training")
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    held = set(order[:k].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


class Loader:
    def __init__(self, examples: list[Example], batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ReftError(f"--batch-size must be at least 1, got {batch_size}")
        if not examples:
            raise ReftError("no examples to train on")
        self.examples, self.batch_size, self.seed, self.shuffle = examples, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._fingerprint = fingerprint(examples)
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def max_batch_tokens(self) -> int:
        """The most tokens one batch can hold (what the plan's max_batch_tokens must allow)."""
        lens = sorted((len(e) for e in self.examples), reverse=True)
        return sum(lens[:self.batch_size])

    def next_batch(self) -> Batch:
        if self.position >= len(self.examples):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        take = self._order[self.position:self.position + self.batch_size]
        self.position += len(take)
        return collate([self.examples[i] for i in take])

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "shuffle": self.shuffle, "batch_size": self.batch_size, "epoch": self.epoch,
                "position": self.position, "examples": len(self.examples), "fingerprint": self._fingerprint}

    def load_state_dict(self, d: dict) -> None:
        mine = self.state_dict()
        for k in ("seed", "shuffle", "batch_size", "examples", "fingerprint"):
            if d.get(k) != mine[k]:
                raise ReftError(f"cannot resume: the data order differs from the checkpoint's ({k}: checkpoint"
                                f" {d.get(k)!r}, this run {mine[k]!r}); use the same datasets, options and seed")
        self.epoch, self.position = int(d["epoch"]), int(d["position"])
        self._order = self._permutation(self.epoch)
