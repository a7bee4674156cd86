"""Checks that refuse a request before any route sees it, as one pure-ASGI middleware.

In order, each answered with an OpenAI error body:
1. Host and Origin (DNS rebinding, cross-site requests). Active when the server binds a loopback
   address, or when --allowed-hosts is given. A `Host` whose name is not localhost, 127.0.0.1,
   ::1 or an --allowed-hosts entry (any port) is 421; an `Origin` whose host is not one of those
   is 403 (a browser sends Origin on cross-origin requests and on same-origin POSTs; the chat
   page at / calls the API from its own origin, so it passes). A request without Host or Origin
   (curl, SDKs over HTTP/1.0) is not refused for lacking them. `--allowed-hosts '*'` turns the
   check off.
2. The API key, when one is set: `Authorization: Bearer KEY` on every route except /health, the
   chat page's HTML at / (a browser cannot send a header when it opens a page; the page sends
   the key the user types with each API call) and, with --metrics-public, /metrics. 401 otherwise.
3. The body size: a Content-Length over the limit is refused before any route sees a byte of the
   body; a body without Content-Length (chunked) is read here, and refused as soon as it passes
   the limit. The rest of a refused body is read and dropped (for at most 2 s and 256 MiB, so the
   client gets to read the 413 rather than a connection reset), then the 413 goes out and the
   connection closes; a refused body is never parsed.
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from ipaddress import ip_address
from urllib.parse import urlsplit

from .protocol import error_body

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
PUBLIC_PATHS = frozenset({"/health", "/"})


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name part of a Host header: 'Example.com:80' -> 'example.com', '[::1]:8000' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    name, sep, port = value.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else value


def allowed_host_names(bind_host: str, allowed_hosts: str | None) -> frozenset[str] | None:
    """The host names requests may name, or None when Host and Origin are not checked."""
    extra = {host_name(h) for h in (allowed_hosts or "").split(",") if h.strip()}
    if "*" in extra or (not extra and not is_loopback(bind_host)):
        return None
    return LOOPBACK_NAMES | extra


@dataclass(frozen=True)
class GuardConfig:
    api_key: str | None = None
    metrics_public: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    allowed_hosts: frozenset[str] | None = None     # None: Host and Origin are not checked


class Guards:
    """ASGI middleware applying the checks above to every HTTP request."""

    def __init__(self, app, config: GuardConfig):
        self.app, self.config = app, config
        self.public = PUBLIC_PATHS | ({"/metrics"} if config.metrics_public else set())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await _refuse(send, *refusal)
        limit = self.config.max_request_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _refuse(send, 400, f"Content-Length {length!r} is not a number")
            if int(length) > limit:
                await _discard_body(receive)
                return await _refuse(send, 413, _too_large(limit, f" ({int(length):,} bytes)"), "request_too_large")
            return await self.app(scope, receive, send)
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            return await self.app(scope, receive, send)
        replay = await _buffer_body(receive, limit)
        if replay is None:
            await _discard_body(receive)
            return await _refuse(send, 413, _too_large(limit, ""), "request_too_large")
        return await self.app(scope, replay, send)

    def _refusal(self, scope, headers: dict) -> tuple | None:
        hosts = self.config.allowed_hosts
        if hosts is not None:
            host = headers.get("host")
            if host is not None and host_name(host) not in hosts:
                return (421, f"this server does not answer for host {host!r}; allowed: {', '.join(sorted(hosts))}"
                        " (start it with --allowed-hosts to add names)", "misdirected_request")
            origin = headers.get("origin")
            if origin is not None and _origin_host(origin) not in hosts:
                return (403, f"cross-origin request from {origin!r} refused; allowed hosts:"
                        f" {', '.join(sorted(hosts))} (start the server with --allowed-hosts to add names)",
                        "forbidden_origin")
        key = self.config.api_key
        if key is not None and scope["path"] not in self.public:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return 401, "missing or invalid API key: send `Authorization: Bearer KEY`", "invalid_api_key"
        return None


def _origin_host(origin: str) -> str:
    try:
        return urlsplit(origin).hostname or ""     # 'null' (sandboxed pages, file:) -> ''
    except ValueError:                             # 'http://[::1' and the like
        return ""


def _too_large(limit: int, size: str) -> str:
    return (f"the request body{size} is larger than this server's limit of {limit:,} bytes"
            " (--max-request-bytes)")


async def _buffer_body(receive, limit: int):
    """Read a whole body of unknown length; returns a receive() that replays it and then passes
    on (so a later client disconnect is still seen), or None once it passes `limit` bytes."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":   # the client left
            first = message
            break
        size += len(message.get("body", b""))
        if size > limit:
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            first = {"type": "http.request", "body": b"".join(parts), "more_body": False}
            break
    pending = [first]

    async def replay():
        return pending.pop() if pending else await receive()
    return replay


DRAIN_SECONDS, DRAIN_BYTES = 2.0, 256 * 2**20


async def _discard_body(receive) -> None:
    """Read and drop the rest of a refused body, for at most DRAIN_SECONDS and DRAIN_BYTES, before
    the 413 goes out. A client sends its whole body before it reads the answer: closing on unread
    bytes makes the kernel reset the connection, and the reset can destroy the answer in flight
    (uvicorn stops delivering the body once a response is complete, so this must come first).
    Nothing read here is parsed or kept."""
    import anyio

    with anyio.move_on_after(DRAIN_SECONDS):
        size = 0
        while size < DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            size += len(message.get("body", b""))


async def _refuse(send, status: int, message: str, code: str | None = None) -> None:
    body = json.dumps(error_body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
