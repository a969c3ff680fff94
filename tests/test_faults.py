"""What happens when things fail: a flaky network, kill -9, a full disk, a read-only folder,
hostile teacher text, and strangers at the local teacher's port.

Real processes and real servers throughout: ``generate`` runs as a child process against
the real embedded teacher (behind a fault-injecting proxy) or against a tiny
OpenAI-compatible server written here; nothing in the openai client is mocked.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import resource
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from faultproxy import FAULTS, FaultProxy
from conftest import (GENERATE, FakeTeacher, diverse_tasks, fake_args, lines, one_error_line, run_generate, tmpfs,
                      verify_run)
from test_generate import FAST

from selfinstruct.datafiles import LOCK

JSONL = ("responses.jsonl", "kept.jsonl", "rejected.jsonl", "errors.jsonl")


@pytest.fixture(scope="module")
def teacher():
    """The real embedded teacher (llama.cpp, SmolLM2-135M), once for the module."""
    from selfinstruct.servers import embedded_teacher

    with embedded_teacher() as t:
        yield t


def complete_lines(folder: Path) -> dict[str, bytes]:
    """Each JSONL file's bytes up to its last newline: what no later failure may take back."""
    out = {}
    for name in JSONL:
        raw = (folder / name).read_bytes() if (folder / name).exists() else b""
        out[name] = raw[: raw.rfind(b"\n") + 1]
    return out


def assert_prefix_kept(folder: Path, before: dict[str, bytes]) -> None:
    for name, old in before.items():
        now = (folder / name).read_bytes() if (folder / name).exists() else b""
        assert now.startswith(old), f"{name}: lines written earlier were changed or lost"


# ------------------------------------------------------------ a tiny teacher

# ------------------------------------------------- 1. a network that fails

# At 10% faults the six kinds need ~50 requests, so each is made cheap: short prompts (one
# seed example) and short replies. Seed 13's first block of 60 faults requests 8 to 44.
CHEAP = ["--seed-examples", "1", "--machine-examples", "0", "--tasks-per-request", "2", "--max-tokens", "160"]
PROXY_SEED, REQUESTS_NEEDED = 13, 50


@pytest.mark.slow
def test_every_network_fault_is_retried_and_counted(tmp_path, teacher):
    """500s, 429s, timeouts, dropped and cut-off connections, broken JSON at ~10% of requests:
    the run still finishes, the folder holds every invariant, and stats count each fault the
    client saw."""
    out = tmp_path / "run"
    t0 = time.time()
    # How many requests the 135M teacher needs for --num kept varies threefold, so the run is
    # resumed with a --num scaled up from the yield so far until every kind of fault was seen
    # (stats.json adds up over sessions). A fault is seen once its request came again: the
    # run stops at --num kept and cancels what is in flight, so the last faults may never be read.
    num, sessions = 6, []
    with FaultProxy(teacher.base_url, seed=PROXY_SEED, hold_s=5, client_timeout_s=3) as proxy:
        for _ in range(6):
            r = run_generate("--base-url", proxy.base_url, "--model", teacher.model, "--max-retries", "6",
                             "--timeout", "3", "--num", str(num), "--out", str(out), "--seed", "5", *FAST, *CHEAP,
                             # --base-url turns the prefill off; the 135M teacher needs it (as embedded).
                             "--prefill", key=teacher.api_key, timeout=1800)
            assert r.returncode == 0, r.stderr.decode()[-3000:]
            sessions.append(f"--num {num}: {proxy.requests} requests by {time.time() - t0:.0f}s")
            seen = proxy.retried()
            if set(seen) == set(FAULTS):
                break
            num = max(num + 2, math.ceil(num * REQUESTS_NEEDED / proxy.requests))
    stats = verify_run(out, num)
    errors = lines(out / "errors.jsonl")
    faults = Counter(stats["faults"])
    fates = Counter(fate for _, _, fate in proxy.arrivals)
    rate = 1 - fates["relay"] / sum(fates.values())
    print(f"\n{proxy.requests} requests ({proxy.relayed} relayed, {rate:.1%} faulted) in sessions {sessions}, "
          f"injected {Counter(f for f, _ in proxy.injected)}, stats faults {dict(faults)}, "
          f"failed units {stats['errors']}, {time.time() - t0:.0f}s")

    # Every kind of fault was seen by the run (it retried it), at about the rate asked for...
    assert set(seen) == set(FAULTS), f"the run ended before it had retried every fault kind: {seen}"
    assert 0.05 <= rate <= 0.20, f"{rate:.1%} of {sum(fates.values())} requests were faulted, not ~10%"
    # ...and each one it saw is counted, per attempt, under the kind the client names it.
    expected = Counter()
    for fault, n in seen.items():
        expected[FAULTS[fault]] += n
    for kind, n in expected.items():
        assert faults[kind] >= n, f"{kind}: the proxy injected {n}, stats count {faults[kind]}"
    # Kinds only the proxy can cause are not over-counted either (timeouts and connection
    # faults could also be genuine, so they are bounded from below only).
    injected_all = Counter(FAULTS[f] for f, _ in proxy.injected)
    for kind in ("http_500", "http_429", "malformed_response"):
        assert faults[kind] <= injected_all[kind], f"{kind}: stats count {faults[kind]} > injected {injected_all[kind]}"
    # A 429 is retried no sooner than its Retry-After: 1 asks (the first backoff is 0.5 s).
    gaps = proxy.retry_gaps("http_429")
    assert gaps and min(gaps) >= 0.95, gaps
    # A unit that failed after every retry is in errors.jsonl under the kind of its last fault.
    assert stats["failed_units"] == len(errors)
    assert {e["kind"] for e in errors} <= set(FAULTS.values())
    assert all(faults[e["kind"]] > 0 for e in errors)


