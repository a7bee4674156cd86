"""A GGUF file's `tokenizer.ggml.*` metadata -> a `tokenizers` tokenizer that encodes as llama.cpp.

Two vocabulary kinds (`tokenizer.ggml.model`):
- "llama": SentencePiece-style BPE over `tokens` with `scores` and byte fallback (<0xXX> tokens).
  llama.cpp repeatedly merges the adjacent pair whose concatenation is a token with the highest
  score (leftmost first on ties); characters left outside the vocabulary become byte tokens. As
  a `tokenizers` BPE that is one merge per way of splitting a token into two tokens, ranked by the
  merged token's score. Text is prefixed with a space (unless `add_space_prefix` is false) and
  spaces become U+2581, for every run of text between special tokens, as llama.cpp does; that is
  a Prepend normalizer, not the Metaspace pre-tokenizer HF exports use (Metaspace prefixes only
  the first run, and skips texts that already start with a space).
- "gpt2": byte-level BPE with ranked `merges`; the pre-tokenizer regexes are chosen by
  `tokenizer.ggml.pre` as llama.cpp chooses them (PRE_TOKENIZERS below).

Token types: CONTROL and UNKNOWN tokens are special added tokens, USER_DEFINED ones plain added
tokens, all matched in the text before the model runs (llama.cpp with special-token parsing on,
which chat templates need). BOS/EOS are added by the post-processor when `add_bos_token` /
`add_eos_token` say so (llama.cpp's defaults: BOS for "llama", nothing for "gpt2").
Special-token ids outside the vocabulary (0xFFFFFFFF = unset) are absent, not errors.
"""
from __future__ import annotations

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import ModelError
from .tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN2_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def _gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(regex: str):
    return lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre -> (pre-tokenizer factory, ignore_merges); the groups llama.cpp treats alike
PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "phi-2"), (_gpt2, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    (_digits_then_gpt2, False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), (_split_then_bytes(LLAMA3_REGEX), True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), (_split_then_bytes(QWEN2_REGEX), False)),
}


def _get(meta: dict, key: str, default=None):
    return meta.get(f"tokenizer.ggml.{key}", default)


def _flag(meta: dict, key: str, default: bool) -> bool:
    v = _get(meta, key)
    return default if v is None else bool(v)


def _token_id(meta: dict, key: str, n_vocab: int) -> int | None:
    """A special token id, or None when unset (absent, or outside the vocabulary like 0xFFFFFFFF)."""
    v = _get(meta, f"{key}_token_id")
    return int(v) if isinstance(v, int) and 0 <= v < n_vocab else None


def spm_merges(tokens: list[str], types: list[int], scores) -> list[tuple[str, str]]:
    """Every (left, right) pair of tokens that concatenates to a normal token, best score first."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] not in (BYTE, CONTROL)}
    ranked = []
    for i, tok in enumerate(tokens):
        if types[i] != NORMAL:
            continue
        for cut in range(1, len(tok)):
            a, b = tok[:cut], tok[cut:]
            if a in ids and b in ids:
                ranked.append((-float(scores[i]), ids[a], ids[b], a, b))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def _spm(tokens, types, scores, unk: str | None, space_prefix: bool) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab, spm_merges(tokens, types, scores), unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = tokenizers.Tokenizer(bpe)
    steps = [normalizers.Prepend(SPACE)] if space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return tok


def _byte_level(meta, tokens, where) -> tokenizers.Tokenizer:
    pre = _get(meta, "pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ModelError(f"{where}: GGUF pre-tokenizer {pre!r} is not supported (supported:"
                         f" {', '.join(sorted(PRE_TOKENIZERS))})")
    make_pre, ignore_merges = PRE_TOKENIZERS[pre]
    raw = _get(meta, "merges")
    if raw is None:
        raise ModelError(f"{where}: gpt2 tokenizer without tokenizer.ggml.merges")
    merges = []
    for m in raw:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ModelError(f"{where}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((a, b))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    return tok


def tokenizer_from_gguf(meta: dict, where) -> Tokenizer:
    kind = _get(meta, "model")
    tokens = _get(meta, "tokens")
    if kind is None or tokens is None:
        raise ModelError(f"{where}: the GGUF file has no tokenizer (tokenizer.ggml.model / tokens missing)")
    n = len(tokens)
    types = _get(meta, "token_type")
    types = [NORMAL] * n if types is None else [int(t) for t in types]
    if len(types) != n:
        raise ModelError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    ids = {k: _token_id(meta, k, n) for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}
    if kind == "llama":
        scores = _get(meta, "scores")
        if scores is None or len(scores) != n:
            raise ModelError(f"{where}: llama tokenizer needs tokenizer.ggml.scores for each of its {n} tokens")
        unk = tokens[ids["unknown"]] if ids["unknown"] is not None else None
        tok = _spm(tokens, types, scores, unk, _flag(meta, "add_space_prefix", True))
        add_bos, add_eos = _flag(meta, "add_bos_token", True), _flag(meta, "add_eos_token", False)
    elif kind == "gpt2":
        tok = _byte_level(meta, tokens, where)
        add_bos, add_eos = _flag(meta, "add_bos_token", False), _flag(meta, "add_eos_token", False)
    else:
        raise ModelError(f"{where}: GGUF tokenizer model {kind!r} is not supported (supported: llama, gpt2)")
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)])
    tok.post_processor = _post_processor(tokens, ids, add_bos, add_eos)

    name = lambda key: tokens[ids[key]] if ids[key] is not None else None  # noqa: E731
    eos_ids = list(dict.fromkeys(i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None))
    config = {k: v for k, v in (("unk_token", name("unknown")), ("pad_token", name("padding"))) if v is not None}
    config.update(add_bos_token=add_bos, add_eos_token=add_eos)
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(tok, bos_token=name("bos"), eos_token=name("eos"), bos_token_id=ids["bos"],
                     eos_token_ids=eos_ids, chat_template=template if isinstance(template, str) and template else None,
                     tokenizer_config=config)


def _post_processor(tokens, ids, add_bos: bool, add_eos: bool):
    first = [ids["bos"]] if add_bos and ids["bos"] is not None else []
    last = [ids["eos"]] if add_eos and ids["eos"] is not None else []
    names = lambda group: [tokens[i] for i in group]  # noqa: E731
    single = names(first) + ["$A"] + names(last)
    pair = single + names(first) + ["$B:1"] + names(last)
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=[(tokens[i], i) for i in dict.fromkeys(first + last)])
