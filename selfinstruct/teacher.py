"""One client for every teacher, against one or more OpenAI-compatible servers: completions are POSTed
on aiohttp directly (``Poster``: a quarter of the ``openai`` client's CPU a request), and the
servers' checks (GET /models) go through the ``openai`` async client.

Every retry is ours (neither client retries):
one loop retries 429 (honouring Retry-After), 5xx, timeouts, dropped or cut-off
connections and replies the client cannot use (malformed JSON, no choices), up
to ``max_retries`` times with exponential backoff, and counts every failed
attempt by kind, so stats say exactly what went wrong. (The client's own retries
of timeouts and dropped connections were invisible to us, so went uncounted.)

Several servers serving the same model share the work: each attempt (a retry
too) goes to the server in service with the fewest requests in flight, each
server taking at most ``concurrency`` at once. With ``health=True`` (generate),
a server that fails ``TAKE_OUT_AFTER`` times in a row with a sign of being down
(connection refused or dropped, a timeout, a 5xx) is taken out of service and
probed with ``GET /models`` at growing intervals until it answers; when no
server has been in service for ``timeout`` seconds, each is asked once more, and
when none answers, a request raises UserError. A server put back that fails again
before any reply does not start that count anew.
One that answers completions with a 401, 403 or 404 while others are in service
is taken out for the rest of the run, not probed: its /models may well pass.

With ``client_processes`` the HTTP requests themselves go out from child processes
(``sender.py``); each failed attempt comes back as the same ``Fault`` that ``describe``
makes here, so the retries, counts and server choice above do not change.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from selfinstruct.config import UserError, distinct_urls
from selfinstruct.records import Reply, Usage

# Faults in a row, of a kind that says the server is down, that take it out of service. One is
# not enough: a single dropped connection or 503 under load is routine, and a retry handles it.
TAKE_OUT_AFTER = 3
PROBE_FIRST_S, PROBE_MAX_S = 0.5, 10.0  # GET /models after 0.5 s, 1 s, 2 s ... then every 10 s
# How long a server has to answer GET /models once another has passed the preflight (``check_all``),
# and at the last look before a run stops for want of a server (``_last_look``).
LAST_LOOK_S = 5.0
# A server whose request failed (any fault) is passed over while another in service is not: for 0.5 s,
# then twice as long at each fault in a row, at most 30 s. Requests go to the server with the fewest in
# flight, and one that fails at once (a 400, a 429, a reply that is not JSON) always has fewest: one such
# server among good ones drew most of the work and failed 43-85% of respond's rows.
PASS_OVER_FIRST_S, PASS_OVER_MAX_S = 0.5, 30.0


# Sampling keys the OpenAI API lacks, sent in the request body under each server's name:
# llama.cpp reads repeat_penalty, vLLM repetition_penalty (each ignores the other's); DRY is llama.cpp's.
BODY_KEYS = {"repeat_penalty": ("repeat_penalty", "repetition_penalty"), "dry_multiplier": ("dry_multiplier",)}


# A teacher that answers these refuses every request the same way: stop the run, do not skip.
FATAL_KINDS = ("http_401", "http_403", "http_404", "unusable")

# Malformed replies (not JSON, no choices, no content) a server may give before its first usable one
# before it is taken for one that never gives any: two prompts' every attempt. Its GET /models passed,
# so it was probed back in, and each prompt retried for 15 s, until --max-requests: a run of --num 100
# spent half an hour making nothing. One usable reply and it is a server with faults, retried as any.
JUNK_LIMIT = 12


def fatal_line(e: "TeacherError") -> str:
    """The line that stops a run for a fault of ``FATAL_KINDS``: a refusal no retry can mend, or a server
    that gives nothing usable."""
    if e.kind == "unusable":
        return f"the teacher at {e.server} gives no usable reply ({e.kind}): {e}"
    return f"the teacher at {e.server} refused the request ({e.kind}): {e}"


class TeacherError(Exception):
    """A request that failed after every retry. ``kind`` names the fault for stats.

    ``reached`` is False when no attempt got as far as sending a byte (every one failed
    to connect): the prompt never reached a teacher.
    """

    def __init__(self, kind: str, message: str, reached: bool = True, server: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.reached = reached
        self.server = server  # the base URL of the last attempt


def unusable(server: str, junk: int, last: str, endpoint: str = "chat completions") -> TeacherError:
    """The error of a server whose every reply so far was malformed (``junk`` of them, ``last`` the latest's
    message): the request's at ``JUNK_LIMIT``, and respond's and evolve's at a session's end, under it."""
    return TeacherError("unusable", f"{junk} replies and none usable, the last: {last}; check that --base-url is "
                                    f"the model's server and that it answers {endpoint}", server=server)


@dataclass(eq=False)  # an exception: compared and hashed by identity
class Fault(Exception):
    """One failed attempt, described as the retry loop needs it: built where the error was
    raised, from openai's exception (``describe``), so that it can cross a pipe from a
    sender process (``selfinstruct/sender.py``) as plain fields."""

    kind: str  # fault_kind: 'http_503', 'timeout', 'connection', 'malformed_response', ...
    message: str  # one line
    cause: str = ""  # one line of what lay under it (the transport's error), for take-out notes
    reached: bool = True  # whether the request got to the server (False: it failed while connecting)
    status: int | None = None  # the HTTP status of an error reply
    retry_after: float | None = None  # what a 429/503 asked us to wait

    def __str__(self) -> str:
        return self.message


def describe(exc: BaseException) -> Fault | None:
    """The Fault for an error of one attempt, or None for an error that is not the teacher's."""
    import openai

    if isinstance(exc, Fault):
        return exc
    if isinstance(exc, (openai.APIResponseValidationError, ValueError, TypeError, AttributeError)):
        # TypeError/AttributeError: a 200 whose JSON is not a completion.
        return Fault("malformed_response", _one_line(exc), _one_line(_cause(exc)))
    if isinstance(exc, openai.APIStatusError):
        return Fault(fault_kind(exc), _one_line(exc), _one_line(_cause(exc)), status=exc.status_code,
                     retry_after=_retry_after(exc.response.headers))
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        # The transport's own words: openai calls a refused or dropped connection "Request timed out."
        return Fault(fault_kind(exc), _one_line(_cause(exc)), _one_line(_cause(exc)), reached=not _never_sent(exc))
    return None