# ------------------------------------------------------------- 2. kill -9

@pytest.mark.slow
def test_twenty_kill_9s_during_a_real_run_lose_and_repeat_nothing(tmp_path):
    """SIGKILL the whole process group (the embedded teacher dies with it) at 20 moments:
    during startup, at random times, and just after a line was written; resume each time."""
    out = tmp_path / "run"
    num = 6
    rng = random.Random(20)
    t0 = time.time()
    before: dict[str, bytes] = {}
    acknowledged: set[str] = set()
    moments = Counter()

    def command() -> list[str]:
        return [*GENERATE, "--num", str(num), "--out", str(out), "--seed", "4", *FAST]

    def written() -> int:
        return sum((out / n).stat().st_size for n in JSONL[:3] if (out / n).exists())

    for session in range(40):
        kills = sum(moments.values())
        if kills == 20:
            break
        proc = subprocess.Popen(command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        if kills < 4:
            moment = "startup"
            time.sleep(rng.uniform(0.05, 2.0))
        elif rng.random() < 0.4:
            moment = "timed"
            time.sleep(rng.uniform(1, 8))
        else:  # just after the k-th write: inside a reply's log-reject-keep sequence, or between
            moment = "after_write"
            deadline = time.monotonic() + 300
            for _ in range(rng.randint(1, 4)):
                size = written()
                while proc.poll() is None and time.monotonic() < deadline and written() == size:
                    time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is not None:  # finished before the kill (a fast machine): ask for more
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            proc.stderr.close()
            num += 2  # --num may grow on resume
            continue
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        moments[moment] += 1
        # Complete lines written before are still there, unchanged, after this kill.
        assert_prefix_kept(out, before)
        before = complete_lines(out)
        acknowledged |= {json.loads(l)["id"] for l in before["kept.jsonl"].decode().splitlines()}
    r = subprocess.run(command(), capture_output=True, timeout=1800)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    print(f"\n{sum(moments.values())} kills {dict(moments)}; {len(acknowledged)} kept ids acknowledged at a kill; "
          f"--num {num}; {time.time() - t0:.0f}s")
    assert sum(moments.values()) == 20
    assert acknowledged, "no kill came after a kept record was written; lengthen the run"
    assert_prefix_kept(out, before)
    verify_run(out, num)
    for name in JSONL:
        lines(out / name)  # no partial line anywhere
    assert acknowledged <= {o["id"] for o in lines(out / "kept.jsonl")}


def test_twenty_kill_9s_on_the_fast_path_lose_and_repeat_nothing(tmp_path):
    """The same promise with group commit under load: a fast scripted server, 16 prompts in
    flight, so many replies share each commit; SIGKILL 20 times while lines are flowing. --num is
    far enough that the loop holds groups back between replies (``Processor.feed``)."""
    out = tmp_path / "run"
    rng = random.Random(21)
    before: dict[str, bytes] = {}
    acknowledged: set[str] = set()
    kills, num = 0, 600
    with FakeTeacher(reply=lambda n: diverse_tasks(n, k=5)) as fake:

        def command() -> list[str]:
            return [*GENERATE, *fake_args(fake, out, num), "--concurrency", "16", "--tasks-per-request", "5"]

        def written() -> int:
            return sum((out / n).stat().st_size for n in JSONL if (out / n).exists())

        env = {**os.environ, "SELFINSTRUCT_API_KEY": fake.key}
        while kills < 20:
            proc = subprocess.Popen(command(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            size, deadline = written(), time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline and written() == size:
                time.sleep(0.002)  # wait for this session's first commit
            time.sleep(rng.uniform(0, 0.1))
            if proc.poll() is not None:  # it finished first: ask for more (--num may grow on resume)
                assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
                proc.stderr.close()
                num += 40
                continue
            proc.kill()
            proc.wait()
            proc.stderr.close()
            kills += 1
            assert_prefix_kept(out, before)
            before = complete_lines(out)
            acknowledged |= {json.loads(l)["id"] for l in before["kept.jsonl"].decode().splitlines()}
        num = max(num, len(acknowledged) + 10)
        r = subprocess.run(command(), env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert acknowledged, "no kill came after a kept record was written"
    assert_prefix_kept(out, before)
    verify_run(out, num)
    assert acknowledged <= {o["id"] for o in lines(out / "kept.jsonl")}
    groups = len(lines(out / "responses.jsonl"))
    print(f"\n20 kills; {len(acknowledged)} kept ids acknowledged at a kill; --num {num}; {groups} replies")


# ----------------------------------------------- 3. disk full, read-only folder

@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs; skipped where mounting is not allowed."""
    with tmpfs(tmp_path / "disk", "1m") as mnt:
        yield mnt


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as f:
        while True:
            try:
                f.write(b"\0" * 65536)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return filler


def test_a_teacher_that_writes_nothing_usable_is_stopped_at_the_request_cap(tmp_path):
    """Every reply is a refusal: the run gives up after the default cap (50 times what --num
    needs), exits 1 with a note saying so, and every candidate is in rejected.jsonl."""
    out = tmp_path / "run"
    refusal = "###\nInstruction: I'm sorry, but as an AI language model I cannot do that.\nInput: <noinput>\nOutput: No.\n"
    with FakeTeacher(reply=lambda n: refusal * 2) as fake:
        r = run_generate(*fake_args(fake, out, 3, "--concurrency", "8"), key=fake.key)
    assert r.returncode == 1, r.stderr.decode()[-3000:]
    cap = 50 * 2  # --num 3 at 2 tasks per request needs 2 prompts
    assert len(fake.prompts) == cap
    assert f"stopped after {cap} prompts (--max-requests {cap}) with 0 of 3 kept" in r.stderr.decode()
    assert lines(out / "kept.jsonl") == [] and len(lines(out / "rejected.jsonl")) == 2 * cap
    # A larger cap on resume goes on from there instead of starting again.
    with FakeTeacher(reply=lambda n: refusal * 2) as fake:
        r = run_generate(*fake_args(fake, out, 3, "--max-requests", str(cap + 5)), key=fake.key)
    assert r.returncode == 1 and len(fake.prompts) == 5


def test_disk_full_mid_run_and_on_resume_is_one_clear_error_and_loses_nothing(tiny_disk):
    out = tiny_disk / "run"
    # The 4th request fills the disk, and its reply is too big for what is left of any page.
    with FakeTeacher(reply=lambda n: diverse_tasks(n, chatter=12000 if n == 3 else 0),
                     on_request=lambda n: fill(tiny_disk) if n == 3 else None) as fake:
        r = run_generate(*fake_args(fake, out, 20), key=fake.key)
        assert r.returncode == 2, r.stderr.decode()[-3000:]
        msg = one_error_line(r.stderr)
        # The write that failed: the 4th reply's log line, or (when that still fit a page's
        # slack) one of its decision lines; either way the error names the file.
        assert any(f"{out / name}: cannot write (No space left on device)" in msg for name in JSONL), msg
        # Nothing half-written is left behind, and the replies before the fill are all there.
        for name in JSONL:
            lines(out / name)
        assert len(lines(out / "responses.jsonl")) >= 3
        snapshot = {p.name: p.read_bytes() for p in out.iterdir()}

        # Resuming on the still-full disk: the same clear error. A line may still fit in the
        # slack of a file's last page; nothing written before changes, no line is cut.
        r = run_generate(*fake_args(fake, out, 20), key=fake.key)
        assert r.returncode == 2, r.stderr.decode()[-3000:]
        msg = one_error_line(r.stderr)
        assert str(out) in msg and "No space left on device" in msg
        assert_prefix_kept(out, {k: v for k, v in snapshot.items() if k in JSONL})
        for name in JSONL:
            lines(out / name)
        # The lock file records its latest holder; everything else is as it was.
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name not in (*JSONL, LOCK)} == \
            {k: v for k, v in snapshot.items() if k not in (*JSONL, LOCK)}
        snapshot = {p.name: p.read_bytes() for p in out.iterdir()}

        # Space again: the resume finishes the run, keeping every line written before (and asks
        # for more than is kept: records short enough to fit a page's slack may have been kept).
        (tiny_disk / "filler").unlink()
        num = len(lines(out / "kept.jsonl")) + 2
        r = run_generate(*fake_args(fake, out, num), key=fake.key)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert_prefix_kept(out, {k: v for k, v in snapshot.items() if k in JSONL})
    verify_run(out, num)


def _limit_file_size(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write over the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_a_write_the_disk_takes_only_in_part_is_an_error_not_half_a_line(tmp_path):
    """RLIMIT_FSIZE makes the write-ahead log's next line fit only in part (a short write):
    the run must stop with a clear error, not go on with half a line in the log."""
    out = tmp_path / "run"
    limit = 40_000  # replies of ~15 KB: the log reaches it on the 3rd reply, the other files never do
    with FakeTeacher(reply=lambda n: diverse_tasks(n, chatter=15000)) as fake:
        r = run_generate(*fake_args(fake, out, 20), key=fake.key, preexec_fn=_limit_file_size(limit))
        assert r.returncode == 2, r.stderr.decode()[-3000:]
        msg = one_error_line(r.stderr)
        assert f"{out / 'responses.jsonl'}: cannot write (File too large)" in msg
        for name in JSONL:
            lines(out / name)
        written = complete_lines(out)
        r = run_generate(*fake_args(fake, out, 6), key=fake.key)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert_prefix_kept(out, written)
    verify_run(out, 6)


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only for root too (a read-only bind mount); skipped where not allowed."""
    mounted = []

    def make(folder: Path):
        r = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {r.stderr.decode().strip()}")
        mounted.append(folder)
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {r.stderr.decode().strip()}")

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_read_only_run_folder_is_one_clear_error_and_changes_nothing(tmp_path, read_only):
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        assert run_generate(*fake_args(fake, out, 2), key=fake.key).returncode == 0
        snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
        read_only(out)
        asked = len(fake.prompts)
        r = run_generate(*fake_args(fake, out, 4), key=fake.key)
        assert r.returncode == 2, r.stderr.decode()[-3000:]
        msg = one_error_line(r.stderr)
        assert str(out) in msg and "Read-only file system" in msg
        assert len(fake.prompts) == asked, "the teacher was asked before the folder was known to be writable"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot


# ------------------------------------------------- 4. teacher output is data

def test_sampling_settings_reach_the_server_and_a_retry_gets_a_fresh_seed(tmp_path):
    def drop_first(n):
        if n == 0:
            raise ConnectionResetError("dropped")  # the handler dies: the client sees a dropped connection

    sampling = ["--temperature", "0.3", "--top-p", "0.8", "--max-tokens", "77", "--stop", "END", "STOP"]
    with FakeTeacher(on_request=drop_first) as fake:
        r = run_generate(*fake_args(fake, tmp_path / "seeded", 2, *sampling, "--teacher-seed", "7"), key=fake.key)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
        seeded = list(fake.bodies)
    with FakeTeacher() as fake:
        assert run_generate(*fake_args(fake, tmp_path / "unseeded", 2), key=fake.key).returncode == 0
        unseeded = list(fake.bodies)
    for body in seeded:
        assert (body["temperature"], body["top_p"], body["max_tokens"], body["stop"]) == (0.3, 0.8, 77, ["END", "STOP"])
    # The dropped request was retried with the same prompt but not the same seed.
    assert seeded[0]["messages"] == seeded[1]["messages"] and seeded[0]["seed"] != seeded[1]["seed"]
    assert len({b["seed"] for b in seeded}) == len(seeded)
    assert all("seed" not in b for b in unseeded)
    kept = [json.loads(line) for line in (tmp_path / "seeded" / "kept.jsonl").read_text().split("\n") if line]
    assert kept[0]["provenance"]["sampling"] == {"temperature": 0.3, "top_p": 0.8, "max_tokens": 77,
                                                 "stop": ["END", "STOP"], "seed": 7}


CONTROLS = " \x1b[31mred\x1b[0m \x1b]0;title\x07 nul\x00 bell\x07 del\x7f c1\x85"


def hostile(canary: Path, controls: str = "") -> str:
    return (f"Explain ../../etc/passwd then $(rm -rf /) and $(touch {canary}) and `touch {canary}` "
            f"with {{examples}} $num ${{num}} $$ %s %(num)s {{0}}{controls} ls\u2028 <script>alert(1)</script> done.")


def test_teacher_output_is_stored_as_text_and_never_acted_on(tmp_path):
    canary = tmp_path / "pwned"
    text = hostile(canary)
    out_text = "Output " + text + "\n\tend"  # the output keeps its inner newlines and tabs
    dirty = hostile(canary, CONTROLS)  # ESC sequences, BEL, NUL, DEL, C1: never training data
    first = (f"###\nInstruction: {text}\nInput: {text}\nOutput: {out_text}\n"
             "###\nInstruction: $(rm -rf /)\nInput: <noinput>\nOutput: `reboot` \x1b[2J\n"
             f"###\nInstruction: {dirty}\nInput: <noinput>\nOutput: fine\n"
             f"###\nInstruction: Compare the quartz quill raven reef ribbon river robin saddle.\nInput: <noinput>\n"
             f"Output: ok {dirty}\n")
    home = tmp_path / "a" / "b"  # where the command runs: ../../ lands inside tmp_path
    home.mkdir(parents=True)
    passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()

    def tree():
        return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "run" not in p.relative_to(tmp_path).parts)

    before = tree()
    with FakeTeacher(reply=lambda n: first if n == 0 else diverse_tasks(n)) as fake:
        r = run_generate(*fake_args(fake, tmp_path / "run", 2, "--seed-examples", "2", "--machine-examples", "1"),
                         key=fake.key, cwd=home)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    out = tmp_path / "run"

    # Stored as text: the JSON round trip gives back exactly what the teacher sent.
    from selfinstruct.runfolder import load_kept, load_rejected

    kept = {k.id: k for k in load_kept(out)}
    assert kept["r000000-0"].instruction == " ".join(text.split())  # one line, single spaces
    assert kept["r000000-0"].instances[0].input == text.strip()
    assert kept["r000000-0"].instances[0].output == out_text.strip()
    rejected = {j.id: j for j in load_rejected(out)}
    assert rejected["r000000-1"].raw.endswith("Instruction: $(rm -rf /)\nInput: <noinput>\nOutput: `reboot` \x1b[2J")
    assert rejected["r000000-1"].reason.startswith("too_short")
    # Control characters in an instruction or an output: rejected with a reason, the raw text kept as it came.
    for rid, field in (("r000000-2", "instruction"), ("r000000-3", "output")):
        assert (rejected[rid].stage, rejected[rid].reason) == ("filter", f"control_characters: the {field} holds U+001B")
        assert dirty in rejected[rid].raw
    assert not any(c in json.dumps([k.model_dump() for k in kept.values()]) for c in ("\\u001b", "\\u0000", "\\u0007"))
    for name in JSONL:  # one record per line for any line splitter, str.splitlines included
        raw = (out / name).read_bytes()
        assert raw.count(b"\n") == len(raw.decode().splitlines()) == len(lines(out / name))
    data = json.loads((out / "data.json").read_text())
    assert {"instruction": " ".join(text.split()), "input": text.strip(), "output": out_text.strip()} in data
    verify_run(out, 2)

    # Never acted on: no file appeared outside the run folder, nothing ran, nothing was printed.
    assert tree() == before and not canary.exists()
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == passwd
    assert b"\x1b" not in r.stdout + r.stderr and b"rm -rf" not in r.stdout + r.stderr

    # The next prompt shows the kept task as an example, verbatim: the template's own $num
    # was filled in, the teacher's $num, ${num} and {examples} were not.
    second = fake.prompts[1]
    example = f"Instruction: {' '.join(text.split())}\nInput: {text.strip()}\nOutput: {out_text.strip()}\n"
    assert example in second
    rest = second.replace(example, "")
    assert "$num" not in rest and "{examples}" not in rest and "Invent 2 new tasks" in rest


# ---------------------------------------- 5. local servers: 127.0.0.1 and a key

PROTECTED = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
             ("POST", "/completion"), ("POST", "/tokenize"), ("GET", "/props"), ("GET", "/slots"),
             ("GET", "/metrics")]


def _status(url: str, method: str, key: str | None) -> int:
    data = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi",
                       "content": "hi", "max_tokens": 1, "n_predict": 1}).encode() if method == "POST" else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=headers),
                                    timeout=300) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_embedded_teacher_listens_on_loopback_only_and_wants_its_key(teacher, tmp_path):
    url = urlsplit(teacher.base_url)
    assert url.hostname == "127.0.0.1"
    # Every socket listening on that port is bound to 127.0.0.1 (none on IPv6 or 0.0.0.0).
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == url.port:
                listening.append((table, local))
    assert listening == [("/proc/net/tcp", f"0100007F:{url.port:04X}")]
    # From another address of this machine, nobody answers.
    others = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    for ip in [a for a in others if ":" not in a and not a.startswith("127.")][:2]:
        with pytest.raises(OSError):
            socket.create_connection((ip, url.port), timeout=5).close()

    root = teacher.base_url.removesuffix("/v1")
    for method, path in PROTECTED:
        assert _status(root + path, method, None) == 401, f"{method} {path} without a key"
        assert _status(root + path, method, "wrong-" + teacher.api_key) == 401, f"{method} {path} with a wrong key"
    assert _status(root + "/v1/models", "GET", teacher.api_key) == 200
    assert _status(root + "/health", "GET", None) == 200  # llama.cpp's liveness probe is open by design

    # generate with a wrong key stops before the first prompt (the preflight's GET /models) with one clear line.
    r = run_generate("--base-url", teacher.base_url, "--model", teacher.model, "--out", str(tmp_path / "run"),
                     "--num", "1", *FAST, "--prefill", key="wrong-key", timeout=300)  # FAST's --lead-word needs it
    assert r.returncode == 2
    assert "refused the request (http_401)" in one_error_line(r.stderr)
    assert not (tmp_path / "run" / "errors.jsonl").exists()  # no prompt was spent on it


