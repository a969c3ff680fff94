"""Many teacher servers at once: spreading, health, preflight, replicas (quick, no model).

Every server is a real process on 127.0.0.1: ``bench/instant_server.py`` (an OpenAI-compatible
server that answers at once, or after ``--latency``), started and killed by the test.
``generate`` runs as a child process too, as a user would run it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import GENERATE, FakeTeacher, lines, one_error_line, verify_run
from test_servers import assert_all_gone

from selfinstruct.config import UserError
from selfinstruct.records import Response

ROOT = Path(__file__).resolve().parents[1]
INSTANT = ROOT / "bench" / "instant_server.py"
KEY = "test-key-123"


class Instant:
    """One bench/instant_server.py process; ``kill()`` is SIGKILL, ``start()`` again reuses the port."""

    def __init__(self, *args: str, key: str = KEY):
        self.args, self.key, self.port = list(args), key, 0
        self.proc = None
        self.start()

    def start(self) -> "Instant":
        self.proc = subprocess.Popen([sys.executable, str(INSTANT), f"--key={self.key}", "--port", str(self.port),
                                      *self.args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.base_url = self.proc.stdout.readline().decode().strip()
        assert self.base_url.startswith("http://127.0.0.1:"), self.proc.stderr.read().decode()
        self.port = int(self.base_url.rsplit(":", 1)[1].split("/")[0])
        return self

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def served(self) -> int:
        """Stop it (SIGTERM) and return how many requests it says it served."""
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=10)
        return int(err.decode().split("served ")[1].split()[0])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()


@pytest.fixture
def servers():
    started: list[Instant] = []

    def make(n: int, *args: str, key: str = KEY) -> list[Instant]:
        new = [Instant(*args, key=key) for _ in range(n)]
        started.extend(new)
        return new

    yield make
    for s in started:
        s.close()


def args_for(urls: list[str], out: Path, num: int, *more: str) -> list[str]:
    return [*GENERATE, "--base-url", *urls, "--model", "instant", "--out", str(out), "--num", str(num),
            "--tasks-per-request", "2", "--no-progress", "--no-fsync", *more]


def run(cmd: list[str], key: str = KEY, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env={**os.environ, "SELFINSTRUCT_API_KEY": key}, capture_output=True, timeout=timeout)


def start(cmd: list[str], key: str = KEY) -> subprocess.Popen:
    return subprocess.Popen(cmd, env={**os.environ, "SELFINSTRUCT_API_KEY": key},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, limit: float = 60) -> int:
    """Wait until ``path`` holds at least n lines (while ``proc`` runs); returns the count."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        count = path.read_bytes().count(b"\n") if path.exists() else 0
        if count >= n:
            return count
        time.sleep(0.02)
    raise AssertionError(f"{path.name} did not reach {n} lines: {proc.poll()=}")


def wait_for_stderr(proc: subprocess.Popen, text: str, limit: float = 60) -> bytes:
    """Read ``proc``'s stderr until ``text`` appears; returns what was read."""
    import select

    got, deadline = b"", time.monotonic() + limit
    while text.encode() not in got:
        assert time.monotonic() < deadline and proc.poll() is None, got.decode()[-2000:]
        if select.select([proc.stderr], [], [], 0.2)[0]:
            got += os.read(proc.stderr.fileno(), 65536)
    return got


def servers_of(out: Path) -> list[str]:
    """The server of each logged reply, in the order they were logged."""
    return [r["server"] for o in lines(out / "responses.jsonl") for r in o["replies"]]


# ------------------------------------------------------------ spreading and health


@pytest.mark.parametrize("senders", [[], ["--client-processes", "2"]], ids=["in-process", "senders"])
def test_a_server_killed_mid_run_is_taken_out_and_the_others_finish_the_run(tmp_path, servers, senders):
    a, b, c = servers(3, "--latency", "0.3", "--tasks", "2")
    out = tmp_path / "run"
    proc = start(args_for([a.base_url, b.base_url, c.base_url], out, 100, "--concurrency", "2", *senders))
    wait_for_lines(out / "responses.jsonl", 8, proc)
    b.kill()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    stats = verify_run(out, 100)  # every candidate of every logged reply is kept or rejected, once

    per = stats["servers"]
    assert list(per) == [a.base_url, b.base_url, c.base_url]
    assert all(per[u]["requests"] > 0 for u in per)
    assert per[b.base_url]["taken_out"] >= 1 and per[b.base_url]["faults"].get("connection", 0) >= 1
    assert per[a.base_url]["taken_out"] == per[c.base_url]["taken_out"] == 0
    # The per-server figures add up to the run's.
    assert sum((Counter(s["faults"]) for s in per.values()), Counter()) == Counter(stats["faults"])
    assert sum(s["completion_tokens"] for s in per.values()) == stats["completion_tokens"]
    assert sum(s["prompt_tokens"] for s in per.values()) == stats["prompt_tokens"]
    # Each reply and kept record names the server that wrote it; the dead one stopped early.
    served = Counter(servers_of(out))
    assert set(served) == {a.base_url, b.base_url, c.base_url}
    assert served[b.base_url] < min(served[a.base_url], served[c.base_url])
    assert {o["provenance"]["base_url"] for o in lines(out / "kept.jsonl")} == set(served)
    assert f"{b.base_url} taken out of service (connection" in stderr.decode()


def test_requests_go_to_the_server_with_the_fewest_in_flight(tmp_path, servers):
    even = servers(3, "--latency", "0.05", "--tasks", "2")
    out = tmp_path / "even"
    r = run(args_for([s.base_url for s in even], out, 40, "--concurrency", "2"))
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    stats = verify_run(out, 40)
    requests = [stats["servers"][s.base_url]["requests"] for s in even]
    assert min(requests) >= 0.25 * sum(requests), requests
    # A slow server holds its --concurrency requests; the fast one serves the rest.
    slow, = servers(1, "--latency", "0.5", "--tasks", "2")
    fast, = servers(1, "--latency", "0.01", "--tasks", "2")
    out = tmp_path / "uneven"
    r = run(args_for([slow.base_url, fast.base_url], out, 60, "--concurrency", "2"))
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    per = verify_run(out, 60)["servers"]
    assert per[fast.base_url]["requests"] >= 4 * per[slow.base_url]["requests"] > 0, per


def test_a_server_that_comes_back_is_used_again(tmp_path, servers):
    a, b = servers(2, "--latency", "0.4", "--tasks", "2")
    out = tmp_path / "run"
    proc = start(args_for([a.base_url, b.base_url], out, 60, "--concurrency", "1"))
    wait_for_lines(out / "responses.jsonl", 4, proc)
    b.kill()
    seen = wait_for_stderr(proc, f"{b.base_url} taken out of service")
    restarted_at = wait_for_lines(out / "responses.jsonl", 1, proc)
    b.start()  # same port, same key
    stdout, stderr = proc.communicate(timeout=120)
    stderr = seen + stderr
    assert proc.returncode == 0, stderr.decode()[-3000:]
    verify_run(out, 60)
    per = json.loads((out / "stats.json").read_text())["servers"]
    assert per[b.base_url]["taken_out"] >= 1
    # Replies logged after the restart that came from b: only the new process can have written them.
    after = servers_of(out)[restarted_at:]
    assert after.count(b.base_url) > 0, Counter(after)
    assert b.served() >= after.count(b.base_url)  # its own count: probes and those replies
    assert f"{b.base_url} answers again; back in service" in stderr.decode()


def test_when_no_server_is_left_for_timeout_seconds_the_run_stops_with_one_line(tmp_path, servers):
    a, b = servers(2, "--latency", "0.1", "--tasks", "2")
    out = tmp_path / "run"
    proc = start(args_for([a.base_url, b.base_url], out, 1000, "--concurrency", "2", "--timeout", "2"))
    wait_for_lines(out / "responses.jsonl", 3, proc)
    a.kill()
    b.kill()
    t0 = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    line = one_error_line(stderr)
    assert "no teacher server has answered for 2 s (--timeout)" in line and a.base_url in line and b.base_url in line
    assert time.monotonic() - t0 < 20
    for name in ("responses.jsonl", "kept.jsonl", "rejected.jsonl", "errors.jsonl"):
        lines(out / name)  # whole lines only: the folder resumes
    stats = json.loads((out / "stats.json").read_text())
    assert stats["servers"][a.base_url]["taken_out"] == stats["servers"][b.base_url]["taken_out"] == 1


# ------------------------------------------------------------------ preflight


def test_an_unreachable_teacher_is_one_line_in_seconds_and_costs_no_request(tmp_path, servers):
    out = tmp_path / "run"
    t0 = time.monotonic()
    r = run(args_for(["http://127.0.0.1:1/v1"], out, 100, "--max-requests", "3"))
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "the teacher at http://127.0.0.1:1/v1 cannot be reached (connection" in line
    assert time.monotonic() - t0 < 30  # interpreter start included; it used to take 110 s
    assert not any((out / n).exists() and (out / n).read_bytes() for n in ("responses.jsonl", "errors.jsonl"))
    # Resumed with the right URL, the run makes all the requests it may.
    s, = servers(1, "--tasks", "2")
    r = run(args_for([s.base_url], out, 100, "--max-requests", "3"))
    assert r.returncode == 1, r.stderr.decode()[-3000:]  # --num not reached within 3 prompts
    assert len(lines(out / "responses.jsonl")) == 3


def test_a_wrong_key_or_model_is_one_line_naming_it(tmp_path, servers):
    s, = servers(1)
    r = run(args_for([s.base_url], tmp_path / "key", 10), key="not-the-key")
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert f"the teacher at {s.base_url} refused the request (http_401): the API key is wrong" in line
    cmd = args_for([s.base_url], tmp_path / "model", 10)
    cmd[cmd.index("instant")] = "llama-9000"
    r = run(cmd)
    assert r.returncode == 2
    assert "does not serve model 'llama-9000' (it serves: instant)" in one_error_line(r.stderr)
    r = run(args_for([s.base_url.removesuffix("/v1")], tmp_path / "path", 10))
    assert r.returncode == 2
    assert "It usually ends in /v1" in one_error_line(r.stderr)
    root = s.base_url.removesuffix("v1")  # as a browser's address bar gives it: 'http://127.0.0.1:PORT/'
    r = run(args_for([root], tmp_path / "slash", 10))
    assert r.returncode == 2  # (it said 'has no http://127.0.0.1:PORT//models')
    assert f"the teacher at {root} has no {root}models (http_404)" in one_error_line(r.stderr), r.stderr.decode()