def _aiohttp_error(exc: BaseException) -> BaseException | None:
    """aiohttp's own error under an openai error, or None when the transport was httpx."""
    e = exc.__cause__
    while e is not None:
        if type(e).__module__.startswith("aiohttp"):
            return e
        e = e.__cause__
    return None


def fault_kind(exc: BaseException) -> str:
    """A short name for a failure, for counting: 'http_500', 'http_429', 'timeout', 'connection', ..."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, openai.APIConnectionError):
        # openai's aiohttp transport maps every aiohttp.ClientConnectionError (a server that
        # dropped the connection, say) to httpx.ConnectTimeout, so openai calls it a timeout:
        # aiohttp's own error says which it was. Its timeouts are TimeoutErrors.
        cause = _aiohttp_error(exc)
        if cause is not None:
            return "timeout" if isinstance(cause, TimeoutError) else "connection"
        return "timeout" if isinstance(exc, openai.APITimeoutError) else "connection"
    if isinstance(exc, (openai.APIResponseValidationError, ValueError)):
        return "malformed_response"
    return type(exc).__name__


def _never_sent(exc: BaseException) -> bool:
    """Whether the attempt failed while connecting, before any byte of the request was sent."""
    cause = _aiohttp_error(exc)
    if cause is not None:  # (its ConnectTimeout stands for any dropped connection: see fault_kind)
        import aiohttp

        return isinstance(cause, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
    # By name: the openai client may bring its own copy of httpx (openai 3.x imports httpx2).
    return type(exc.__cause__).__name__ in ("ConnectError", "ConnectTimeout")


def _is_down_sign(kind: str) -> bool:
    """Faults that say a server may be down, not that it is busy (429) or replied badly.

    >>> [_is_down_sign(k) for k in ("connection", "timeout", "http_503", "http_429", "malformed_response")]
    [True, True, True, False, False]
    """
    return kind in ("connection", "timeout") or (kind.startswith("http_5") and len(kind) == 8)


@dataclass
class Server:
    """One OpenAI-compatible server and what happened to the requests sent to it (summed into stats.json)."""

    url: str
    client: object  # openai.AsyncOpenAI: GET /models
    poster: object = None  # Poster: the completions
    in_flight: int = 0
    requests: int = 0
    faults: Counter = field(default_factory=Counter)
    taken_out: int = 0
    in_service: bool = True
    strikes: int = 0  # down-sign faults in a row
    fails: int = 0  # faults of any kind in a row
    passed_over_until: float = 0.0  # time.monotonic() until which another server in service is asked first
    wake_at: object = None  # the timer that wakes waiting requests when that ends (an asyncio.TimerHandle)
    why: str = ""  # the last fault, for messages
    refused: bool = False  # answered completions with a 401/403/404, or only junk: out for the rest of the run
    usable: bool = False  # has given a usable reply this session
    last_junk: str = ""  # the message of its latest malformed reply (``unusable``)
    probe: object = None  # the task probing it while it is out (an asyncio.Task)
    probe_after: float = 0.0  # seconds before its next first probe: 0, PROBE_FIRST_S; grows while it fails again

    def stats(self) -> dict:
        # (Its tokens are counted from responses.jsonl, as the run's are: generate.compute_stats.)
        return {"requests": self.requests, "faults": dict(self.faults.most_common()), "taken_out": self.taken_out}


@dataclass
class TeacherClient:
    base_url: str | list[str]  # one server, or several serving the same model
    api_key: str
    model: str
    sampling: dict  # temperature, top_p, max_tokens, stop, seed, repeat_penalty, dry_multiplier
    concurrency: int = 8  # per server
    timeout: float = 120.0
    max_retries: int = 5
    health: bool = False  # take failing servers out, probe them, give up when none answers for `timeout`
    on_event: object = None  # called with one line when a server is taken out or comes back
    client_processes: int = 0  # requests sent from this many child processes (sender.py); 0: from this one
    faults: Counter = field(default_factory=Counter)  # every fault seen, retried or not, all servers
    requests: int = 0

    def __post_init__(self):
        urls = [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)
        if not urls:
            raise UserError("no teacher server given")
        distinct = distinct_urls(urls)  # a URL given twice is one server
        room_for_connections(self.concurrency, len(distinct))  # before a sender inherits the limit
        self.servers = [Server(url=u, client=make_client(u, self.api_key, self.timeout),
                               poster=Poster(u, self.api_key, self.timeout, self.concurrency)) for u in distinct]
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._senders = None
        if self.client_processes:
            from selfinstruct.sender import Senders

            # No more senders than requests can be in flight: --client-processes 64 with one server
            # at --concurrency 1 started 64 interpreters (8.6 s on 2 cores) for one request at a time.
            # They start as the requests in flight need them, each carrying its share of the most.
            most = self.concurrency * len(self.servers)
            n = min(self.client_processes, most)
            self._senders = Senders(n, self.api_key, self.timeout, self.concurrency, share=most // n, faults=self.faults)
        self._probes: set[asyncio.Task] = set()
        # When the last server in service was taken out; None again at the next usable reply, not when a
        # probe puts one back: a server whose GET /models passes and whose every completion fails (a 5xx)
        # was put back again and again, and the run went on for hours making nothing.
        self._none_since: float | None = None
        self._look: asyncio.Task | None = None  # the last look at the servers (``_last_look``) ...
        self._looked_since: float | None = None  # ... and the _none_since it was for
        self._closing = False
        # A caller's error between its first request and its own ``close`` (generate's run files
        # opened after the preflight, when out of file descriptors) left the clients open: aiohttp
        # printed "Unclosed client session" under the one line. asyncio.run cancels every task
        # left when its main one ends, and this one closes the clients then.
        try:
            self._guard = asyncio.get_running_loop().create_task(self._close_when_the_loop_ends())
        except RuntimeError:  # made outside a loop: its caller closes it
            self._guard = None

    # ------------------------------------------------------------ the servers

    def in_service(self) -> int:
        """How many servers take requests now."""
        return sum(s.in_service for s in self.servers)

    def server_stats(self) -> dict:
        return {s.url: s.stats() for s in self.servers}

    def _wake(self, n: int | None = None) -> None:
        """Wake ``n`` waiters for a slot, first come first served (all when None).

        One per released slot, not all: self-instruct's follow-ups start many more requests
        than there are slots, and waking every waiter at each release cost more than the
        requests (bench/README.md). All are woken when servers come back into service or
        the last one goes out, since each must then look again (or time out).
        """
        while self._waiters and (n is None or n > 0):
            f = self._waiters.popleft()
            if not f.done():
                f.set_result(None)
                n = None if n is None else n - 1

    async def _acquire(self, tried: frozenset[str] = frozenset()) -> Server:
        """A slot on the server in service with the fewest requests in flight; waits for one. Servers
        passed over after a fault (``_fault``) only while no other server in service is; one the request
        was ``tried`` on (their URLs) last among those with a free slot."""
        while True:
            now = time.monotonic()
            live = [s for s in self.servers if s.in_service]
            ready = [s for s in ([s for s in live if s.passed_over_until <= now] or live)
                     if s.in_flight < self.concurrency]
            if ready:
                s = min(ready, key=lambda s: (s.url in tried, s.in_flight, s.requests))
                s.in_flight += 1
                s.requests += 1
                self.requests += 1
                return s
            left = None
            if self._none_since is not None and not live:
                left = self._none_since + self.timeout - time.monotonic()
                if left <= 0:
                    if not await self._last_look():
                        raise UserError(self._none_left())
                    continue
            # Each slot freed wakes one waiter: a waiter that gives up (timeout, cancel) must
            # not swallow a wake-up meant for a slot, or another would sleep beside a free one.
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await (waiter if left is None else asyncio.wait_for(waiter, left))
            except asyncio.TimeoutError:
                pass
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(1)  # woken, then cancelled before taking the slot: hand it on
                raise

    async def _last_look(self) -> bool:
        """Whether a server is back in service after each one out (not ``refused``) was asked GET /models
        once more, together, at most ``LAST_LOOK_S`` seconds: the run stops only when none answers.

        Probes come up to 10 s apart, so one back since the last probe was called down at --timeout
        while it answered ('has not answered for 15 s', back 7 s before). Every request waiting then
        shares one look, and there is one look until a usable reply: a server it puts back that fails
        again before giving one stops the run.
        """
        if self._look is None or self._look.done():
            if self._looked_since == self._none_since:
                return False
            self._looked_since = self._none_since
            self._look = asyncio.get_running_loop().create_task(self._look_at_each())
        await asyncio.shield(self._look)
        return self.in_service() > 0

    async def _look_at_each(self) -> None:
        async def look(s: Server) -> None:
            try:
                problem = await asyncio.wait_for(self.check(s), LAST_LOOK_S)
            except asyncio.TimeoutError:
                problem = f"did not answer GET /models within {LAST_LOOK_S:g} s (timeout)"
            if s.refused or s.in_service:  # refused meanwhile, or a probe put it back
                return
            if problem is None:
                self._back(s)
            else:
                s.why = problem

        await asyncio.gather(*(look(s) for s in self.servers if not s.in_service and not s.refused))

    def _back(self, s: Server) -> None:
        """Put ``s`` back in service (a probe or the last look found it answering)."""
        s.in_service, s.strikes = True, 0
        if s.probe is not None and s.probe is not asyncio.current_task():
            s.probe.cancel()  # the last look found it: its probe, asleep for up to 10 s, is done
        self._note(f"{s.url} answers again; back in service")
        self._wake()

    def _release(self, s: Server) -> None:
        s.in_flight -= 1
        self._wake(1)

    def _none_left(self) -> str:
        why = "; ".join(f"{s.url} ({s.why})" for s in self.servers)
        if len(self.servers) == 1:
            return f"the teacher has not answered for {self.timeout:g} s (--timeout): {why}"
        return f"no teacher server has answered for {self.timeout:g} s (--timeout): {why}"

    def _note(self, text: str) -> None:
        if self.on_event is not None:
            self.on_event(text)

    def take_out(self, s: Server, why: str) -> None:
        """Stop sending to ``s`` and probe it with GET /models until it answers (unless ``s.refused``)."""
        s.why = why
        if not s.in_service:
            return
        s.in_service = False
        s.taken_out += 1
        if self.in_service() == 0:
            if self._none_since is None:
                self._none_since = time.monotonic()
            self._wake()  # every waiter starts (or goes on with) the --timeout count now
        if s.refused:
            self._note(f"{s.url} taken out of service ({why}) for the rest of the run")
            return
        self._note(f"{s.url} taken out of service ({why}); probing it")
        task = s.probe = asyncio.get_running_loop().create_task(self._probe(s))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, s: Server) -> None:
        # Put back before and failing again with no usable reply between (its GET /models passes, its
        # completions fail): its probes go on growing, or it came back every half second for --timeout.
        delay = s.probe_after or PROBE_FIRST_S
        while True:
            await asyncio.sleep(delay)
            if s.in_service:  # the last look (``_last_look``) put it back
                return
            problem = await self.check(s)
            # Refused a completion since it was taken out (GET /models cannot clear that), or put back meanwhile.
            if s.refused or s.in_service:
                return
            if problem is None:
                s.probe_after = min(PROBE_MAX_S, delay * 2)
                self._back(s)
                return
            s.why = problem
            delay = min(PROBE_MAX_S, delay * 2)

    def _fault(self, s: Server, f: Fault) -> None:
        self.faults[f.kind] += 1
        s.faults[f.kind] += 1
        if f.kind == "malformed_response":
            s.last_junk = f.message
        if len(self.servers) > 1:  # passed over for a while (PASS_OVER_FIRST_S): the others are asked first
            s.fails += 1
            pause = min(PASS_OVER_MAX_S, PASS_OVER_FIRST_S * 2 ** min(s.fails - 1, 16))
            s.passed_over_until = time.monotonic() + pause
            # Requests waiting for a slot on the others may take its slots again once the pause ends: one
            # timer a server (a burst of faults made thousands, each waking every waiter).
            if s.wake_at is not None:
                s.wake_at.cancel()
            s.wake_at = asyncio.get_running_loop().call_later(pause, self._wake)
        if not _is_down_sign(f.kind):
            s.strikes = 0  # it answered: busy or wrong, not down
            return
        s.strikes += 1
        if self.health and s.strikes >= TAKE_OUT_AFTER:
            # (A stuck sender's timeout has no transport error under it: its message says what happened.)
            self.take_out(s, f"{f.kind}: {f.cause or f.message}")

    def _impossible_usage(self, s: Server) -> None:
        """Count a usable reply whose usage held an impossible count (``_usage``) as a fault of its server's,
        ``impossible_usage``: the reply is used, its tokens taken as none, and stats.json says how often.
        Not through ``_fault``: the server answered, so it is neither passed over nor nearer being taken out."""
        self.faults["impossible_usage"] += 1
        s.faults["impossible_usage"] += 1

    async def check(self, s: Server) -> str | None:
        """None when ``s`` answers GET /models with our key and lists our model, else what is wrong."""
        import openai

        try:
            page = await s.client.models.list(timeout=min(self.timeout, 30))
            served = [m.id for m in page.data]
        except openai.APIStatusError as e:
            kind = fault_kind(e)
            if e.status_code in (401, 403):
                return (f"refused the request ({kind}): the API key is wrong "
                        "(--api-key, SELFINSTRUCT_API_KEY or OPENAI_API_KEY)")
            if e.status_code == 404:
                return f"has no {s.url.rstrip('/')}/models ({kind}): is the base URL right? It usually ends in /v1"
            return f"answered GET /models with {kind}"
        except openai.APIConnectionError as e:  # (a timeout too: APITimeoutError is one)
            if fault_kind(e) == "timeout":
                return f"did not answer GET /models within {min(self.timeout, 30):g} s (timeout)"
            return f"cannot be reached (connection: {_one_line(_cause(e))})"
        except Exception as e:  # a 200 that is not a model list
            return f"answered GET /models with something that is not a model list ({type(e).__name__})"
        if self.model not in served:
            return f"does not serve model '{self.model}' (it serves: {', '.join(served[:5]) or 'nothing'})"
        return None

    async def check_all(self) -> dict[str, str | None]:
        """Each server's URL and what ``check`` found wrong with it (None: it passed), asked together.

        Once one has passed, the others have ``LAST_LOOK_S`` seconds more: a hung server beside good ones
        (stopped, the kernel still accepting its connections) held every start for min(--timeout, 30) s.
        Those still silent then are probed like any server that fails its check.
        """
        tasks = {asyncio.ensure_future(self.check(s)): s for s in self.servers}
        problems: dict[str, str | None] = {}
        pending, deadline = set(tasks), None
        try:
            while pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
                for task in done:
                    problems[tasks[task].url] = task.result()
                    if task.result() is None and deadline is None:
                        deadline = time.monotonic() + LAST_LOOK_S
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in pending:
            problems[tasks[task].url] = f"did not answer GET /models within {LAST_LOOK_S:g} s of another server"
        return {s.url: problems[s.url] for s in self.servers}

    def refuse_if_none_passed(self, problems: dict[str, str | None]) -> None:
        """The one line (UserError) for servers of which none passed their check (``check_all``)."""
        bad = [(s, problems[s.url]) for s in self.servers if problems[s.url]]
        if len(bad) == len(self.servers):
            if len(bad) == 1:
                raise UserError(f"the teacher at {bad[0][0].url} {bad[0][1]}")
            raise UserError("no teacher server passed the check (GET /models): "
                            + "; ".join(f"{s.url} {p}" for s, p in bad))

    async def preflight(self, problems: dict[str, str | None] | None = None) -> list[str]:
        """Check every server before the first prompt (GET /models, with the key).

        Raises UserError (one line) when none passes. Servers that fail while others pass are
        taken out and probed like any failing server; returns one line about each of them.
        ``problems``: what a ``check_all`` just found, before the run folder was written (respond,
        evolve), so that a start asks each server GET /models once, not again here.
        """
        if problems is None or set(problems) != {s.url for s in self.servers}:
            problems = await self.check_all()
        self.refuse_if_none_passed(problems)
        bad = [(s, problems[s.url]) for s in self.servers if problems[s.url]]
        notes = []
        for s, p in bad:
            notes.append(f"{s.url} {p}")
            self.take_out(s, p)
        return notes

    # ------------------------------------------------------------ requests

    async def complete(self, prompt: str, purpose: str, response_format: dict | None = None,
                       prefill: str | None = None, sampling: dict | None = None) -> Reply:
        """One chat completion. Raises TeacherError when every retry failed.

        ``prefill`` starts the assistant's reply (llama.cpp continues a final assistant
        message; vLLM does with continue_final_message). The returned text always
        begins with it: llama.cpp echoes it, vLLM does not. ``sampling``: settings that
        replace the run's for this request (a None value: not sent).
        """
        kwargs, extra_body = self._sampling_kwargs(sampling)
        if response_format is not None:
            kwargs["response_format"] = response_format
        messages = [{"role": "user", "content": prompt}]
        if prefill:
            messages.append({"role": "assistant", "content": prefill})
            extra_body.update(continue_final_message=True, add_generation_prompt=False)

        async def call(s: Server, kw: dict) -> Reply:
            data = await self._send(s, "/chat/completions", {"model": self.model, "messages": messages, **kw, **extra_body})
            message, finish_reason, usage, impossible = _first_choice(data, "message")
            content = message.get("content") if isinstance(message, dict) else None
            if content is None and isinstance(message, dict) and finish_reason == "length":
                # Cut at max_tokens before any content: a reasoning model's thinking (vLLM's
                # reasoning_content) took them all. An empty reply cut short, rejected as one; a retry
                # asked for the same max_tokens again, each prompt paid six times for nothing.
                content = ""
            text = _text(content)
            if text is None:
                raise ValueError("the reply has no message content")
            text = without_thinking(text)
            if prefill and not text.startswith(prefill):
                text = prefill + text
            if impossible:
                self._impossible_usage(s)
            return Reply(purpose=purpose, text=text, finish_reason=finish_reason, usage=usage, server=s.url)

        return await self._request(call, prompt, purpose, kwargs)

    async def complete_raw(self, prompt: str, purpose: str, stop: list[str] | None = None) -> Reply:
        """One raw completion (``POST /v1/completions``): the model continues ``prompt`` as it is,
        with no chat template around it. ``stop`` replaces the run's stop sequences.

        A server without the endpoint (404) is a UserError naming it: nothing else can
        stand in for it, so retrying or skipping the unit would only repeat the failure.
        """
        kwargs, extra_body = self._sampling_kwargs()
        if stop is not None:
            kwargs["stop"] = stop

        async def call(s: Server, kw: dict) -> Reply:
            data = await self._send(s, "/completions", {"model": self.model, "prompt": prompt, **kw, **extra_body})
            text, finish_reason, usage, impossible = _first_choice(data, "text")
            text = _text(text)
            if text is None:
                raise ValueError("the reply has no text")
            if impossible:
                self._impossible_usage(s)
            return Reply(purpose=purpose, text=text, finish_reason=finish_reason, usage=usage, server=s.url)

        try:
            return await self._request(call, prompt, purpose, kwargs, endpoint="raw completions (/v1/completions)")
        except TeacherError as e:
            if e.kind == "http_404":
                raise UserError(f"the teacher at {e.server} has no /v1/completions endpoint, "
                                "which --mode magpie needs") from None
            raise

    def _sampling_kwargs(self, changed: dict | None = None) -> tuple[dict, dict]:
        """The request's sampling keywords (the run's, with ``changed`` over them), and the body
        keys the OpenAI API lacks (see BODY_KEYS)."""
        kwargs = {k: v for k, v in {**self.sampling, **(changed or {})}.items() if v is not None and k != "seed"}
        extra_body = {name: kwargs[key] for key, names in BODY_KEYS.items() if key in kwargs for name in names}
        for key in BODY_KEYS:
            kwargs.pop(key, None)
        return kwargs, extra_body

    async def _request(self, call, prompt: str, purpose: str, kwargs: dict, endpoint: str = "chat completions") -> Reply:
        """``await call(server, kwargs)`` with our retries, fault counts and server choice.

        Shared by chat and raw completions: each attempt picks its server anew, and gets
        its own seed when the run is seeded.
        """
        base_seed = self.sampling.get("seed")
        last: Fault | None = None
        reached = False
        tried: frozenset[str] = frozenset()  # the servers this request failed on
        for attempt in range(self.max_retries + 1):
            wait = min(8.0, 0.5 * 2**attempt)
            if base_seed is not None:
                kwargs["seed"] = request_seed(base_seed, prompt, purpose, attempt)
            s = await self._acquire(tried)  # a retry picks its server anew, another if one is free
            try:
                reply = await call(s, kwargs)
                reached = s.usable = True
                if self.in_service():  # a server in service gives replies: the --timeout count starts over
                    self._none_since = None  # (a late reply from one out of service leaves it: none may come back)
                s.strikes = s.fails = 0
                s.probe_after = 0.0
                s.passed_over_until = 0.0
                return reply
            except Exception as e:
                last = describe(e)
                if last is None:
                    raise
                if last.kind == OUT_OF_FILES:
                    # This process's limit, not the server's fault: counted as one, the server was taken
                    # out, its GET /models passed, it was put back, in cycles. The run stops instead.
                    raise UserError(last.message) from None
                reached = reached or last.reached
                self._fault(s, last)
                tried |= {s.url}
                others = [o for o in self.servers if o.in_service and o is not s]
                if last.status in (401, 403, 404) and self.health and others:
                    # This server refuses what the others take (a wrong key, another model or path there):
                    # out of service, and the request sent to another at once. For the rest of the run: its
                    # GET /models passed the preflight, so a probe put it back, and it failed again, in cycles.
                    s.refused = True
                    self.take_out(s, f"{last.kind}: {last.message}")
                    continue
                # Before its first usable reply, its malformed ones so far are all it has given (each counted by _fault).
                if last.kind == "malformed_response" and not s.usable:
                    if (junk := s.faults["malformed_response"]) >= JUNK_LIMIT:
                        if others:  # out for the rest of the run (with health checks on); the others go on
                            if self.health:
                                s.refused = True
                                self.take_out(s, f"{junk} replies and none usable, the last: {last.message}")
                            continue
                        raise unusable(s.url, junk, last.message, endpoint) from None
                if last.status in (400, 422) and any(o.url not in tried for o in others):
                    continue  # the request may be wrong for this server only (a smaller --max-model-len)
                if last.status in (400, 401, 403, 404, 422):
                    # The request itself is wrong: do not loop.
                    raise TeacherError(last.kind, last.message, server=s.url) from None
                wait = last.retry_after or wait
            finally:
                self._release(s)
            if attempt < self.max_retries:
                await asyncio.sleep(wait)
        raise TeacherError(last.kind, last.message, reached=reached, server=s.url) from None

    async def _send(self, s: Server, path: str, body: dict) -> object:
        if self._senders is not None:
            return await self._senders.post(s.url, path, body)
        return await _post(s, path, body)

    async def _close_when_the_loop_ends(self) -> None:
        try:
            await asyncio.get_running_loop().create_future()  # never done: only cancelled
        finally:
            if not self._closing:  # (one that began closes the clients in its own finally)
                await self.close()

    async def close(self) -> None:
        self._closing = True
        if self._guard is not None and self._guard is not asyncio.current_task():
            self._guard.cancel()
        try:
            if self._senders is not None:
                await self._senders.close()
            for s in self.servers:
                if s.wake_at is not None:
                    s.wake_at.cancel()
            tasks = [*self._probes, *([self._look] if self._look is not None else [])]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:  # a second Ctrl-C while the senders end, say: the clients are closed still
            for s in self.servers:
                await s.client.close()
                await s.poster.close()


def api_key_of(given: str | None) -> str | None:
    """--api-key, else $SELFINSTRUCT_API_KEY, else $OPENAI_API_KEY (what any OpenAI client reads):
    one order for every command that asks a server."""
    return given or os.environ.get("SELFINSTRUCT_API_KEY") or os.environ.get("OPENAI_API_KEY")


# Files a command keeps open beside its connections: its run files, the interpreter's imports,
# numba's cache, a sender's pipes.
FILES_BESIDE = 256


def room_for_connections(concurrency: int, servers: int, ends: int = 1) -> None:
    """Raise this process's soft limit on open files (``ulimit -n``) to what ``concurrency`` connections to
    each of ``servers`` need, up to its hard limit; past the hard limit, one line. Many distributions start a
    shell at 1,024, and vLLM's default --concurrency is 512 a server: two servers' connections ran out of
    file descriptors mid-run (a traceback, from an import that could not open its file). ``ends``: 2 where
    the server runs in this process too (the embedded teacher), so each connection is two open files."""
    try:
        import resource
    except ImportError:  # not on a Unix: no such limit to raise
        return
    files = concurrency * servers * ends
    need = files + FILES_BESIDE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        fits = (hard - FILES_BESIDE) // (servers * ends)
        both = " (both ends of each in this process, with the embedded teacher)" if ends == 2 else ""
        raise UserError(f"--concurrency {concurrency} on {servers} server{'s' if servers != 1 else ''} keeps "
                        f"{files} {'connections' if ends == 1 else 'sockets'} open{both}, which with {FILES_BESIDE} "
                        f"files of its own is {need} open files, and this system lets a process open {hard} "
                        f"(ulimit -Hn): " + (f"lower --concurrency to {fits} or less, or raise the limit" if fits >= 1
                                             else "raise the limit"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def make_client(url: str, api_key: str, timeout: float):
    """The openai client for one server's checks (GET /models, ``TeacherClient.check``: one request
    at a time, so its own pool does); its completions go through ``Poster``."""
    import openai

    # max_retries=0: every attempt comes back to our loop, so every fault is counted.
    try:  # (its transport reads the certificates now, whatever the URL's scheme)
        return openai.AsyncOpenAI(base_url=url, api_key=api_key, timeout=timeout, max_retries=0,
                                  http_client=openai.DefaultAioHttpClient(timeout=timeout))
    except OSError as e:
        raise UserError(f"cannot make the HTTP client for {url}: {certificates_problem(e)}") from None


def certificates_problem(e: OSError, environ=None) -> str:
    """What an OSError while loading the certificates says, naming SSL_CERT_FILE/SSL_CERT_DIR
    when one of them is set (the usual cause: a path that is not there).

    >>> certificates_problem(FileNotFoundError(2, "No such file"), {"SSL_CERT_FILE": "/etc/ca.pem"})
    '[Errno 2] No such file (the certificates from SSL_CERT_FILE=/etc/ca.pem)'
    """
    environ = os.environ if environ is None else environ
    given = [f"{name}={environ[name]}" for name in ("SSL_CERT_FILE", "SSL_CERT_DIR") if environ.get(name)]
    why = _one_line(e)
    return f"{why} (the certificates from {' and '.join(given)})" if given else why


async def _post(s: Server, path: str, body: dict) -> object:
    """POST ``body`` as JSON to ``path`` on ``s``; the reply's JSON as plain Python objects
    (``Poster.post``)."""
    return await s.poster.post(path, body)


class Poster:
    """A server's completions, POSTed over aiohttp directly rather than through the openai client.

    The openai client (``make_client``, still used for GET /models) spent 650-850 us of CPU a
    request building it and passing it down its httpx layer to the same aiohttp below: request
    options copied, headers merged, URLs parsed twice, an httpx Request and Response wrapped
    around aiohttp's. A POST straight to aiohttp takes about 250 us (bench/README.md), and the
    coordinator's loop is CPU-bound: that is a tenth of a candidate's cost in alpaca mode and most
    of it where each instruction makes requests of its own (self-instruct's follow-ups, respond,
    evolve, magpie).

    What the openai client did is kept: its aiohttp settings (a pool of ``connections``, the
    timeout for connecting, waiting for a connection and each read, proxies and certificates from
    the environment, no redirects), its headers' meaning, and what a failure is. Each failure is
    raised as the ``Fault`` that ``describe`` made of openai's exception for it: a non-2xx reply is
    ``http_<status>`` with openai's message ("Error code: 503 - <the error's message>") and its
    Retry-After; a refused or dropped connection is ``connection`` and a timeout ``timeout``, with
    aiohttp's own words, and ``reached`` False when it failed before a byte was sent; a 2xx whose
    body is not JSON is a ValueError (``malformed_response``), and one not labelled JSON is
    returned as its text, as openai's ``cast_to=object`` did.
    """

    def __init__(self, url: str, api_key: str, timeout: float, connections: int):
        self.url, self.timeout, self.connections = url.rstrip("/"), timeout, connections
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                        "Accept": "application/json", "User-Agent": f"selfinstruct/{_version()}"}
        # As the openai client sent them: an account's organization and project, from its variables.
        for header, name in (("OpenAI-Organization", "OPENAI_ORG_ID"), ("OpenAI-Project", "OPENAI_PROJECT_ID")):
            if os.environ.get(name):
                self.headers[header] = os.environ[name]
        self.session = None  # made in the running event loop, at the first request
        self.proxy: dict = {}  # the proxy from the environment, if any, as aiohttp's arguments

    def _session(self):
        if self.session is None:
            import aiohttp

            try:
                from httpx2 import create_ssl_context  # the openai client's httpx, from openai 3 on
            except ImportError:
                from httpx import create_ssl_context

            # As the openai client's transport: certifi's roots, or SSL_CERT_FILE/SSL_CERT_DIR; loaded
            # only for https (reading the roots is about 90 ms, a sender's whole start-up).
            tls = create_ssl_context(trust_env=True) if self.url.startswith("https:") else True
            connector = aiohttp.TCPConnector(limit=self.connections, ssl=tls)
            self.session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout,
                                              connect=self.timeout))
            self.proxy = _env_proxy(self.url)
        return self.session

    async def post(self, path: str, body: dict) -> object:
        import aiohttp

        data = json.dumps(body).encode()
        try:
            session = self._session()
        except OSError as e:  # out of file descriptors, or the certificates cannot be read
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise Fault(OUT_OF_FILES, out_of_files(e.strerror or str(e)), reached=False) from None
            why = certificates_problem(e)
            raise Fault("connection", f"cannot make the HTTP client: {why}", why, reached=False) from None
        try:
            async with session.post(self.url + path, data=data, headers=self.headers, allow_redirects=False,
                                    **self.proxy) as r:
                raw = await r.read()
                status, headers, kind = r.status, r.headers, r.content_type
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            if getattr(e, "errno", None) in (errno.EMFILE, errno.ENFILE):
                raise Fault(OUT_OF_FILES, out_of_files(e.strerror or str(e)), reached=False) from None
            timeout = isinstance(e, (TimeoutError, asyncio.TimeoutError))
            never_sent = isinstance(e, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
            words = _one_line(e) if str(e) else type(e).__name__
            raise Fault("timeout" if timeout else "connection", words, words, reached=not never_sent) from None
        if not 200 <= status < 300:
            words = _status_message(status, raw)
            raise Fault(f"http_{status}", words, words, status=status, retry_after=_retry_after(headers))
        if not kind.endswith("json"):
            return raw.decode("utf-8", "replace")
        try:
            return json.loads(raw)
        except ValueError as e:  # ("Expecting value: line 1 column 1" said nothing of what came)
            raise ValueError(f"the reply is not JSON ({e}): {_shown(raw.decode('utf-8', 'replace'))}") from None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


# A request this process could not make for want of a file descriptor (a connection is one): the
# Fault's kind, which stops the run (``_request``) rather than counting against the server.
OUT_OF_FILES = "out_of_files"


def out_of_files(why: str) -> str:
    """The one line for a process out of open files: its limit, and what to do (cli.py says the
    same of a file that could not be opened)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = "unlimited" if hard == resource.RLIM_INFINITY else hard
    return (f"out of open files: {why}; this process may open {soft} (ulimit -n; at most {hard}, ulimit -Hn): "
            "raise the limit, or lower --concurrency, and run the command again")