def test_a_lone_surrogate_in_a_reply_is_a_replacement_character_not_a_crash(tmp_path):
    """JSON may escape half a UTF-16 pair ("\\ud800"), which no UTF-8 file can hold: it was a
    traceback from the record writer; now it is U+FFFD, as a broken byte is, and the task holding it
    is rejected as replacement_character (its text, U+FFFD and all, kept in rejected.jsonl)."""
    first = ("###\nInstruction: Describe the quartz quill \ud800 raven reef ribbon river robin.\nInput: <noinput>\n"
             "Output: A robin by a river \udfff on a reef.\n")
    with FakeTeacher(reply=lambda n: first if n == 0 else diverse_tasks(n)) as fake:
        r = run_generate(*fake_args(fake, tmp_path / "run", 2), key=fake.key)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    rec = next(o for o in lines(tmp_path / "run" / "rejected.jsonl") if o["id"] == "r000000-0")
    assert rec["instruction"] == "Describe the quartz quill \ufffd raven reef ribbon river robin."
    assert rec["reason"].startswith("replacement_character: the instruction holds U+FFFD")
    assert "A robin by a river \ufffd on a reef." in rec["raw"]
    verify_run(tmp_path / "run", 2)


@pytest.mark.parametrize("count", ["1e30", "10" + "0" * 29, "-4", '"12"', "2.5"])
def test_an_impossible_usage_count_is_taken_as_none_and_counted_as_a_fault(tmp_path, count):
    """A server (a proxy, say) that replied usage: {"completion_tokens": 1e30} put 1e30 tokens in stats.json's
    totals as it was (an integer that large), or dropped a negative or string count in silence. The reply is
    still used; its usage is taken as none, and each such reply is an impossible_usage fault of its server's."""
    usage = json.loads(f'{{"prompt_tokens": 7, "completion_tokens": {count}}}')
    with FakeTeacher(usage=lambda n: usage if n == 0 else {"prompt_tokens": 7, "completion_tokens": 3}) as fake:
        r = run_generate(*fake_args(fake, tmp_path / "run", 4), key=fake.key)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    stats = verify_run(tmp_path / "run", 4)
    asked = stats["responses"]
    assert asked >= 2  # --num 4 at 2 tasks a request: the first reply's tasks were kept, and another's
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (7 * (asked - 1), 3 * (asked - 1))
    assert stats["faults"] == {"impossible_usage": 1}
    assert stats["servers"][fake.base_url]["faults"] == {"impossible_usage": 1}
    first = lines(tmp_path / "run" / "responses.jsonl")[0]
    assert first["replies"][0]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}


