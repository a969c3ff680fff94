"""A fault-injecting HTTP proxy for tests: it sits in front of a real OpenAI-compatible server.

Each POST gets one planned fate, in arrival order, from a seeded plan: relayed to the
server, or one of the six faults below. The plan comes in blocks of ``block`` (60) requests
that hold each fault kind once, at seeded random places, so 6 in 60 requests (10%) are
faulted and every kind occurs within each block; ``arrivals`` records each POST's fate::

    with FaultProxy(teacher.base_url, seed=0, hold_s=5, client_timeout_s=3) as proxy:
        ...  # point the client at proxy.base_url
    proxy.injected  # [(kind, t_seen_by_client), ...]

Relayed requests stream a space every ``heartbeat_s`` while the server works (JSON allows
leading whitespace), so a short client --timeout only ever fires on the held requests,
however slow the real teacher is.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# What each injected fault is, and the kind the client is expected to count it as.
FAULTS = {
    "http_500": "http_500",          # 500 with a JSON error body
    "http_429": "http_429",          # 429 with Retry-After: 1
    "timeout": "timeout",            # nothing sent until after the client's timeout
    "drop": "connection",            # the socket closed without a reply
    "malformed": "malformed_response",  # 200 whose body is not JSON
    "truncated": "connection",       # Content-Length larger than the body sent, then closed
}

_COMPLETION = {
    "id": "chatcmpl-proxy", "object": "chat.completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Instruction: cut short\nOutput: never seen"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def _cut(conn: http.client.HTTPConnection, gone: threading.Event) -> None:
    """Abandon an upstream request: close its socket, or stop it before it is sent."""
    gone.set()  # first: a worker that connects after this sees it
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class FaultProxy:
    def __init__(self, upstream_base_url: str, *, seed: int = 0, block: int = 60, hold_s: float = 5.0,
                 client_timeout_s: float = 3.0, heartbeat_s: float = 0.5):
        up = urlsplit(upstream_base_url)
        self.upstream = (up.hostname, up.port)
        self.hold_s, self.client_timeout_s, self.heartbeat_s = hold_s, client_timeout_s, heartbeat_s
        self._rng = random.Random(seed)
        self._block = block
        self._plan: list[str] = []
        self._lock = threading.Lock()
        self.requests = 0
        self.relayed = 0
        self.injected: list[tuple[str, float]] = []  # (fault, when the client had it in hand)
        self.arrivals: list[tuple[str, float, str]] = []  # (sha256 of the body, when, fate)
        self.upstream_errors: list[str] = []
        self._open: dict[threading.Thread, tuple[http.client.HTTPConnection, threading.Event]] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.base_url = f"http://{host}:{port}/v1"

    # ------------------------------------------------------------- plumbing

    def __enter__(self):
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        # Cut what is still relayed: the embedded teacher's destructor holds the GIL while it
        # waits for its open requests, so a relay left for later would hang it for good.
        with self._lock:
            open_now = list(self._open.items())
        for worker, (conn, gone) in open_now:
            _cut(conn, gone)
        for worker, _ in open_now:
            worker.join(10)

    def _next_fate(self, body: bytes) -> str:
        with self._lock:
            if not self._plan:
                block = list(FAULTS) + ["relay"] * (self._block - len(FAULTS))
                self._rng.shuffle(block)
                self._plan = block
            self.requests += 1
            fate = self._plan.pop(0)
            self.arrivals.append((hashlib.sha256(body).hexdigest(), time.time(), fate))
            return fate

    def retry_gaps(self, fault: str) -> list[float]:
        """Seconds from each request that got ``fault`` to the next request with the same body (its retry)."""
        gaps = []
        for i, (digest, t, fate) in enumerate(self.arrivals):
            if fate == fault:
                later = [t2 for d2, t2, _ in self.arrivals[i + 1:] if d2 == digest]
                if later:
                    gaps.append(later[0] - t)
        return gaps

    def retried(self) -> Counter:
        """Faults whose request came again later (a retry): proof the client had them in hand."""
        with self._lock:
            arrivals = list(self.arrivals)
        later: set[str] = set()
        seen: Counter = Counter()
        for digest, _, fate in reversed(arrivals):
            if fate != "relay" and digest in later:
                seen[fate] += 1
            later.add(digest)
        return seen

    def _note(self, fault: str, when: float) -> None:
        with self._lock:
            self.injected.append((fault, when))

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked replies need it

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._relay(b"")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fate = proxy._next_fate(body)
                self.close_connection = True
                if fate == "relay":
                    return self._relay(body)
                t0 = time.time()
                if fate == "http_500":
                    self._send(500, {"error": {"message": "injected 500", "type": "server_error"}})
                elif fate == "http_429":
                    self._send(429, {"error": {"message": "injected 429", "type": "rate_limit"}}, {"Retry-After": "1"})
                elif fate == "timeout":
                    time.sleep(proxy.hold_s)  # the client gave up at client_timeout_s
                    proxy._note(fate, t0 + proxy.client_timeout_s)
                    return
                elif fate == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif fate == "malformed":
                    self._send(200, None, raw=b'{"id": "chatcmpl-x", "choices": [{"message": ')
                elif fate == "truncated":
                    full = json.dumps(_COMPLETION).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(full)))
                    self.end_headers()
                    self.wfile.write(full[: len(full) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                proxy._note(fate, time.time())

            def _send(self, code, obj, headers=None, raw=None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

            def _relay(self, body: bytes):
                """Forward to the real server; stream spaces until its reply is complete."""
                self.close_connection = True
                result: dict = {}
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=900)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}

                gone = threading.Event()  # the client hung up, or the proxy is closing

                def call():
                    try:
                        conn.connect()
                        if gone.is_set():  # set before connect() made conn.sock: nobody cut it
                            raise ConnectionAbortedError("the client went away")
                        conn.request(self.command, self.path, body=body or None, headers=headers)
                        r = conn.getresponse()
                        result["status"], result["body"] = r.status, r.read()
                    except Exception as e:  # the proxy closed it: the client went away
                        result["error"] = repr(e)
                    finally:
                        conn.close()
                        with proxy._lock:
                            proxy._open.pop(threading.current_thread(), None)

                worker = threading.Thread(target=call, daemon=True)
                with proxy._lock:
                    proxy._open[worker] = (conn, gone)
                worker.start()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    while worker.is_alive():
                        self.wfile.write(b"1\r\n \r\n")  # one space: JSON allows leading whitespace
                        self.wfile.flush()
                        worker.join(proxy.heartbeat_s)
                    if result.get("status") != 200:
                        # Too late to change the status: a cut-off reply is the honest signal.
                        with proxy._lock:
                            proxy.upstream_errors.append(f"{result.get('status')}: {result.get('body') or result.get('error')}")
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    data = result["body"]
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
                    self.wfile.flush()
                    with proxy._lock:
                        proxy.relayed += 1
                except OSError:  # the client hung up (its run ended, or it was killed)
                    _cut(conn, gone)  # wakes the worker; the server may stop early

        return Handler