def test_a_server_failing_the_preflight_is_reported_and_the_others_run(tmp_path, servers):
    s, = servers(1, "--tasks", "2")
    out = tmp_path / "run"
    r = run(args_for([s.base_url, "http://127.0.0.1:1/v1"], out, 10, "--timeout", "5"))
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert "http://127.0.0.1:1/v1 taken out of service (cannot be reached" in r.stderr.decode()
    per = verify_run(out, 10)["servers"]
    assert per["http://127.0.0.1:1/v1"] == {"requests": 0, "faults": {}, "prompt_tokens": 0,
                                            "completion_tokens": 0, "taken_out": 1}
    assert per[s.base_url]["requests"] >= 5


def test_a_hung_server_beside_one_that_passes_holds_the_preflight_a_few_seconds_not_its_timeout(servers):
    """A server stopped (SIGSTOP: the kernel still accepts its connections) beside one that passed: every
    start waited for its GET /models to time out, min(--timeout, 30) s, before the first prompt."""
    import asyncio

    from selfinstruct import teacher

    good, hung = servers(2)
    os.kill(hung.proc.pid, signal.SIGSTOP)

    async def scene():
        t = teacher.TeacherClient(base_url=[good.base_url, hung.base_url], api_key=KEY, model="instant",
                                  sampling={}, timeout=60)
        try:
            t0 = time.monotonic()
            problems = await t.check_all()
            return problems, time.monotonic() - t0
        finally:
            await t.close()

    try:
        problems, took = asyncio.run(scene())
    finally:
        os.kill(hung.proc.pid, signal.SIGCONT)
    assert problems == {good.base_url: None,
                        hung.base_url: f"did not answer GET /models within {teacher.LAST_LOOK_S:g} s of another server"}
    assert took < 20, took  # (30 s before)


def test_prompts_that_never_reached_a_server_do_not_use_up_max_requests(tmp_path, servers):
    s, = servers(1, "--tasks", "2")
    out = tmp_path / "run"
    r = run(args_for([s.base_url], out, 100, "--max-requests", "2"))
    assert r.returncode == 1 and len(lines(out / "responses.jsonl")) == 2
    with open(out / "errors.jsonl", "a") as f:  # as a run whose server went away leaves them
        f.write(json.dumps({"index": 2, "kind": "connection", "message": "refused", "at": "", "reached": False}) + "\n")
        f.write(json.dumps({"index": 3, "kind": "http_500", "message": "boom", "at": "", "reached": True}) + "\n")
    r = run(args_for([s.base_url], out, 100, "--max-requests", "5"))
    assert r.returncode == 1
    # 5 = 2 answered + 1 that reached a server and failed + 2 new; the unreached one is not counted.
    assert len(lines(out / "responses.jsonl")) == 4
    assert s.served() == 2 + 4  # two preflights (GET /models) and the 4 prompts


# Each test of how a failed attempt is read runs twice: requests sent from this process, and from
# a sender process (--client-processes), which must describe every fault the same way.
SENDERS = pytest.mark.parametrize("client_processes", [0, 1], ids=["in-process", "sender"])


@SENDERS
def test_reached_says_whether_any_attempt_got_to_a_server(client_processes):
    import asyncio

    from selfinstruct.teacher import TeacherClient, TeacherError

    async def attempt():
        t = TeacherClient(base_url="http://127.0.0.1:1/v1", api_key="k", model="m", sampling={}, max_retries=1,
                          client_processes=client_processes)
        try:
            await t.complete("hi", "tasks")
        finally:
            await t.close()

    with pytest.raises(TeacherError) as e:
        asyncio.run(attempt())
    assert e.value.kind == "connection" and e.value.reached is False


async def failed_request(handle, **client) -> tuple:
    """One chat request (and one retry) against a raw socket server on 127.0.0.1 whose
    connections ``handle`` serves; returns the TeacherError it must end in and the faults."""
    import asyncio

    from selfinstruct.teacher import TeacherClient, TeacherError

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    t = TeacherClient(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", model="m", sampling={}, max_retries=1,
                      **client)
    try:
        with pytest.raises(TeacherError) as e:
            await t.complete("hi", "tasks")
    finally:
        await t.close()
        server.close()
    return e.value, t.faults


@SENDERS
@pytest.mark.parametrize("server_does, kind", [("drop", "connection"), ("hang", "timeout")])
def test_a_dropped_connection_and_a_timeout_are_told_apart(server_does, kind, client_processes):
    """A server on 127.0.0.1 that reads the request, then closes the socket (or never answers).

    The openai client's aiohttp transport calls any dropped connection a ConnectTimeout: the
    stats must still say 'connection' for the one and 'timeout' for the other, and both
    requests reached the server (they count against --max-requests).
    """
    import asyncio

    async def attempt():
        arrived = []

        async def handle(reader, writer):
            arrived.append(await reader.readuntil(b"\r\n\r\n"))
            if server_does == "drop":
                writer.close()
            else:
                await asyncio.sleep(30)

        error, faults = await failed_request(handle, timeout=0.5, client_processes=client_processes)
        return error, faults, arrived

    error, faults, arrived = asyncio.run(attempt())
    assert len(arrived) == 2 and arrived[0].startswith(b"POST /v1/")  # the first try and one retry
    assert error.kind == kind and error.reached is True
    assert faults == Counter({kind: 2})


@SENDERS
def test_every_request_in_flight_reaches_the_server_past_the_openai_clients_1000_connections(client_processes):
    """--concurrency goes up to 4096 a server (vLLM's default is twice its --max-num-seqs), but the
    openai client's connection pool stops at 1,000 by default: the rest waited inside the client, on
    the clock of their --timeout, while the server had free slots. A server on 127.0.0.1 holds each
    request until all have come (or 10 s have passed) and counts how many it held at once."""
    import asyncio
    import re

    n = 1100
    body = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()

    async def scene():
        from selfinstruct.teacher import TeacherClient

        held, most, connections = 0, 0, 0
        all_came = asyncio.Event()

        async def handle(reader, writer):
            nonlocal held, most, connections
            connections += 1
            try:
                while True:  # keep-alive: requests one after another on this connection
                    head = await reader.readuntil(b"\r\n\r\n")
                    await reader.readexactly(int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)))
                    held += 1
                    most = max(most, held)
                    if held >= n:
                        all_came.set()
                    try:
                        await asyncio.wait_for(all_came.wait(), 10)
                    except asyncio.TimeoutError:
                        pass
                    held -= 1
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=2 * n)
        port = server.sockets[0].getsockname()[1]
        t = TeacherClient(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", model="m", sampling={},
                          concurrency=n, timeout=60, max_retries=0, client_processes=client_processes)
        try:
            replies = await asyncio.gather(*(t.complete("hi", "tasks") for _ in range(n)))
        finally:
            await t.close()
            server.close()
        return replies, most, connections

    replies, most, connections = asyncio.run(scene())
    assert [r.text for r in replies] == ["ok"] * n
    assert most == n and connections == n


def with_open_files(soft: int, hard: int | None = None):
    """A preexec_fn that sets the child's limit on open files (ulimit -n), soft and hard."""
    import resource

    def set_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard or resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    return set_limit


def test_a_low_soft_limit_on_open_files_is_raised_to_what_concurrency_holds_open(tmp_path, servers):
    """Many distributions start a shell at ulimit -n 1024, and vLLM's default --concurrency is 512
    a server: two servers' connections ran out of file descriptors mid-run (a traceback, rc 1, from
    an import that could not open its file). Up to the hard limit, the run raises its own."""
    s, = servers(1, "--latency", "0.5", "--tasks", "2")
    out = tmp_path / "run"
    r = subprocess.run(args_for([s.base_url], out, 400, "--concurrency", "300"), capture_output=True, timeout=120,
                       env={**os.environ, "SELFINSTRUCT_API_KEY": KEY}, preexec_fn=with_open_files(256))
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    stats = verify_run(out, 400)
    assert stats["faults"] == {} and stats["servers"][s.base_url]["requests"] >= 300


def test_a_hard_limit_on_open_files_below_what_concurrency_holds_open_is_one_line(tmp_path, servers):
    s, = servers(1, "--tasks", "2")
    out = tmp_path / "run"
    r = subprocess.run(args_for([s.base_url, "http://127.0.0.1:9/v1"], out, 10, "--concurrency", "300"),
                       capture_output=True, timeout=120, env={**os.environ, "SELFINSTRUCT_API_KEY": KEY},
                       preexec_fn=with_open_files(400, 500))
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert one_error_line(r.stderr).endswith(
        "--concurrency 300 on 2 servers keeps 600 connections open, which with 256 files of its own is 856 open "
        "files, and this system lets a process open 500 (ulimit -Hn): lower --concurrency to 122 or less, or "
        "raise the limit")
    assert not (out / "responses.jsonl").exists()


def test_the_embedded_teacher_counts_two_open_files_a_connection():
    """Its server runs in the generate process, so each connection is a socket at each end: the check
    counted one, passed at 956 of 1024, and the run ran out of file descriptors (nothing kept)."""
    code = ("import resource; from selfinstruct.generate import GenerateOptions, room_for_the_teacher; "
            "room_for_the_teacher(GenerateOptions(out='r', concurrency=200), 'embedded'); "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, preexec_fn=with_open_files(300, 5000))
    assert r.returncode == 0 and int(r.stdout) == 2 * 200 + 256, r.stderr.decode()[-2000:]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, preexec_fn=with_open_files(300, 600))
    assert r.returncode == 1 and "keeps 400 sockets open (both ends of each in this process, with the embedded " \
        "teacher)" in r.stderr.decode() and "lower --concurrency to 172 or less" in r.stderr.decode()


def test_too_few_open_files_for_vllm_replicas_is_said_before_any_starts(tmp_path, fake_vllm):
    """The check came when the client was made, after every replica had loaded (minutes on a GPU)."""
    out = tmp_path / "run"
    r = subprocess.run(vllm_cmd(fake_vllm, out, 3, "--concurrency", "512"), capture_output=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"},
                       preexec_fn=with_open_files(1024, 1024))
    assert r.returncode == 2
    assert one_error_line(r.stderr).endswith("--concurrency 512 on 3 servers keeps 1536 connections open, which with "
                                             "256 files of its own is 1792 open files, and this system lets a process "
                                             "open 1024 (ulimit -Hn): lower --concurrency to 256 or less, or raise the "
                                             "limit")
    assert replicas(fake_vllm) == [] and not out.exists()


