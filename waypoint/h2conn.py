"""HTTP/2 (h2c inside a tunnel) for the waypoint, both roles, with ``h2`` as the state machine.

Role: ``H2Conn`` runs one HTTP/2 connection over a byte stream (an HBONE tunnel). As a server
(``client=False``) it turns each request into an ``HttpRequest`` and calls ``on_request`` in a
task of its own, so streams are multiplexed; ``send_response`` writes the answer. As a client
it sends requests (``request``) over one connection to an upstream, many at a time.

Invariants:
* Flow control is end to end: received DATA is acknowledged to the peer only when the body's
  reader has consumed it; sending waits for the peer's window.
* A protocol error by the peer ends the connection with GOAWAY (``h2`` queues it; we flush it),
  a stream-level error resets only that stream; neither raises out of ``run``.
* Every stream left open when the connection ends is failed (bodies raise ``BodyError``,
  waiting responses raise ``H2Error``).
* Header blocks are bounded: SETTINGS_MAX_HEADER_LIST_SIZE = ``MAX_HEADER_LIST``, enforced by
  the HPACK decoder on what we receive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from waypoint.message import (
    Body,
    BodyError,
    ByteStream,
    Headers,
    HttpRequest,
    HttpResponse,
    content_length,
    end_to_end,
    get_header,
)

__all__ = ["MAX_HEADER_LIST", "PREFACE", "H2Conn", "H2Error"]

log = logging.getLogger("waypoint.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_HEADER_LIST = 64 * 1024
STREAM_WINDOW = 1024 * 1024
MAX_CONCURRENT = 256


class H2Error(Exception):
    """An HTTP/2 stream or connection failed."""


@dataclass
class _Stream:
    sid: int
    body: Body | None = None  # what we receive
    head: asyncio.Future[Headers] | None = None  # client: the response head
    window: asyncio.Event = field(default_factory=asyncio.Event)
    reset: BaseException | None = None
    done_sending: bool = False


def _hdrs(raw: list[tuple[bytes, bytes]] | list[tuple[str, str]]) -> Headers:
    out: Headers = []
    for k, v in raw:
        ks = k.decode("latin-1") if isinstance(k, bytes) else k
        vs = v.decode("latin-1") if isinstance(v, bytes) else v
        out.append((ks.lower(), vs))
    return out


class H2Conn:
    """One HTTP/2 connection over ``stream``; call ``run()`` to drive it."""

    def __init__(
        self,
        stream: ByteStream,
        *,
        client: bool,
        on_request: Callable[[int, HttpRequest], None] | None = None,
        initial: bytes = b"",
    ) -> None:
        cfg = h2.config.H2Configuration(client_side=client, header_encoding=None,
                                        validate_inbound_headers=True)
        self.h2 = h2.connection.H2Connection(cfg)
        self.h2.local_settings = h2.settings.Settings(client=client, initial_values={
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.stream = stream
        self.client = client
        self.on_request = on_request
        self._initial = initial
        self._streams: dict[int, _Stream] = {}
        self._closed: BaseException | None = None
        self._conn_window = asyncio.Event()
        self.closed = asyncio.get_running_loop().create_future()
        self._lock = asyncio.Lock()
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(16 * 1024 * 1024 - 65535)

    # -- public ---------------------------------------------------------------------------

    @property
    def is_usable(self) -> bool:
        return self._closed is None and not self.closed.done()

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def capacity(self) -> int:
        if not self.is_usable:
            return 0
        peer_max = self.h2.remote_settings.max_concurrent_streams
        return min(peer_max, MAX_CONCURRENT) - self.h2.open_outbound_streams

    async def run(self) -> None:
        """Read and dispatch until the connection ends (never raises for peer misbehaviour)."""
        try:
            await self._flush()
            data = self._initial
            while True:
                if data:
                    try:
                        events = self.h2.receive_data(data)
                    except h2.exceptions.ProtocolError as e:
                        log.info("HTTP/2 peer broke the protocol: %s", e)
                        await self._flush()
                        self._shutdown(H2Error(f"HTTP/2 protocol error: {e}"))
                        return
                    for ev in events:
                        self._dispatch(ev)
                    await self._flush()
                data = await self.stream.read()
                if not data:
                    self._shutdown(H2Error("connection closed by peer"))
                    return
        except (OSError, ConnectionError, BodyError) as e:
            self._shutdown(H2Error(f"connection lost: {e}"))
        except asyncio.CancelledError:
            self._shutdown(H2Error("connection cancelled"))
            raise
        finally:
            if not self.closed.done():
                self.closed.set_result(None)

    async def close(self, error_code: int = 0) -> None:
        """GOAWAY and end the byte stream."""
        if self._closed is None:
            with contextlib.suppress(Exception):
                self.h2.close_connection(error_code)
                await self._flush()
        self._shutdown(H2Error("connection closed"))
        with contextlib.suppress(Exception):
            self.stream.write_eof()

    def reset_stream(self, sid: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        st = self._streams.pop(sid, None)
        with contextlib.suppress(Exception):
            self.h2.reset_stream(sid, code)
        if st is not None:
            self._fail_stream(st, H2Error(f"stream {sid} reset locally"))
        asyncio.ensure_future(self._flush_quiet())

    # -- server side ----------------------------------------------------------------------

    async def send_response(self, sid: int, resp: HttpResponse, *, head_only: bool = False
                            ) -> int:
        """Write ``resp`` on stream ``sid`` (headers, body, trailers); returns body bytes."""
        headers = [(":status", str(resp.status))]
        headers += [(k, v) for k, v in end_to_end(resp.headers)]
        body = resp.body
        async with self._lock:
            self._check(sid)
            end_now = head_only or (body.ended and not body.buffered() and not body.trailers)
            self.h2.send_headers(sid, headers, end_stream=end_now)
        await self._flush()
        if end_now:
            self._finish_sending(sid)
            return 0
        return await self._send_body(sid, body)

    # -- client side ----------------------------------------------------------------------

    async def request(self, req: HttpRequest) -> HttpResponse:
        """Send ``req`` on a new stream; returns once the response head arrived."""
        headers: Headers = [(":method", req.method), (":scheme", req.scheme or "http"),
                            (":authority", req.authority), (":path", req.target or "/")]
        headers += [(k, v) for k, v in end_to_end(req.headers, keep_te_trailers=True)
                    if k != "host"]
        body = req.body
        async with self._lock:
            if self._closed is not None:
                raise H2Error(f"HTTP/2 connection unusable: {self._closed}")
            sid = self.h2.get_next_available_stream_id()
            st = _Stream(sid)
            st.head = asyncio.get_running_loop().create_future()
            st.body = Body(on_consumed=self._acker(sid))
            self._streams[sid] = st
            end_now = body.ended and not body.buffered() and not body.trailers \
                and body.received == 0
            try:
                self.h2.send_headers(sid, headers, end_stream=end_now)
            except h2.exceptions.ProtocolError as e:
                self._streams.pop(sid, None)
                raise H2Error(f"cannot send request: {e}") from e
        await self._flush()
        sender = None
        if end_now:
            st.done_sending = True
        else:
            sender = asyncio.ensure_future(self._send_body_quiet(sid, body))
        try:
            rheaders = await st.head
        except BaseException:
            if sender is not None:
                sender.cancel()
            if sid in self._streams:
                self.reset_stream(sid)
            raise
        status = get_header(rheaders, ":status") or "0"
        regular = [(k, v) for k, v in rheaders if not k.startswith(":")]
        st.body.length = content_length(regular)
        return HttpResponse(int(status) if status.isdigit() else 502, regular, st.body)

    # -- internals ------------------------------------------------------------------------

    def _check(self, sid: int) -> None:
        if self._closed is not None:
            raise H2Error(f"HTTP/2 connection closed: {self._closed}")
        st = self._streams.get(sid)
        if st is None or st.reset is not None:
            raise H2Error(f"stream {sid} is gone")

    async def _send_body_quiet(self, sid: int, body: Body) -> None:
        try:
            await self._send_body(sid, body)
        except (H2Error, BodyError) as e:
            log.debug("request body on stream %d not sent: %s", sid, e)
            if sid in self._streams:
                self.reset_stream(sid)

    async def _send_body(self, sid: int, body: Body) -> int:
        sent = 0
        while True:
            try:
                data = await body.read()
            except BodyError:
                self.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                raise
            if not data:
                break
            view = memoryview(data)
            while view:
                n = await self._window(sid, len(view))
                async with self._lock:
                    self._check(sid)
                    self.h2.send_data(sid, bytes(view[:n]))
                view = view[n:]
                sent += n
                await self._flush()
        async with self._lock:
            self._check(sid)
            if body.trailers:
                self.h2.send_headers(sid, body.trailers, end_stream=True)
            else:
                self.h2.end_stream(sid)
        await self._flush()
        self._finish_sending(sid)
        return sent

    async def _window(self, sid: int, want: int) -> int:
        while True:
            self._check(sid)
            try:
                avail = min(self.h2.local_flow_control_window(sid),
                            self.h2.max_outbound_frame_size, want)
            except h2.exceptions.StreamClosedError:
                raise H2Error(f"stream {sid} closed by peer") from None
            if avail > 0:
                return avail
            st = self._streams[sid]
            st.window.clear()
            self._conn_window.clear()
            waits = [asyncio.ensure_future(st.window.wait()),
                     asyncio.ensure_future(self._conn_window.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    def _finish_sending(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is None:
            return
        st.done_sending = True
        if st.body is None or st.body.ended:
            self._streams.pop(sid, None)

    def _acker(self, sid: int) -> Callable[[int], None]:
        return lambda n: self._ack(sid, n)

    def _ack(self, sid: int, n: int) -> None:
        if self._closed is not None or n <= 0:
            return
        with contextlib.suppress(Exception):
            self.h2.acknowledge_received_data(n, sid)
        asyncio.ensure_future(self._flush_quiet())

    async def _flush_quiet(self) -> None:
        with contextlib.suppress(Exception):
            await self._flush()

    async def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.stream.write(data)

    def _dispatch(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev)
        elif isinstance(ev, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            st = self._streams.get(ev.stream_id or 0)
            if isinstance(ev, h2.events.ResponseReceived) and st is not None \
                    and st.head is not None and not st.head.done():
                st.head.set_result(_hdrs(ev.headers or []))
        elif isinstance(ev, h2.events.DataReceived):
            sid, n = ev.stream_id or 0, ev.flow_controlled_length or 0
            st = self._streams.get(sid)
            if st is None or st.body is None or not ev.data:
                with contextlib.suppress(Exception):
                    self.h2.acknowledge_received_data(n, sid)
            else:
                pad = n - len(ev.data)
                if pad > 0:
                    self.h2.acknowledge_received_data(pad, sid)
                st.body.feed(ev.data)
        elif isinstance(ev, h2.events.TrailersReceived):
            st = self._streams.get(ev.stream_id or 0)
            if st is not None and st.body is not None:
                st.body.trailers = _hdrs(ev.headers or [])
        elif isinstance(ev, h2.events.StreamEnded):
            st = self._streams.get(ev.stream_id or 0)
            if st is not None and st.body is not None:
                st.body.end(st.body.trailers)
                if st.done_sending:
                    self._streams.pop(st.sid, None)
        elif isinstance(ev, h2.events.StreamReset):
            st = self._streams.pop(ev.stream_id or 0, None)
            if st is not None:
                self._fail_stream(st, H2Error(
                    f"stream {ev.stream_id} reset by peer (code {ev.error_code})"))
        elif isinstance(ev, h2.events.WindowUpdated):
            if not ev.stream_id:
                self._conn_window.set()
                for st in self._streams.values():
                    st.window.set()
            else:
                st = self._streams.get(ev.stream_id)
                if st is not None:
                    st.window.set()
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self._conn_window.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._shutdown(H2Error(f"peer sent GOAWAY (code {ev.error_code})"))

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id or 0
        raw = _hdrs(ev.headers or [])
        pseudo = {k: v for k, v in raw if k.startswith(":")}
        regular = [(k, v) for k, v in raw if not k.startswith(":")]
        st = _Stream(sid, body=Body(on_consumed=self._acker(sid)))
        assert st.body is not None
        st.body.length = content_length(regular)
        self._streams[sid] = st
        method = pseudo.get(":method", "GET")
        if self.on_request is None or method == "CONNECT":
            self._streams.pop(sid, None)
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        authority = pseudo.get(":authority") or get_header(regular, "host") or ""
        req = HttpRequest(
            method=method, scheme=pseudo.get(":scheme", "http"), authority=authority,
            target=pseudo.get(":path", "/"),
            headers=[(k, v) for k, v in regular if k != "host"], body=st.body,
            protocol="HTTP/2",
        )
        self.on_request(sid, req)

    def _fail_stream(self, st: _Stream, exc: BaseException) -> None:
        st.reset = exc
        if st.body is not None:
            st.body.fail(exc)
        if st.head is not None and not st.head.done():
            st.head.set_exception(exc)
        st.window.set()

    def _shutdown(self, exc: BaseException) -> None:
        if self._closed is None:
            self._closed = exc
        for st in list(self._streams.values()):
            self._fail_stream(st, exc)
        self._streams.clear()
        self._conn_window.set()
        if not self.closed.done():
            self.closed.set_result(None)
