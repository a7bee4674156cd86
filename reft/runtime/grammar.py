"""Structured output: grammars compiled by llguidance, one matcher per sequence, token masks.

A request may carry a `GrammarSpec` (a JSON schema, any JSON object, a regex, a list of choices, or
a Lark / GBNF grammar). `GrammarCompiler.compile` turns it into a `Constraint` (a checked
llguidance matcher, compiled once per request); each sequence starts its own copy, and before each
of its tokens is sampled `allowed_tokens` computes the boolean mask of the tokens the grammar
accepts next, for every constrained sequence of the step in one call (llguidance's Rust code runs
without the GIL; several masks go to its thread pool, a lone one runs on the engine thread so no
pool thread is left spinning beside the forward's threads).

Notable:
- Why llguidance: a Rust wheel with no torch dependency (reft has none), masks computed on the fly
  from a token trie with an Earley parser over lazily built lexer automata, so a new schema costs
  milliseconds rather than a per-vocabulary precompilation; it reads JSON schema, regex, Lark and
  (through its converter) llama.cpp's GBNF, and Lark grammars can embed JSON schemas (`%json`),
  which the tool-calling grammars use.
- The vocabulary is handed over as each token's real bytes, computed from the tokenizer's own
  model and decoder: byte-level BPE symbols (GPT-2's byte-to-unicode table) map back to their
  bytes, SentencePiece's U+2581 becomes a space and byte-fallback tokens `<0xXX>` become one byte;
  special tokens are marked special (llguidance never lets text match them). Ids the model has
  beyond the tokenizer get no bytes, so they are never allowed.
- llguidance tokenizes the bytes a grammar forces (the `{"` opening a schema's object) itself and
  forces those tokens, so it needs the canonical tokenization of bare text: it gets the model's
  tokenizer with the SentencePiece space prefix and the BOS/EOS post-processor taken out.
- JSON whitespace is bounded (at most 20 whitespace characters between tokens, as llama.cpp's
  schema grammars allow) so that a sampled run of newlines cannot go on to max_tokens; a schema's
  own `x-guidance` whitespace options (llguidance's: `"whitespace_flexible": false` for compact
  JSON, or a `whitespace_pattern`) replace this.
- EOS is allowed only where the grammar may end; a sequence whose grammar is complete (nothing
  but EOS could follow) stops at once with finish reason "stop".
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import RequestError

JSON_DEFAULTS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{1,20}"}
KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class GrammarError(RequestError):
    """A schema or grammar that the engine rejects; `param` names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to. `source`: the schema (dict or JSON text) for
    json_schema, the pattern for regex, the list of strings for choice, Lark or GBNF text for
    grammar; unused for json_object. `param` names where it came from, for error messages."""
    kind: str
    source: object = None
    param: str = "grammar"


# --- the vocabulary as bytes ---------------------------------------------------------------------------
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable bytes stand for themselves, the rest are shifted
    to U+0100 onwards in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in keep}
    shifted = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


def _decoder_types(node) -> set[str]:
    """Every decoder type in a tokenizer.json decoder (sequences walked), plus 'Replace:<pattern>'."""
    if not isinstance(node, dict):
        return set()
    kinds = {node.get("type")}
    if node.get("type") == "Replace":
        kinds.add("Replace:" + str((node.get("pattern") or {}).get("String")))
    for child in node.get("decoders") or ():
        kinds |= _decoder_types(child)
    return kinds


def vocabulary(tokenizer, size: int) -> tuple[list[bytes], list[int]]:
    """(bytes of each token id < size, ids of special tokens) for a reft Tokenizer."""
    spec = json.loads(tokenizer.backend.to_str())
    decoders = _decoder_types(spec.get("decoder"))
    byte_level = "ByteLevel" in decoders
    byte_fallback = bool(spec.get("model", {}).get("byte_fallback")) or "ByteFallback" in decoders
    space = "\u2581" if "Metaspace" in decoders or "Replace:\u2581" in decoders else None
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    table = _byte_level_table() if byte_level else {}
    tokens, special = [b""] * size, []
    for text, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if i >= size:
            continue
        if i in added:
            tokens[i] = text.encode("utf-8")
            if added[i].get("special"):
                special.append(i)
        elif byte_level and all(c in table for c in text):
            tokens[i] = bytes(table[c] for c in text)
        elif byte_fallback and (m := _BYTE_TOKEN.fullmatch(text)):
            tokens[i] = bytes([int(m.group(1), 16)])
        else:
            tokens[i] = (text.replace(space, " ") if space else text).encode("utf-8")
    return tokens, sorted(special)


def _without_prefix(node):
    """A tokenizer.json normalizer / pre-tokenizer that adds no leading space."""
    if not isinstance(node, dict) or node.get("type") == "Prepend":
        return None if isinstance(node, dict) else node
    node = dict(node)
    if node.get("type") == "Metaspace":
        node["prepend_scheme"] = "never"
        node.pop("add_prefix_space", None)
    elif node.get("type") == "ByteLevel":
        node["add_prefix_space"] = False
    for key in ("normalizers", "pretokenizers"):
        if key in node:
            node[key] = [x for x in map(_without_prefix, node[key]) if x is not None]
    return node


def canonical_encoder(tokenizer):
    """text -> ids as the model's tokenizer splits it, without the space prefix or BOS/EOS."""
    import tokenizers

    spec = json.loads(tokenizer.backend.to_str())
    for key in ("normalizer", "pre_tokenizer"):
        spec[key] = _without_prefix(spec.get(key))
    spec["post_processor"] = None
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))

    def encode(text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return tok.encode(text, add_special_tokens=False).ids
    return encode


class _Vocab:
    """What llguidance.TokenizerWrapper reads: token bytes, special ids, EOS/BOS and an encoder."""

    def __init__(self, tokenizer, size: int):
        self.tokens, self.special_token_ids = vocabulary(tokenizer, size)
        eos = [i for i in tokenizer.eos_token_ids if i < size]
        self.eos_token_id = eos[0] if eos else None
        self.eos_token_ids = eos
        self.bos_token_id = tokenizer.bos_token_id
        self._encode = canonical_encoder(tokenizer)

    def __call__(self, text):
        return self._encode(text)


# --- compiling and matching ----------------------------------------------------------------------------
def _one_line(message: str) -> str:
    """llguidance's message up to the grammar listing it appends, on one line."""
    lines = []
    for line in str(message).splitlines():
        if re.match(r"\s*\d+ \|", line) or line.startswith("<state>"):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)[:600] or "invalid grammar"


