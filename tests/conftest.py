"""Helpers the test files share: a scripted teacher, run folders, and the run-folder invariants.

``FakeTeacher`` is a real OpenAI-compatible server on 127.0.0.1 that the test starts
and stops; ``verify_run`` asserts every promise a finished run folder makes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rouge_score import rouge_scorer

from selfinstruct.datafiles import mark_run_folder
from selfinstruct.generate import GenerateOptions, candidates_of
from selfinstruct.prompts import bundled_dir
from selfinstruct.records import Instance, KeptRecord, Provenance, Rejected, Response, Usage
from selfinstruct.seeds import load_seeds

GENERATE = [sys.executable, "-m", "selfinstruct.cli", "generate"]


def run_generate(*args, key: str, timeout: float = 900, **popen):
    """``selfinstruct generate ARGS`` as a child process; the key goes by environment, not argv."""
    env = {**os.environ, "SELFINSTRUCT_API_KEY": key}
    return subprocess.run([*GENERATE, *args], env=env, capture_output=True, timeout=timeout, **popen)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client gone before its reply (a run that stopped waiting for it once --num was kept) is no
        error: socketserver printed its traceback to stderr from a handler thread that outlived the test,
        into a later test's captured stderr (a clean-clone CI run failed a one-line check that way)."""
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def one_error_line(stderr: bytes) -> str:
    """The CLI's error: exactly one non-empty line, 'selfinstruct generate: error: ...'."""
    text = stderr.decode()
    shown = [l for l in text.splitlines() if l.strip()]
    assert len(shown) == 1 and shown[0].startswith("selfinstruct generate: error: "), text[-3000:]
    return shown[0]