def _env_proxy(url: str) -> dict:
    """The proxy that HTTP(S)_PROXY (or ALL_PROXY) and NO_PROXY give for ``url``, as aiohttp's ``proxy``, read once:
    aiohttp's own ``trust_env`` reads them again on a worker thread for every request (a fifth of a
    request's CPU); the openai client read them once. Credentials stay in the URL: aiohttp sends
    them as Proxy-Authorization (tests/test_multi_server.py).
    """
    import urllib.request
    from urllib.parse import urlsplit

    host, proxies = urlsplit(url).hostname, urllib.request.getproxies()
    proxy = proxies.get(urlsplit(url).scheme) or proxies.get("all")  # ALL_PROXY, as httpx read it too
    if not proxy or (host and urllib.request.proxy_bypass(host)):
        return {}
    return {"proxy": proxy if "://" in proxy else f"http://{proxy}"}


def _status_message(status: int, raw: bytes) -> str:
    """openai's words for an error reply: its status, and the error's own message when the
    body is JSON with one (``{"error": {"message": ...}}`` or ``{"message": ...}``).

    >>> _status_message(503, b'{"error": {"message": "busy"}}'), _status_message(500, b"oops")
    ('Error code: 503 - busy', 'Error code: 500')
    """
    words = f"Error code: {status}"
    try:
        body = json.loads(raw)
    except ValueError:
        return words
    error = body.get("error", body) if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return _one_line(f"{words} - {message}") if isinstance(message, str) and message else words


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("selfinstruct")
    except PackageNotFoundError:
        return "dev"