def test_respond_checks_open_files_for_its_own_concurrency_before_its_folder_is_made(tmp_path, servers):
    """respond's server check made its client with the default 8 a server: --concurrency 4 on three servers
    was refused at a limit it fits in, and a --concurrency past the limit was refused only after the run
    folder was written (and counted as a session)."""
    good = servers(3, "--tasks", "2")
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"Name {n} colours of the sea."}) + "\n" for n in range(2, 7)))
    urls = [u for s in good for u in ("--base-url", s.base_url)]

    def respond(out: Path, concurrency: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "selfinstruct.cli", "respond", str(src), "--out", str(out), *urls,
                               "--model", "instant", "--concurrency", str(concurrency), "--no-progress"],
                              capture_output=True, timeout=120, env={**os.environ, "SELFINSTRUCT_API_KEY": KEY},
                              preexec_fn=with_open_files(275, 275))

    r = respond(tmp_path / "fits", 4)  # 3 x 4 + 256 = 268 of 275 (3 x 8 + 256 = 280 was refused)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert len(lines(tmp_path / "fits" / "kept.jsonl")) + len(lines(tmp_path / "fits" / "rejected.jsonl")) == 5
    r = respond(tmp_path / "past", 100)
    assert r.returncode == 2 and "--concurrency 100 on 3 servers keeps 300 connections open" in r.stderr.decode()
    assert not (tmp_path / "past").exists()


# A server whose GET /v1/models passes (the preflight lets it in) and whose every completion fails at
# once: with STATUS, or with a 200 that is not JSON (STATUS 200). It prints its base URL, then serves.
FAILING_SERVER = r"""
import asyncio, json, sys
status = int(sys.argv[1])
models = json.dumps({"object": "list", "data": [{"id": "instant", "object": "model"}]}).encode()

async def handle(reader, writer):
    try:
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            length = next((int(l.split(":", 1)[1]) for l in head.split("\r\n") if l.lower().startswith("content-length:")), 0)
            await reader.readexactly(length)
            code, body, more = (200, models, "") if " /v1/models " in head.split("\r\n")[0] else (
                (200, b"not json", "") if status == 200 else
                (status, b'{"error": {"message": "no"}}', "Retry-After: 1\r\n" if status == 429 else ""))
            writer.write(f"HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                         f"{more}\r\n".encode() + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


@contextlib.contextmanager
def failing_server(tmp_path, status: int):
    """A FAILING_SERVER answering ``status`` on 127.0.0.1 while the block runs; its base URL."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING_SERVER)
    bad = subprocess.Popen([sys.executable, str(script), str(status)], stdout=subprocess.PIPE)
    try:
        yield bad.stdout.readline().decode().strip()
    finally:
        bad.kill()
        bad.wait()


def run_beside_a_failing_server(tmp_path, servers, status: int, latency: str, out: Path, num: int):
    """generate to ``num`` on two instant servers (replies held ``latency`` s) with a FAILING_SERVER
    answering ``status`` between them; its result and the failing server's URL."""
    good = servers(2, "--latency", latency, "--tasks", "2")
    with failing_server(tmp_path, status) as url:
        return run(args_for([good[0].base_url, url, good[1].base_url], out, num, "--concurrency", "4")), url


@pytest.mark.parametrize("status", [400, 401, 429, 200], ids=["400", "401", "429", "not-json"])
def test_a_server_that_fails_every_request_at_once_does_not_fail_the_run_or_draw_its_work(tmp_path, servers, status):
    """Each request goes to the server with the fewest in flight, and one that fails at once always has
    fewest: one such server among two good ones drew most requests (a 400 or 429 server failed 43-85% of
    respond's rows), a 400 was not tried on another server (one replica with a smaller --max-model-len),
    and a 401 from one server mid-run stopped the whole run. A server whose requests fail is passed over
    for a while, longer at each fault in a row; a request it refused goes to another; a 401 takes it out."""
    out = tmp_path / "run"
    r, url = run_beside_a_failing_server(tmp_path, servers, status, "0.05", out, 200)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    stats = verify_run(out, 200)
    assert not (out / "errors.jsonl").exists() or not lines(out / "errors.jsonl")  # no prompt failed
    per = stats["servers"]
    assert per[url]["requests"] <= 0.1 * sum(p["requests"] for p in per.values()), per
    if status == 401:
        assert per[url]["taken_out"] >= 1 and f"{url} taken out of service (http_401" in r.stderr.decode()


def test_a_server_that_answers_only_junk_stops_the_run_in_one_line(tmp_path):
    """A server whose GET /models passes and whose every completion is not JSON (a proxy's page, a
    reasoning parser that leaves no content): each prompt was retried for 15 s, until --max-requests, so
    --num 100 ran half an hour to make nothing. Twelve such replies and none usable stop the run, naming
    the server and the last reply; what was asked is in errors.jsonl."""
    with failing_server(tmp_path, 200) as url:
        out = tmp_path / "run"
        t0 = time.monotonic()
        r = run(args_for([url], out, 100, "--concurrency", "8"))
        took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr.decode()[-3000:]
    assert one_error_line(r.stderr).startswith(f"selfinstruct generate: error: the teacher at {url} gives no usable "
                                               "reply (unusable): 12 replies and none usable, the last: the reply is "
                                               "not JSON"), one_error_line(r.stderr)
    assert lines(out / "errors.jsonl") and not lines(out / "kept.jsonl")
    assert took < 60, took  # (each prompt alone retries for about 15 s; --max-requests is 1,000 prompts)


def test_a_server_whose_models_pass_and_every_completion_is_a_503_stops_the_run_after_the_timeout(tmp_path):
    """Its GET /models passed, so each probe put it back in service, and the --timeout count began anew
    each time: every prompt failed its retries into errors.jsonl, 9 in 90 s, until --max-requests (1,000
    prompts: hours) with nothing made. Put back, it must give a reply before the count starts over."""
    with failing_server(tmp_path, 503) as url:
        out = tmp_path / "run"
        t0 = time.monotonic()
        r = run(args_for([url], out, 100, "--concurrency", "4", "--timeout", "2"), timeout=120)
        took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr.decode()[-3000:]
    said = r.stderr.decode()
    # Above it, a line at each time it was taken out and put back.
    assert said.splitlines()[-1] == (f"selfinstruct generate: error: the teacher has not answered for 2 s (--timeout): "
                                     f"{url} (http_503: Error code: 503 - no)"), said[-3000:]
    assert said.count("error:") == 1 and "Traceback" not in said
    # Probed 0.5 s, then 1 s after each time it failed again, not every 0.5 s: twice and the last look.
    assert said.count("answers again; back in service") <= 3, said[-3000:]
    assert not lines(out / "kept.jsonl")
    assert took < 60, took


@pytest.mark.parametrize("raw", [False, True], ids=["chat", "raw"])
def test_a_junk_servers_line_names_the_endpoint_that_gave_junk(tmp_path, raw):
    """magpie's queries go to /v1/completions: a server giving junk there was told to check that it
    answers chat completions, which it may well do. The line names the endpoint asked."""
    import asyncio

    from selfinstruct.teacher import JUNK_LIMIT, TeacherClient, TeacherError

    with failing_server(tmp_path, 200) as url:

        async def ask() -> TeacherError:
            # One attempt a request (no backoff between them): the junk replies count over requests.
            t = TeacherClient(base_url=url, api_key="k", model="instant", sampling={}, max_retries=0, concurrency=1)
            try:
                for _ in range(JUNK_LIMIT):
                    try:
                        await (t.complete_raw("Hi", "query") if raw else t.complete("Hi", "tasks"))
                    except TeacherError as e:
                        if e.kind == "unusable":
                            return e
            finally:
                await t.close()
            raise AssertionError("never taken for unusable")

        e = asyncio.run(ask())
    assert str(e).endswith("raw completions (/v1/completions)" if raw else "it answers chat completions"), str(e)


# ------------------------------------------------------------------ config


def test_base_urls_from_yaml_a_list_or_one_string_and_repeated_flags(tmp_path, servers):
    import argparse

    from selfinstruct.generate import GenerateOptions, add_arguments

    a, b = servers(2, "--latency", "0.05", "--tasks", "2")
    config = tmp_path / "run.yaml"
    config.write_text(f"base_url: [{a.base_url}, {b.base_url}]\nmodel: instant\nconcurrency: 1\n")
    out = tmp_path / "run"
    r = run([*GENERATE, "--config", str(config), "--out", str(out), "--num", "20", "--tasks-per-request", "2",
             "--no-progress"])
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    per = verify_run(out, 20)["servers"]
    assert set(per) == {a.base_url, b.base_url} and all(v["requests"] > 0 for v in per.values())

    # The same server given again with a trailing slash (or another case of host) is one server, not
    # two with --concurrency each: every request and the stats go to it under its first spelling.
    again = tmp_path / "again"
    # So is it at localhost for 127.0.0.1 (they were two servers, two rows of stats, twice the requests at once).
    localhost = a.base_url.replace("127.0.0.1", "LocalHost")
    r = run([*GENERATE, "--base-url", a.base_url, a.base_url + "/", localhost,
             "--model", "instant", "--concurrency", "1", "--out", str(again), "--num", "4",
             "--tasks-per-request", "2", "--no-progress"])
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert set(verify_run(again, 4)["servers"]) == {a.base_url}

    assert GenerateOptions(out="x", base_url="http://h:1/v1").base_url == ["http://h:1/v1"]
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--base-url", "A", "--base-url", "B", "C"]).base_url == ["A", "B", "C"]


def test_one_server_spelled_two_ways_in_two_sessions_is_one_row_of_stats(tmp_path, servers):
    """A resume with a trailing slash (or a capital in the host) added a second row for the same server
    to stats.json's servers, its tokens split between them."""
    a, = servers(1, "--tasks", "2")
    out = tmp_path / "run"
    for url, num in ((a.base_url, 6), (a.base_url + "/", 12)):
        r = run(args_for([url], out, num, "--concurrency", "1"))
        assert r.returncode == 0, r.stderr.decode()[-3000:]
    stats = verify_run(out, 12)
    assert list(stats["servers"]) == [a.base_url]
    one = stats["servers"][a.base_url]
    assert one["completion_tokens"] == stats["completion_tokens"] and one["prompt_tokens"] == stats["prompt_tokens"]
    assert one["requests"] == stats["replies"]