# Words that pass every filter and make instructions far apart in ROUGE-L.
VOCAB = """amber anchor apple arch autumn badge bakery balcony bamboo banner barley basket beacon bicycle
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


def diverse_tasks(n: int, k: int = 2, chatter: int = 0) -> str:
    """k Alpaca-format tasks whose instructions share almost no words with anything else."""
    rng = random.Random(n)
    blocks = ["Here you go. " * (chatter // 13)] if chatter else []
    for _ in range(k):
        words = rng.sample(VOCAB, 9)
        blocks.append(f"###\nInstruction: {rng.choice(VERBS)} {' '.join(words)}.\nInput: <noinput>\n"
                      f"Output: A short answer about the {words[0]} and the {words[1]}.\n")
    return "".join(blocks)


class Busy:
    """``on_request`` for FakeTeachers: holds each request 50 ms and counts the most held at once."""

    def __init__(self):
        self.lock, self.now, self.most = threading.Lock(), 0, 0

    def __call__(self, n: int) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.05)
        with self.lock:
            self.now -= 1


class FakeTeacher:
    """An OpenAI-compatible server on 127.0.0.1 that wants ``Authorization: Bearer <key>``.

    ``reply(n)`` writes the n-th reply (0-based); ``on_request(n)`` runs before it is sent.
    Every prompt it was sent is kept in ``prompts``. ``unauthorized_message`` is what a
    request with the wrong key is told (a server's own words, hostile ones included).
    """

    def __init__(self, reply=diverse_tasks, on_request=None, unauthorized_message="Invalid API Key", models=("fake",),
                 raw_reply=None, chat_template=None, refuse=None, usage=None):
        self.key = "sk-" + secrets.token_urlsafe(16)  # never led by "-", which argparse reads as a flag
        # --mode magpie: ``raw_reply(n)`` writes the n-th POST /v1/completions reply (None: the
        # server has no such endpoint, 404); ``chat_template`` is what GET /props serves, as
        # llama.cpp does (None: 404). Raw prompts are kept in ``raw_prompts``.
        self.raw_reply, self.chat_template = raw_reply, chat_template
        # ``refuse(prompt)``: a message to answer a chat request with as vLLM answers a prompt longer
        # than its context (400, BadRequestError), or None to answer it.
        self.refuse = refuse
        # ``usage(n)``: the n-th chat reply's usage object as sent, in place of the counted one (None: counted).
        self.usage = usage
        self.raw_prompts: list[str] = []
        self.unauthorized_message = unauthorized_message
        self.reply, self.on_request = reply, on_request
        self.models = models  # what GET /v1/models lists
        self.prompts: list[str] = []
        self.bodies: list[dict] = []  # every authorized request body, as sent
        self.unauthorized = 0
        self.model_lists = 0  # authorized GET /v1/models answered: each check of the server
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # generate's preflight: GET /models with the key
                if self.headers.get("Authorization") != f"Bearer {fake.key}":
                    fake.unauthorized += 1
                    return self.send(401, {"error": {"message": fake.unauthorized_message, "type": "authentication_error"}})
                if self.path == "/props" and fake.chat_template is not None:
                    return self.send(200, {"chat_template": fake.chat_template, "eos_token": "<|im_end|>"})
                if self.path != "/v1/models":
                    return self.send(404, {"error": {"message": "not found"}})
                with fake._lock:
                    fake.model_lists += 1
                self.send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                                                           for m in fake.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if self.headers.get("Authorization") != f"Bearer {fake.key}":
                    fake.unauthorized += 1
                    return self.send(401, {"error": {"message": fake.unauthorized_message, "type": "authentication_error"}})
                if self.path == "/v1/completions":
                    return self.raw(body)
                if fake.refuse and (why := fake.refuse(body["messages"][-1]["content"])):
                    return self.send(400, {"error": {"message": why, "type": "BadRequestError", "code": 400}})
                with fake._lock:
                    n = len(fake.prompts)
                    fake.prompts.append(body["messages"][0]["content"])
                    fake.bodies.append(body)
                if fake.on_request:
                    fake.on_request(n)
                text = fake.reply(n)
                self.send(200, {
                    "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": fake.usage(n) if fake.usage else {"prompt_tokens": len(fake.prompts[n].split()),
                                                               "completion_tokens": len(text.split()), "total_tokens": 0},
                })

            def raw(self, body):
                if fake.raw_reply is None:
                    return self.send(404, {"error": {"message": "File Not Found", "type": "not_found_error"}})
                with fake._lock:
                    n = len(fake.raw_prompts)
                    fake.raw_prompts.append(body["prompt"])
                    fake.bodies.append(body)
                if fake.on_request:
                    fake.on_request(n)
                text = fake.raw_reply(n)
                self.send(200, {
                    "id": f"cmpl-{n}", "object": "text_completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "text": text, "logprobs": None}],
                    "usage": {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": len(text.split()) + 1,
                              "total_tokens": 0},
                })

        return Handler


def fake_args(fake: FakeTeacher, out: Path, num: int, *more: str, mode: str = "alpaca") -> list[str]:
    """generate's flags for a run against ``fake``; magpie mode refuses --tasks-per-request (one query a request)."""
    tasks = [] if mode == "magpie" else ["--tasks-per-request", "2"]
    return ["--base-url", fake.base_url, "--model", "fake", "--out", str(out), "--num", str(num),
            "--concurrency", "1", *tasks, "--no-progress", *more, *(["--mode", mode] if mode != "alpaca" else [])]


def lines(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), f"{path.name} ends in a partial line"
    return [json.loads(l) for l in raw.decode().splitlines()]


def verify_run(folder: Path, num: int) -> dict:
    """Assert every invariant of a finished run folder; returns the stats."""
    cfg = GenerateOptions(out=str(folder), **{k: v for k, v in _yaml(folder / "config.yaml").items() if k != "out"})
    kept = [KeptRecord.model_validate(o) for o in lines(folder / "kept.jsonl")]
    rejected = [Rejected.model_validate(o) for o in lines(folder / "rejected.jsonl")]
    responses = [Response.model_validate(o) for o in lines(folder / "responses.jsonl")]
    assert len(kept) == num

    # Exactly-once accounting: the candidates each logged reply yields == the ids written.
    ids = [r.id for r in kept] + [r.id for r in rejected]
    assert len(ids) == len(set(ids)), "a candidate was written twice"
    expected = {f"{resp.id}-{n}" for resp in responses for n in range(len(candidates_of(resp, cfg)))}
    assert set(ids) == expected
    # Each reply was logged with its count, which a resume trusts instead of parsing it again.
    assert [resp.candidates for resp in responses] == [len(candidates_of(resp, cfg)) for resp in responses]

    # Dedup: against seeds and each other, checked with rouge_score itself.
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    seeds = [s.instruction for s in load_seeds([bundled_dir("seeds") / "seed_tasks.jsonl"])]
    pool = list(seeds)
    for rec in kept:
        worst = max(scorer.score(p, rec.instruction)["rougeL"].fmeasure for p in pool)
        assert worst <= 0.7, f"{rec.instruction!r} is a duplicate ({worst:.3f})"
        if rec.nearest:
            assert abs(rec.nearest[0].rouge_l - worst) < 1e-5  # the record says how close it came
        pool.append(rec.instruction)
        assert rec.provenance.teacher_model and rec.provenance.prompt_hash
        assert rec.provenance.example_ids or rec.provenance.mode == "magpie"  # magpie shows the teacher no examples

    # Every rejection carries a stage and a reason; dedup rejections are real duplicates.
    for rej in rejected:
        assert rej.reason and ":" in rej.reason
        if rej.stage == "dedup":
            # Checked with rouge_score, not the stored score: that is rounded to 6 digits, and a
            # float F1 of 0.7000000000000001 (a duplicate, as rouge_score decides) is stored as 0.7.
            assert rej.nearest and rej.nearest[0].rouge_l >= 0.7
            assert scorer.score(rej.nearest[0].instruction, rej.instruction)["rougeL"].fmeasure > 0.7

    stats = json.loads((folder / "stats.json").read_text())
    assert stats["kept"] == len(kept) and stats["rejected"] == len(rejected)
    assert stats["candidates"] == len(ids)
    assert sum(stats["rejected_by_reason"].values()) == len(rejected)
    assert sum(stats["rejected_by_stage"].values()) == len(rejected)
    assert stats["responses"] == len(responses)
    assert stats["completion_tokens"] == sum(r.usage.completion_tokens for resp in responses for r in resp.replies)
    assert stats["completion_tokens"] > 0
    alpaca = json.loads((folder / "data.json").read_text())
    assert len(alpaca) == sum(len(r.instances) for r in kept)
    assert set(alpaca[0]) == {"instruction", "input", "output"}
    return stats


def _yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())