def _first_choice(data: object, key: str) -> tuple[object, str | None, Usage, bool]:
    """``choices[0][key]``, its finish_reason, the usage of a completion's JSON, and whether that usage
    held a count no reply could have (``_usage``).

    A reply of any other shape (not JSON, no choices) is a ValueError, which the retry loop
    counts as ``malformed_response``.

    >>> _first_choice({"choices": [{"text": "Hi", "finish_reason": "stop"}],
    ...                "usage": {"prompt_tokens": 3, "completion_tokens": 1}}, "text")
    ('Hi', 'stop', Usage(prompt_tokens=3, completion_tokens=1), False)
    """
    if isinstance(data, str):  # a body not labelled JSON: a proxy's or web server's page, say
        raise ValueError(f"the reply is not JSON: {_shown(data)}")
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("the reply has no choices")
    choice = choices[0]
    finish = choice.get("finish_reason")
    usage = usage_counts(data.get("usage"))
    return choice.get(key), finish if isinstance(finish, str) else None, usage or Usage(), usage is None


# The most tokens one reply's usage may count, prompt or completion: no model's context holds more than
# about 10 million (Llama 4 Scout's), so a count ten times that is a server's error, not a reply. The bound
# also keeps the totals of 90 million replies exact (2**53) for a reader of stats.json whose numbers are doubles.
MOST_TOKENS = 10**8