class Constraint:
    """A compiled grammar: a checked matcher that each constrained sequence copies."""

    def __init__(self, matcher, spec: GrammarSpec):
        self._proto, self.spec = matcher, spec

    def start(self):
        return self._proto.deep_copy()


class GrammarCompiler:
    """Compiles GrammarSpecs against one tokenizer and computes batches of masks. The tokenizer's
    trie is built on first use (tens of milliseconds for a 50k vocabulary); thread-safe."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()
        self._lltok = None
        self._executor = None

    @property
    def lltok(self):
        with self._lock:
            if self._lltok is None:
                import llguidance

                vocab = _Vocab(self.tokenizer, self.vocab_size)
                self._lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab),
                                                     eos_token=vocab.eos_token_ids or None)
                self._executor = llguidance.LLExecutor()
            return self._lltok

    def grammar_text(self, spec: GrammarSpec) -> str:
        """The llguidance grammar (its JSON form) of a spec; raises GrammarError."""
        import llguidance
        from llguidance import LLMatcher

        src = spec.source
        try:
            if spec.kind in ("json_schema", "json_object"):
                schema = {"type": "object"} if spec.kind == "json_object" else src
                if isinstance(schema, str):
                    schema = json.loads(schema)
                if not isinstance(schema, dict):
                    raise GrammarError(f"{spec.param}: a JSON schema must be a JSON object", spec.param)
                own = schema.get("x-guidance")
                own = own if isinstance(own, dict) else {}
                defaults = None if {"whitespace_flexible", "whitespace_pattern"} & own.keys() else JSON_DEFAULTS
                return LLMatcher.grammar_from_json_schema(schema, defaults=defaults)
            if spec.kind == "regex":
                return LLMatcher.grammar_from_regex(_text(src, spec))
            if spec.kind == "choice":
                if not isinstance(src, list) or not src or not all(isinstance(x, str) and x for x in src):
                    raise GrammarError(f"{spec.param}: give a non-empty list of non-empty strings", spec.param)
                return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(x) for x in src))
            if spec.kind == "grammar":
                return llguidance.grammar_from("grammar", _text(src, spec))   # Lark, or GBNF converted
        except ValueError as e:
            raise GrammarError(f"{spec.param}: {_one_line(e)}", spec.param) from None
        raise GrammarError(f"{spec.param}: unknown grammar kind {spec.kind!r} (one of {', '.join(KINDS)})",
                           spec.param)

    def compile(self, spec: GrammarSpec, grammar: str | None = None) -> Constraint:
        """A checked Constraint for `spec` (or for an llguidance grammar built elsewhere, such as
        a tool-calling grammar); raises GrammarError naming the problem. Blocking: for large
        schemas this takes a while (without the GIL), so servers run it in a worker thread."""
        from llguidance import LLMatcher

        lltok = self.lltok
        matcher = LLMatcher(lltok, grammar if grammar is not None else self.grammar_text(spec), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{spec.param}: {_one_line(matcher.get_error())}", spec.param)
        return Constraint(matcher, spec)

    def allowed_tokens(self, matchers: list) -> np.ndarray:
        """bool[len(matchers), vocab_size]: the tokens each matcher accepts next. One mask is
        computed on the calling thread (no worker thread left spinning beside the next forward's
        threads); several go to llguidance's pool."""
        words = (self.lltok.vocab_size + 31) // 32
        bits = np.empty((len(matchers), words), np.int32)
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(bits.ctypes.data, words * 4)
        else:
            self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bits.ctypes.data,
                                                   words * 4, len(matchers))
        unpacked = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")
        return unpacked[:, :self.vocab_size].view(bool)


def _text(src, spec: GrammarSpec) -> str:
    if not isinstance(src, str) or not src.strip():
        raise GrammarError(f"{spec.param}: give the {spec.kind} as a non-empty string", spec.param)
    return src
