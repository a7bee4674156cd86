"""SFT conversations: record checks, and chat-template rendering with assistant-only loss masks.

How the assistant spans are found, for any template: with `full` the rendering of the whole
conversation, assistant message i starts where the rendering of messages[:i] with the generation
prompt ends, and ends where the rendering of messages[:i + 1] ends, less trailing whitespace (so
"...<|im_end|>\\n" trains "<|im_end|>", not the newline). Both renderings must be prefixes of
`full`. A template that renders earlier turns differently (some drop reasoning from history) gets
the fallback: the message's content is searched in `full` after the previous span, and the span
grows over an EOS token string written right after it.

The whole rendering is tokenized once (add_special_tokens=False: the template writes its own
special tokens), as the served model sees a conversation; a token carries loss when its
characters overlap a span (SentencePiece's "▁ok" holds the template's space before "ok" and is
trained; byte-level BPE offsets already leave such spaces out). Tokenizing the pieces one by one
instead would give SentencePiece tokenizers a spurious leading "▁" on every piece.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import ModelError
from .records import BadRecord, DatasetError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant", "model": "assistant", "system": "system", "tool": "tool"}


def _str(rec: dict, key: str, required: bool = True) -> str:
    v = rec.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        raise BadRecord(f"missing string field `{key}`" if v is None else f"`{key}` is {type(v).__name__}, not a string")
    return v


def check_alpaca(raw) -> dict:
    if not isinstance(raw, dict):
        raise BadRecord(f"expected an object with instruction/input/output, got {type(raw).__name__}")
    rec = {"instruction": _str(raw, "instruction"), "input": _str(raw, "input", False),
           "output": _str(raw, "output"), "system": _str(raw, "system", False)}
    hist = raw.get("history") or []
    if not isinstance(hist, list) or not all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h)
                                             for h in hist):
        raise BadRecord("`history` must be a list of [user, assistant] string pairs")
    rec["history"] = hist
    return rec


def alpaca_messages(rec: dict) -> list[dict]:
    msgs = [{"role": "system", "content": rec["system"]}] if rec["system"] else []
    for user, assistant in rec["history"]:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    prompt = rec["instruction"] + ("\n" + rec["input"] if rec["input"] else "")
    return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]


def _content(v, i: int) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in v):
        return "".join(p["text"] for p in v)
    raise BadRecord(f"message {i}: content must be a string (or a list of text parts)")


def check_messages(raw) -> list[dict]:
    if not isinstance(raw, dict):
        raise BadRecord(f"expected an object with `messages` or `conversations`, got {type(raw).__name__}")
    if "messages" in raw:
        turns, role_key, text_key = raw["messages"], "role", "content"
    elif "conversations" in raw:
        turns, role_key, text_key = raw["conversations"], "from", "value"
    else:
        raise BadRecord("missing field `messages` (or ShareGPT `conversations`)")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("the conversation must be a non-empty list of messages")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise BadRecord(f"message {i} is {type(t).__name__}, not an object")
        role = SHAREGPT_ROLES.get(t.get(role_key)) if role_key == "from" else t.get(role_key)
        if role not in ("system", "user", "assistant", "tool"):
            raise BadRecord(f"message {i}: unknown {role_key} {t.get(role_key)!r}")
        msgs.append({"role": role, "content": _content(t.get(text_key), i)})
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRecord("the conversation has no assistant message to train on")
    return msgs


def resolve_chat_template(value: str | None) -> str | None:
    """--chat-template: a file holding a Jinja template, or the template itself."""
    if value is None:
        return None
    p = Path(value)
    if "{" not in value and len(value) < 4096:
        if not p.is_file():
            raise DatasetError(f"--chat-template {value}: no such file (give a template file or the template text)")
        try:
            return p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"--chat-template {value}: cannot read ({e})") from None
    return value


def _render(tokenizer, messages, gen: bool, template) -> str:
    try:
        return tokenizer.render_chat(messages, add_generation_prompt=gen, template=template)
    except ModelError as e:
        raise BadRecord(str(e)) from None


def assistant_spans(tokenizer, messages: list[dict], template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans that carry loss."""
    full = _render(tokenizer, messages, False, template)
    eos = [t for t in dict.fromkeys([tokenizer.eos_token, *map(tokenizer.id_to_token, tokenizer.eos_token_ids)]) if t]
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before = _render(tokenizer, messages[:i], True, template) if i else None
            through = _render(tokenizer, messages[:i + 1], False, template)
        except BadRecord:
            before = through = None
        if before is not None and through is not None and full.startswith(through) and through.startswith(before) \
                and len(before) >= cursor:
            start, end = len(before), len(through.rstrip())
        else:
            start = full.find(m["content"], cursor)
            if start < 0 or not m["content"]:
                raise BadRecord(f"message {i}: the chat template does not render the assistant text verbatim")
            end = start + len(m["content"])
            end += next((len(t) for t in eos if full.startswith(t, end)), 0)
        if end > start:
            spans.append((start, end))
        cursor = max(cursor, end)
    return full, spans


def encode_conversation(tokenizer, messages: list[dict], template: str | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it carries loss."""
    full, spans = assistant_spans(tokenizer, messages, template)
    ids, offsets = tokenizer.encode_offsets(full, add_special_tokens=False)
    mask = []
    for ts, te in offsets:
        mask.append(any(max(ts, s) < min(te, e) or (ts == te and s <= ts < e) for s, e in spans))
    return ids, mask
