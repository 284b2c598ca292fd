"""A fault-injecting HTTP reverse proxy on loopback, to put in front of a registry.

Each connection carries one request (the proxy forces `Connection: close`). A
seeded share of requests is answered by the proxy itself with a 503, a 429
(`Retry-After: 0`) or a TCP reset; `steady_status` answers every request with
one status instead (401 carries a Basic challenge). Everything else is
forwarded to the upstream byte for byte and streamed both ways, so chunked
uploads, large blobs and HEAD requests pass unchanged.

Plain http only: point skopeo at `proxy.host` with `--tls-verify=false`, or use
`proxy.through(registry)` with the helpers of tests.infra.registry.
"""

from __future__ import annotations

import contextlib
import http
import json
import random
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self

import pytest

from tests.infra.ports import LOOPBACK
from tests.infra.registry import Registry

FAULT_KINDS = ("503", "429", "reset")
_IO_TIMEOUT = 60.0
_CHUNK = 1 << 16
_MAX_HEAD = 64 * 1024
_HOP_HEADERS = {b"connection", b"keep-alive", b"proxy-connection"}
_ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS", 503: "UNAVAILABLE"}


@dataclass(frozen=True)
class Seen:
    """One request the proxy saw and what it did with it ("forward" or a fault)."""

    method: str
    target: str
    outcome: str


class FaultProxy:
    """A reverse proxy to `upstream` ("127.0.0.1:PORT") that injects faults."""

    def __init__(
        self,
        upstream: str,
        *,
        fault_rate: float = 0.0,
        faults: Sequence[str] = FAULT_KINDS,
        steady_status: int | None = None,
        seed: int = 0,
    ) -> None:
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown or not faults:
            raise ValueError(f"faults must be a non-empty subset of {FAULT_KINDS}, not {faults}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate {fault_rate} is not between 0.0 and 1.0")
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(faults)
        self.steady_status = steady_status
        self.seen: list[Seen] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        if self._server is None:
            raise RuntimeError("the fault proxy is not running")
        return f"{LOOPBACK}:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def requests(self) -> int:
        """HTTP requests seen (a TLS hello or garbage is not counted)."""
        with self._lock:
            return len(self.seen)

    @property
    def faults(self) -> int:
        """Requests the proxy answered (or reset) itself instead of forwarding."""
        with self._lock:
            return sum(1 for seen in self.seen if seen.outcome != "forward")

    def through(self, registry: Registry) -> Registry:
        """`registry` as reached through this proxy, for the registry helpers."""
        if registry.tls:
            raise ValueError(
                "the fault proxy speaks plain http: put it in front of an http registry"
            )
        return replace(registry, host=self.host, process=None)

    def start(self) -> Self:
        self._server = _Server((LOOPBACK, 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, cut open connections and join every thread."""
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=_IO_TIMEOUT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- one connection --------------------------------------------------------------

    def serve(self, client: socket.socket) -> None:
        client.settimeout(_IO_TIMEOUT)
        reader = _Reader(client)
        head = reader.read_head()
        if head is None:
            _send_quietly(client, b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            return
        request = _Request.parse(head)
        outcome = self._decide(request)
        if outcome == "forward":
            self._forward(client, reader, request)
        elif outcome == "reset":
            # SO_LINGER 0 makes close() send RST instead of FIN: the client sees ECONNRESET.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        else:
            _relay_body(reader, request, sink=None)
            client.sendall(_fault_response(int(outcome), request.method))

    def _decide(self, request: _Request) -> str:
        with self._lock:
            if self.steady_status is not None:
                outcome = str(self.steady_status)
            elif self._rng.random() < self.fault_rate:
                outcome = self._rng.choice(self.fault_kinds)
            else:
                outcome = "forward"
            self.seen.append(Seen(request.method, request.target, outcome))
            return outcome

    def _forward(self, client: socket.socket, reader: _Reader, request: _Request) -> None:
        upstream = socket.create_connection(self.upstream, timeout=_IO_TIMEOUT)
        self._track(upstream)
        try:
            upstream.sendall(request.head_for_upstream())
            # The body goes up in its own thread: the upstream may answer before reading it all.
            pump = threading.Thread(
                target=_pump_body, args=(reader, request, upstream), daemon=True
            )
            pump.start()
            while data := upstream.recv(_CHUNK):
                client.sendall(data)
            pump.join(timeout=_IO_TIMEOUT)
        finally:
            self._untrack(upstream)
            upstream.close()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False
    block_on_close = True
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client or upstream that hangs up mid-request is part of the game, not an error."""


class _Handler(socketserver.BaseRequestHandler):
    request: socket.socket
    server: _Server

    def handle(self) -> None:
        proxy = self.server.proxy
        proxy._track(self.request)
        try:
            proxy.serve(self.request)
        except (OSError, ValueError):
            pass
        finally:
            proxy._untrack(self.request)


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    request_line: bytes
    headers: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def parse(cls, head: bytes) -> _Request:
        request_line, *lines = head.split(b"\r\n")
        method, target, _version = request_line.decode("latin-1").split(" ", 2)
        headers = []
        for line in lines:
            name, _, value = line.partition(b":")
            headers.append((name.strip(), value.strip()))
        return cls(method, target, request_line, tuple(headers))

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n.lower() == name), None)

    @property
    def chunked(self) -> bool:
        return b"chunked" in (self.header(b"transfer-encoding") or b"").lower()

    @property
    def content_length(self) -> int:
        return int(self.header(b"content-length") or 0)

    def head_for_upstream(self) -> bytes:
        kept = [n + b": " + v for n, v in self.headers if n.lower() not in _HOP_HEADERS]
        return b"\r\n".join([self.request_line, *kept, b"Connection: close", b"", b""])


