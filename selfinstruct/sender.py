"""Requests sent from other processes (``--client-processes N``): the HTTP client's CPU off the
coordinator's loop.

A request costs the coordinator about 0.25 ms of CPU (``teacher.Poster``: building it, aiohttp,
reading the reply; 0.6-0.9 ms through the openai client before), on the same thread as
everything else it does: in self-instruct mode, where every instruction kept gets two more
requests, that is a large share of the loop (bench/README.md). Each sender is a child process
(``python -m selfinstruct.sender``) with its own event loop and a ``Poster`` a server; the
coordinator writes it one JSON line a request and reads one back:

    -> {"api_key": "...", "timeout": 300}                     (first line: never in argv or env)
    -> {"id": 7, "url": "http://gpu1:8000/v1", "path": "/chat/completions", "body": {...}}
    <- {"id": 7, "data": {...the reply's JSON...}}
    <- {"id": 8, "fault": {"kind": "http_503", "message": "...", "status": 503, ...}}

A failed attempt comes back as the ``Fault`` that ``Poster`` raised in the sender, so the retry loop, fault counts and health checks in the
coordinator treat it as they treat one raised in-process. A sender exits when its stdin
closes: when the coordinator closes it, and when the coordinator dies (kill -9 included).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import sys
from dataclasses import asdict
from pathlib import Path

LINE_LIMIT = 1 << 28  # one reply's JSON on a line; a long answer is far below this
SENDER_MARGIN_S = 5.0  # past --timeout, how long a sender may take to say its request timed out


class Senders:
    """Up to ``n`` sender processes, started as the requests in flight need them (``share``);
    ``post`` goes to the one with the fewest requests waiting."""

    def __init__(self, n: int, api_key: str, timeout: float, connections: int, share: int = 1,
                 faults: collections.Counter | None = None):
        self.n, self.api_key, self.timeout, self.connections = n, api_key, timeout, connections
        # A sender that let a request pass --timeout and the margin is stuck (stopped, swapped out), not the
        # server: it gets no new request until it answers again, the request is sent once more through
        # another, and ``faults`` counts it as ``sender_timeout``. Charged to the server as a timeout, one
        # stopped sender took every healthy server out of service, and the run stopped.
        self.faults = faults if faults is not None else collections.Counter()
        self._late: set[int] = set()  # senders (by their place in _procs) with a request past the margin
        # Requests in flight a sender carries before another is started: what can be in flight
        # (--concurrency times the servers) over n. All n were started up front: --client-processes 64
        # started 64 interpreters (33 s on 2 cores) for a dozen prompts. Now a small run starts one or
        # two, and a full one reaches n, each started while the others send.
        self.share = max(1, share)
        self._procs: list = []
        self._pending: list[dict[int, asyncio.Future]] = []
        self._readers: list[asyncio.Task] = []
        self._ids = itertools.count()
        self._in_flight = 0  # requests in post(), those waiting for the first sender too
        self._starts: set[asyncio.Task] = set()  # senders being started
        self._up = asyncio.Event()  # set when the first sender has started (or could not)
        self._ended: str | None = None  # why a sender is gone: no request may wait on it

    async def _start_one(self) -> None:
        # connections: a server's whole --concurrency may be in flight through any one sender.
        hello = json.dumps({"api_key": self.api_key, "timeout": self.timeout,
                            "connections": self.connections}).encode() + b"\n"
        # The same selfinstruct as this process's, whatever the working directory holds
        # (``python -m`` would put it first on the path, and a checkout there would shadow us).
        root = str(Path(__file__).resolve().parents[1])
        code = f"import sys; sys.path[0] = {root!r}; from selfinstruct.sender import main; main()"
        try:
            # A session of its own: Ctrl-C at the terminal reaches the coordinator only,
            # which closes our input (a sender still importing would print a traceback).
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=LINE_LIMIT, start_new_session=True)
        except OSError as e:
            # The next request stops the run with this line (those waiting for a first sender at once).
            self._ended = self._ended or (f"cannot start request sender process {len(self._procs) + 1} of "
                                          f"{self.n} (--client-processes): {e}")
            self._up.set()
            return
        proc.stdin.write(hello)
        pending: dict[int, asyncio.Future] = {}
        self._procs.append(proc)
        self._pending.append(pending)
        self._readers.append(asyncio.get_running_loop().create_task(self._read(proc, pending)))
        self._up.set()

    async def post(self, url: str, path: str, body: dict) -> object:
        """What ``teacher._post`` returns for the same request, or the Fault it raises."""
        from selfinstruct.config import UserError
        from selfinstruct.teacher import Fault

        self._in_flight += 1
        try:
            for again in (False, True):  # again: its sender was stuck
                live = len(self._procs) - len(self._late) + len(self._starts)  # stuck ones not counted
                wanted = live == 0 if again else self._in_flight > live * self.share
                if wanted and live < self.n and not self._ended:
                    task = asyncio.get_running_loop().create_task(self._start_one())
                    self._starts.add(task)
                    task.add_done_callback(self._starts.discard)
                if self._late and len(self._late) == len(self._procs) and self._starts:
                    await asyncio.gather(*self._starts, return_exceptions=True)  # every one stuck: wait for a new one
                if not self._procs:
                    await self._up.wait()
                if self._ended:
                    raise UserError(self._ended)
                msg = await self._post_once(url, path, body, again)
                if msg is not None:
                    break
        finally:
            self._in_flight -= 1
        if "fault" in msg:
            raise Fault(**msg["fault"])
        return msg["data"]

    async def _post_once(self, url: str, path: str, body: dict, again: bool) -> dict | None:
        """The request through the sender with the fewest waiting, among those not stuck (all where
        every one is); None where it was stuck (the first time), a timeout Fault the second."""
        from selfinstruct.teacher import Fault

        ready = [k for k in range(len(self._procs)) if k not in self._late] or range(len(self._procs))
        k = min(ready, key=lambda k: len(self._pending[k]))
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[k][rid] = future
        try:
            self._procs[k].stdin.write(json.dumps({"id": rid, "url": url, "path": path, "body": body}).encode() + b"\n")
            # The sender's client times out at --timeout; past that and a margin, the sender itself is stuck.
            return await asyncio.wait_for(future, self.timeout + SENDER_MARGIN_S)
        except asyncio.TimeoutError:
            self._late.add(k)
            self.faults["sender_timeout"] += 1
            if not again:
                return None  # sent once more, through another sender
            # Stuck twice: this process itself may be (a long pause of its own loop, a machine out of memory).
            raise Fault("timeout", f"the request sender process did not answer within --timeout {self.timeout:g} s "
                                   f"and {SENDER_MARGIN_S:g} s more") from None
        finally:
            self._pending[k].pop(rid, None)

    async def _read(self, proc, pending: dict[int, asyncio.Future]) -> None:
        from selfinstruct.config import UserError

        broken = None
        try:
            while line := await proc.stdout.readline():
                msg = json.loads(line)
                if self._late:  # it answers again: no longer stuck
                    self._late.discard(self._procs.index(proc))
                future = pending.get(msg["id"])
                if future is not None and not future.done():  # (a cancelled request's answer is dropped)
                    future.set_result(msg)
        except (ValueError, KeyError, TypeError) as e:
            # A line over LINE_LIMIT (the sender makes none) or not ours: this reader cannot go on,
            # so neither can the sender; its requests fail now, not one --timeout each.
            broken = f"sent a line this process cannot read ({' '.join(str(e).split())[:200]})"
            proc.kill()
        code = await proc.wait()
        how = broken or (f"was killed by signal {-code}" if code < 0 else f"ended with exit code {code} (its error is above)")
        self._ended = self._ended or f"a request sender process (--client-processes) {how}"
        for future in pending.values():
            if not future.done():
                future.set_exception(UserError(self._ended))

    async def close(self) -> None:
        if self._starts:  # senders being started: their processes (a moment; the imports come after), ended below
            await asyncio.gather(*self._starts, return_exceptions=True)
        for proc in self._procs:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()  # the sender ends at the end of its input
        for proc in self._procs:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


# ------------------------------------------------------------------ the sender process


async def _serve() -> None:
    from selfinstruct.teacher import Fault, Poster, _post, describe

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
    out = asyncio.StreamWriter(transport, protocol, None, loop)
    hello = json.loads(await reader.readline() or b"{}")
    clients: dict[str, object] = {}
    tasks: set[asyncio.Task] = set()

    class Server:  # what teacher._post reads of a server
        def __init__(self, url: str):
            self.poster = Poster(url, hello["api_key"], hello["timeout"], hello["connections"])

    async def one(req: dict) -> None:
        s = clients.get(req["url"]) or clients.setdefault(req["url"], Server(req["url"]))
        try:
            msg = {"id": req["id"], "data": await _post(s, req["path"], req["body"])}
        except Exception as e:
            f = describe(e) or Fault(type(e).__name__, " ".join(str(e).split())[:300])
            msg = {"id": req["id"], "fault": asdict(f)}
        out.write(reply_line(msg) + b"\n")

    try:
        while line := await reader.readline():
            task = loop.create_task(one(json.loads(line)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:  # (should reading fail: the clients are closed all the same, not left to print "Unclosed")
        for task in tasks:  # the coordinator closed our input: what is still in flight is not wanted
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in clients.values():
            await s.poster.close()


def reply_line(msg: dict, limit: int = LINE_LIMIT) -> bytes:
    """``msg`` as the line sent to the coordinator, whose reader takes lines under ``limit``
    bytes; a reply too long for it is a fault (not sent: one line too long would stop the reader).

    >>> reply_line({"id": 1, "data": "x" * 40}, limit=80)
    b'{"id": 1, "data": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'
    >>> json.loads(reply_line({"id": 1, "data": "x" * 100}, limit=80))["fault"]["kind"]
    'malformed_response'
    """
    from selfinstruct.teacher import Fault

    line = json.dumps(msg).encode()
    if len(line) >= limit:
        f = Fault("malformed_response", f"the reply is {len(line) >> 20} MB as JSON, more than a request sender passes "
                                        f"on ({limit >> 20} MB)")
        line = json.dumps({"id": msg["id"], "fault": asdict(f)}).encode()
    return line


def main() -> None:
    import signal

    # Should a Ctrl-C, a SIGTERM or a SIGHUP reach us anyway (we have a session of our own, but a
    # scheduler such as SLURM signals every process of the job, and systemd follows its SIGTERM with
    # a SIGHUP to each): the coordinator handles it and closes our input. Ended by it first, we would
    # be a sender that died, and the run would stop on that.
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, signal.SIG_IGN)
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