@pytest.mark.parametrize("command", ["generate", "respond", "audit"])
@pytest.mark.parametrize("given, said", [
    ("http://127.0.0.1:9/v1\r", "holds U+000D, which no URL has (a line end from a file saved on Windows?)"),
    ("http://127.0.0.1:9/v1\t", "holds U+0009, which no URL has"),
    ("http://127.0.0.1:9/v1 http://127.0.0.1:10/v1", "holds 2 URLs in one string; give each its own --base-url"),
    ("http://127.0.0.1:9/v1,http://127.0.0.1:10/v1", "holds 2 URLs in one string; give each its own --base-url"),
])
def test_a_base_url_with_a_line_end_or_two_urls_in_it_is_one_line(tmp_path, command, given, said):
    """A trailing CR (a script saved on Windows) or a tab was dropped by the URL parser and then refused by
    the HTTP client with a traceback; two URLs in one string were one server 'without /models'."""
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps({"instruction": "Name a colour.", "output": "Blue."}) + "\n")
    out = tmp_path / "out"
    argv = {"generate": ["generate", "--out", str(out)], "respond": ["respond", str(src), "--out", str(out)],
            "audit": ["audit", str(src), "--judge"]}[command]
    r = run([sys.executable, "-m", "selfinstruct.cli", *argv, "--base-url", given, "--model", "m", "--no-progress"]
            if command != "audit" else [sys.executable, "-m", "selfinstruct.cli", *argv, "--base-url", given,
                                        "--model", "m"])
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert said in err and not out.exists()


# ------------------------------------------------------------------ vLLM replicas

# A fake `vllm`: notes its argv, pid and CUDA_VISIBLE_DEVICES, then becomes an instant server
# that wants the key and serves the model name it was given, as `vllm serve` would.
FAKE_VLLM = f"""
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
opt = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
here = Path(__file__).parent
if "FAKE_VLLM_FAIL_ONE" in os.environ:
    try:
        os.close(os.open(here / "first", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        print("RuntimeError: fake replica failed to start", file=sys.stderr, flush=True)
        sys.exit(3)
(here / f"replica-{{opt['port']}}.json").write_text(json.dumps(
    {{"argv": args, "pid": os.getpid(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}}))
os.execv(sys.executable, [sys.executable, {str(INSTANT)!r}, "--port", opt["port"], "--key=" + opt["api-key"],
                          "--model", opt.get("served-model-name", args[1]), "--tasks", "2"])
"""


@pytest.fixture
def fake_vllm(tmp_path) -> Path:
    path = tmp_path / "fakebin" / "vllm"
    path.parent.mkdir()
    path.write_text(f"#!{sys.executable}\n{FAKE_VLLM}")
    path.chmod(0o755)
    return path


def replicas(fake: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(fake.parent.glob("replica-*.json"))]


def vllm_cmd(fake: Path, out: Path, n: int, *more: str) -> list[str]:
    return [*GENERATE, "--teacher", "vllm", "--vllm-bin", str(fake), "--model", "some/model", "--out", str(out),
            "--num", "20", "--tasks-per-request", "2", "--concurrency", "2", "--no-progress",
            "--teacher-replicas", str(n), *more, "--", "--max-model-len", "4096"]


def test_teacher_replicas_start_n_servers_with_one_key_and_a_gpu_each(tmp_path, fake_vllm):
    out = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5"}
    r = subprocess.run(vllm_cmd(fake_vllm, out, 2), env=env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    started = replicas(fake_vllm)
    assert len(started) == 2
    keys = {next(a for a in s["argv"] if a.startswith("--api-key=")) for s in started}
    ports = {next(a for a in s["argv"] if a.startswith("--port=")) for s in started}
    assert len(keys) == 1 and len(ports) == 2
    assert sorted(s["cuda"] for s in started) == ["3", "5"]
    assert all(s["argv"][-2:] == ["--max-model-len", "4096"] for s in started)  # pass-through flags reach each
    assert (out / "vllm-0.log").is_file() and (out / "vllm-1.log").is_file() and not (out / "vllm.log").exists()
    assert KEY not in (out / "vllm-0.log").read_text() and "***" in (out / "vllm-0.log").read_text()
    per = verify_run(out, 20)["servers"]
    assert len(per) == 2 and all(v["requests"] > 0 for v in per.values())
    assert_all_gone([s["pid"] for s in started])


def test_replicas_without_gpus_change_nothing_and_one_failing_stops_them_all(tmp_path, fake_vllm):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = str(tmp_path / "empty")  # no nvidia-smi: no GPUs
    r = subprocess.run(vllm_cmd(fake_vllm, tmp_path / "cpu", 2), env=env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert [s["cuda"] for s in replicas(fake_vllm)] == [None, None]
    for p in fake_vllm.parent.glob("replica-*.json"):
        p.unlink()

    r = subprocess.run(vllm_cmd(fake_vllm, tmp_path / "fail", 2), env={**env, "FAKE_VLLM_FAIL_ONE": "1"},
                       capture_output=True, timeout=120)
    assert r.returncode == 2
    first = r.stderr.decode().splitlines()[0]
    assert "vLLM replica" in first and "exited with code 3 before it was ready" in first
    assert "RuntimeError: fake replica failed to start" in first
    started = replicas(fake_vllm)
    assert len(started) == 1  # the one that came up is stopped with the run
    assert_all_gone([started[0]["pid"]])

    r = subprocess.run(vllm_cmd(fake_vllm, tmp_path / "few", 3), env={**env, "CUDA_VISIBLE_DEVICES": "0,1"},
                       capture_output=True, timeout=120)
    assert r.returncode == 2
    assert "--teacher-replicas 3 needs at least 3 GPUs, one per replica; CUDA_VISIBLE_DEVICES=0,1 gives 2" \
        in one_error_line(r.stderr)


def test_replica_gpus_split_the_visible_gpus():
    from selfinstruct.servers import replica_gpus

    assert replica_gpus(4, "0,1,2,3", 0) == ["0", "1", "2", "3"]
    assert replica_gpus(2, "GPU-a,GPU-b,GPU-c", 0) == ["GPU-a", "GPU-b"]  # 3 // 2 = 1 each, the rest unused
    assert replica_gpus(2, "", 8) == [None, None]  # set but empty: no GPUs to split
    with pytest.raises(UserError, match="needs at least 4 GPUs"):
        replica_gpus(4, None, 2)


# ------------------------------------------------------------------ the instant server


def test_instant_server_speaks_the_openai_api_with_its_key_and_replies_in_turn(tmp_path, servers):
    import openai

    replies = tmp_path / "replies.jsonl"
    replies.write_text("\n".join(json.dumps(t) for t in ["first reply", "second\nreply"]) + "\n")
    s, = servers(1, "--replies", str(replies), "--model", "m")
    client = openai.OpenAI(base_url=s.base_url, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["m"]
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "one two three"}])
    assert chat.choices[0].message.content == "first reply"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (3, 2)
    text = client.completions.create(model="m", prompt="four five")
    assert text.choices[0].text == "second\nreply" and text.usage.prompt_tokens == 2
    assert client.chat.completions.create(model="m", messages=[]).choices[0].message.content == "first reply"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=[])
    # The built-in replies parse into distinct tasks, as the alpaca parser reads them.
    from selfinstruct.prompts import parse_alpaca

    sys.path.insert(0, str(INSTANT.parent))
    from instant_server import default_reply

    tasks = parse_alpaca(default_reply(0, 3), "stop") + parse_alpaca(default_reply(1, 3), "stop")
    assert len({t.instruction for t in tasks}) == 6 and all(t.error is None for t in tasks)


def test_instant_server_cuts_a_reply_at_max_tokens_and_says_length(tmp_path, servers):
    """A request's max_tokens got the whole canned reply, with finish_reason "stop": a cut reply, and the
    parse's truncated paths, could not be run against it. A reply longer than max_tokens (whitespace-split
    pieces) is cut after that many, with "length" and that many completion tokens, in chat and
    completions alike; one that fits is whole, with "stop"; a max_tokens below 1 is a 400 that uses up no reply."""
    import openai

    replies = tmp_path / "replies.jsonl"
    replies.write_text("".join(json.dumps(t) + "\n" for t in ["one two\nthree  four five", "six seven"]))
    s, = servers(1, "--replies", str(replies), "--model", "m")
    client = openai.OpenAI(base_url=s.base_url, api_key=KEY, max_retries=0)
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == ("one two\nthree", "length")
    assert chat.usage.completion_tokens == 3
    text = client.completions.create(model="m", prompt="hi", max_tokens=2)  # "six seven" fits
    assert (text.choices[0].text, text.choices[0].finish_reason, text.usage.completion_tokens) == ("six seven", "stop", 2)
    text = client.completions.create(model="m", prompt="hi", max_tokens=1)
    assert (text.choices[0].text, text.choices[0].finish_reason, text.usage.completion_tokens) == ("one", "length", 1)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):
        client.chat.completions.create(model="m", messages=[], max_tokens=0)
    whole = client.chat.completions.create(model="m", messages=[])  # no max_tokens: the next reply, whole
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == ("six seven", "stop")


@pytest.mark.parametrize("path", ["inside a task", "as the next task starts"])
def test_generate_rejects_the_task_a_reply_cut_at_max_tokens_left_unfinished(tmp_path, servers, path):
    """A generate run whose replies the server cuts at --max-tokens, end to end from the command line:
    the task the cut fell in is rejected as truncated (the parse's two paths: cut inside a task, or
    cut just after a task closed by ### as the next one starts), the whole task before it is kept, and
    the log says the cut ("length", --max-tokens completion tokens)."""
    sys.path.insert(0, str(INSTANT.parent))
    from instant_server import default_reply

    # The built-in replies hold 2 tasks of 24 pieces each ("###" to the output's last word).
    if path == "inside a task":
        args, max_tokens, why = ["--tasks", "2", "--seed", "0"], 30, "truncated: the reply was cut at max_tokens inside this task"
    else:  # the second task numbered, as teachers write it: cut after "###\n2." (pieces 25 and 26)
        replies = tmp_path / "numbered.jsonl"
        numbered = ["###\nInstruction:" + default_reply(n, 2, 0)[len("###\nInstruction:"):].replace(
            "###\nInstruction:", "###\n2. Instruction:") for n in range(40)]
        replies.write_text("".join(json.dumps(r) + "\n" for r in numbered))
        args, max_tokens, why = ["--replies", str(replies)], 26, \
            "truncated: the reply was cut at max_tokens as it started another task"
    s, = servers(1, *args)
    out = tmp_path / "run"
    r = run(args_for([s.base_url], out, 4, "--max-tokens", str(max_tokens), "--concurrency", "1"))
    assert r.returncode == 0, r.stderr.decode()
    stats = verify_run(out, 4)
    responses = [Response.model_validate(o) for o in lines(out / "responses.jsonl")]
    assert {(x.finish_reason, x.usage.completion_tokens) for resp in responses for x in resp.replies} \
        == {("length", max_tokens)}
    rejected = lines(out / "rejected.jsonl")
    truncated = [o for o in rejected if o["reason"] == why]
    assert len(truncated) == len(responses) and {o["stage"] for o in truncated} == {"parse"}
    assert stats["rejected_by_reason"]["truncated"] == len(responses)
    assert all(o["reason"].startswith(("truncated", "quota")) for o in rejected), rejected