class _Reader:
    """Buffered reads from the client socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def read_head(self) -> bytes | None:
        """The request line and headers, or None when the peer does not speak HTTP."""
        while b"\r\n\r\n" not in self._buffer:
            if self._buffer and not self._buffer[:1].isalpha():
                return None  # a TLS hello (0x16) or garbage
            if len(self._buffer) > _MAX_HEAD or not self._fill():
                return None
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        return head

    def readline(self) -> bytes:
        while b"\r\n" not in self._buffer:
            if not self._fill():
                raise ConnectionError("connection closed inside a chunked body")
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line + b"\r\n"

    def copy(self, size: int, sink: socket.socket | None) -> None:
        """Pass exactly `size` body bytes to `sink` (None discards them)."""
        while size > 0:
            if not self._buffer and not self._fill():
                raise ConnectionError("connection closed inside a body")
            part, self._buffer = self._buffer[:size], self._buffer[size:]
            if sink is not None:
                sink.sendall(part)
            size -= len(part)

    def _fill(self) -> bool:
        data = self._sock.recv(_CHUNK)
        self._buffer += data
        return bool(data)


def _relay_body(reader: _Reader, request: _Request, sink: socket.socket | None) -> None:
    """Pass the request body on unchanged, following its framing."""
    if not request.chunked:
        reader.copy(request.content_length, sink)
        return
    while True:
        size_line = reader.readline()
        _send(sink, size_line)
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            break
        reader.copy(size + 2, sink)  # the chunk and its CRLF
    while (trailer := reader.readline()) != b"\r\n":
        _send(sink, trailer)
    _send(sink, b"\r\n")


def _pump_body(reader: _Reader, request: _Request, upstream: socket.socket) -> None:
    with contextlib.suppress(OSError, ValueError):
        _relay_body(reader, request, upstream)


def _send(sink: socket.socket | None, data: bytes) -> None:
    if sink is not None:
        sink.sendall(data)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def _fault_response(status: int, method: str) -> bytes:
    """A registry-style error answer (JSON `errors` body, which clients classify by code)."""
    reason = http.HTTPStatus(status).phrase
    code = _ERROR_CODES.get(status, "UNKNOWN")
    body = json.dumps({"errors": [{"code": code, "message": f"fault proxy: {reason}"}]}).encode()
    headers = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == 401:
        headers.append('WWW-Authenticate: Basic realm="fault-proxy"')
    if status in (429, 503):
        headers.append("Retry-After: 0")
    head = ("\r\n".join(headers) + "\r\n\r\n").encode()
    return head if method == "HEAD" else head + body


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """A factory: `fault_proxy(registry_or_host, fault_rate=..., ...)` gives a running proxy.

    Every proxy it made is closed when the test ends.
    """
    made: list[FaultProxy] = []

    def make(upstream: Registry | str, **options: Any) -> FaultProxy:
        host = upstream.host if isinstance(upstream, Registry) else upstream
        proxy = FaultProxy(host, **options).start()
        made.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in made:
            proxy.close()