def usage_counts(usage: object) -> Usage | None:
    """A reply's ``usage``: none given (absent or null, a key of it too) counts 0, and None when it holds
    a count no reply could have (negative, not a whole number, a string, above ``MOST_TOKENS``): a proxy's
    1e30 went into stats.json's totals as it was. Such a reply's usage is taken as missing, both counts,
    since neither can be trusted beside the other.

    >>> usage_counts({"prompt_tokens": 3, "completion_tokens": 2.0}), usage_counts(None), usage_counts({"prompt_tokens": 3})
    (Usage(prompt_tokens=3, completion_tokens=2), Usage(prompt_tokens=0, completion_tokens=0), Usage(prompt_tokens=3, completion_tokens=0))
    >>> [usage_counts({"completion_tokens": v}) for v in (1e30, -1, "12", 2.5, True, float("nan"))]
    [None, None, None, None, None, None]
    """
    if usage is None:
        return Usage()
    if not isinstance(usage, dict):
        return None
    counts = {}
    for name in ("prompt_tokens", "completion_tokens"):
        v = usage.get(name)
        if v is None:
            v = 0
        elif isinstance(v, float) and v.is_integer():  # 12.0 is a count still (1e30 too, till the bound)
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MOST_TOKENS:
            return None
        counts[name] = v
    return Usage(**counts)


