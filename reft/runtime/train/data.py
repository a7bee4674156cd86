"""Training datasets: `KIND@PATH` specs -> tokenized examples with next-token targets.

  text@PATH      pretraining: .txt files (one document each), JSONL/JSON/parquet records with a
                 `text` field. Each document is encoded (with the tokenizer's own special tokens,
                 e.g. a BOS) and ends with the first EOS id; documents are concatenated and cut
                 into `block_size` blocks. Inside a block each document (or piece of one) is its
                 own sequence: positions restart at 0 and it gets its own seq id, so attention
                 never crosses documents. A token's target is the next token of the same
                 sequence; the last token of each sequence has none (-100): a document's EOS is
                 predicted, the token after it is not, and a document cut at a block end goes on
                 as a new sequence in the next block. The final block may be shorter.
  alpaca@PATH    SFT: {instruction, input?, output, system?, history?: [[user, assistant], ...]}
                 records (JSON array or JSONL); the user turn is instruction + "\\n" + input.
  messages@PATH  SFT: {"messages": [{role, content}, ...]} (OpenAI) or {"conversations":
                 [{from, value}, ...]} (ShareGPT: human/gpt/system) records.

SFT conversations are rendered with the model's chat template (or an override) and the loss is
**only on assistant tokens and the end-of-turn text after them** (sft.py finds the spans).
Examples longer than `cutoff_len` are cut to it and counted; one left without any target is
dropped (counted). Targets use IGNORE (-100) where there is no loss, so pad/EOS ids never decide
a mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .records import BadRecord, DatasetError, ReadStats, read_records
from .sft import alpaca_messages, check_alpaca, check_messages, encode_conversation

IGNORE = -100
KINDS = ("text", "alpaca", "messages")


@dataclass
class Example:
    """One training example: sequences packed back to back (SFT examples hold one)."""
    input_ids: np.ndarray   # int32[n]
    targets: np.ndarray     # int32[n], IGNORE where no loss
    positions: np.ndarray   # int32[n], restarting at 0 for each sequence
    segments: np.ndarray    # int32[n], 0, 1, ...: the sequence each token belongs to

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    datasets: list[str] = field(default_factory=list)
    read: ReadStats = field(default_factory=ReadStats)
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0       # SFT examples cut to cutoff_len
    no_target: int = 0       # SFT examples dropped: no assistant token within cutoff_len

    def summary(self) -> str:
        s = (f"{self.examples} examples, {self.tokens} tokens ({self.target_tokens} with loss) from "
             f"{self.read.records} records in {self.read.files} files")
        extra = [f"{n} {what}" for n, what in ((self.truncated, "truncated to cutoff_len"),
                                               (self.no_target, "dropped (no assistant token within cutoff_len)"),
                                               (self.read.bad, "malformed records skipped")) if n]
        return s + ("; " + ", ".join(extra) if extra else "")


@dataclass
class Dataset:
    examples: list[Example]
    stats: DataStats


def parse_spec(spec: str) -> tuple[str, Path]:
    kind, sep, path = spec.partition("@")
    if not sep or not path:
        raise DatasetError(f"dataset {spec!r}: expected KIND@PATH with KIND one of {', '.join(KINDS)}")
    if kind not in KINDS:
        raise DatasetError(f"dataset {spec!r}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind, Path(path)


def load_datasets(specs: list[str], tokenizer, *, block_size: int = 1024, cutoff_len: int = 1024,
                  chat_template: str | None = None, skip_bad_lines: bool = False) -> Dataset:
    """Read, tokenize and pack every `KIND@PATH` dataset, in the order given."""
    if block_size < 2 or cutoff_len < 2:
        raise DatasetError(f"block_size ({block_size}) and cutoff_len ({cutoff_len}) must be at least 2")
    stats = DataStats(datasets=list(specs))
    examples: list[Example] = []
    for spec in specs:
        kind, path = parse_spec(spec)
        if kind == "text":
            docs = (rec for _, rec in read_records(path, check_text, skip_bad_lines=skip_bad_lines, stats=stats.read))
            examples += pack_documents(docs, tokenizer, block_size)
            continue
        check = check_alpaca if kind == "alpaca" else check_messages
        for where, rec in read_records(path, check, skip_bad_lines=skip_bad_lines, stats=stats.read):
            messages = alpaca_messages(rec) if kind == "alpaca" else rec
            try:
                ids, mask = encode_conversation(tokenizer, messages, chat_template)
            except BadRecord as e:
                if not skip_bad_lines:
                    raise DatasetError(f"{where}: {e}") from None
                stats.read.bad += 1
                continue
            if len(ids) > cutoff_len:
                ids, mask = ids[:cutoff_len], mask[:cutoff_len]
                stats.truncated += 1
            ex = sft_example(ids, mask)
            if ex is None:
                stats.no_target += 1
                continue
            examples.append(ex)
    if not examples:
        raise DatasetError(f"no training examples in {', '.join(specs)} ({stats.summary()})")
    stats.examples = len(examples)
    stats.tokens = sum(len(e) for e in examples)
    stats.target_tokens = sum(int((e.targets != IGNORE).sum()) for e in examples)
    return Dataset(examples, stats)


def check_text(raw) -> str:
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, dict):
        raise BadRecord(f"expected an object with a `text` field, got {type(raw).__name__}")
    t = raw.get("text")
    if not isinstance(t, str):
        raise BadRecord("missing string field `text`" if t is None else f"`text` is {type(t).__name__}, not a string")
    return t


def sft_example(ids: list[int], mask: list[bool]) -> Example | None:
    """targets[i] = ids[i + 1] where token i + 1 is trained; None when nothing is."""
    ids_a = np.asarray(ids, np.int32)
    targets = np.full(len(ids_a), IGNORE, np.int32)
    m = np.asarray(mask[1:], bool)
    targets[:-1][m] = ids_a[1:][m]
    if not m.any():
        return None
    n = len(ids_a)
    return Example(ids_a, targets, np.arange(n, dtype=np.int32), np.zeros(n, np.int32))


def document_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=True)
    eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def pack_documents(docs, tokenizer, block_size: int) -> list[Example]:
    """Documents back to back in blocks of block_size tokens, one sequence per document piece."""
    blocks: list[Example] = []
    ids: list[int] = []
    seg: list[int] = []       # document index of each token of the current block

    def flush():
        a, s = np.asarray(ids, np.int32), np.asarray(seg)
        starts = np.r_[True, s[1:] != s[:-1]]
        local = np.cumsum(starts).astype(np.int32) - 1
        first = np.maximum.accumulate(np.where(starts, np.arange(len(a)), 0))
        targets = np.full(len(a), IGNORE, np.int32)
        same = ~starts[1:]
        targets[:-1][same] = a[1:][same]
        blocks.append(Example(a, targets, (np.arange(len(a)) - first).astype(np.int32), local))
        ids.clear(), seg.clear()

    for d, text in enumerate(docs):
        toks = document_ids(tokenizer, text)
        while toks:
            room = block_size - len(ids)
            ids.extend(toks[:room])
            seg.extend([d] * min(room, len(toks)))
            toks = toks[room:]
            if len(ids) == block_size:
                flush()
    if len(ids) >= 2:
        flush()
    return blocks
