"""An instant OpenAI-compatible server for benchmarks and tests: every reply at once, from a list.

    python bench/instant_server.py --port 0 --key K [--replies FILE] [--route TEXT=FILE] [--model NAME] [--latency S]

It prints its base URL (``http://127.0.0.1:PORT/v1``) as the first line of stdout and serves
until killed (SIGTERM and Ctrl-C print how many requests it served to stderr). It answers
``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``, each only with
``Authorization: Bearer K``, and a request for another model than ``--model`` gets vLLM's 404.
Replies are the strings of FILE (JSONL, one JSON string per line) in turn; without FILE, a few
Alpaca-format tasks in the ``###\\nInstruction:`` format that ``parse_alpaca`` reads, with fresh
words each time (from ``--seed``, random by default, so servers side by side differ), so they
pass the filters and are not duplicates of each other. A token is a whitespace-split piece of
text (``str.split``): ``usage`` counts them, and a request's ``max_tokens`` cuts a longer reply
after its first ``max_tokens`` pieces (what lies between them kept as it was), answered with
``finish_reason: "length"`` and that many completion tokens; a reply that fits is whole, with
``"stop"``. ``max_completion_tokens`` (the chat API's newer name) cuts alike; given both, the
smaller does. Either one not a whole number of at least 1 is a 400, as vLLM answers it.
``--route TEXT=FILE`` gives prompts containing TEXT the replies of FILE instead (a
self-instruct run's classification and instance prompts want replies of their own).
``--latency S`` holds each reply S seconds (without blocking other connections).

Why hand-written HTTP/1.1: one asyncio protocol parses keep-alive requests itself
(``Content-Length`` bodies; no chunked uploads, no streaming), with no thread per connection,
so hundreds of open connections (what generate keeps against each server) cost nothing.
``bench/instant.py`` measures it against the standard library's ``http.server``: on 2 shared
cores, 1,800-5,700 requests/s over 1 to 256 connections (0.8-2.8 times http.server's, which
needs TCP_NODELAY and a larger backlog to get there); see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import re
import signal
import sys
import time

WORDS = """amber anchor apple arch autumn badge bakery balcony bamboo banner barley basket beacon bicycle
blanket blossom boulder bracelet breeze brick bridge bucket cabin cactus candle canoe canyon carpet castle
cedar cellar chalk cherry chimney cider cliff clover coconut compass copper coral cottage cotton crater
crystal cushion daisy desert dolphin dragonfly drum eagle ember engine falcon feather fence fern ferry
fiddle fig flannel forest fountain fox galaxy garden garlic glacier glove granite harbor harvest hazel
helmet honey horizon island ivory jacket jasmine kettle kite ladder lagoon lantern lemon lighthouse
lilac linen lobster locket magnet maple marble meadow melon mirror mitten moss mountain mushroom needle
nutmeg oak oasis olive orchard otter paddle palace pebble pepper pillow pine planet pocket pond
porcelain puzzle quartz quill rabbit raft raven reef ribbon river robin saddle saffron sailboat
satchel scarf shell shovel silk sparrow spruce squirrel stable summit sunflower swan teapot thimble
thistle thunder timber tulip tunnel turtle umbrella valley velvet violin volcano walnut willow
windmill wool yarn zebra""".split()
VERBS = ["Describe", "Summarize", "Explain", "Compare", "Classify", "Rewrite", "Rank", "Contrast"]
MAX_HEAD = 64 * 1024


def default_reply(n: int, tasks: int = 5, seed: int = 0) -> str:
    """The n-th built-in reply: ``tasks`` Alpaca-format tasks with instructions far apart in ROUGE-L."""
    rng = random.Random(f"{seed}-{n}")
    out = []
    for _ in range(tasks):
        words = rng.sample(WORDS, 9)
        out.append(f"###\nInstruction: {rng.choice(VERBS)} {' '.join(words)}.\nInput: <noinput>\n"
                   f"Output: A short answer about the {words[0]} and the {words[1]}.\n")
    return "".join(out)


class Replies:
    def __init__(self, path: str | None, tasks: int, seed: int):
        self.n = 0
        self.tasks, self.seed = tasks, seed
        self.fixed = None
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    self.fixed = [json.loads(line) for line in f if line.strip()]
            except (OSError, ValueError) as e:
                sys.exit(f"{path}: cannot read it as JSONL ({e})")
            if not self.fixed or not all(isinstance(t, str) for t in self.fixed):
                sys.exit(f"{path}: want a JSONL file of strings, one reply per line")

    def next(self) -> str:
        n, self.n = self.n, self.n + 1
        return self.fixed[n % len(self.fixed)] if self.fixed else default_reply(n, self.tasks, self.seed)


_PIECE = re.compile(r"\S+")


def cut(text: str, tokens: int) -> str:
    r"""``text`` up to the end of its ``tokens``-th whitespace-split piece, as a reply cut at max_tokens.

    >>> cut("###\nInstruction: Add 2 and 3.\nOutput: 5", 4)
    '###\nInstruction: Add 2'
    """
    end = 0
    for m in itertools.islice(_PIECE.finditer(text), tokens):
        end = m.end()
    return text[:end]


def _error(status: int, message: str, kind: str) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": kind, "code": status}}


def answer(method: str, path: str, headers: dict, body: bytes, opts, replies: Replies) -> tuple[int, dict]:
    """(status, JSON object) for one request."""
    if headers.get("authorization") != f"Bearer {opts.key}":
        return _error(401, "Unauthorized", "authentication_error")
    path = path.split("?", 1)[0]
    if method == "GET" and path == "/v1/models":
        return 200, {"object": "list", "data": [{"id": opts.model, "object": "model", "created": 0,
                                                  "owned_by": "instant_server"}]}
    if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
        return _error(404, f"no route {method} {path}", "NotFoundError")
    try:
        req = json.loads(body)
        model = req["model"]
    except (ValueError, KeyError, TypeError):
        return _error(400, "the body is not a JSON request with a model", "BadRequestError")
    if model != opts.model:
        return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
    if req.get("stream"):
        return _error(400, "this server does not stream", "BadRequestError")
    # max_completion_tokens is the chat API's newer name for max_tokens, and vLLM honours both: a
    # client sending only the new name got whole replies here, never a cut one; the smaller wins.
    limits = []
    for name in ("max_tokens", "max_completion_tokens"):
        value = req.get(name)
        if value is not None and (type(value) is not int or value < 1):  # before a reply is used up
            return _error(400, f"{name} must be at least 1, got {value!r}", "BadRequestError")
        if value is not None:
            limits.append(value)
    limit = min(limits, default=None)
    if path == "/v1/chat/completions":
        prompt = " ".join(str(m.get("content") or "") for m in req.get("messages") or [] if isinstance(m, dict))
    else:
        p = req.get("prompt") or ""
        prompt = p if isinstance(p, str) else " ".join(map(str, p))
    text = next((r for mark, r in opts.routes if mark in prompt), replies).next()
    pt, ct = len(prompt.split()), len(text.split())
    finish = "stop"
    if limit is not None and ct > limit:  # ct is usage's count anyway: a reply that fits costs this comparison
        text, ct, finish = cut(text, limit), limit, "length"
    if path == "/v1/chat/completions":
        choice = {"index": 0, "finish_reason": finish, "logprobs": None,
                  "message": {"role": "assistant", "content": text}}
        obj, kind = "chat.completion", "chatcmpl"
    else:
        choice = {"index": 0, "finish_reason": finish, "logprobs": None, "text": text}
        obj, kind = "text_completion", "cmpl"
    return 200, {"id": f"{kind}-{replies.n}", "object": obj, "created": int(time.time()), "model": model,
                 "choices": [choice], "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}


REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 413: "Payload Too Large",
           501: "Not Implemented"}


class Connection(asyncio.Protocol):
    """One keep-alive connection: requests are answered in order, one at a time."""

    def __init__(self, opts, replies: Replies, counter: list):
        self.opts, self.replies, self.counter = opts, replies, counter
        self.buf = bytearray()
        self.busy = False  # a reply is being held for --latency
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.transport = None

    def data_received(self, data: bytes):
        self.buf += data
        self._serve()

    def _serve(self):
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._send(413, {"error": {"message": "headers too large"}}, keep=False)
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if len(parts) != 3 or "chunked" in headers.get("transfer-encoding", "").lower():
                self._send(501, {"error": {"message": "want a request line and a Content-Length body"}}, keep=False)
                return
            try:
                length = int(headers.get("content-length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                self._send(501, {"error": {"message": "bad Content-Length"}}, keep=False)
                return
            if len(self.buf) < end + 4 + length:
                return  # the body is still coming
            body = bytes(self.buf[end + 4:end + 4 + length])
            del self.buf[:end + 4 + length]
            method, path, version = parts
            conn = headers.get("connection", "").lower()
            keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
            self.counter[0] += 1
            status, obj = answer(method, path, headers, body, self.opts, self.replies)
            if self.opts.latency > 0:
                self.busy = True
                asyncio.get_running_loop().call_later(self.opts.latency, self._later, status, obj, keep)
                return
            self._send(status, obj, keep)

    def _later(self, status, obj, keep):
        self.busy = False
        self._send(status, obj, keep)
        self._serve()

    def _send(self, status: int, obj: dict, keep: bool):
        if self.transport is None:
            return
        data = json.dumps(obj).encode()
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: {'keep-alive' if keep else 'close'}\r\n\r\n")
        self.transport.write(head.encode() + data)
        if not keep:
            self.transport.close()
            self.transport = None


async def serve(opts) -> None:
    loop = asyncio.get_running_loop()
    # Servers side by side must not all say the same things: each draws its own seed unless given one.
    seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(2**32)
    replies = Replies(opts.replies, opts.tasks, seed)
    routes = []
    for route in opts.route:
        mark, sep, path = route.rpartition("=")
        if not sep or not mark or not path:
            sys.exit(f"--route {route!r}: want TEXT=FILE")
        routes.append((mark, Replies(path, opts.tasks, seed)))
    opts.routes = routes
    counter = [0]
    server = await loop.create_server(lambda: Connection(opts, replies, counter), "127.0.0.1", opts.port,
                                      reuse_address=True, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"http://127.0.0.1:{port}/v1", flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with server:
        await stop
    print(f"served {counter[0]} requests", file=sys.stderr, flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 (default) picks a free one")
    p.add_argument("--key", required=True, help="the API key clients must send")
    p.add_argument("--model", default="instant", help="the model name it serves (default: instant)")
    p.add_argument("--replies", help="JSONL of reply strings, used in turn (default: generated Alpaca tasks)")
    p.add_argument("--tasks", type=int, default=5, help="tasks per generated reply (default: 5)")
    p.add_argument("--seed", type=int, help="seed of the generated replies (default: a random one)")
    p.add_argument("--route", action="append", default=[], metavar="TEXT=FILE",
                   help="a prompt containing TEXT gets the replies of FILE in turn (the first TEXT found; "
                        "may be given several times), other prompts those of --replies")
    p.add_argument("--latency", type=float, default=0.0, help="seconds each reply is held (default: 0)")
    asyncio.run(serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
