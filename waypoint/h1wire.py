"""HTTP/1.1 wire format for the waypoint: heads parsed and written, bodies framed (sans-I/O).

Role: the byte-level half of ``waypoint.h1``. ``parse_request_head`` / ``parse_response_head``
take a receive buffer and return a head and how many bytes it used (or None: more bytes
needed); ``BodyDecoder`` takes bytes off the buffer for one message body (Content-Length,
chunked, or until the peer closes); the encoders build heads and chunks. No I/O, no clock.

Invariants:
* Parsing is strict where a proxy must be (request smuggling, response splitting): a message
  with both Content-Length and Transfer-Encoding, conflicting Content-Lengths, a
  Transfer-Encoding other than ``chunked``, whitespace before a header colon, folded header
  lines, control characters or a bare CR are refused, never guessed at. Lines may end in CRLF
  or a bare LF (RFC 9112 §2.2).
* A refusal raises ``WireError`` with the status a server answers (400, 431, 501, 505) and a
  message saying what was wrong; nothing else escapes the parsers for any input.
* Heads are bounded by ``max_head`` bytes (431), chunk-size lines by ``MAX_CHUNK_LINE`` and
  trailer sections by ``MAX_TRAILERS``.
* Encoders refuse header names that are not tokens and values holding CR, LF or NUL
  (``WireError`` 500), so nothing a filter or an HTTP/2 peer supplied can split a message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus

__all__ = [
    "LAST_CHUNK",
    "MAX_CHUNK_LINE",
    "MAX_TRAILERS",
    "BodyDecoder",
    "RequestHead",
    "ResponseHead",
    "WireError",
    "encode_chunk",
    "encode_last_chunk",
    "encode_request_head",
    "encode_response_head",
    "parse_request_head",
    "parse_response_head",
    "reason_phrase",
]

MAX_CHUNK_LINE = 1024
MAX_TRAILERS = 16 * 1024
LAST_CHUNK = b"0\r\n\r\n"

_TCHAR = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
_REQUEST_LINE = re.compile(r"([" + _TCHAR + r"]+) ([\x21-\x7e\x80-\xff]+) HTTP/(\d)\.(\d)")
_STATUS_LINE = re.compile(r"HTTP/(\d)\.(\d) (\d{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_VALUE = r"[^\x00-\x08\x0a-\x1f\x7f]*"  # field-content and OWS: no CTL but HTAB
_FIELD_BLOCK = re.compile(r"(?:[" + _TCHAR + r"]+:" + _VALUE + r"\r?\n)*")
_FIELD = re.compile(r"([" + _TCHAR + r"]+):[ \t]*(" + _VALUE[:-1] + r"*?)[ \t]*\r?\n")
_NAMES = re.compile("[" + _TCHAR + "]+(?::[" + _TCHAR + "]+)*")
_BAD_VALUE = re.compile("[\x00\r\n]")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class WireError(Exception):
    """Bytes that are not acceptable HTTP/1.1; ``status`` is what a server answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    http11: bool
    headers: list[tuple[str, str]]  # lower-case names, ``host`` included
    host: str | None
    length: int | None  # body length; None with ``chunked``
    chunked: bool
    keep_alive: bool  # the client allows another request on this connection
    expect_continue: bool


@dataclass(slots=True)
class ResponseHead:
    status: int
    http11: bool
    headers: list[tuple[str, str]]
    length: int | None  # None: chunked, or until close (``until_close``)
    chunked: bool
    until_close: bool
    keep_alive: bool  # the server allows another request on this connection


_REASONS = {s.value: s.phrase for s in HTTPStatus}


def reason_phrase(status: int) -> str:
    # Some clients (h2load, older http-parser users) only see a status with a reason phrase.
    return _REASONS.get(status, "Unknown")


# -- heads ------------------------------------------------------------------------------------


def _head_bounds(buf: bytes | bytearray, start: int) -> tuple[int, int] | None:
    """(end of the head's text, start of the body) or None when the blank line is missing."""
    i = buf.find(b"\r\n\r\n", start)
    j = buf.find(b"\n\n", start)
    if j != -1 and (i == -1 or j < i):
        return j, j + 2
    if i != -1:
        return i, i + 4
    return None


def _split_head(buf: bytes | bytearray, start: int, max_head: int, what: str
                ) -> tuple[str, str, int] | None:
    """(first line, the field lines each ending in a newline, bytes used) of a head."""
    bounds = _head_bounds(buf, start)
    if bounds is None:
        if len(buf) - start > max_head:
            raise WireError(431, f"{what} head larger than {max_head} bytes")
        return None
    end, body = bounds
    if end - start > max_head:
        raise WireError(431, f"{what} head larger than {max_head} bytes")
    text = bytes(buf[start:body]).decode("latin-1")
    nl = text.find("\n")
    first = text[:nl - 1] if nl > 0 and text[nl - 1] == "\r" else text[:nl]
    block = text[nl + 1:len(text) - (2 if text.endswith("\r\n") else 1)]
    return first, block, body