def without_thinking(text: str) -> str:
    """A chat reply without the thinking a reasoning model wrote before its answer, as vLLM's reasoning
    parser would have moved it to ``reasoning_content``: a server run without one (DeepSeek-R1, Qwen3, QwQ)
    leaves it in the content, and every answer was rejected for its ``<think>`` (``filters.thinking``).
    Only a block that opens the reply: a leading ``<think>...</think>``, or thinking closed by a
    ``</think>`` with no ``<think>`` before it (an R1 template opens the block in the prompt). A block
    never closed (the thinking took every token) leaves no answer. A tag elsewhere is left for the filter.

    >>> without_thinking("<think>\\nThe user wants France.\\n</think>\\n\\nParis."), without_thinking("Okay.\\n</think>\\nParis.")
    ('Paris.', 'Paris.')
    >>> without_thinking("<think>\\nLet me count the"), without_thinking("Use <think> tags.")
    ('', 'Use <think> tags.')
    """
    low = text.lower()
    end = low.find("</think>")
    if low.lstrip().startswith("<think>"):
        return "" if end < 0 else text[end + len("</think>"):].lstrip()
    if end >= 0 and "<think>" not in low[:end]:
        return text[end + len("</think>"):].lstrip()
    return text


def _text(value: object) -> str | None:
    """A reply's text, or None when it is not a string. JSON may carry a lone surrogate
    (``"\\ud800"``), which no file can hold as UTF-8: it becomes U+FFFD, as a broken byte would.
    Windows line endings become newlines: the CR left in a multi-line output is a control
    character, which would reject the task.

    >>> _text("caf\\u00e9") == "caf\\u00e9", _text("a\\ud800b") == "a\\ufffdb", _text(7), _text("a\\r\\nb")
    (True, True, None, 'a\\nb')
    """
    if not isinstance(value, str):
        return None
    value = value.replace("\r\n", "\n")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def _shown(body: str) -> str:
    """The start of a reply that is not JSON, on one line, for the fault's message.

    >>> _shown("<html>\\n<h1>Welcome to nginx!</h1>")
    "'<html> <h1>Welcome to nginx!</h1>'"
    """
    return repr(" ".join(body.split())[:80]) if body.strip() else "an empty body"