def test_requests_carry_the_body_the_openai_sdk_would_send_and_replies_are_read_back():
    """The client posts plain JSON (``client.post``) instead of ``chat.completions.create``:
    the body must be the one the SDK's typed call sends for the same request, for chat (with a
    prefill and a response format) and raw completions, and the reply's text, finish_reason and
    usage must come back as the SDK read them."""
    import asyncio

    import openai

    from selfinstruct.teacher import TeacherClient

    sampling = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 100, "stop": ["\n20", "20."], "seed": 5,
                "repeat_penalty": 1.2, "dry_multiplier": 0.8}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "object"}}}

    async def both(fake):
        t = TeacherClient(base_url=fake.base_url, api_key=fake.key, model="fake", sampling=sampling)
        sdk = openai.AsyncOpenAI(base_url=fake.base_url, api_key=fake.key, max_retries=0)
        try:
            chat = await t.complete("Write tasks.", "tasks", response_format=fmt, prefill="1.")
            seed = fake.bodies[-1]["seed"]  # derived per request from the run's seed
            sdk_chat = await sdk.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "Write tasks."},
                                        {"role": "assistant", "content": "1."}],
                temperature=0.7, top_p=0.9, max_tokens=100, stop=["\n20", "20."], seed=seed, response_format=fmt,
                extra_body={"repeat_penalty": 1.2, "repetition_penalty": 1.2, "dry_multiplier": 0.8,
                            "continue_final_message": True, "add_generation_prompt": False})
            raw = await t.complete_raw("<|user|>", "query", stop=["<|end|>"])
            raw_seed = fake.bodies[-1]["seed"]
            sdk_raw = await sdk.completions.create(
                model="fake", prompt="<|user|>", temperature=0.7, top_p=0.9, max_tokens=100, stop=["<|end|>"],
                seed=raw_seed, extra_body={"repeat_penalty": 1.2, "repetition_penalty": 1.2, "dry_multiplier": 0.8})
        finally:
            await t.close()
            await sdk.close()
        return chat, sdk_chat, raw, sdk_raw

    with FakeTeacher(reply=lambda n: "1. a reply", raw_reply=lambda n: "a query") as fake:
        chat, sdk_chat, raw, sdk_raw = asyncio.run(both(fake))
        ours_chat, theirs_chat, ours_raw, theirs_raw = fake.bodies
    assert ours_chat == theirs_chat and ours_raw == theirs_raw
    assert ours_chat["repetition_penalty"] == 1.2 and ours_chat["continue_final_message"] is True
    assert chat.text == sdk_chat.choices[0].message.content == "1. a reply"
    assert (chat.finish_reason, chat.usage.prompt_tokens, chat.usage.completion_tokens) == (
        sdk_chat.choices[0].finish_reason, sdk_chat.usage.prompt_tokens, sdk_chat.usage.completion_tokens)
    assert raw.text == sdk_raw.choices[0].text == "a query"
    assert (raw.usage.prompt_tokens, raw.usage.completion_tokens) == (
        sdk_raw.usage.prompt_tokens, sdk_raw.usage.completion_tokens) == (1, 3)


def answering(body: bytes, content_type: str):
    """A raw server's handler that answers a request 200 with ``body`` under ``content_type``, then closes."""
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type.encode()
                     + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    return handle


@pytest.mark.parametrize("body, content_type", [
    (b'{"choices": []}', "application/json"),
    (b'{"choices": [{"message": {"role": "assistant"}}]}', "application/json"),
    (b'{"choices": [{"message": {"content": 7}}]}', "application/json"),
    (b'["choices"]', "application/json"),
    (b'{"choices": [', "application/json"),
    (b"<html>busy</html>", "text/html"),
])
@SENDERS
def test_a_reply_of_the_wrong_shape_is_a_malformed_response(body, content_type, client_processes):
    import asyncio

    async def attempt():
        return await failed_request(answering(body, content_type), client_processes=client_processes)

    error, faults = asyncio.run(attempt())
    assert error.kind == "malformed_response" and error.reached
    assert faults == {"malformed_response": 2}


class CountingDeque:
    """``TeacherClient._waiters`` that counts how often a request went to sleep for a slot."""

    def __init__(self):
        import collections

        self.q, self.sleeps = collections.deque(), 0

    def append(self, f):
        self.sleeps += 1
        self.q.append(f)

    def popleft(self):
        return self.q.popleft()

    def __bool__(self):
        return bool(self.q)


def slot_client(**kw):
    from selfinstruct.teacher import TeacherClient

    # Port 1: nothing listens there; these tests take slots without sending anything.
    t = TeacherClient(base_url="http://127.0.0.1:1/v1", api_key="k", model="m", sampling={}, **kw)
    t._waiters = CountingDeque()
    return t


def test_many_more_requests_than_slots_each_sleep_once_and_never_exceed_the_slots():
    """Self-instruct's follow-ups start many more requests than there are slots: a freed
    slot wakes one of them, not all (waking all made each request cost ~1.5x, bench/README.md)."""
    import asyncio

    from selfinstruct.records import Reply

    most = 0

    async def call(s, kw):
        nonlocal most
        most = max(most, s.in_flight)
        await asyncio.sleep(0.001)
        return Reply(purpose="tasks", text="ok")

    async def many():
        t = slot_client(concurrency=4)
        try:
            replies = await asyncio.gather(*(t._request(call, "p", "tasks", {}) for _ in range(200)))
        finally:
            await t.close()
        return t, replies

    t, replies = asyncio.run(many())
    assert len(replies) == 200 and t.requests == 200 and most == 4
    assert 196 <= t._waiters.sleeps < 2 * 200  # waking every waiter at each release: ~5,000


def test_a_woken_request_cancelled_before_it_runs_hands_its_slot_on():
    import asyncio

    async def scene():
        t = slot_client(concurrency=1)
        try:
            s = await t._acquire()
            first, second = asyncio.create_task(t._acquire()), asyncio.create_task(t._acquire())
            await asyncio.sleep(0)  # both wait now
            t._release(s)  # wakes `first` ...
            first.cancel()  # ... which is cancelled before it could take the slot
            got = await asyncio.wait_for(second, 2)  # without the hand-on: asleep beside a free slot
            return first.cancelled(), got is s
        finally:
            await t.close()

    assert asyncio.run(scene()) == (True, True)


def test_requests_waiting_when_the_last_server_goes_out_time_out_with_one_line():
    import asyncio

    async def scene():
        t = slot_client(concurrency=1, health=True, timeout=0.3)
        try:
            s = await t._acquire()
            waiting = asyncio.create_task(t._acquire())
            await asyncio.sleep(0)
            t.take_out(s, "connection: refused")  # its request still holds the only slot
            with pytest.raises(UserError) as e:
                await asyncio.wait_for(waiting, 5)  # not woken, it would wait for ever
            return str(e.value)
        finally:
            await t.close()

    assert asyncio.run(scene()).startswith("the teacher has not answered for 0.3 s (--timeout)")


def test_a_server_back_before_the_timeout_ends_is_found_though_no_probe_fell_due(servers, monkeypatch):
    """Probes come 10 s apart at most: a server back a moment after one failed was called down at --timeout
    ('has not answered for 15 s') while it answered. Each one out is asked once more before the run stops."""
    import asyncio

    from selfinstruct import teacher

    monkeypatch.setattr(teacher, "PROBE_FIRST_S", 60.0)  # no probe falls due before the timeout
    (a,) = servers(1)
    notes = []

    async def scene():
        t = teacher.TeacherClient(base_url=a.base_url, api_key=KEY, model="instant", sampling={}, concurrency=1,
                                  health=True, timeout=0.5, on_event=notes.append)
        try:
            t.take_out(t.servers[0], "connection: refused")  # down then; it answers now
            s = await asyncio.wait_for(t._acquire(), 10)
            probe_ended = await asyncio.wait_for(asyncio.gather(s.probe, return_exceptions=True), 2)
            return s.url, s.in_service, probe_ended
        finally:
            await t.close()

    url, in_service, probe_ended = asyncio.run(scene())
    assert (url, in_service) == (a.base_url, True)
    assert isinstance(probe_ended[0], asyncio.CancelledError)  # asleep for 60 s, no longer needed
    assert notes[-1] == f"{a.base_url} answers again; back in service"


def test_a_server_still_down_when_the_timeout_ends_stops_the_run_with_one_line(servers, monkeypatch):
    import asyncio

    from selfinstruct import teacher

    monkeypatch.setattr(teacher, "PROBE_FIRST_S", 60.0)
    (a,) = servers(1)
    a.kill()

    async def scene():
        t = teacher.TeacherClient(base_url=a.base_url, api_key=KEY, model="instant", sampling={}, concurrency=1,
                                  health=True, timeout=0.5)
        try:
            t.take_out(t.servers[0], "connection: refused")
            waiting = [asyncio.create_task(t._acquire()) for _ in range(3)]
            done = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 10)
            return [str(e) for e in done]
        finally:
            await t.close()

    said = asyncio.run(scene())
    assert len(set(said)) == 1 and said[0].startswith("the teacher has not answered for 0.5 s (--timeout)"), said
    assert "cannot be reached" in said[0]  # what the last look found


def test_a_reply_that_comes_after_its_server_went_out_does_not_stop_the_timeout_count():
    """A slow server's request that was still in flight when timeouts took it out, answered after: with no
    server in service the count must go on, or a request waiting for a slot waits for ever."""
    import asyncio

    from selfinstruct.records import Reply

    async def scene():
        t = slot_client(concurrency=2, health=True, timeout=0.3)
        answer = asyncio.Event()

        async def slow(s, kw):
            await answer.wait()
            return Reply(purpose="tasks", text="late but fine")

        try:
            late = asyncio.create_task(t._request(slow, "p", "tasks", {}))
            await asyncio.sleep(0)  # it holds a slot now
            t.take_out(t.servers[0], "timeout: Timeout on reading data from socket")
            answer.set()
            reply = await late
            with pytest.raises(UserError) as e:
                await asyncio.wait_for(t._acquire(), 10)  # without the count: for ever
            return reply.text, str(e.value)
        finally:
            await t.close()

    text, line = asyncio.run(scene())
    assert text == "late but fine" and line.startswith("the teacher has not answered for 0.3 s (--timeout)"), line


