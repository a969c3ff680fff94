"""The teacher client's own housekeeping: its HTTP clients closed whatever its caller did, senders
started as the requests in flight need them, servers that refuse completions kept out (quick, no model).

Servers are ``bench/instant_server.py`` processes on 127.0.0.1 (test_multi_server.py's ``servers``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GENERATE, one_error_line
from test_multi_server import KEY, servers  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]

# A caller that made requests, then failed before its own ``close``: the client must not be left open.
CALLER_FAILS = """
import asyncio, sys
from selfinstruct.teacher import TeacherClient

async def main(url, client_processes):
    t = TeacherClient(base_url=url, api_key=sys.argv[3], model="instant", sampling={},
                      client_processes=client_processes)
    await t.preflight()
    await t.complete("hi", "tasks")
    raise OSError(24, "Too many open files")  # never reaches t.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.parametrize("client_processes", [0, 1], ids=["in-process", "sender"])
def test_a_caller_that_fails_before_closing_the_client_leaves_no_session_unclosed(servers, client_processes):
    (a,) = servers(1)
    r = subprocess.run([sys.executable, "-c", CALLER_FAILS, a.base_url, str(client_processes), KEY],
                       capture_output=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    stderr = r.stderr.decode()
    assert r.returncode == 1 and "OSError: [Errno 24] Too many open files" in stderr, stderr[-3000:]
    assert "Unclosed" not in stderr, stderr[-3000:]


# generate, out of file descriptors when it opens its run files (after the preflight asked GET /models).
GENERATE_OUT_OF_FILES = """
import sys
import selfinstruct.generate as g

def no_files(*args, **kwargs):
    raise OSError(24, "Too many open files")

g.GroupWriter = no_files
from selfinstruct.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_generate_out_of_files_after_its_preflight_leaves_no_session_unclosed(tmp_path, servers):
    """What a run out of file descriptors printed under its error: 'Unclosed client session'. And
    its error is one line naming the limit (it was an OSError's traceback), exit code 2."""
    (a,) = servers(1, "--tasks", "2")
    cmd = [sys.executable, "-c", GENERATE_OUT_OF_FILES, *GENERATE[3:], "--base-url", a.base_url, "--model", "instant",
           "--out", str(tmp_path / "run"), "--num", "5", "--no-progress", "--no-fsync"]
    r = subprocess.run(cmd, capture_output=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "SELFINSTRUCT_API_KEY": KEY})
    stderr = r.stderr.decode()
    assert r.returncode == 2 and "Too many open files" in stderr, stderr[-3000:]
    assert "Unclosed" not in stderr, stderr[-3000:]
    line = one_error_line(r.stderr)
    assert "out of open files" in line and "ulimit -n" in line and "lower --concurrency" in line, line


# ------------------------------------------------------------ a server that refuses completions


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_server_whose_completions_refuse_is_kept_out_though_its_models_check_passes(tmp_path, servers, status):
    """Its GET /models passes (the preflight, and each probe), its completions answer 401/403/404: a
    probe put it back, its requests failed again and it was taken out again, cycling for the whole run.
    Now it gets the attempts in flight when it first refused, and the others finish the run."""
    from test_multi_server import run_beside_a_failing_server

    from conftest import lines, verify_run

    out = tmp_path / "run"
    # About 10 s on the good servers: long enough for a probe to put it back, and its pause (passed over
    # after 4 faults in a row: 4 s) to end.
    r, url = run_beside_a_failing_server(tmp_path, servers, status, "0.2", out, 600)
    stderr = " ".join(r.stderr.decode().split())  # (a note wraps at the terminal's width)
    assert r.returncode == 0, stderr[-3000:]
    stats = verify_run(out, 600)  # every candidate of every logged reply kept or rejected, once
    assert not (out / "errors.jsonl").exists() or not lines(out / "errors.jsonl")  # no prompt failed
    per = stats["servers"][url]
    assert per["taken_out"] == 1 and per["requests"] <= 4, per  # its first attempts: what --concurrency let in
    assert per["faults"] == {f"http_{status}": per["requests"]}, per
    taken_out = re.findall(rf"{re.escape(url)} taken out of service \(http_{status}: [^)]*\) for the rest of the run", stderr)
    assert len(taken_out) == 1, stderr[-3000:]
    assert f"{url} answers again" not in stderr, stderr[-3000:]


# ------------------------------------------------------------ senders started as needed


def sender_scene(url: str, waves: list[int], **kw):
    """Send ``waves`` of requests (each wave's at once, one wave after another) through a TeacherClient
    with senders; the replies and how many sender processes it started."""
    import asyncio

    from selfinstruct.teacher import TeacherClient

    async def scene():
        t = TeacherClient(base_url=url, api_key=KEY, model="instant", sampling={}, **kw)
        try:
            replies = []
            for n in waves:
                replies += await asyncio.gather(*(t.complete(f"hi {len(replies) + i}", "tasks") for i in range(n)))
            return replies, len(t._senders._procs)
        finally:
            await t.close()

    return asyncio.run(scene())


def test_a_few_requests_start_one_sender_however_many_client_processes_allow(servers):
    """--client-processes 64 started 64 interpreters (33 s on 2 cores) for a dozen prompts: every one,
    up front. A sender is started when those started carry their share of what can be in flight
    (here 16 / 4 = 4 each)."""
    (a,) = servers(1, "--latency", "0.1")
    replies, started = sender_scene(a.base_url, [3, 1, 4, 2], concurrency=16, client_processes=4)
    assert len(replies) == 10 and all(r.text.startswith("###") for r in replies)
    assert started == 1


def test_many_requests_in_flight_start_every_sender(servers):
    (a,) = servers(1, "--latency", "0.3")
    replies, started = sender_scene(a.base_url, [16, 16], concurrency=16, client_processes=4)
    assert len(replies) == 32 and all(r.text.startswith("###") for r in replies)
    assert started == 4


@pytest.mark.parametrize("failing", [1, 2], ids=["first", "later"])
def test_a_sender_that_cannot_start_is_one_line(servers, monkeypatch, failing):
    """The first, or a later one started as more requests came: the next request stops the run with one line."""
    import asyncio

    from selfinstruct.config import UserError

    (a,) = servers(1, "--latency", "0.3")
    real, calls = asyncio.create_subprocess_exec, []

    async def fails(*args, **kwargs):
        calls.append(args)
        if len(calls) >= failing:
            raise OSError(24, "Too many open files")
        return await real(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", fails)
    with pytest.raises(UserError) as e:
        sender_scene(a.base_url, [1, 8, 8], concurrency=16, client_processes=4, max_retries=0)
    assert str(e.value) == (f"cannot start request sender process {failing} of 4 (--client-processes): "
                            "[Errno 24] Too many open files")


# ------------------------------------------------------------ a sender's own end


def test_a_sender_whose_reading_fails_closes_the_clients_it_made(servers):
    """Should a sender's reading fail (here a line that is not JSON, which the coordinator never
    writes), it ends with the error, its HTTP clients closed, not left to print 'Unclosed'."""
    import json
    import select

    (a,) = servers(1)
    code = "from selfinstruct.sender import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        body = {"model": "instant", "messages": [{"role": "user", "content": "hi"}]}
        proc.stdin.write(json.dumps({"api_key": KEY, "timeout": 10, "connections": 4}).encode() + b"\n"
                         + json.dumps({"id": 0, "url": a.base_url, "path": "/chat/completions", "body": body}).encode()
                         + b"\n")
        proc.stdin.flush()
        assert select.select([proc.stdout], [], [], 20)[0], "no answer"
        reply = json.loads(proc.stdout.readline())  # its client made a session for that server
        _, stderr = proc.communicate(b"not a request\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert reply["data"]["choices"][0]["message"]["content"].startswith("###")
    stderr = stderr.decode()
    assert "JSONDecodeError" in stderr and "Unclosed" not in stderr, stderr[-3000:]


# A client whose process has no file descriptor left when it connects.
CONNECT_OUT_OF_FILES = """
import asyncio, os, resource, sys
from selfinstruct.config import UserError
from selfinstruct.teacher import TeacherClient

async def main(url):
    t = TeacherClient(base_url=url, api_key=sys.argv[2], model="instant", sampling={}, max_retries=3)
    await t.preflight()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) - 1, hard))  # none left (listdir held one)
    try:
        await t.complete("hi", "tasks")
    except UserError as e:
        print("USER ERROR:", e)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await t.close()
    print("FAULTS:", dict(t.faults), [s.in_service for s in t.servers])

asyncio.run(main(sys.argv[1]))
"""


def test_a_connection_that_finds_no_file_descriptor_left_stops_with_one_line_not_against_the_server(servers):
    """Out of file descriptors is this process's limit, not the server's fault: counted as a connection
    fault, it took a healthy server out, a probe put it back, and so on in cycles. It stops the request
    (and so the run) with one line naming the limit, and the server is not blamed."""
    (a,) = servers(1)
    r = subprocess.run([sys.executable, "-c", CONNECT_OUT_OF_FILES, a.base_url, KEY], capture_output=True, timeout=60,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert "USER ERROR: out of open files: Too many open files" in out and "ulimit -n" in out, out
    assert "FAULTS: {} [True]" in out, out  # not counted against the server, which stays in service
