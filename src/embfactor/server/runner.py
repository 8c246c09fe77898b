"""Running the app over TCP: bind the port first, then uvicorn with timeouts for slow and idle clients.

uvicorn times out idle keep-alive connections (``timeout_keep_alive``) but not a request that arrives slowly or
never completes: a client that sends half a request line, or headers and half a body, held its connection (and,
with enough of them, the server) forever. :class:`TimedH11Protocol` gives every request ``request_timeout`` seconds
to arrive in full, headers and body, counted from when the connection became ready for it; past that the client
gets a 408 (when nothing was answered yet) and the connection is closed. Time the model spends on a request that
did arrive is not limited.

A response that closes the connection while the request body is still arriving (a 413 for a body over
``--max-body-bytes`` sent with ``Connection: close``, as Python's urllib does) used to close the socket with the rest of
the body unread: the kernel then answers with a reset, and a client that writes its whole body before reading (urllib
at 20 MB, every time) saw ``BrokenPipeError`` or ``ConnectionResetError`` instead of the 413. The connection now closes
the way Apache and nginx close it (a *lingering close*): the response is sent and the write side shut (FIN), then the
rest of the body is read and discarded, nothing kept, until the client closes or ``request_timeout`` seconds pass.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from embfactor.errors import ConfigError, InvalidInputError

#: Seconds a request has to arrive in full (headers and body); see the module docstring.
REQUEST_TIMEOUT = 30.0
#: Seconds an idle keep-alive connection stays open after a response (uvicorn's default).
KEEP_ALIVE_TIMEOUT = 5.0

_408 = b"the request did not arrive in full within %.0f seconds\n"
# h11's states of the client's side once its request is entirely in (MUST_CLOSE: HTTP/1.0 without keep-alive)
_REQUEST_IN = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)


class _LingeringTransport:
    """The transport as uvicorn's protocol and request cycles see it: ``close()`` is the protocol's lingering close."""

    def __init__(self, transport: asyncio.Transport, protocol: TimedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._protocol._close()

    def is_closing(self) -> bool:
        return self._protocol._lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # write, get_extra_info, ... of the real transport
        return getattr(self._transport, name)


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request to arrive in full (``request_timeout`` seconds).

    The deadline starts when the connection opens and again after each response; it ends when h11 has parsed the
    whole request (their side ``DONE``). Subclass with another ``request_timeout`` (see :func:`make_config`).
    Closing while the request body is still arriving lingers (module docstring), for at most ``request_timeout``.
    """

    request_timeout: float = REQUEST_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._request_timer: asyncio.TimerHandle | None = None
        self._lingering = False
        self._no_linger = False
        super().connection_made(transport)
        self._raw = transport
        self.transport = _LingeringTransport(transport, self)  # type: ignore[assignment]
        self._start_request_clock()

    def _close(self) -> None:
        """Close, or, when the client is still sending its request, shut our side and discard what still arrives."""
        raw = self._raw
        if self._lingering:
            return
        if self._no_linger or raw.is_closing() or self.conn.their_state in _REQUEST_IN or not raw.can_write_eof():
            raw.close()
            return
        try:
            raw.write_eof()  # the response already written goes out, then FIN: the client reads it once it has sent
        except OSError:  # the client is gone already (ENOTCONN): nothing to linger for
            raw.close()
            return
        self._lingering = True
        self._stop_request_clock()
        raw.resume_reading()  # flow control may have paused reading while the unread body piled up
        self._request_timer = self.loop.call_later(self.request_timeout, raw.close)

    def shutdown(self) -> None:
        self._no_linger = True  # the server is stopping: close at once, lingering connections too
        if self._lingering:
            self._raw.close()
        super().shutdown()

    def _start_request_clock(self) -> None:
        self._stop_request_clock()
        self._request_timer = self.loop.call_later(self.request_timeout, self._request_timed_out)

    def _stop_request_clock(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of a body already answered: discarded (the client closes when it has sent it)
        super().data_received(data)
        if self.conn.their_state in _REQUEST_IN:  # the whole request is in: the model's time is not limited
            self._stop_request_clock()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._start_request_clock()  # the next request (or the rest of an unread body) must come in time

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_request_clock()
        super().connection_lost(exc)

    def _request_timed_out(self) -> None:
        self._request_timer = None
        if self.transport.is_closing() or self.conn.their_state in _REQUEST_IN:
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started or cycle.response_complete:
            # written raw: h11 cannot send a response before it has parsed a request, and the connection closes next
            msg = _408 % self.request_timeout
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(msg), msg)
            )
        self._raw.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening); a busy or unusable address is an InvalidInputError.

    Binding before the model loads makes a busy port fail in milliseconds, and nothing is announced for a server
    that cannot run.

    Example:
        >>> sock = bind_socket("127.0.0.1", 0); sock.getsockname()[1] > 0
        True
        >>> sock.close()
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise InvalidInputError(f"--host {host!r} is not an address or a name this machine can resolve ({e})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    # as uvicorn does: a restarted server can bind while the previous one's connections sit in TIME_WAIT; a port
    # that another program listens on still fails with EADDRINUSE
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise InvalidInputError(
                f"port {port} on {host} is in use; stop the program using it or choose another --port"
            ) from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise InvalidInputError(
                f"port {port} on {host} needs privileges (ports below 1024 usually do); choose --port 1024 or above"
            ) from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise InvalidInputError(f"cannot listen on {host}: it is not an address of this machine") from None
        raise InvalidInputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket (IPv6 hosts in brackets; the real port when 0 was asked for)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_config(
    app: Any,
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    keep_alive: float = KEEP_ALIVE_TIMEOUT,
    log_level: str = "info",
    access_log: bool = True,
) -> Any:
    """The uvicorn Config that :func:`serve` runs: :class:`TimedH11Protocol` and the keep-alive timeout.

    Example:
        >>> server = uvicorn.Server(make_config(app, request_timeout=10))   # doctest: +SKIP
        >>> server.run(sockets=[bind_socket("127.0.0.1", 8000)])             # doctest: +SKIP
    """
    import uvicorn

    for name, v in (("request_timeout", request_timeout), ("keep_alive", keep_alive)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 86_400:
            raise ConfigError(f"{name} must be a number of seconds in (0, 86400), got {v!r}")
    protocol = type("TimedH11Protocol", (TimedH11Protocol,), {"request_timeout": float(request_timeout)})
    return uvicorn.Config(
        app, http=protocol, timeout_keep_alive=keep_alive, log_level=log_level, access_log=access_log
    )


def serve(app: Any, sock: socket.socket, **config: Any) -> None:
    """Serve ``app`` on the bound socket ``sock`` until interrupted (``config``: :func:`make_config`'s options)."""
    import uvicorn

    uvicorn.Server(make_config(app, **config)).run(sockets=[sock])


__all__ = ["KEEP_ALIVE_TIMEOUT", "REQUEST_TIMEOUT", "TimedH11Protocol", "bind_socket", "make_config", "serve",
           "url_of"]