@SENDERS
def test_a_429_is_retried_after_its_retry_after_and_counted(client_processes):
    import asyncio

    from selfinstruct.teacher import TeacherClient

    async def scene():
        arrived = []
        ok = json.dumps({"choices": [{"message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 2, "completion_tokens": 1}}).encode()

        async def handle(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            arrived.append(time.monotonic())
            if len(arrived) == 1:
                writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(ok)).encode() + b"\r\nConnection: close\r\n\r\n" + ok)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        t = TeacherClient(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", model="m", sampling={}, max_retries=2,
                          client_processes=client_processes)
        try:
            reply = await t.complete("hi", "tasks")
        finally:
            await t.close()
            server.close()
        return reply, t.faults, arrived

    reply, faults, arrived = asyncio.run(scene())
    assert (reply.text, reply.usage.completion_tokens) == ("fine", 1)
    assert faults == {"http_429": 1} and len(arrived) == 2
    assert arrived[1] - arrived[0] >= 0.95  # Retry-After: 1, not the first backoff's 0.5 s


def test_a_sender_process_that_dies_stops_the_run_with_one_line(servers):
    import asyncio

    from selfinstruct.teacher import TeacherClient

    (a,) = servers(1)

    async def scene():
        t = TeacherClient(base_url=a.base_url, api_key=KEY, model="instant", sampling={}, client_processes=1)
        try:
            first = await t.complete("hi", "tasks")
            (proc,) = t._senders._procs
            proc.kill()
            await proc.wait()
            await asyncio.sleep(0.2)
            with pytest.raises(UserError) as e:
                await asyncio.wait_for(t.complete("again", "tasks"), 10)
            return first, str(e.value)
        finally:
            await t.close()

    first, error = asyncio.run(scene())
    assert first.text.startswith("###") and first.server == a.base_url
    assert error == "a request sender process (--client-processes) was killed by signal 9"


def test_no_more_senders_start_than_requests_can_be_in_flight(servers):
    """--client-processes 8 with two servers at --concurrency 2 starts 4 senders, not 8 (64 with one
    slot started 64 interpreters, 8.6 s on 2 cores, to send one request at a time)."""
    import asyncio

    from selfinstruct.teacher import TeacherClient

    a, b = servers(2)

    async def scene():
        t = TeacherClient(base_url=[a.base_url, b.base_url], api_key=KEY, model="instant", sampling={},
                          concurrency=2, client_processes=8)
        try:
            replies = await asyncio.gather(*(t.complete(f"hi {i}", "tasks") for i in range(6)))
            return replies, len(t._senders._procs)
        finally:
            await t.close()

    replies, started = asyncio.run(scene())
    assert started == 4 and all(r.text.startswith("###") for r in replies)


def sender_pids(parent: int) -> list[int]:
    """The ``python -m selfinstruct.sender`` processes whose parent is ``parent``."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"selfinstruct.sender" in (d / "cmdline").read_bytes() \
                    and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def test_kill_9_of_generate_ends_its_sender_processes_too(tmp_path, servers):
    a, b = servers(2, "--latency", "0.2", "--tasks", "2")
    out = tmp_path / "run"
    proc = start(args_for([a.base_url, b.base_url], out, 1000, "--concurrency", "2", "--client-processes", "2"))
    wait_for_lines(out / "responses.jsonl", 4, proc)
    senders = sender_pids(proc.pid)
    assert len(senders) == 2
    proc.kill()
    proc.wait()
    assert_all_gone(senders)  # their input closed with the coordinator: nothing is left sending



def test_a_session_ended_by_kill_9_keeps_its_requests_faults_and_seconds_in_stats(tmp_path, servers):
    """Its counts are saved every second (session.json); the next session adds them to stats.json, once."""
    a, b = servers(2, "--latency", "0.05", "--tasks", "2")
    out = tmp_path / "run"
    cmd = args_for([a.base_url, b.base_url], out, 100_000, "--concurrency", "2")
    proc = start(cmd)
    wait_for_lines(out / "responses.jsonl", 6, proc)
    b.kill()  # connection faults in this session, then b is taken out
    deadline = time.monotonic() + 60
    while True:  # until the saved counts hold the faults and a second of the loop
        saved = json.loads((out / "session.json").read_text()) if (out / "session.json").exists() else {}
        if sum(saved.get("faults", {}).values()) and saved.get("wall_s", 0) > 2:
            break
        assert time.monotonic() < deadline and proc.poll() is None, saved
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no stats.json written by this session
    proc.wait()
    saved = json.loads((out / "session.json").read_text())
    assert not (out / "stats.json").exists()
    logged_before = len(lines(out / "responses.jsonl"))
    kept = len(lines(out / "kept.jsonl"))

    r = run(args_for([a.base_url, b.base_url], out, kept + 4, "--concurrency", "2"))
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert not (out / "session.json").exists()
    assert stats["sessions"] == 2 and stats["last_session"]["id"] != saved["id"]
    assert stats["wall_time_s"] >= saved["wall_s"] > 2
    for kind, n in saved["faults"].items():  # the killed session's faults, and the new one's
        assert stats["faults"][kind] >= n
    assert stats["servers"][b.base_url]["faults"] and stats["servers"][b.base_url]["requests"] >= \
        saved["servers"][b.base_url]["requests"]
    logged_after = len(lines(out / "responses.jsonl")) - logged_before
    saved_requests = sum(s["requests"] for s in saved["servers"].values())
    # Every reply the second session logged took a request of its own, on top of the first session's.
    assert sum(s["requests"] for s in stats["servers"].values()) >= saved_requests + logged_after

    r = run(args_for([a.base_url, b.base_url], out, kept + 6, "--concurrency", "2"))
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    again = json.loads((out / "stats.json").read_text())
    assert again["sessions"] == 3 and again["wall_time_s"] >= stats["wall_time_s"]  # the killed one counted once

def test_ctrl_c_to_the_process_group_stops_generate_and_its_senders_without_a_traceback(tmp_path, servers):
    (a,) = servers(1, "--latency", "0.2", "--tasks", "2")
    out = tmp_path / "run"
    env = {**os.environ, "SELFINSTRUCT_API_KEY": KEY}
    # Its own process group, as a terminal gives a command: Ctrl-C reaches every process in it.
    proc = subprocess.Popen(args_for([a.base_url], out, 1000, "--client-processes", "1"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for_lines(out / "responses.jsonl", 2, proc)
    senders = sender_pids(proc.pid)
    assert len(senders) == 1
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in stderr, stderr.decode()[-3000:]
    assert_all_gone(senders)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)], ids=["sigterm", "sighup"])
def test_a_stop_to_every_process_stops_generate_as_ctrl_c_does_with_its_own_line(tmp_path, servers, signum, code):
    """A scheduler's SIGTERM (SLURM's signals every process of the job, the senders first here) or a
    hangup sent to every process (systemd's SendSIGHUP=yes after its SIGTERM): it ended the coordinator
    at once (no line, no stats.json until the next session), and a sender it ended first (they ignored
    SIGINT only, then SIGINT and SIGTERM) stopped the run as a sender that died, code 2. Now the run
    stops as on Ctrl-C: what it decided is written and counted, its senders end, one line, 128 + the signal."""
    (a,) = servers(1, "--latency", "0.2", "--tasks", "2")
    out = tmp_path / "run"
    proc = start(args_for([a.base_url], out, 1000, "--client-processes", "1"))
    wait_for_lines(out / "responses.jsonl", 2, proc)
    senders = sender_pids(proc.pid)
    assert len(senders) == 1
    for pid in senders:
        os.kill(pid, signum)
    time.sleep(1)  # long enough for the coordinator to see a sender that died
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    text = stderr.decode()
    assert proc.returncode == code and "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == f"selfinstruct generate: stopped by {signal.Signals(signum).name}", \
        text[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sessions"] == 1 and not (out / "session.json").exists()
    assert stats["kept"] == len(lines(out / "kept.jsonl")) > 0
    assert_all_gone(senders)


def test_sighup_stops_generate_with_its_line_unless_it_was_ignored_as_nohup_does(tmp_path, servers):
    """A closed terminal or a dropped ssh session sends SIGHUP: handled as SIGTERM is (code 129, the
    run counted), where it ended the process at once. Under nohup (SIGHUP ignored from the start)
    it stays ignored and the run finishes."""
    (a,) = servers(1, "--latency", "0.2", "--tasks", "2")
    out = tmp_path / "run"
    proc = start(args_for([a.base_url], out, 1000))
    wait_for_lines(out / "responses.jsonl", 2, proc)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=60)
    text = stderr.decode()
    assert proc.returncode == 129 and text.strip().splitlines()[-1] == "selfinstruct generate: stopped by SIGHUP", \
        text[-3000:]
    assert json.loads((out / "stats.json").read_text())["sessions"] == 1 and not (out / "session.json").exists()

    nohup = tmp_path / "nohup"
    proc = subprocess.Popen(args_for([a.base_url], nohup, 40), env={**os.environ, "SELFINSTRUCT_API_KEY": KEY},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_for_lines(nohup / "responses.jsonl", 2, proc)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert len(lines(nohup / "kept.jsonl")) == 40


@contextlib.asynccontextmanager
async def a_stopped_sender(base_url: str):
    """A client (--timeout 0.5, no retries) whose one request sender has answered once and is then stopped
    (SIGSTOP: it reads nothing and answers nothing); every sender is let go on again and closed after."""
    from selfinstruct.teacher import TeacherClient

    t = TeacherClient(base_url=base_url, api_key=KEY, model="instant", sampling={}, client_processes=1,
                      timeout=0.5, max_retries=0)
    try:
        await t.complete("hi", "tasks")
        (stuck,) = t._senders._procs
        os.kill(stuck.pid, signal.SIGSTOP)
        yield t, stuck
    finally:
        for proc in t._senders._procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
        await t.close()


def test_a_stuck_sender_is_passed_over_and_its_request_goes_through_another(servers):
    """A stopped sender is not the server's fault: charged to the server as a timeout, one stopped sender
    took every healthy server out of service. Its request goes once more through a new sender, the server
    keeps a clean record, and the fault is counted as the sender's; it gets no request until it answers."""
    import asyncio

    from selfinstruct import sender

    (a,) = servers(1)

    async def scene():
        async with a_stopped_sender(a.base_url) as (t, stuck):
            t0 = time.monotonic()
            reply = await asyncio.wait_for(t.complete("again", "tasks"), 30)
            waited = time.monotonic() - t0
            later = await asyncio.wait_for(t.complete("once more", "tasks"), 5)  # not sent to the stuck one
            return reply, later, waited, dict(t.faults), dict(t.servers[0].faults), list(t._senders._procs), stuck

    reply, later, waited, faults, server_faults, procs, stuck = asyncio.run(scene())
    assert reply.text and later.text and server_faults == {}
    assert faults == {"sender_timeout": 1}
    assert len(procs) == 2 and procs[0] is stuck
    assert 0.5 + sender.SENDER_MARGIN_S - 0.1 < waited < 0.5 + sender.SENDER_MARGIN_S + 5


def test_a_request_sent_while_every_sender_is_stuck_waits_for_a_new_one_not_the_stuck(servers):
    """Between a sender found stuck and its replacement up, a new request went to the stuck one and waited
    --timeout and the margin before it was sent again."""
    import asyncio

    (a,) = servers(1)

    async def scene():
        async with a_stopped_sender(a.base_url) as (t, _):
            t._senders._late.add(0)  # as a request past the margin leaves it
            t0 = time.monotonic()
            reply = await asyncio.wait_for(t.complete("again", "tasks"), 30)
            return reply, time.monotonic() - t0, len(t._senders._procs), dict(t.faults)

    reply, waited, procs, faults = asyncio.run(scene())
    assert reply.text and procs == 2 and faults == {}
    assert waited < 5, waited  # through the stuck one: --timeout 0.5 and the 5 s margin, then again


def test_a_request_whose_second_sender_is_stuck_too_is_a_timeout_not_a_hang(servers, monkeypatch):
    """Stuck twice (the new sender too, as where this process itself stalls): a timeout, as before."""
    import asyncio

    from selfinstruct import sender
    from selfinstruct.teacher import TeacherError

    (a,) = servers(1)
    start_one = sender.Senders._start_one

    async def stopped(self):
        await start_one(self)
        os.kill(self._procs[-1].pid, signal.SIGSTOP)

    async def scene():
        async with a_stopped_sender(a.base_url) as (t, _):
            monkeypatch.setattr(sender.Senders, "_start_one", stopped)
            t0 = time.monotonic()
            with pytest.raises(TeacherError) as e:
                await asyncio.wait_for(t.complete("again", "tasks"), 40)
            return e.value, time.monotonic() - t0, dict(t.faults)

    error, waited, faults = asyncio.run(scene())
    assert error.kind == "timeout" and "did not answer within --timeout 0.5 s" in str(error)
    assert 2 * (0.5 + sender.SENDER_MARGIN_S) - 0.2 < waited < 2 * (0.5 + sender.SENDER_MARGIN_S) + 10
    assert faults == {"sender_timeout": 2, "timeout": 1}


def test_a_run_whose_sender_is_stopped_finishes_on_a_new_one_with_every_server_in_service(tmp_path, servers):
    """The whole run: two healthy servers, the only sender stopped mid-run. No server is taken out, the run
    completes with every candidate accounted for, and stats.json counts the sender's timeouts as its own."""
    # Replies at 0.3 s, four in flight: the run's 100 requests take seconds, so most are still to be sent when
    # the sender stops (at an instant server, a loaded machine had every reply in before 3 lines were written).
    # --timeout 3: the new sender has 8 s to start and answer, on a loaded machine too.
    a, b = servers(2, "--tasks", "2", "--latency", "0.3")
    out = tmp_path / "run"
    proc = start(args_for([a.base_url, b.base_url], out, 200, "--concurrency", "2", "--client-processes", "1",
                          "--timeout", "3"))
    wait_for_lines(out / "responses.jsonl", 3, proc)
    (stuck,) = sender_pids(proc.pid)
    os.kill(stuck, signal.SIGSTOP)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGCONT)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    stats = verify_run(out, 200)
    assert stats["faults"].get("sender_timeout", 0) >= 1, stats["faults"]
    assert "timeout" not in stats["faults"] and "taken out" not in stderr.decode()
    assert all(not s["faults"] for s in stats["servers"].values()), stats["servers"]


def test_a_server_taken_out_for_a_fault_with_no_cause_is_told_its_message():
    """A stuck sender's timeout (``Senders.post``) has a message and no transport error under it: the take-out
    note and the run's last line said 'taken out of service (timeout: )'."""
    import asyncio

    from selfinstruct.teacher import TAKE_OUT_AFTER, Fault

    notes = []
    said = "the request sender process did not answer within --timeout 0.5 s and 5 s more"

    async def scene():
        t = slot_client(health=True, timeout=0.5, on_event=notes.append)
        try:
            for _ in range(TAKE_OUT_AFTER):
                t._fault(t.servers[0], Fault("timeout", said))
            with pytest.raises(UserError) as e:
                await t._acquire()
            return str(e.value)
        finally:
            await t.close()

    line = asyncio.run(scene())
    assert notes[0] == f"http://127.0.0.1:1/v1 taken out of service (timeout: {said}); probing it"
    assert "(timeout: )" not in line and line.startswith("the teacher has not answered for 0.5 s"), line


def test_a_sender_runs_this_selfinstruct_whatever_the_working_directory_holds(tmp_path, monkeypatch, servers):
    import asyncio

    from selfinstruct.teacher import TeacherClient

    (a,) = servers(1)
    shadow = tmp_path / "selfinstruct"  # another checkout, say, where the user runs the command
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    (shadow / "sender.py").write_text("import sys\nsys.exit('the sender of the working directory ran')\n")
    monkeypatch.chdir(tmp_path)

    async def scene():
        t = TeacherClient(base_url=a.base_url, api_key=KEY, model="instant", sampling={}, client_processes=1)
        try:
            return await t.complete("hi", "tasks")
        finally:
            await t.close()

    assert asyncio.run(scene()).text.startswith("###")


def test_a_resume_that_leaves_out_the_servers_uses_the_runs_own(tmp_path, servers):
    """Not the embedded teacher, which an empty --base-url means: its records would join a run
    made by another teacher."""
    a, b = servers(2, "--tasks", "2")
    out = tmp_path / "run"
    r = run(args_for([a.base_url, b.base_url], out, 10))
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    again = [*GENERATE, "--model", "instant", "--out", str(out), "--num", "30", "--tasks-per-request", "2",
             "--no-progress", "--no-fsync"]
    r = run(again, timeout=60)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    stats = verify_run(out, 30)
    assert stats["base_url"] == [a.base_url, b.base_url]
    kept = lines(out / "kept.jsonl")
    assert {o["provenance"]["teacher_model"] for o in kept} == {"instant"}
    assert {o["provenance"]["base_url"] for o in kept} <= {a.base_url, b.base_url}


def test_per_server_tokens_add_up_to_the_runs_after_a_kill_9(tmp_path, servers):
    a, b = servers(2, "--latency", "0.05", "--tasks", "2")
    out = tmp_path / "run"
    cmd = args_for([a.base_url, b.base_url], out, 300, "--concurrency", "2")
    proc = start(cmd)
    wait_for_lines(out / "responses.jsonl", 20, proc)
    proc.kill()  # this session never writes its stats
    proc.wait()
    r = run(cmd)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    stats = verify_run(out, 300)
    per = stats["servers"]
    assert set(per) == {a.base_url, b.base_url}
    for kind in ("prompt_tokens", "completion_tokens"):
        assert sum(s[kind] for s in per.values()) == stats[kind] > 0
    served = Counter(servers_of(out))
    assert all(per[u]["completion_tokens"] > 0 for u in served)


# ------------------------------------------------------------ the senders' pipe


def test_a_line_the_coordinator_cannot_read_fails_the_senders_requests_at_once():
    """A sender's line over the reader's limit (a reply of hundreds of MB) stopped the reader task
    silently: every later request to that sender waited --timeout and more, and was logged as a
    timeout. Now the requests fail at once, in one line (and a sender sends no such line:
    ``sender.reply_line``)."""
    import asyncio

    from selfinstruct.sender import Senders

    class Proc:  # what Senders._read uses of a sender process
        killed = False

        def __init__(self, stdout):
            self.stdout = stdout

        def kill(self):
            self.killed = True

        async def wait(self):
            return -9 if self.killed else 0

    async def scene():
        out = asyncio.StreamReader(limit=64)
        out.feed_data(b'{"id": 0, "data": {}}\n' + b'{"id": 1, "data": "' + b"x" * 100 + b'"}\n')
        out.feed_data(b'{"id": 2, "data": {}}\n')
        out.feed_eof()
        loop = asyncio.get_running_loop()
        pending = {n: loop.create_future() for n in range(3)}
        senders, proc = Senders(1, KEY, 30.0, 8), Proc(out)
        await asyncio.wait_for(senders._read(proc, pending), 10)
        return pending, senders._ended, proc.killed

    pending, ended, killed = asyncio.run(scene())
    assert pending[0].result() == {"id": 0, "data": {}}
    for n in (1, 2):
        assert isinstance(pending[n].exception(), UserError)
    assert killed and ended.startswith("a request sender process (--client-processes) sent a line this process cannot read")


def completion_reply(text: str = "1. a reply") -> bytes:
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n" + body)


@pytest.mark.parametrize("variable, bypass", [("HTTP_PROXY", False), ("ALL_PROXY", False), ("HTTP_PROXY", True)])
def test_requests_go_through_the_proxy_the_environment_names_unless_no_proxy_says_not(variable, bypass, monkeypatch):
    """Completions are POSTed on aiohttp directly (teacher.Poster), not through the openai client,
    which took HTTP_PROXY and NO_PROXY from the environment: so must we. The proxy here answers
    itself, and says what it was asked: a proxy is sent the whole URL, with its credentials."""
    import asyncio
    import base64

    from selfinstruct.teacher import TeacherClient

    async def attempt():
        seen = {"proxy": [], "server": []}

        def answer(who):
            async def handle(reader, writer):
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                length = int(next((h.split(":")[1] for h in head.split("\r\n") if h.lower().startswith("content-length")), 0))
                await reader.readexactly(length)
                seen[who].append(head)
                writer.write(completion_reply(f"from the {who}"))
                await writer.drain()
                writer.close()
            return handle

        proxy = await asyncio.start_server(answer("proxy"), "127.0.0.1", 0)
        server = await asyncio.start_server(answer("server"), "127.0.0.1", 0)
        port, proxy_port = server.sockets[0].getsockname()[1], proxy.sockets[0].getsockname()[1]
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(variable, f"http://us%40er:pw@127.0.0.1:{proxy_port}")
        if bypass:
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        t = TeacherClient(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", model="m", sampling={}, max_retries=0)
        try:
            reply = await t.complete("hi", "tasks")
        finally:
            await t.close()
            proxy.close()
            server.close()
        return reply, seen

    reply, seen = asyncio.run(attempt())
    if bypass:
        assert reply.text == "from the server" and not seen["proxy"]
        assert seen["server"][0].startswith("POST /v1/chat/completions HTTP/1.1")
    else:
        assert reply.text == "from the proxy" and not seen["server"]
        head = seen["proxy"][0]
        assert head.startswith(f"POST http://127.0.0.1:{head.split(':')[2].split('/')[0]}/v1/chat/completions HTTP/1.1")
        creds = base64.b64encode(b"us@er:pw").decode()
        assert f"Proxy-Authorization: Basic {creds}" in head
        assert "Authorization: Bearer k" in head


@SENDERS
@pytest.mark.parametrize("body, content_type", [
    (b'{"error": {"message": "the  model is\\n busy", "type": "x"}}', "application/json"),
    (b'{"message": "busy"}', "application/json"),
    (b'{"error": "busy"}', "application/json"),
    (b"<html>busy</html>", "text/html"),
])
def test_an_error_reply_is_told_in_the_openai_clients_words_with_its_retry_after(body, content_type,
                                                                                 client_processes):
    """A 503 is described as the openai client described it (its status and the error's own
    message, on one line), with its Retry-After: the request path no longer goes through that
    client, so the same reply is put to the client itself here and the words compared."""
    import asyncio

    import openai

    async def attempt():
        async def handle(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next((h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0))
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: " + content_type.encode()
                         + b"\r\nRetry-After: 0\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
            writer.close()

        error, faults = await failed_request(handle, client_processes=client_processes)
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", api_key="k",
                                 max_retries=0)
        try:
            with pytest.raises(openai.APIStatusError) as theirs:
                await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        finally:
            await sdk.close()
            server.close()
        return error, faults, theirs.value

    error, faults, theirs = asyncio.run(attempt())
    assert error.kind == "http_503" and faults == {"http_503": 2}
    assert str(error) == " ".join(str(theirs).split())


@pytest.mark.skipif(not __import__("shutil").which("openssl"), reason="needs the openssl command to make a certificate")
@pytest.mark.parametrize("trusted", [True, False])
def test_an_https_server_is_trusted_through_ssl_cert_file_as_the_openai_client_trusted_it(trusted, tmp_path,
                                                                                          monkeypatch):
    """Completions go out on aiohttp with the openai client's certificates: certifi's, or the file
    SSL_CERT_FILE names. A server with a certificate of its own is reached when that file holds it,
    and is a connection fault (the certificate refused), not a reply, when it does not."""
    import asyncio
    import ssl

    from selfinstruct.teacher import TeacherClient, TeacherError

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))

    async def attempt():
        async def handle(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next((h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0))
            await reader.readexactly(length)
            writer.write(completion_reply("over tls"))
            await writer.drain()
            writer.close()

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
        t = TeacherClient(base_url=f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", api_key="k",
                          model="m", sampling={}, max_retries=0)
        try:
            return await t.complete("hi", "tasks")
        finally:
            await t.close()
            server.close()

    if trusted:
        assert asyncio.run(attempt()).text == "over tls"
    else:
        with pytest.raises(TeacherError) as e:
            asyncio.run(attempt())
        assert e.value.kind == "connection" and "certificate" in str(e.value).lower()


def test_certificates_that_cannot_be_read_are_one_line_naming_ssl_cert_file(tmp_path, servers):
    """SSL_CERT_FILE naming a file that is not there: the openai client's transport reads the
    certificates when it is made, whatever the URL, and a FileNotFoundError's traceback came out of
    generate before its first request. One line now, naming the variable and the path."""
    s = servers(1)[0]
    gone = tmp_path / "gone.pem"
    r = subprocess.run(args_for([s.base_url], tmp_path / "run", 4), capture_output=True, timeout=120,
                       env={**os.environ, "SELFINSTRUCT_API_KEY": KEY, "SSL_CERT_FILE": str(gone)})
    assert r.returncode == 2, r.stderr
    err = one_error_line(r.stderr)
    assert f"cannot make the HTTP client for {s.base_url}" in err and f"SSL_CERT_FILE={gone}" in err, err
    assert not (tmp_path / "run").exists()


def test_a_poster_that_cannot_make_its_client_is_a_connection_fault(tmp_path, monkeypatch):
    """A Poster makes its HTTP client at its first request (in a sender, where no openai client
    read the certificates first): certificates that cannot be read then fail that request as a
    connection that could not be opened, counted and retried as one, not a crash."""
    import asyncio

    from selfinstruct.teacher import Fault, Poster

    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "gone.pem"))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    async def attempt():
        p = Poster("https://127.0.0.1:9/v1", "k", 5.0, 4)
        try:
            await p.post("/chat/completions", {"model": "m"})
        finally:
            await p.close()

    with pytest.raises(Fault) as e:
        asyncio.run(attempt())
    assert e.value.kind == "connection" and e.value.reached is False
    assert "cannot make the HTTP client" in str(e.value) and "gone.pem" in str(e.value)