def test_teacher_text_with_a_bidi_control_or_a_zero_width_character_inside_is_rejected(tmp_path):
    """A right-to-left override inside an instruction (the text shows in another order than it is), a
    zero-width space inside an output and a soft hyphen splitting 'image' (past the blacklist) were all
    kept. Each task is rejected as invisible_characters, naming the field and the character."""
    first = ("###\nInstruction: Describe the amber anchor apple arch autumn in \u202eplain words.\nInput: <noinput>\n"
             "Output: An answer about the amber.\n"
             "###\nInstruction: Explain the badge bakery balcony bamboo banner to a child.\nInput: <noinput>\n"
             "Output: A badge is\u200b a small sign.\n"
             "###\nInstruction: Summarize the cedar cellar chalk cherry chimney im\u00adage.\nInput: <noinput>\n"
             "Output: Fine.\n")
    with FakeTeacher(reply=lambda n: first if n == 0 else diverse_tasks(n)) as fake:
        r = run_generate(*fake_args(fake, tmp_path / "run", 2), key=fake.key)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    rejected = {o["id"]: o["reason"].split(" (")[0] for o in lines(tmp_path / "run" / "rejected.jsonl")}
    assert {k: rejected.get(k) for k in ("r000000-0", "r000000-1", "r000000-2")} == {
        "r000000-0": "invisible_characters: the instruction holds U+202E",
        "r000000-1": "invisible_characters: the output holds U+200B",
        "r000000-2": "invisible_characters: the instruction holds U+00AD"}
    stats = verify_run(tmp_path / "run", 2)
    assert stats["rejected_by_reason"]["invisible_characters"] == 3
