"""grpclite's asyncio edge: dial (TLS, ALPN h2), :class:`Channel`, :class:`Call`, keepalive,
deadlines, idle close.  See :mod:`ambient.grpclite` for the layers and invariants."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Iterable
from typing import Any

from .protocol import DEFAULT_MAX_RECEIVE, CallState, ClientCore, GrpcError, StatusCode


def client_tls_context(root_pem: bytes | None) -> ssl.SSLContext:
    """TLS 1.2+ client context with ALPN h2, verifying the server's chain and name against
    ``root_pem`` (PEM roots; None or empty: the system store)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if root_pem:
            ctx.load_verify_locations(cadata=root_pem.decode("ascii", "replace"))
        else:
            ctx.load_default_certs()
    except ssl.SSLError as e:
        raise GrpcError(StatusCode.UNAVAILABLE, (
            f"the configured root certificates do not load ({e.reason or e}); set the root to "
            "the PEM certificate of the CA that signed the server's certificate")) from e
    ctx.set_alpn_protocols(["h2"])
    return ctx


# -- the asyncio edge -------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One TCP/TLS connection: feeds :class:`ClientCore`, wakes calls, pings, closes idle."""

    def __init__(self, core: ClientCore, keepalive: float | None, keepalive_timeout: float,
                 idle_timeout: float | None) -> None:
        self.core = core
        self.transport: asyncio.Transport | None = None
        self._keepalive, self._keepalive_timeout = keepalive, keepalive_timeout
        self._idle_timeout = idle_timeout
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._lost = False

    @property
    def usable(self) -> bool:
        return (self.core.accepting and not self._lost and self.transport is not None
                and not self.transport.is_closing())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.core.initiate()
        self.flush()
        if self._keepalive:
            self._schedule("keepalive", self._keepalive, self._keepalive_tick)

    def data_received(self, data: bytes) -> None:
        changed = self.core.receive(data)
        if self.core.ping_acks:
            self.core.ping_acks.clear()
            self._cancel_timer("ping")
        self.flush()
        self.wake(changed)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        reason = f"connection to the server lost: {exc}" if exc else \
            "the server closed the connection"
        self.wake(self.core.connection_lost(reason))

    def flush(self) -> None:
        data = self.core.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
        if self.core.closed or (self.core.goaway is not None and not self.core.calls):
            self.close()

    def wake(self, calls: Iterable[CallState]) -> None:
        for call in calls:
            waiters, call.waiters = call.waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
            if call.status is not None and call.timer is not None:
                call.timer.cancel()
                call.timer = None
        if not self.core.calls and self._idle_timeout and "idle" not in self._timers:
            self._schedule("idle", self._idle_timeout, self._idle)

    def call_started(self) -> None:
        self._cancel_timer("idle")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self, reason: str) -> None:
        """Fail every call now and drop the transport (keepalive lost, client closing)."""
        self.wake(self.core.connection_lost(reason))
        if self.transport is not None:
            self.transport.abort()

    def _schedule(self, name: str, delay: float, fn: Any) -> None:
        if not self._lost:
            self._timers[name] = asyncio.get_running_loop().call_later(delay, fn)

    def _cancel_timer(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _idle(self) -> None:
        self._timers.pop("idle", None)
        if not self.core.calls:
            self.core.close()
            self.flush()

    def _keepalive_tick(self) -> None:
        # Like grpcio's keepalive without permit_without_calls: ping only while calls are open.
        if self.core.calls and "ping" not in self._timers:
            self.core.ping(os.urandom(8))
            self.flush()
            self._schedule("ping", self._keepalive_timeout, self._ping_timeout)
        self._schedule("keepalive", self._keepalive or 0.0, self._keepalive_tick)

    def _ping_timeout(self) -> None:
        self._timers.pop("ping", None)
        self.abort(f"the server did not answer a keepalive ping within "
                   f"{self._keepalive_timeout:g}s; the connection is presumed dead")


class Call:
    """One RPC: write and read messages; a non-OK end raises :class:`GrpcError`."""

    __slots__ = ("_conn", "_state")

    def __init__(self, conn: _Connection, state: CallState) -> None:
        self._conn, self._state = conn, state

    @property
    def status(self) -> tuple[StatusCode, str] | None:
        return self._state.status

    async def write(self, payload: bytes, *, end: bool = False) -> None:
        """Send one message; returns once it is handed to the transport (flow control).

        After the server ended the call: raises its error, or does nothing if it was OK."""
        st = self._state
        self._conn.core.send(st, payload, end)
        self._conn.flush()
        while st.sending:
            await self._wait()
        self._raise_if_failed()

    async def done_writing(self) -> None:
        self._conn.core.end(self._state)
        self._conn.flush()
        while self._state.sending:
            await self._wait()

    async def read(self) -> bytes | None:
        """The next message; None once the call ended OK.  Raises the call's error."""
        st = self._state
        while True:
            if st.messages:
                msg = st.messages.popleft()
                self._conn.core.consumed(st)
                self._conn.flush()
                return msg
            if st.status is not None:
                self._raise_if_failed()
                return None
            await self._wait()

    def cancel(self, code: StatusCode = StatusCode.CANCELLED,
               details: str = "the call was cancelled") -> None:
        """End the call now (RST_STREAM CANCEL); a no-op once it is over."""
        if self._state.status is None:
            self._conn.core.cancel(self._state, code, details)
            self._conn.flush()
            self._conn.wake([self._state])

    def _raise_if_failed(self) -> None:
        status = self._state.status
        if status is not None and status[0] is not StatusCode.OK:
            raise GrpcError(*status)

    async def _wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._state.waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._state.waiters:
                self._state.waiters.remove(fut)

    async def __aenter__(self) -> Call:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


def _split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise GrpcError(StatusCode.UNAVAILABLE, f"address {target!r} is not host:port")
    return host.strip("[]"), int(port)


class Channel:
    """Calls to one server (``host:port``) over one connection, dialled on demand.

    ``tls`` None is plaintext (``http``).  ``server_hostname`` is the name the server's
    certificate must carry (default: the host), also sent as SNI.  ``keepalive`` pings the
    server every that many seconds while calls are open and drops the connection if a ping is
    not answered in ``keepalive_timeout``.  A connection without calls for ``idle_timeout``
    seconds is closed (the next call dials again).
    """

    def __init__(self, target: str, *, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, max_receive: int = DEFAULT_MAX_RECEIVE,
                 keepalive: float | None = None, keepalive_timeout: float = 20.0,
                 connect_timeout: float = 20.0, idle_timeout: float | None = 300.0) -> None:
        self.target = target
        self.host, self.port = _split_target(target)
        self.tls = tls
        self.server_hostname = server_hostname or self.host
        self.max_receive = max_receive
        self.keepalive, self.keepalive_timeout = keepalive, keepalive_timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._conn: _Connection | None = None
        self._draining: list[_Connection] = []  # older connections finishing their calls
        self._lock = asyncio.Lock()

    async def unary(self, path: str, request: bytes, *,
                    metadata: Iterable[tuple[str, str]] = (), timeout: float | None = None,
                    max_receive: int | None = None) -> bytes:
        """One request, one response message (or a :class:`GrpcError`)."""
        call = await self.stream(path, metadata=metadata, timeout=timeout,
                                 max_receive=max_receive)
        try:
            await call.write(request, end=True)
            reply = await call.read()
            if reply is None:
                raise GrpcError(StatusCode.INTERNAL, "the server ended a unary call without a "
                                                     "response message")
            if await call.read() is not None:
                raise GrpcError(StatusCode.INTERNAL, "the server sent more than one response "
                                                     "message to a unary call")
            return reply
        finally:
            call.cancel()  # a no-op once the call ended; else RST_STREAM (error, cancellation)

    async def stream(self, path: str, *, metadata: Iterable[tuple[str, str]] = (),
                     timeout: float | None = None, max_receive: int | None = None) -> Call:
        """Open a call; write and read its messages through the returned :class:`Call`."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        conn = await self._connection(deadline)
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            raise GrpcError(StatusCode.DEADLINE_EXCEEDED, f"deadline of {timeout:g}s exceeded "
                                                          f"while connecting to {self.target}")
        state = conn.core.start_call(path, metadata, remaining, max_receive or self.max_receive)
        conn.call_started()
        conn.flush()
        call = Call(conn, state)
        if remaining is not None:
            state.timer = loop.call_later(remaining, call.cancel, StatusCode.DEADLINE_EXCEEDED,
                                          f"deadline of {timeout:g}s exceeded")
        return call

    async def _connection(self, deadline: float | None) -> _Connection:
        async with self._lock:
            if self._conn is None or not self._conn.usable:
                if self._conn is not None and self._conn.core.calls:
                    self._draining.append(self._conn)  # after GOAWAY: its calls may finish
                self._draining = [c for c in self._draining if c.core.calls]
                self._conn = None
                self._conn = await self._dial(deadline)
            return self._conn

    async def _dial(self, deadline: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        limit = self.connect_timeout
        if deadline is not None:
            limit = min(limit, deadline - loop.time())
        core = ClientCore(self.target, "http" if self.tls is None else "https")
        conn = _Connection(core, self.keepalive, self.keepalive_timeout, self.idle_timeout)
        name = self.server_hostname
        try:
            async with asyncio.timeout(max(limit, 0.0)):
                await loop.create_connection(
                    lambda: conn, self.host, self.port, ssl=self.tls,
                    server_hostname=name if self.tls is not None else None)
        except ssl.SSLCertVerificationError as e:
            raise GrpcError(StatusCode.UNAVAILABLE, (
                f"TLS handshake with {self.target} failed: the server's certificate was refused "
                f"({e.verify_message or e.reason}); does it chain to the configured root "
                f"certificates and carry the name {name!r}?")) from e
        except ssl.SSLError as e:
            raise GrpcError(StatusCode.UNAVAILABLE, (
                f"TLS handshake with {self.target} failed ({e.reason or e}); is it a TLS "
                "port, and does it accept TLS 1.2 or 1.3?")) from e
        except TimeoutError as e:
            if deadline is not None and loop.time() >= deadline:
                raise GrpcError(StatusCode.DEADLINE_EXCEEDED,
                                f"deadline exceeded while connecting to {self.target}") from e
            raise GrpcError(StatusCode.UNAVAILABLE,
                            f"no connection to {self.target} within {limit:g}s") from e
        except OSError as e:
            raise GrpcError(StatusCode.UNAVAILABLE,
                            f"cannot connect to {self.target}: {e.strerror or e}") from e
        if self.tls is not None:
            ssl_object = conn.transport.get_extra_info("ssl_object") if conn.transport else None
            alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            if alpn != "h2":
                conn.abort("no HTTP/2")
                raise GrpcError(StatusCode.UNAVAILABLE, (
                    f"{self.target} did not negotiate HTTP/2 over TLS (ALPN {alpn!r}); is it "
                    "a gRPC port?"))
        return conn

    async def close(self) -> None:
        """Cancel open calls (they fail UNAVAILABLE) and close the connection."""
        conns = [c for c in (self._conn, *self._draining) if c is not None]
        self._conn, self._draining = None, []
        for conn in conns:
            if conn.transport is not None:
                ended = conn.core.close()
                conn.flush()
                conn.wake(ended)
                conn.close()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