def provenance() -> Provenance:
    return Provenance(
        teacher_model="teacher", base_url="http://127.0.0.1:1/v1", mode="alpaca", sampling={"temperature": 0.7},
        prompt_template="alpaca", prompt_hash="h", example_ids=["s1"], response_id="resp-1", usage=Usage(),
        created_at="2025-01-01T00:00:00Z", elapsed_s=0.5,
    )


def write_run(folder, rows) -> str:
    """A run folder whose kept.jsonl holds one KeptRecord per row."""
    folder.mkdir(parents=True, exist_ok=True)
    mark_run_folder(folder)
    with open(folder / "kept.jsonl", "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            rec = KeptRecord(id=f"resp-{i}-0", instruction=r["instruction"],
                             instances=[Instance(input=r["input"], output=r["output"])], provenance=provenance())
            f.write(rec.model_dump_json() + "\n")
    return str(folder)


def kill_when_lines(cmd: list[str], env: dict, path: Path, wants, after=None) -> int:
    """Run ``cmd`` once per count in ``wants``; SIGKILL its process group once ``path`` has that many lines.

    ``after()`` runs after each session ends. Returns how many sessions were killed (a session
    that finished first was not).
    """
    import signal

    kills = 0
    for want in wants:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= want:
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        if after:
            after()
    return kills


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but the lock file (which records its latest holder)."""
    import hashlib

    from selfinstruct.datafiles import LOCK

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != LOCK}


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` (``"1m"``) mounted at ``folder`` for a full-disk test; the test is
    skipped where mounting is not allowed."""
    import pytest

    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


class NoChoicesTeacher(FakeTeacher):
    """A server whose GET /models passes and whose every completion is 200 with empty ``choices``."""

    def _handler(self):
        fake = self

        class Handler(super()._handler()):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with fake._lock:
                    fake.prompts.append("")
                self.send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "fake", "choices": []})

        return Handler
