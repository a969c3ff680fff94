"""Requests per second of bench/instant_server.py, against the standard library's http.server.

Both servers give the same replies (``instant_server.answer``) over HTTP/1.1 keep-alive, each in
its own process; the reference is ``ThreadingHTTPServer`` with ``protocol_version = "HTTP/1.1"``
(a thread per connection), which is how the fakes in tests/ are written. One client, the same
for both: raw asyncio keep-alive connections sending chat completion requests of a typical
prompt size (about 2 KB), so the figure is the server's, not the openai client's. A last row
sends the same requests through the ``openai`` client against the instant server, for scale.

    python bench/instant.py                       # 8 connections x 1000 requests each
    python bench/instant.py --connections 32 --requests 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEY = "bench-key"


def reference_server() -> None:
    """http.server with instant_server's answers; prints its base URL like instant_server does."""
    import socket
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    sys.path.insert(0, str(HERE))
    import instant_server as inst

    opts = argparse.Namespace(key=KEY, model="instant", latency=0.0, routes=[])
    replies = inst.Replies(None, 5, 0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            # Its best case: headers and body are two writes, and without TCP_NODELAY Nagle's
            # algorithm holds the body until the client's delayed ACK (40 ms a request).
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args):
            pass

        def handle_one(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, obj = inst.answer(self.command, self.path, headers, body, opts, replies)
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = handle_one

    ThreadingHTTPServer.request_queue_size = 1024  # its default backlog of 5 resets a burst of connections
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    server.serve_forever()


def start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    return proc, proc.stdout.readline().decode().strip()


async def raw_load(url: str, connections: int, requests: int) -> float:
    """Requests per second over ``connections`` keep-alive connections, one request at a time on each."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    body = json.dumps({"model": "instant", "max_tokens": 512, "temperature": 0.7,
                       "messages": [{"role": "user", "content": "Write a task. " * 140}]}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    async def one_connection():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(requests):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one_connection() for _ in range(connections)))
    return connections * requests / (time.perf_counter() - t0)


async def openai_load(url: str, connections: int, requests: int) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "Write a task. " * 140}]

    async def one():
        for _ in range(requests):
            await client.chat.completions.create(model="instant", messages=messages, max_tokens=512)

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one() for _ in range(connections)))
    rate = connections * requests / (time.perf_counter() - t0)
    cpu_ms = (time.process_time() - cpu0) / (connections * requests) * 1000
    await client.close()
    return rate, cpu_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--requests", type=int, default=1000, help="per connection")
    p.add_argument("--reference-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reference_server:
        return reference_server()
    rows = []
    for name, cmd in [("instant_server.py", [sys.executable, str(HERE / "instant_server.py"), f"--key={KEY}", "--seed", "0"]),
                      ("http.server (reference)", [sys.executable, __file__, "--reference-server"])]:
        proc, url = start(cmd)
        try:
            asyncio.run(raw_load(url, args.connections, 20))  # warm-up
            rate = asyncio.run(raw_load(url, args.connections, args.requests))
            rows.append((name, "raw keep-alive", rate))
            if name == "instant_server.py":
                n = max(1, args.requests // 10)
                rate, cpu_ms = asyncio.run(openai_load(url, args.connections, n))
                rows.append((name, f"openai client ({cpu_ms:.1f} ms CPU a request)", rate))
        finally:
            proc.terminate()
            proc.wait()
    ref = next(r for n, c, r in rows if n.startswith("http.server"))
    print(f"{args.connections} connections, {args.requests} requests each (openai client: a tenth)")
    print(f"{'server':<26}{'client':<40}{'req/s':>9}{'/ reference':>13}")
    for name, client, rate in rows:
        print(f"{name:<26}{client:<40}{rate:>9.0f}{rate / ref:>13.2f}")


if __name__ == "__main__":
    main()