def _fields(block: str, what: str) -> list[tuple[str, str]]:
    """The header fields of ``block`` (lines each ending in LF or CRLF), names lower-cased."""
    if not block:
        return []
    if _FIELD_BLOCK.fullmatch(block) is None:
        for line in block.split("\n"):
            if line[:1] in (" ", "\t"):
                raise WireError(400, f"{what}: folded header lines are not accepted")
            if line and not _FIELD_BLOCK.fullmatch(line + "\n"):
                raise WireError(400, f"{what}: malformed header line {line[:60]!r}")
        raise WireError(400, f"{what}: malformed header block")
    return [(k.lower(), v) for k, v in _FIELD.findall(block)]


def _framing(headers: list[tuple[str, str]], what: str
             ) -> tuple[int | None, bool, set[str]]:
    """(Content-Length, chunked, Connection tokens) of a head; refuses ambiguous framing."""
    lengths: list[str] = []
    te: list[str] = []
    conn: set[str] = set()
    for k, v in headers:
        if k == "content-length":
            lengths.extend(x.strip() for x in v.split(","))
        elif k == "transfer-encoding":
            te.extend(x.strip().lower() for x in v.split(",") if x.strip())
        elif k == "connection":
            conn.update(x.strip().lower() for x in v.split(",") if x.strip())
    length: int | None = None
    if lengths:
        first = lengths[0]
        if not first.isdigit() or not first.isascii() or len(first) > 18 or any(
                x != first for x in lengths):
            raise WireError(400, f"{what}: bad or conflicting Content-Length {lengths[:4]}")
        length = int(first)
        if len(lengths) > 1:  # "5, 5" or repeated fields: forward one, where the first was
            i = next(n for n, (k, _) in enumerate(headers) if k == "content-length")
            headers[:] = [*headers[:i], ("content-length", first),
                          *((k, v) for k, v in headers[i + 1:] if k != "content-length")]
    chunked = False
    if te:
        if te != ["chunked"]:
            raise WireError(501, f"{what}: Transfer-Encoding {', '.join(te)!r} is not "
                                 "supported (only chunked)")
        if length is not None:
            raise WireError(400, f"{what}: both Content-Length and Transfer-Encoding")
        chunked = True
    return length, chunked, conn


def parse_request_head(buf: bytes | bytearray, max_head: int
                       ) -> tuple[RequestHead, int] | None:
    """The request head at the start of ``buf`` and the bytes it used (blank lines before
    it included), or None if it is not complete yet. Raises ``WireError``."""
    start = 0
    n = len(buf)
    while start < n and buf[start] in (13, 10) and start < 64:  # stray CRLF after a body
        start += 1
    split = _split_head(buf, start, max_head, "request")
    if split is None:
        return None
    first, block, used = split
    m = _REQUEST_LINE.fullmatch(first)
    if m is None:
        raise WireError(400, f"malformed request line {first[:80]!r}")
    if m.group(3) != "1":
        raise WireError(505, f"HTTP version {m.group(3)}.{m.group(4)} is not supported")
    http11 = m.group(4) != "0"
    headers = _fields(block, "request")
    length, chunked, conn = _framing(headers, "request")
    host: str | None = None
    hosts = 0
    expect = False
    for k, v in headers:
        if k == "host":
            hosts += 1
            host = v
        elif k == "expect" and v.lower() == "100-continue":
            expect = http11
    if hosts > 1 or (http11 and hosts == 0):
        raise WireError(400, "a request needs exactly one Host header"
                        if hosts else "missing Host header")
    if length is None and not chunked:
        length = 0  # RFC 9112 §6.3: a request without framing headers has no body
    keep = http11 and "close" not in conn
    return RequestHead(m.group(1), m.group(2), http11, headers, host, length, chunked, keep,
                       expect), used


def parse_response_head(buf: bytes | bytearray, max_head: int, method: str
                        ) -> tuple[ResponseHead, int] | None:
    """The response head at the start of ``buf`` (to a ``method`` request) and the bytes it
    used, or None if it is not complete yet. Raises ``WireError`` (status 502)."""
    try:
        split = _split_head(buf, 0, max_head, "response")
        if split is None:
            return None
        first, block, used = split
        m = _STATUS_LINE.fullmatch(first)
        if m is None or m.group(1) != "1":
            raise WireError(502, f"malformed status line {first[:80]!r}")
        http11 = m.group(2) != "0"
        status = int(m.group(3))
        headers = _fields(block, "response")
        length, chunked, conn = _framing(headers, "response")
    except WireError as e:
        raise WireError(502, str(e)) from None
    until_close = False
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        length, chunked = 0, False
    elif not chunked and length is None:
        until_close = True
    keep = http11 and "close" not in conn and not until_close
    return ResponseHead(status, http11, headers, length, chunked, until_close, keep), used


