"""Tool calls read back out of generated text, as it streams: content and calls apart.

`ToolCallParser(fmt)` takes the text of one choice piece by piece (`push`) and, at the end,
`finish`; each returns the content that is now certain to be plain text and the calls that are
now complete, as OpenAI tool-call objects (`id` "call_...", `function.arguments` a JSON string).
The whole reply parses the same way (one push, then finish).

Formats (tools.py picks one from the chat template):
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text around
  them; a call is returned as soon as its closing tag arrives (an unclosed last one at the end).
- llama3_json: `{"name": ..., "parameters": {...}}` (several separated by `;`) after
  `<|python_tag|>` or as the whole reply.
- mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, the marker optional.

Special-token markers (`<|python_tag|>`, `[TOOL_CALLS]`) are usually left out of the text (the
server skips special tokens), so a reply that starts with `{` (llama3_json) or `[` (mistral) is
held back until the end and returned as calls if it parses as calls, else as content. Text that
could still become an opening marker is held back, as is whitespace-only text (dropped when a call
follows). Text inside a call that does not parse as calls is returned as content, markers and all.
"""
from __future__ import annotations

import json
import uuid

from .tools import HERMES, LLAMA3, MISTRAL

_MARKERS = {HERMES: ("<tool_call>", "</tool_call>", None),
            LLAMA3: ("<|python_tag|>", None, "{"),
            MISTRAL: ("[TOOL_CALLS]", None, "[")}


def new_call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def parse_calls(body: str) -> list[dict] | None:
    """The calls in a call body (JSON objects, or arrays of them, separated by whitespace, `;` or
    `,`), or None when it is anything else."""
    dec, i, calls = json.JSONDecoder(), 0, []
    while True:
        while i < len(body) and body[i] in " \t\r\n;,":
            i += 1
        if i == len(body):
            return calls or None
        try:
            value, i = dec.raw_decode(body, i)
        except ValueError:
            return None
        for obj in value if isinstance(value, list) else [value]:
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return None
            args = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    return None
            calls.append(new_call(obj["name"], json.dumps(args, ensure_ascii=False)))


def _held_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    def __init__(self, fmt: str, parallel: bool = True):
        self.open, self.close, self.bare = _MARKERS[fmt]
        self.parallel = parallel
        self.calls: list[dict] = []
        self._buf = ""
        self._in_call = False
        self._call_text = ""      # the raw text of the call being read (markers included)
        self._said = False        # content other than whitespace was returned

    def _take(self, calls: list[dict]) -> list[dict]:
        room = len(calls) if self.parallel else max(0, 1 - len(self.calls))
        calls = calls[:room]
        self.calls += calls
        return calls

    def push(self, text: str) -> tuple[str, list[dict]]:
        self._buf += text
        content, calls = "", []
        while self._buf:
            if self._in_call:
                if self.close is None or (end := self._buf.find(self.close)) < 0:
                    break
                body, self._buf = self._buf[:end], self._buf[end + len(self.close):]
                self._in_call = False
                content, calls = self._ended(body, self._call_text + body + self.close, content, calls)
                continue
            start = self._buf.find(self.open)
            head = self._buf.lstrip()
            if start < 0 and self.bare is not None and head and self.open.startswith(head):
                break    # may still become the marker (which begins like a bare call: "[TOOL_CALLS]")
            bare = (self.bare is not None and not self._said and not self.calls and start != len(self._buf) - len(head)
                    and head.startswith(self.bare))
            if bare or start >= 0:
                cut = len(self._buf) - len(self._buf.lstrip()) if bare else start
                content += self._say(self._buf[:cut], before_call=True)
                self._call_text = "" if bare else self.open
                self._buf = self._buf[cut:] if bare else self._buf[start + len(self.open):]
                self._in_call = True
                continue
            keep = _held_suffix(self._buf, self.open)
            ready = self._buf[:len(self._buf) - keep]
            if not ready.strip():
                break    # only whitespace so far: it goes with what follows, or is dropped before a call
            content += self._say(ready)
            self._buf = self._buf[len(ready):]
        return content, calls

    def finish(self) -> tuple[str, list[dict]]:
        content, calls = self.push("")
        if self._in_call:
            self._in_call = False
            content, calls = self._ended(self._buf, self._call_text + self._buf, content, calls)
        elif self._buf.strip() or not self.calls:
            content += self._say(self._buf)
        self._buf = ""
        return content, calls

    def _ended(self, body: str, raw: str, content: str, calls: list[dict]) -> tuple[str, list[dict]]:
        parsed = parse_calls(body)
        if parsed is None:
            return content + self._say(raw), calls
        return content, calls + self._take(parsed)

    def _say(self, text: str, before_call: bool = False) -> str:
        if before_call and not text.strip():
            return ""
        self._said = self._said or bool(text.strip())
        return text
