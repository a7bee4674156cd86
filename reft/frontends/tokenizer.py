"""The model's tokenizer (HF `tokenizers` tokenizer.json), chat template and streaming decoder.

Notable:
- Special tokens are gathered from three files the way checkpoints scatter them:
  `eos_token_ids` is the ordered union of generation_config.json's eos_token_id (int or list),
  tokenizer_config.json's eos_token and config.json's eos_token_id; the first is the primary one.
- The chat template comes from chat_template.jinja (transformers >= 5) or from
  tokenizer_config.json's `chat_template` (a string, or a list of {name, template}: "default").
- `render_chat` renders like transformers' apply_chat_template: sandboxed jinja2 with
  trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII,
  loop controls, and `{% generation %}` blocks (rendered as plain text). The rendered text already
  holds the template's special tokens: encode it with add_special_tokens=False.
- `tokenizers`' own decode skips special tokens by default; ours does not unless asked.
- `IncrementalDecoder` streams text the way vLLM does: decode a window that starts a few tokens
  back and emit what grew, holding back while the text ends in U+FFFD (an unfinished UTF-8
  sequence from byte-fallback or byte-level tokens). Starting the window on an earlier token keeps
  SentencePiece's "strip the leading space of the first token" from eating real spaces. Unlike
  vLLM, the first window never starts inside a prompt character spelled as byte tokens.
- A run of byte-fallback tokens that is not valid UTF-8 decodes to one U+FFFD per token, even
  for bytes that were valid alone (b"\x00" then b"\x80"): such garbage can stream differently
  from a one-shot decode. Valid text always streams exactly.
- `save_to` writes tokenizer.json, tokenizer_config.json (template + special tokens) and
  generation_config.json (eos ids as a list), which `from_dir` reads back as the same tokenizer.
"""
from __future__ import annotations

import functools
import json
import shutil
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ModelError
from .config import load_generation_config, read_json

NO_TEMPLATE = "this model has no chat template; pass --chat-template FILE or use --prompt"


def _token_str(v) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _ids(v) -> list[int]:
    if type(v) is int:
        return [v]
    return [i for i in v if type(i) is int] if isinstance(v, list) else []