def _cause(exc: BaseException) -> BaseException:
    """The httpx error behind an openai connection error ('Connection error.' says nothing)."""
    return exc.__cause__ if exc.__cause__ is not None and str(exc.__cause__) else exc


def request_seed(base: int, prompt: str, purpose: str, attempt: int) -> int:
    """The sampling seed of one attempt: fixed by (base, prompt, purpose, attempt).

    One seed for every request would make a retry after a malformed reply ask for
    the very same tokens again; this keeps reruns reproducible and retries fresh.

    >>> request_seed(0, "p", "tasks", 0) == request_seed(0, "p", "tasks", 0) != request_seed(0, "p", "tasks", 1)
    True
    """
    digest = hashlib.blake2b(f"{base}\0{purpose}\0{attempt}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 2**31


def _retry_after(headers) -> float | None:
    """Seconds a 429/503 asks us to wait (Retry-After in seconds, or retry-after-ms), capped at 60.

    >>> _retry_after({"retry-after": "1"}), _retry_after({"retry-after-ms": "250"}), _retry_after({})
    (1.0, 0.25, None)
    """
    for name, scale in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            return min(60.0, max(0.0, float(headers.get(name)) / scale))
        except (TypeError, ValueError):
            continue
    return None  # absent, or an HTTP date: our backoff decides


def _one_line(exc: BaseException | str | None) -> str:
    return " ".join(str(exc).split())[:300] if exc else "unknown error"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