def test_requests_carry_the_accounts_organization_and_project_as_the_openai_client_sent_them(monkeypatch):
    """OPENAI_ORG_ID and OPENAI_PROJECT_ID: the openai client sent them as headers on every request,
    and the API uses them to bill a member of several; the completions no longer go through it."""
    import asyncio

    from selfinstruct.teacher import TeacherClient

    monkeypatch.setenv("OPENAI_ORG_ID", "org-7")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-9")

    async def attempt():
        heads = []

        async def handle(reader, writer):
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            length = int(next((h.split(":")[1] for h in head.split("\r\n") if h.lower().startswith("content-length")), 0))
            await reader.readexactly(length)
            heads.append(head)
            writer.write(completion_reply())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        t = TeacherClient(base_url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", api_key="k",
                          model="m", sampling={}, max_retries=0)
        try:
            await t.complete("hi", "tasks")
        finally:
            await t.close()
            server.close()
        return heads[0]

    head = asyncio.run(attempt())
    assert "OpenAI-Organization: org-7" in head and "OpenAI-Project: proj-9" in head


@SENDERS
def test_a_reply_cut_at_max_tokens_before_any_content_is_an_empty_reply_not_retried(client_processes):
    """vLLM's reasoning parser: a model whose thinking took every token answers content null,
    finish_reason 'length'. It was a malformed_response, asked again five times for the same end."""
    import asyncio

    from selfinstruct.teacher import TeacherClient

    body = json.dumps({"choices": [{"index": 0, "finish_reason": "length", "message": {
        "role": "assistant", "content": None, "reasoning_content": "Let me think about the tasks"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 16}}).encode()
    served = []

    async def attempt():
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            served.append(1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        t = TeacherClient(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", model="m", sampling={},
                          max_retries=2, client_processes=client_processes)
        try:
            return await t.complete("hi", "tasks"), t.faults
        finally:
            await t.close()
            server.close()

    reply, faults = asyncio.run(attempt())
    assert (reply.text, reply.finish_reason, reply.usage.completion_tokens) == ("", "length", 16)
    assert not faults and len(served) == 1


@pytest.mark.parametrize("content_type", ["text/html", "application/json"])
@SENDERS
def test_a_reply_that_is_not_json_says_what_came(content_type, client_processes):
    """A web server's page at the completions URL was 'the reply has no choices' (or, labelled JSON,
    'Expecting value: line 1 column 1 (char 0)') in errors.jsonl: nothing said a page came back."""
    import asyncio

    body = b"<html>\n<body><h1>Welcome to nginx!</h1></body></html>"

    async def attempt():
        return await failed_request(answering(body, content_type), client_processes=client_processes)

    error, _ = asyncio.run(attempt())
    assert error.kind == "malformed_response"
    assert str(error).startswith("the reply is not JSON") and "Welcome to nginx!" in str(error), str(error)


def test_the_bars_server_names_tell_every_server_apart():
    """Servers on one host are named by port; two behind one gateway's port (told apart by their
    path) were both ':8000'."""
    from types import SimpleNamespace

    from selfinstruct.generate import server_line

    def teacher(*urls):
        return SimpleNamespace(servers=[SimpleNamespace(url=u, requests=i, faults=Counter(), in_service=True)
                                        for i, u in enumerate(urls)])

    assert server_line(teacher("http://h:8001/v1", "http://h:8002/v1")) == "  :8001 0/0 :8002 1/0"
    assert server_line(teacher("http://h:8000/a/v1", "http://h:8000/b/v1/")) == "  :8000/a/v1 0/0 :8000/b/v1 1/0"
    assert server_line(teacher("http://g1:8000/v1", "http://g2:8000/v1")) == "  g1:8000 0/0 g2:8000 1/0"


def test_the_bar_shows_every_servers_counts_wrapped_at_the_terminals_width():
    """On the bar's own line, three servers or more were cut off at 80 columns."""
    import io
    import re

    from rich.console import Console

    from selfinstruct.progress import RunProgress

    def last_state(servers: str) -> str:
        buf = io.StringIO()
        bar = RunProgress(100, console=Console(file=buf, width=80, force_terminal=True))
        with bar:
            bar.update(40, 3, 20, 4, 1234.0, servers=servers)
        seen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
        return seen[seen.rindex("kept"):]

    servers = "  " + " ".join(f"gpu-node-{i}.cluster:8000 {1000 + i}/{i}" for i in range(5)) + "(out)"
    last = last_state(servers)
    assert all(len(line) <= 80 for line in last.splitlines()) and len(last.splitlines()) >= 3
    assert "".join(servers.split()) in "".join(last.split()), last
    assert "[::1]:8001 3/0" in last_state("  [::1]:8001 3/0 [::1]:8002 1/0")  # not read as markup


def test_a_run_stopped_for_want_of_servers_leaves_the_bar_at_its_last_state(tmp_path, servers):
    """The bar above the error line showed the servers in service and the counts of the last reply taken."""
    a, b = servers(2, "--latency", "0.1", "--tasks", "2")
    out = tmp_path / "run"
    argv = [x for x in args_for([a.base_url, b.base_url], out, 1000, "--concurrency", "2", "--timeout", "2")
            if x != "--no-progress"]
    proc = start(argv)
    wait_for_lines(out / "responses.jsonl", 3, proc)
    a.kill()
    b.kill()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    err = stderr.decode()
    bar = err[err.rindex("kept"):err.rindex("selfinstruct generate:")]
    from urllib.parse import urlsplit

    assert all(f":{urlsplit(s.base_url).port} " in bar for s in (a, b)), err[-2000:]
    assert bar.count("(out)") == 2, bar
