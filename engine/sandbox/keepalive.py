"""A werkzeug request handler with HTTP/1.1 keep-alive.

werkzeug's development handler closes every connection after one response, so each request
costs a TCP connect and a new server thread; at thousands of creates a second that is most
of the work. This handler answers each request in one write with a Content-Length and keeps
the connection open. It reads each request body exactly to its Content-Length (even when
the app did not), so the next request line is never confused with a leftover body.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import threading
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any, BinaryIO

from werkzeug.serving import WSGIRequestHandler
from werkzeug.wsgi import LimitedStream

log = logging.getLogger(__name__)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding"})
MAX_LINE = 65536  # http.client's limits on request headers
MAX_HEADERS = 100


def read_headers(rfile: BinaryIO) -> http.client.HTTPMessage:
    """The header block of a request, as http.client.parse_headers returns it (same limits,
    same values: leading blanks and the line end stripped, folded lines joined), without
    the email parser."""
    headers: list[tuple[str, str]] = []
    while True:
        line = rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            break
        if len(headers) >= MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")
        text = line.decode("iso-8859-1").rstrip("\r\n")
        if text[:1] in (" ", "\t") and headers:  # a folded continuation line
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {text.strip()}")
            continue
        name, colon, value = text.partition(":")
        if colon:
            headers.append((name, value.lstrip(" \t")))
    message = http.client.HTTPMessage()
    message._headers = headers  # type: ignore[attr-defined]  # email.message.Message's list
    return message


class OpenConnections:
    """The server's live client sockets, so stopping the server also ends kept-alive
    connections (else a stopped sandbox would go on answering on them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def discard(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def close_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed by its handler
                sock.shutdown(socket.SHUT_RDWR)


class KeepAliveRequestHandler(WSGIRequestHandler):
    """Registers its socket in `server.open_connections` (an OpenConnections) if the
    server has one."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 75  # seconds an idle keep-alive connection (and its thread) is kept

    def setup(self) -> None:
        super().setup()
        registry = getattr(self.server, "open_connections", None)
        if registry is not None:
            registry.add(self.connection)

    def finish(self) -> None:
        registry = getattr(self.server, "open_connections", None)
        if registry is not None:
            registry.discard(self.connection)
        super().finish()

    def parse_request(self) -> bool:
        """BaseHTTPRequestHandler.parse_request with the headers read by `read_headers`
        instead of the email package's parser (a third of the sandbox's CPU per create)."""
        self.command = None  # type: ignore[assignment]
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if not words or not self._request_line(words):
            return False
        try:
            self.headers = read_headers(self.rfile)
        except http.client.LineTooLong as err:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long", str(err))
            return False
        except http.client.HTTPException as err:
            self.send_error(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers", str(err)
            )
            return False
        conntype = self.headers.get("Connection", "").lower()
        if conntype == "close":
            self.close_connection = True
        elif conntype == "keep-alive":
            self.close_connection = False
        expect = self.headers.get("Expect", "").lower()
        if expect == "100-continue" and self.request_version >= "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def _request_line(self, words: list[str]) -> bool:
        """Method, path and version from the request line, as the standard library reads
        them; False (after an error answer) when they are not acceptable."""
        if len(words) >= 3:
            version = words[-1]
            number = version[5:].split(".") if version.startswith("HTTP/") else []
            if len(number) != 2 or not all(n.isdigit() and len(n) <= 10 for n in number):
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request version ({version!r})")
                return False
            major_minor = int(number[0]), int(number[1])
            if major_minor >= (2, 0):
                self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "Invalid HTTP version")
                return False
            self.close_connection = major_minor < (1, 1)
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({self.requestline!r})")
            return False
        command, path = words[:2]
        if len(words) == 2:
            self.close_connection = True
            if command != "GET":
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad HTTP/0.9 request type ({command!r})")
                return False
        self.command, self.path = command, path
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")
        return True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """No access log line per request: at thousands a second it costs more than the
        request."""

    def log_error(self, format: str, *args: Any) -> None:
        """Idle keep-alive connections time out routinely; not worth werkzeug's error log."""
        log.info("%s: " + format, self.address_string(), *args)

    def run_wsgi(self) -> None:
        if self.headers.get("Expect", "").lower().strip(" \t") == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        environ = self.make_environ()
        body: LimitedStream | None = None
        if environ.get("wsgi.input_terminated"):  # chunked request body: no keep-alive
            self.close_connection = True
        else:
            body = LimitedStream(self.rfile, int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = body
        status, headers, payload = self._call_app(environ)
        if body is not None:
            body.exhaust()
        self._respond(status, headers, payload)

    def _call_app(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        started: dict[str, Any] = {}
        chunks: list[bytes] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            started["status"], started["headers"] = status, headers
            return chunks.append

        try:
            result: Iterable[bytes] = self.server.app(environ, start_response)
            try:
                chunks.extend(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:
            log.exception("error in the sandbox app")
            self.close_connection = True
            return "500 Internal Server Error", [("Content-Type", "text/plain")], b"error"
        return started["status"], started["headers"], b"".join(chunks)

    def _respond(self, status: str, headers: list[tuple[str, str]], payload: bytes) -> None:
        lines = [f"{self.protocol_version} {status}"]
        has_length = False
        for key, value in headers:
            name = key.lower()
            if name in HOP_BY_HOP:
                continue
            has_length = has_length or name == "content-length"
            lines.append(f"{key}: {value}")
        if not has_length:
            lines.append(f"Content-Length: {len(payload)}")
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head + payload)
        except OSError:  # the client left, or the app dropped the connection on purpose
            self.close_connection = True
