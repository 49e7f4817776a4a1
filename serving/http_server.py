"""A small HTTP/1.1 server on asyncio for the REST API: keep-alive, pipelining, bounded requests.

It runs on the same event loop as the gRPC server, so a REST request costs
no thread of its own and no thread switch before it reaches the handler.
Bodies come with Content-Length or chunked encoding; `Expect: 100-continue`
is answered; a body over the limit gets 413 (the rest of it is read and
dropped so the client sees the answer, up to a bound past which the
connection just closes); header blocks over 64 KiB get 431; malformed
requests get 400 and the connection closes; idle connections close after
a while. Each response goes out in one write, so Nagle's algorithm and
delayed ACKs never stall a keep-alive connection.
"""
from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from typing import Awaitable, Callable, Dict, List, Optional, Tuple

MAX_HEAD_BYTES = 64 << 10
IDLE_SECONDS = 120.0
DRAIN_FACTOR = 16  # an oversized body is read and dropped up to this many times the limit

Response = Tuple[int, bytes, str, List[Tuple[str, str]]]
Handler = Callable[[str, str, Dict[str, str], bytes], Awaitable[Response]]


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Client Closed Request" if status == 499 else "Unknown"


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class HttpProtocol(asyncio.Protocol):
    def __init__(self, server: "HttpServer"):
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = bytearray()
        self.busy = False  # a request is being handled; later ones wait in the buffer (pipelining)
        self.closing = False
        self.last_active = time.monotonic()
        self.drop = 0  # bytes of an oversized body still to discard
        self.drop_then: Optional[Response] = None
        self.eof = False

    # --- asyncio callbacks ---
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        self.closing = True

    def eof_received(self) -> bool:
        """The client is done sending: answer what it sent, then close (a half-close is not a hang-up)."""
        self.eof = True
        if not self.busy:
            self._next_or_close()
        return True

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self.closing:
            return
        if self.drop:
            taken = min(self.drop, len(data))
            self.drop -= taken
            data = data[taken:]
            if self.drop:
                return
            self._send(self.drop_then, close=True)
            return
        self.buffer += data
        if not self.busy:
            self._next()

    # --- requests ---
    def _next(self) -> None:
        """Starts the next complete request in the buffer, if there is one."""
        try:
            parsed = self._parse()
        except _BadRequest as e:
            self._send(self.server.error_response(e.status, str(e)), close=True)
            return
        if parsed is None:
            return
        method, target, headers, body, keep_alive = parsed
        self.busy = True
        task = self.server.loop.create_task(self.server.handler(method, target, headers, body))
        task.add_done_callback(lambda t: self._answered(t, method, keep_alive))

    def _answered(self, task: asyncio.Task, method: str, keep_alive: bool) -> None:
        self.busy = False
        if self.closing:
            return
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            logging.error("REST handler failed", exc_info=error)
            response = self.server.error_response(500, "Internal error")
        else:
            response = task.result()
        self._send(response, close=not keep_alive, head=method == "HEAD")
        if not self.closing:
            self._next_or_close()

    def _next_or_close(self) -> None:
        if self.buffer:
            self._next()
        if self.eof and not self.busy and not self.closing:
            self.closing = True
            self.transport.close()

    def _parse(self):
        """(method, target, headers, body, keep-alive) of the first complete request, or None for now."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                raise _BadRequest(431, "Request header fields too large")
            return None
        if end > MAX_HEAD_BYTES:
            raise _BadRequest(431, "Request header fields too large")
        lines = bytes(buffer[:end]).split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
            raise _BadRequest(400, "Malformed HTTP request line")
        method, target, version = (p.decode("latin-1") for p in parts)
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise _BadRequest(400, "Malformed HTTP header")
            key = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers and key != "content-length" else text
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
        start = end + 4
        limit = self.server.max_body_bytes
        if "chunked" in headers.get("transfer-encoding", "").lower():
            if "content-length" in headers:
                raise _BadRequest(400, "Both Content-Length and chunked Transfer-Encoding")
            body, consumed = self._chunked(start, limit)
            if body is None:
                return None
            del buffer[:consumed]
            return method, target, headers, body, keep_alive
        if headers.get("transfer-encoding"):
            raise _BadRequest(501, "Unsupported Transfer-Encoding")
        text = headers.get("content-length", "0")
        if not text.isdigit() or len(text) > 18:
            raise _BadRequest(400, "Malformed Content-Length")
        length = int(text)
        if length > limit:
            self._refuse_body(start, length, limit, headers)
            return None
        if length and headers.get("expect", "").lower() == "100-continue" and len(buffer) == start:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            headers.pop("expect")
        if len(buffer) < start + length:
            return None
        body = bytes(buffer[start:start + length])
        del buffer[:start + length]
        return method, target, headers, body, keep_alive

    def _chunked(self, start: int, limit: int):
        """(body, bytes consumed) once the whole chunked body is buffered, else (None, 0)."""
        buffer, position, pieces, total = self.buffer, start, [], 0
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                if len(buffer) - position > 1024:
                    raise _BadRequest(400, "Malformed chunk size")
                return None, 0
            size_text = bytes(buffer[position:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest(400, "Malformed chunk size") from None
            if size < 0 or total + size > limit:
                raise _BadRequest(413, f"Request body exceeds the limit of {limit} bytes")
            data_start = line_end + 2
            if size == 0:
                trailer_end = buffer.find(b"\r\n\r\n", line_end)
                if buffer[line_end:line_end + 4] == b"\r\n\r\n":
                    return b"".join(pieces), line_end + 4
                if trailer_end < 0:
                    return None, 0
                return b"".join(pieces), trailer_end + 4
            if len(buffer) < data_start + size + 2:
                return None, 0
            if buffer[data_start + size:data_start + size + 2] != b"\r\n":
                raise _BadRequest(400, "Malformed chunk")
            pieces.append(bytes(buffer[data_start:data_start + size]))
            total += size
            position = data_start + size + 2

    def _refuse_body(self, start: int, length: int, limit: int, headers: Dict[str, str]) -> None:
        response = self.server.error_response(
            413, f"Request body of {length} bytes exceeds the limit of {limit} bytes")
        waiting = headers.get("expect", "").lower() == "100-continue" and len(self.buffer) == start
        if waiting or length > DRAIN_FACTOR * limit:
            self._send(response, close=True)  # the client has not sent it, or it is too big to read through
            return
        already = len(self.buffer) - start
        self.buffer.clear()
        self.busy = True
        self.drop = length - already
        self.drop_then = response
        if self.drop <= 0:
            self._send(response, close=True)

    # --- responses ---
    def _send(self, response: Response, close: bool = False, head: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        status, body, content_type, extra = response
        lines = [f"HTTP/1.1 {status} {_reason(status)}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in extra + self.server.extra_headers]
        if close:
            lines.append("Connection: close")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))
        self.last_active = time.monotonic()
        if close:
            self.closing = True
            self.transport.close()


class HttpServer:
    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Handler, max_body_bytes: int,
                 error_response: Callable[[int, str], Response], extra_headers: List[Tuple[str, str]] = ()):
        self.loop, self.handler, self.max_body_bytes = loop, handler, max_body_bytes
        self.error_response = error_response
        self.extra_headers = list(extra_headers)
        self.connections = set()
        self._server = None
        self._sweeper = None

    async def start(self, host: str, port: int) -> int:
        self._server = await self.loop.create_server(lambda: HttpProtocol(self), host, port, reuse_address=True,
                                                     backlog=1024)
        self._sweeper = self.loop.create_task(self._sweep())
        return self._server.sockets[0].getsockname()[1]

    async def _sweep(self) -> None:
        """Closes connections idle for IDLE_SECONDS (slow or abandoned clients hold no memory for long)."""
        while True:
            await asyncio.sleep(IDLE_SECONDS / 4)
            now = time.monotonic()
            for connection in list(self.connections):
                if not connection.busy and now - connection.last_active > IDLE_SECONDS:
                    connection.transport.close()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
            for connection in list(self.connections):
                connection.transport.close()
            await self._server.wait_closed()