class Tokenizer:
    """A tokenizers.Tokenizer plus the special tokens and chat template of its model."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 bos_token_id: int | None = None, eos_token_ids: list[int] = (), chat_template: str | None = None,
                 tokenizer_config: dict | None = None, generation_config: dict | None = None,
                 source: Path | None = None):
        self._tok = tok
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id, self.eos_token_ids = bos_token_id, list(eos_token_ids)
        self.chat_template = chat_template
        self.tokenizer_config = dict(tokenizer_config or {})
        self.generation_config = dict(generation_config or {})
        self.source = source  # the tokenizer.json it came from, copied verbatim by save_to

    @classmethod
    def from_dir(cls, model_dir, hf_config: dict | None = None) -> Tokenizer:
        d = Path(model_dir)
        if not d.is_dir():
            raise ModelError(f"{d}: no such model directory")
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"{path}: no such file (reft reads the `tokenizers` format tokenizer.json)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception with a serde message
            raise ModelError(f"{path}: cannot load tokenizer: {e}") from None
        tc = read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        gen = load_generation_config(d)
        if hf_config is None:
            hf_config = read_json(d / "config.json") if (d / "config.json").is_file() else {}

        bos, eos = _token_str(tc.get("bos_token")), _token_str(tc.get("eos_token"))
        bos_ids = [tok.token_to_id(bos)] if bos else []
        bos_ids += _ids(gen.get("bos_token_id")) + _ids(hf_config.get("bos_token_id"))
        bos_id = next((i for i in bos_ids if i is not None), None)
        eos_ids = gen["eos_token_ids"] + ([tok.token_to_id(eos)] if eos else []) + _ids(hf_config.get("eos_token_id"))
        eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
        if bos is None and bos_id is not None:
            bos = tok.id_to_token(bos_id)
        if eos is None and eos_ids:
            eos = tok.id_to_token(eos_ids[0])
        return cls(tok, bos_token=bos, eos_token=eos, bos_token_id=bos_id, eos_token_ids=eos_ids,
                   chat_template=_find_template(d, tc), tokenizer_config=tc, generation_config=gen, source=path)

    # --- encode / decode ---------------------------------------------------------------------------
    # Long inputs go through one-item batches: the batch calls release the GIL while they work
    # (encode and decode hold it), so a long prompt tokenized in a worker thread does not stall the
    # server's event loop. Short ones (every per-token decode of streaming) keep the GIL: a release
    # would let another thread take it for up to the interpreter's switch interval.
    LONG = 4096   # characters or token ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) < self.LONG:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)   # _fast (no offsets): >= 0.21
        return batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_offsets(self, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's [start, end) character span in `text` (training masks)."""
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        if len(ids) < self.LONG:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The `tokenizers` tokenizer itself (the grammar engine reads its vocabulary and decoder)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added tokens included (the model's embedding may be larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def special_tokens(self) -> dict[str, str]:
        """bos/eos/unk/pad token strings that are known: what chat templates may refer to."""
        out = {k: _token_str(self.tokenizer_config.get(k)) for k in ("unk_token", "pad_token")}
        out.update(bos_token=self.bos_token, eos_token=self.eos_token)
        return {k: v for k, v in out.items() if v is not None}

    # --- chat --------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, template: str | None = None,
                    **extra) -> str:
        template = template if template is not None else self.chat_template
        if not template:
            raise ModelError(NO_TEMPLATE)
        variables = {"tools": None, "documents": None, **self.special_tokens(), **extra}
        return render_chat_template(template, messages, add_generation_prompt, **variables)

    # --- saving ------------------------------------------------------------------------------------
    def save_to(self, out_dir) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.source is not None and self.source.is_file():
            shutil.copyfile(self.source, out / "tokenizer.json")
        else:
            self._tok.save(str(out / "tokenizer.json"))
        tc = {k: v for k, v in self.tokenizer_config.items() if k != "chat_template"}
        tc.update({k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v is not None})
        if self.chat_template is not None:
            tc["chat_template"] = self.chat_template
        gen = {k: v for k, v in self.generation_config.items() if k != "eos_token_ids"}
        gen.pop("bos_token_id", None)
        if self.bos_token_id is not None:
            gen["bos_token_id"] = self.bos_token_id
        gen["eos_token_id"] = list(self.eos_token_ids)
        for name, obj in (("tokenizer_config.json", tc), ("generation_config.json", gen)):
            (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _find_template(d: Path, tc: dict) -> str | None:
    f = d / "chat_template.jinja"
    if f.is_file():
        try:
            return f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelError(f"{f}: cannot read: {e}") from None
    t = tc.get("chat_template")
    if isinstance(t, list):  # [{name, template}, ...]
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t else None


# --- chat template rendering (jinja2, sandboxed like transformers) -------------------------------------
class _TemplateRaised(jinja2.TemplateError):
    """raise_exception(...) called by the template itself."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ModelError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except _TemplateRaised as e:
        raise ModelError(f"chat template rejected the conversation: {e}") from None
    except jinja2.TemplateError as e:
        raise ModelError(f"chat template failed: {type(e).__name__}: {e}") from None
    except Exception as e:  # bad message shapes surface as TypeError/KeyError inside the template
        raise ModelError(f"chat template failed: {type(e).__name__}: {e}") from None


# --- streaming decode ----------------------------------------------------------------------------------
class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text; push() pieces concatenate to decode(all)."""

    CONTEXT = 5  # prompt tokens decoded in front of the first generated one

    def __init__(self, tokenizer: Tokenizer, prompt_ids=(), skip_special_tokens: bool = False):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids = list(prompt_ids)
        self.read = len(self.ids)  # ids[:read] have been turned into text already
        self.prefix = self._window_start()  # decode ids[prefix:] and emit what grew

    def _window_start(self) -> int:
        """CONTEXT prompt tokens back, or further until the window's text ends the prompt's text
        (five tokens back can land inside a character spelled as byte tokens)."""
        if not self.read:
            return 0
        dec = self.tokenizer.decode
        whole = dec(self.ids, skip_special_tokens=self.skip)
        for p in range(max(self.read - self.CONTEXT, 0), 0, -1):
            if whole.endswith(dec(self.ids[p:], skip_special_tokens=self.skip)):
                return p
        return 0

    def _delta(self) -> str:
        dec = self.tokenizer.decode
        before = dec(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        after = dec(self.ids[self.prefix:], skip_special_tokens=self.skip)
        return after[len(before):] if len(after) > len(before) else ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._delta()
        if not text or text.endswith("\ufffd"):
            return ""  # nothing new yet, or an unfinished UTF-8 sequence: wait for more tokens
        self.prefix, self.read = self.read, len(self.ids)
        return text

    def flush(self) -> str:
        """Whatever is held back (invalid bytes come out as U+FFFD, as in decode)."""
        text = self._delta()
        self.prefix, self.read = self.read, len(self.ids)
        return text