# -- bodies -----------------------------------------------------------------------------------


class BodyDecoder:
    """Takes one message body off a receive buffer: ``feed`` consumes what it can."""

    __slots__ = ("remaining", "chunked", "until_close", "done", "trailers", "_state")

    def __init__(self, length: int | None, chunked: bool, until_close: bool = False) -> None:
        self.remaining = length or 0  # Content-Length left, or the current chunk's rest
        self.chunked = chunked
        self.until_close = until_close
        self.done = not chunked and not until_close and not length
        self.trailers: list[tuple[str, str]] = []
        self._state = 0  # chunked: 0 size line, 1 data, 2 CRLF after data, 3 trailers

    def feed(self, buf: bytearray) -> list[bytes]:
        """Body bytes taken off the front of ``buf`` (which is consumed); check ``done``."""
        if self.done or not buf:
            return []
        if self.until_close:
            data = bytes(buf)
            del buf[:]
            return [data]
        if not self.chunked:
            n = min(self.remaining, len(buf))
            data = bytes(buf[:n])
            del buf[:n]
            self.remaining -= n
            self.done = self.remaining == 0
            return [data]
        return self._feed_chunked(buf)

    def eof(self) -> None:
        """The peer closed: the end of an until-close body, an error for any other."""
        if self.done:
            return
        if self.until_close:
            self.done = True
            return
        raise WireError(400, "peer closed in the middle of a body")

    def _feed_chunked(self, buf: bytearray) -> list[bytes]:
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        try:
            for _ in range(n + 2):  # every pass consumes bytes or returns
                if self._state == 0:
                    nl = buf.find(b"\n", pos, pos + MAX_CHUNK_LINE)
                    if nl == -1:
                        if n - pos >= MAX_CHUNK_LINE:
                            raise WireError(400, "chunk-size line too long")
                        break
                    line = bytes(buf[pos:nl])
                    if line.endswith(b"\r"):
                        line = line[:-1]
                    size_text = line.split(b";", 1)[0].strip(b" \t")
                    if _HEX.fullmatch(size_text) is None:
                        raise WireError(400, f"bad chunk size {line[:40]!r}")
                    pos = nl + 1
                    self.remaining = int(size_text, 16)
                    self._state = 1 if self.remaining else 3
                elif self._state == 1:
                    take = min(self.remaining, n - pos)
                    if take == 0:
                        break
                    out.append(bytes(buf[pos:pos + take]))
                    pos += take
                    self.remaining -= take
                    if self.remaining == 0:
                        self._state = 2
                elif self._state == 2:
                    if buf.startswith(b"\r\n", pos):
                        pos += 2
                    elif buf.startswith(b"\n", pos):
                        pos += 1
                    elif n - pos < 2 and buf[pos:n] in (b"", b"\r"):
                        break
                    else:
                        raise WireError(400, "chunk data not followed by CRLF")
                    self._state = 0
                else:
                    if buf.startswith(b"\r\n", pos) or buf.startswith(b"\n", pos):
                        pos += 2 if buf[pos] == 13 else 1
                        self.done = True
                        break
                    split = _split_head(buf, pos, MAX_TRAILERS, "trailer")
                    if split is None:
                        break
                    first, block, end = split
                    self.trailers = _fields(f"{first}\n{block}", "trailer")
                    pos = end
                    self.done = True
                    break
        finally:
            del buf[:pos]
        return out


# -- encoders ---------------------------------------------------------------------------------


def _encode_fields(lines: list[str], headers: list[tuple[str, str]]) -> None:
    if headers:
        if _NAMES.fullmatch(":".join(k for k, _ in headers)) is None:
            raise WireError(500, f"a header name is not a token: {[k for k, _ in headers]}")
        if _BAD_VALUE.search("\t".join(v for _, v in headers)) is not None:
            raise WireError(500, "a header value holds CR, LF or NUL")
        lines.extend(f"{k}: {v}\r\n" for k, v in headers)
    lines.append("\r\n")


def _to_bytes(lines: list[str]) -> bytes:
    try:
        return "".join(lines).encode("latin-1")
    except UnicodeEncodeError as e:
        raise WireError(500, f"a header is not latin-1: {e}") from None


def encode_request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    if _NAMES.fullmatch(method) is None or not target or _BAD_VALUE.search(target) \
            or " " in target:
        raise WireError(500, f"cannot send request line {method!r} {target[:80]!r}")
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    _encode_fields(lines, headers)
    return _to_bytes(lines)


def encode_response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason_phrase(status)}\r\n"]
    _encode_fields(lines, headers)
    return _to_bytes(lines)


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


def encode_last_chunk(trailers: list[tuple[str, str]]) -> bytes:
    if not trailers:
        return LAST_CHUNK
    lines = ["0\r\n"]
    _encode_fields(lines, trailers)
    return _to_bytes(lines)
