"""Run-folder safety (issue 12): each case a user or a second process can cause is one line,
exit code 2, and every file left as it was (compared by hash).

Real processes against the scripted teacher on 127.0.0.1 (``FakeTeacher``); no model.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import FakeTeacher, fake_args, one_error_line, run_generate, snapshot, verify_run

from selfinstruct.cli import main
from selfinstruct.datafiles import MARKER

ROWS = [{"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
        {"instruction": "Name the color of a clear sky.", "input": "", "output": "Blue."}]


@pytest.fixture(scope="module")
def made_run(tmp_path_factory) -> Path:
    """A finished run folder from a real `generate` (2 kept); tests copy it."""
    out = tmp_path_factory.mktemp("made") / "run"
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 2), key=fake.key)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    return out


@pytest.fixture
def run(made_run, tmp_path) -> Path:
    shutil.copytree(made_run, tmp_path / "run")
    return tmp_path / "run"


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def one_line(err: str, command: str) -> str:
    shown = [line for line in err.splitlines() if line.strip()]
    assert len(shown) == 1 and shown[0].startswith(f"selfinstruct {command}: error: "), err
    return shown[0]


# ----------------------------------------------------------- 1. one writer per run folder

def test_a_second_generate_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    """The first run is held at its first request until the second has been refused: with a fixed
    delay per request instead, a loaded machine (load average 4.5) started the second only after
    the first had finished, and the second resumed the run."""
    import threading

    out = tmp_path / "run"
    gate = threading.Event()  # the first run's requests wait here until the test opens it
    with FakeTeacher(on_request=lambda n: gate.wait(120)) as fake:
        env = {**os.environ, "SELFINSTRUCT_API_KEY": fake.key}
        first = subprocess.Popen([sys.executable, "-m", "selfinstruct.cli", "generate", *fake_args(fake, out, 6)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 60
            while not fake.prompts and time.time() < deadline:
                time.sleep(0.05)
            assert fake.prompts, "the first run never asked the teacher"
            second = run_generate(*fake_args(fake, out, 6), key=fake.key)
            assert second.returncode == 2
            msg = one_error_line(second.stderr)
            assert f"{out}: in use by pid {first.pid} (selfinstruct generate, since " in msg
            assert first.poll() is None  # still held at its first request: the lock was its own
            gate.set()
            _, err = first.communicate(timeout=120)
        finally:
            gate.set()
            first.kill()
    assert first.returncode == 0, err.decode()[-3000:]
    verify_run(out, 6)


# ----------------------------------------------------------- 2. outputs never overwrite inputs

def test_no_command_writes_over_a_run_or_its_input(run, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    before, data_before = snapshot(run), data.read_bytes()
    cases = [
        (["dedup", run, "--out", run], "is a run folder"),
        (["dedup", run, "--out", f"{run}/./"], "is a run folder"),
        (["export", run, "--format", "jsonl", "--out", run / "kept.jsonl"], "kept.jsonl is a run folder's own file"),
        (["export", run, "--format", "alpaca", "--out", run / "data.json"], "data.json is a run folder's own file"),
        (["export", data, "--format", "alpaca", "--out", data], "would overwrite the input"),
        (["export", data, "--format", "hf", "--out", tmp_path], "would overwrite the input"),
        (["tune", run, "--out", run, "--max-steps", "1"], "is a run folder"),
        (["audit", run, "--html", run / "kept.jsonl"], "kept.jsonl is a run folder's own file"),
        (["filter", run, "--min-score", "3", "--out", run / "stats.json"], "stats.json is a run folder's own file"),
        (["export", run, "--format", "jsonl", "--out", run / "judge_session.json"],
         "judge_session.json is a run folder's own file"),
    ]
    for argv, message in cases:
        code, err = cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in one_line(err, argv[0]), (argv, err)
    assert snapshot(run) == before and data.read_bytes() == data_before
    # dedup DATA --out DIR where DIR/kept.jsonl is the data itself
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    code, err = cli(capsys, "dedup", tmp_path / "d" / "kept.jsonl", "--out", tmp_path / "d")
    assert code == 2 and "would overwrite the input" in one_line(err, "dedup")


def test_no_command_writes_inside_an_input_dataset_folder(tmp_path, capsys):
    """`export dd --format hf --out dd/test` replaced a split of the input DatasetDict (and any
    --out under a saved dataset wrote into it): refused, for a whole folder and for one of its splits."""
    from datasets import Dataset, DatasetDict

    dd, flat = tmp_path / "dd", tmp_path / "flat"
    DatasetDict({"train": Dataset.from_list(ROWS[:1]), "test": Dataset.from_list(ROWS[1:])}).save_to_disk(str(dd))
    Dataset.from_list(ROWS).save_to_disk(str(flat))
    capsys.readouterr()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cases = [
        (["export", dd, "--format", "hf", "--out", dd / "test"], dd),
        (["export", dd / "test", "--format", "hf", "--out", dd / "train"], dd),
        (["export", dd / "test", "--format", "jsonl", "--out", dd / "test.jsonl"], dd),
        (["export", flat, "--format", "jsonl", "--out", flat / "x.jsonl"], flat),
        (["dedup", dd / "train", "--out", dd / "deduped"], dd),
        (["decontaminate", flat, "--against", flat, "--out", flat / "clean"], flat),
    ]
    for argv, home in cases:
        code, err = cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert f"is inside the input dataset {home}; choose a path outside it" in one_line(err, argv[0]), (argv, err)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # beside it is fine
    code, err = cli(capsys, "export", dd / "test", "--format", "hf", "--out", tmp_path / "test_copy")
    assert code == 0, err


def test_export_or_filter_never_replaces_a_file_a_run_reads_when_it_resumes(tmp_path, capsys):
    """`generate --seeds my.jsonl --out runS; export runS --out my.jsonl` replaced the seeds (the next
    resume was refused), and `export resp --out src.json` the rows a respond run had still to answer:
    refused as audit --html is, one line naming the input, nothing written."""
    seeds, src = tmp_path / "my.jsonl", tmp_path / "src.json"
    seeds.write_text("".join((Path("seeds") / "seed_tasks.jsonl").read_text().splitlines(keepends=True)[:5]))
    src.write_text(json.dumps(ROWS))
    run_s, resp = tmp_path / "runS", tmp_path / "resp"
    with FakeTeacher() as fake:
        assert main(["generate", *fake_args(fake, run_s, 2), "--seeds", str(seeds), f"--api-key={fake.key}"]) == 0
        assert main(["respond", str(src), "--base-url", fake.base_url, "--model", "fake", f"--api-key={fake.key}",
                     "--out", str(resp), "--no-progress", "--limit", "1"]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (seeds, src)}
    cases = [
        (["export", run_s, "--format", "jsonl", "--out", seeds], seeds),
        (["filter", run_s, "--min-score", "3", "--out", tmp_path / "f.jsonl", "--rejected", seeds], seeds),
        (["export", resp, "--out", src], src),
        (["filter", resp, "--min-score", "3", "--out", src], src),
    ]
    for argv, read in cases:
        code, err = cli(capsys, *argv)
        flag = "--rejected" if "--rejected" in argv else "--out"
        assert code == 2 and f"{flag} would overwrite the input {read}" in one_line(err, argv[0]), (argv, err)
    assert {p: p.read_bytes() for p in (seeds, src)} == before
    code, err = cli(capsys, "export", resp, "--out", tmp_path / "answered.json")  # beside them is fine
    assert code == 0, err


def test_no_command_writes_over_a_dedup_or_decontaminate_folders_own_files(tmp_path, capsys):
    """`export runS --out dd/kept.jsonl` was taken, and a card of dd/kept.jsonl then stated dd's
    summary.json: a dedup or decontaminate output folder's files are its own, as a run's are; also in
    a folder made before its marker (known by its summary.json)."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is the boiling point of water at sea level in kelvin?"}) + "\n")
    for command, more in (("dedup", []), ("decontaminate", ["--against", bench])):
        out = tmp_path / command
        assert cli(capsys, command, data, *more, "--out", out)[0] == 0
        for old in (False, True):
            if old:  # made before the marker: known by its summary.json
                (out / ".selfinstruct-filtered").unlink()
            before = snapshot(out)
            for argv in (["export", data, "--format", "jsonl", "--out", out / "kept.jsonl"],
                         ["export", data, "--out", out / "summary.json"],
                         ["audit", data, "--html", out / "removed.html"],  # not one of its files: fine
                         ["export", data, "--format", "jsonl", "--out", out / "removed.jsonl"]):
                code, err = cli(capsys, *argv)
                name = Path(argv[-1]).name
                if name == "removed.html":
                    assert code == 0, err
                    (out / name).unlink()
                    continue
                assert code == 2 and (f"{name} is a dedup or decontaminate output folder's own file; choose an "
                                      "--out outside it") in one_line(err, argv[0]), (argv, err)
            assert snapshot(out) == before
    # A folder of the user's with a kept.jsonl of theirs is theirs to write into.
    (tmp_path / "mine").mkdir()
    assert cli(capsys, "export", data, "--format", "jsonl", "--out", tmp_path / "mine" / "kept.jsonl")[0] == 0


# ----------------------------------------------------------- 3. only our marker makes a run folder

def test_a_folder_that_is_not_a_run_is_never_taken_for_one(tmp_path, capsys):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.yaml").write_text("num: 5\nmy: own settings\n")
    (mine / "kept.jsonl").write_text("")
    before = snapshot(mine)
    code, err = cli(capsys, "generate", "--out", mine, "--num", "1", "--base-url", "http://127.0.0.1:9/v1", "--model", "m")
    assert code == 2 and f"{mine}: folder exists and is not a run folder (no {MARKER})" in one_line(err, "generate")
    assert snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["config.yaml", "kept.jsonl"]
    code, err = cli(capsys, "export", mine, "--out", tmp_path / "x.json")
    assert code == 2 and "not a run folder" in one_line(err, "export")


@pytest.mark.parametrize("command", ["generate", "respond"])
def test_a_folder_holding_only_our_lock_and_the_markers_temp_is_ours(tmp_path, capsys, command):
    """What a run leaves before its marker is in place: seen by a second run started beside it
    (which was told the folder is not a run folder), or left by a kill -9 in that write (the
    folder was refused for good). Its holder is named instead, and a folder left so is used."""
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    (out / f".{MARKER}.tmp-12345").write_text('{"format": 1')
    source = tmp_path / "data.json"
    source.write_text(json.dumps(ROWS))
    with FakeTeacher() as fake:
        argv = {"generate": ["generate", "--num", "2", "--tasks-per-request", "2"],
                "respond": ["respond", source]}[command]
        argv += ["--out", out, "--base-url", fake.base_url, "--model", "fake", f"--api-key={fake.key}", "--no-progress"]
        with open(out / ".selfinstruct-lock", "w") as held:  # a run beside it, before its marker
            held.write(json.dumps({"pid": 4242, "command": f"selfinstruct {command}", "since": "now"}))
            held.flush()
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            code, err = cli(capsys, *argv)
        assert code == 2 and f"{out}: in use by pid 4242" in one_line(err, command)
        code, err = cli(capsys, *argv)  # the holder is gone: its folder is taken up
    assert code == 0, err
    assert (out / MARKER).is_file() and (out / "kept.jsonl").read_text()


@pytest.mark.parametrize("marker, says", [
    ('{"format": 2, "tool": "selfinstruct"}\n', "says the run folder is format 2 (a newer selfinstruct's?), but this "
                                                 "version reads and writes format 1 only: use the version that made the run"),
    ("garbage\n", 'holds "garbage", not a run folder\'s marker; this version writes {"format": 1, "tool": '
                  '"selfinstruct"} there (was it edited?)')])
def test_a_run_folder_of_another_format_is_refused_by_every_command(run, tmp_path, capsys, marker, says):
    """The marker's format was written and never read: a run a newer selfinstruct made (or a marker
    edited to anything) was resumed, exported and audited as this version's. One line naming the
    marker, what it says and what this version writes; the folder as it was."""
    (run / MARKER).write_text(marker)
    before = snapshot(run)
    for argv in (["generate", "--out", run, "--num", "4", "--base-url", "http://127.0.0.1:9/v1", "--model", "fake"],
                 ["export", run, "--format", "jsonl", "--out", tmp_path / "e.jsonl"],
                 ["audit", run], ["dedup", run, "--out", tmp_path / "dd"]):
        code, err = cli(capsys, *argv)
        assert code == 2 and one_line(err, argv[0]).endswith(f"{run / MARKER}: {says}"), err
    assert snapshot(run) == before and not (tmp_path / "e.jsonl").exists()


def test_a_run_made_before_the_marker_resumes_and_gets_it(run):
    (run / MARKER).unlink()
    before = {n: (run / n).read_bytes() for n in ("kept.jsonl", "responses.jsonl")}
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, run, 4), key=fake.key)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert (run / MARKER).is_file()
    assert all((run / n).read_bytes().startswith(b) for n, b in before.items())
    verify_run(run, 4)


# ----------------------------------------------------------- 5. a garbled stats.json

def test_a_garbled_stats_json_stops_the_resume_before_any_prompt(run):
    (run / "stats.json").write_text('{"kept": 2, "faults": {"http_500": ')
    before = snapshot(run)
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, run, 4), key=fake.key)
        assert r.returncode == 2
        msg = one_error_line(r.stderr)
        assert f"{run / 'stats.json'}:1: not valid JSON" in msg and "delete it and run again" in msg
        assert fake.prompts == []
    assert snapshot(run) == before
    (run / "stats.json").unlink()  # as the message says: the counts come back from the files
    with FakeTeacher() as fake:
        assert run_generate(*fake_args(fake, run, 4), key=fake.key).returncode == 0
    verify_run(run, 4)


def test_a_stats_json_whose_last_session_is_not_an_object_is_one_line(run):
    """begin_session reads its id: a hand-edited one was an AttributeError traceback."""
    stats = json.loads((run / "stats.json").read_text())
    (run / "stats.json").write_text(json.dumps({**stats, "last_session": "yesterday"}))
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, run, 4), key=fake.key)
        assert r.returncode == 2 and fake.prompts == []
    msg = one_error_line(r.stderr)
    assert f"{run / 'stats.json'}: field 'last_session': must be a JSON object; delete it and run again" in msg, msg


# ----------------------------------------------------------- 6. one line, never a traceback

def test_unreadable_inputs_are_one_line(tmp_path, run, capsys):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"instruction": "Caf\xe9 au lait, s\'il vous pla\xeet.", "output": "Oui."}\n'.encode("latin-1"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["generate", "--seeds", tmp_path, "--out", tmp_path / "o1"], "is a folder, not a seed file"),
        (["generate", "--seeds", latin, "--out", tmp_path / "o2"], "latin1.jsonl:1: not UTF-8 text"),
        (["generate", "--config", tmp_path, "--out", tmp_path / "o3"], "is a folder, not a config file"),
        (["generate", "--config", latin, "--out", tmp_path / "o4"], "latin1.jsonl:1: not UTF-8 text"),
        (["generate", "--out", a_file, "--base-url", "http://127.0.0.1:9/v1", "--model", "m"], "a-file: is a file"),
        (["export", latin, "--out", tmp_path / "o5.json"], "latin1.jsonl:1: not UTF-8 text"),
        (["audit", run, "--html", tmp_path / "no" / "such" / "r.html"], "r.html: cannot write (" f"{tmp_path}/no/such: no such folder)"),
    ]
    for argv, message in cases:
        code, err = cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in one_line(err, argv[0]), (argv, err)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_a_schema_invalid_line_is_one_line_naming_file_line_and_field(run, tmp_path, capsys):
    with open(run / "kept.jsonl", "a") as f:
        f.write('{"id": "x-0", "instruction": "Say hi.", "instances": [{"input": ""}]}\n')
    before = snapshot(run)
    bad = f"{run / 'kept.jsonl'}:3: field 'instances.0.output'"
    for argv in (["export", run, "--out", tmp_path / "o.json"], ["tune", run, "--out", tmp_path / "t"]):
        code, err = cli(capsys, *argv)
        assert code == 2 and bad in one_line(err, argv[0]), err
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, run, 4), key=fake.key)
        assert r.returncode == 2 and bad in one_error_line(r.stderr)
        assert fake.prompts == []
    assert snapshot(run) == before  # config.yaml too: --num 4 was not written by a refused resume


def test_a_candidate_both_kept_and_rejected_stops_the_resume(run):
    """Every candidate is in exactly one of kept.jsonl and rejected.jsonl: a hand edit that puts
    one in both is named before any prompt, as a kept id twice is, not resumed with wrong counts."""
    kept = json.loads((run / "kept.jsonl").read_text().splitlines()[1])
    with open(run / "rejected.jsonl", "a") as f:
        f.write(json.dumps({**kept, "stage": "filter", "reason": "too_short: x", "raw": "x"}) + "\n")
    before = snapshot(run)
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, run, 4), key=fake.key)
        assert fake.prompts == []
    assert r.returncode == 2
    assert one_error_line(r.stderr).endswith(f"{run / 'rejected.jsonl'}: record {kept['id']} is also in kept.jsonl")
    assert snapshot(run) == before


def test_a_schema_invalid_errors_line_stops_the_resume(run):
    (run / "errors.jsonl").write_text('{"index": "three", "kind": "timeout"}\n')
    before = snapshot(run)
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, run, 4), key=fake.key)
    assert r.returncode == 2 and f"{run / 'errors.jsonl'}:1: field 'index'" in one_error_line(r.stderr)
    assert snapshot(run) == before


def _file_limit(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.parametrize("command", ["dedup", "audit"])
def test_a_full_disk_on_dedup_or_audit_html_is_one_line_and_leaves_no_temp_file(run, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--out", str(out)] if command == "dedup" else ["--html", str(out / "report.html")]
    r = subprocess.run([sys.executable, "-m", "selfinstruct.cli", command, str(run), *argv],
                       capture_output=True, preexec_fn=_file_limit(200))
    assert r.returncode == 2, r.stderr.decode()[-3000:]
    assert "cannot write (File too large)" in one_line(r.stderr.decode(), command)
    # No temp file; dedup's lock file and marker stay (they hold no data, and a later run takes them again).
    assert sorted(p.name for p in out.iterdir()) == ([".selfinstruct-filtered", ".selfinstruct-lock"]
                                                     if command == "dedup" else [])


# ----------------------------------------------------------- 7. nothing raw reaches the terminal

def test_a_servers_escape_sequences_never_reach_the_terminal(tmp_path):
    # The preflight names the models a server serves when ours is not among them: server text.
    hostile = "Invalid key\x1b[2J\x1b]0;pwned\x07 try again"
    with FakeTeacher(models=(hostile,)) as fake:
        r = run_generate(*fake_args(fake, tmp_path / "run", 2), key=fake.key)
    assert r.returncode == 2
    msg = one_error_line(r.stderr)
    assert b"\x1b" not in r.stderr and b"\x07" not in r.stderr
    assert "\\x1b[2J" in msg and "\\x1b]0;pwned\\x07" in msg  # shown, escaped, not obeyed


def test_a_seed_id_holding_escape_is_echoed_escaped(tmp_path, capsys):
    task = {"id": "t\x1b[2J1", "instruction": "Add two and three.", "instances": [{"input": "", "output": "5"}]}
    seeds = tmp_path / "s.jsonl"
    seeds.write_text(json.dumps(task) + "\n" + json.dumps(task) + "\n")
    code, err = cli(capsys, "generate", "--seeds", seeds, "--out", tmp_path / "run")
    assert code == 2 and "\x1b" not in err and "duplicate id 't\\x1b[2J1'" in one_line(err, "generate")


# ----------------------------------------------------------- 8. templates checked before the folder exists

@pytest.mark.parametrize("text, message", [
    ("Write $num tasks like these.\n", "alpaca.txt: placeholder $examples missing"),
    ("Examples:\n$examples\nWrite $count tasks.\n", "alpaca.txt: unknown placeholder $count"),
    ("Examples:\n$examples\nCosts $5.\n", "alpaca.txt:3: a '$' that starts no placeholder"),
])
def test_a_template_with_a_missing_or_unknown_placeholder_is_refused_before_the_run(tmp_path, capsys, text, message):
    from selfinstruct.prompts import bundled_dir

    prompts = tmp_path / "prompts"
    shutil.copytree(bundled_dir("prompts"), prompts)
    (prompts / "alpaca.txt").write_text(text)
    code, err = cli(capsys, "generate", "--prompts", prompts, "--out", tmp_path / "run")
    assert code == 2 and message in one_line(err, "generate")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------- 9. resume

def test_a_resume_removes_the_temp_files_a_kill_left_mid_write(run):
    """data.json is written a row at a time into a temp beside it: a kill -9 then leaves it (as
    big as the export). The next session, holding the lock, removes it; a file of the user's stays."""
    left = [run / ".data.json.tmp-99999", run / ".stats.json.tmp-99998", run / ".session.json.tmp-7"]
    for p in left:
        p.write_text('[\n  {"instruction": "cut by a kill')
    (run / ".data.json.bak").write_text("mine")
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, run, 3), key=fake.key)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert not [p for p in left if p.exists()]
    assert (run / ".data.json.bak").read_text() == "mine"
    assert len(json.loads((run / "data.json").read_text())) == 3


def test_resume_takes_the_folder_however_it_is_spelled(run):
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, Path(f"{run.name}/"), 3), key=fake.key, cwd=run.parent)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
        r = run_generate(*fake_args(fake, run.resolve(), 4), key=fake.key)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
    verify_run(run, 4)


def test_stats_count_a_session_that_ended_in_an_error(run, tmp_path):
    from conftest import snapshot

    assert json.loads((run / "stats.json").read_text())["sessions"] == 1
    before = snapshot(run)
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, run, 4), key="wrong")  # 401 at the preflight: nothing is written
    assert r.returncode == 2 and "http_401" in r.stderr.decode()
    assert snapshot(run) == before and fake.prompts == []  # no session: the same command resumes as it was
    # A session that passed its preflight and then ended in an error is counted, though no reply was logged.
    out = tmp_path / "magpie"
    with FakeTeacher(raw_reply=None) as fake:  # no POST /v1/completions (404): the first query ends the run
        r = run_generate(*fake_args(fake, out, 4, "--magpie-prefix", "<|im_start|>user\\n", mode="magpie"),
                         key=fake.key)
    assert r.returncode == 2, r.stderr.decode()[-2000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sessions"] == 1 and stats["kept"] == 0, stats



def test_a_killed_sessions_counts_are_added_once_and_an_unreadable_file_is_skipped(tmp_path):
    from selfinstruct.runfolder import SESSION_FILE, SessionCounts, begin_session

    folder = tmp_path / "run"
    folder.mkdir()
    counted = []

    def count(rec, last):
        counted.append((rec, last))
        (folder / "stats.json").write_text(json.dumps({"sessions": 1, "last_session": last}))

    killed = SessionCounts(folder, started=0.0)
    killed.save(now=7.25, faults={"timeout": 2}, servers={"u": {"requests": 5}}, session={"loop_s": 6.0})
    this = begin_session(folder, time.monotonic(), count)
    (rec, last), = counted
    assert rec["faults"] == {"timeout": 2} and rec["wall_s"] == 7.25 and rec["servers"] == {"u": {"requests": 5}}
    assert last == {"loop_s": 6.0, "id": killed.id, "ended": "interrupted"}
    assert json.loads((folder / SESSION_FILE).read_text())["id"] == this.id  # this session's own, saved at once

    # Killed after writing stats.json but before removing its session.json: not counted again.
    (folder / "stats.json").write_text(json.dumps({"sessions": 2, "last_session": {"id": this.id}}))
    begin_session(folder, time.monotonic(), count)
    assert len(counted) == 1

    for garbled in ("", "{", '{"id": "x", "wall_s": "long"}', '{"id": "x", "wall_s": 1, "faults": {"a": true}}'):
        (folder / SESSION_FILE).write_text(garbled)  # a crash of the machine can leave it so: its counts are lost
        begin_session(folder, time.monotonic(), count)
        assert len(counted) == 1 and json.loads((folder / SESSION_FILE).read_text())["id"]

@pytest.mark.parametrize("saved", [
    '{"id": "x", "wall_s": 2, "servers": {"http://h/v1": {"requests": "many"}}}',  # was a TypeError traceback
    '{"id": "x", "wall_s": 2, "base_urls": 5}',  # was a TypeError traceback, at every resume
    '{"id": "x", "wall_s": NaN}',  # was "wall_time_s": NaN in stats.json
    '{"id": "x", "wall_s": -1000, "faults": {"timeout": -5}}',  # was a negative wall time and fault count
    "FIFO",  # the read waited forever
], ids=["server-count-text", "urls-number", "nan", "negative", "fifo"])
def test_a_damaged_session_json_is_skipped_and_the_resume_runs(run, saved):
    import math

    before = json.loads((run / "stats.json").read_text())
    if saved == "FIFO":
        os.mkfifo(run / "session.json")
    else:
        (run / "session.json").write_text(saved)
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, run, 3), key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    stats = verify_run(run, 3)
    assert stats["sessions"] == before["sessions"] + 1  # its counts are lost, as an unreadable file's are
    assert math.isfinite(stats["wall_time_s"]) and stats["wall_time_s"] > before["wall_time_s"]
    assert all(n > 0 for n in stats["faults"].values()) and not (run / "session.json").exists()


def test_a_directory_named_session_json_is_one_line_and_the_run_is_untouched(run):
    """It was an IsADirectoryError traceback at every resume; then one line, but after config.yaml was
    rewritten. Now before anything is written: the run folder is as it was, config.yaml too."""
    (run / "session.json").mkdir()
    (run / "session.json" / "notes.txt").write_text("mine")
    before = snapshot(run)
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, run, 3), key=fake.key)
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert f"{run / 'session.json'}: is a folder, not a file" in line and "move it out of the run folder" in line, line
    assert snapshot(run) == before and fake.prompts == []


def test_stats_count_a_session_ended_by_ctrl_c(run):
    with FakeTeacher(on_request=lambda n: time.sleep(30)) as fake:
        env = {**os.environ, "SELFINSTRUCT_API_KEY": fake.key}
        p = subprocess.Popen([sys.executable, "-m", "selfinstruct.cli", "generate", *fake_args(fake, run, 4)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while not fake.prompts and time.time() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)
    assert p.returncode == 130
    assert json.loads((run / "stats.json").read_text())["sessions"] == 2


# ----------------------------------------------------------- 10. we choose vLLM's host and port

@pytest.mark.parametrize("argv", [
    ["generate", "--teacher", "vllm", "--model", "m", "--vllm-bin", "/nonexistent/vllm", "--out", "{out}", "--", "--host", "0.0.0.0"],
    ["generate", "--teacher", "vllm", "--model", "m", "--out", "{out}", "--", "--port=80"],
    ["serve", "--model", "m", "--vllm-bin", "/nonexistent/vllm", "--", "--max-model-len", "512", "--host=0.0.0.0"],
])
def test_host_or_port_after_the_double_dash_is_refused(tmp_path, capsys, argv):
    out = tmp_path / "run"
    code, err = cli(capsys, *[a.replace("{out}", str(out)) for a in argv])
    assert code == 2 and "after '--': selfinstruct sets --host, --port, --api-key itself" in one_line(err, argv[0])
    assert not out.exists()



def test_run_file_ids_gives_read_jsonls_ids_without_parsing_our_lines(tmp_path):
    """A resume reads every rejected candidate's id; the fast path must give exactly the ids a
    full parse gives, on our writer's lines and on any other line it may meet."""
    from selfinstruct.config import UserError
    from selfinstruct.datafiles import read_jsonl, run_file_ids
    from selfinstruct.records import Instance, KeptRecord

    from conftest import provenance

    ours = [KeptRecord(id=i, instruction="Add.", instances=[Instance(input="", output="2")], provenance=provenance())
            for i in ("r000001-0", 'q"uote-1', "caf\u00e9-2", "back\\slash-3")]
    path = tmp_path / "rejected.jsonl"
    lines = [r.model_dump_json() for r in ours] + ['{"raw": "x", "id": "late-4"}', "", '  {"id": "spaced-5"}']
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b'\n{"id":"cut-by-a-kill')
    assert list(run_file_ids(path)) == [o["id"] for o in read_jsonl(path)]
    assert list(run_file_ids(path)) == ["r000001-0", 'q"uote-1', "caf\u00e9-2", "back\\slash-3", "late-4", "spaced-5"]
    assert list(run_file_ids(tmp_path / "missing.jsonl")) == []
    path.write_text('{"id":"r1-0"}\n["not", "a", "record"]\n')
    with pytest.raises(UserError, match=r"rejected.jsonl:2: not a record with an 'id'"):
        list(run_file_ids(path))


def test_iter_models_gives_what_a_full_parse_and_validation_give_on_any_line(tmp_path):
    """Records are read by pydantic's JSON parser first; every line it refuses or might read
    otherwise must come out as json.loads and model_validate make it, or as the same one-line
    error naming the file, line and field."""
    from selfinstruct.config import UserError
    from selfinstruct.datafiles import iter_jsonl, iter_models, validated
    from selfinstruct.records import Rejected

    from conftest import provenance

    ours = Rejected(id="r1-0", stage="dedup", reason="duplicate: x", raw="caf\u00e9 \U0001f600", provenance=provenance())
    line = ours.model_dump_json()
    good = [line, line.replace('"raw":"', '"raw":"\\ud83d\\ude00 pair '), "", "   ",
            line.replace('"id":"r1-0"', '"id":"r1-1","id":"r1-2"'),  # the last of a repeated key, as json.loads
            '{"raw": "x", "reason": "too_short: 1", "stage": "filter", "id": "r1-3", "provenance": '
            + provenance().model_dump_json() + "}"]
    path = tmp_path / "rejected.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(good).encode() + b"\n" + line.encode()[:40])
    slow = [validated(Rejected, o, f"{path}:{n}") for n, o in iter_jsonl(path, run_file=True)]
    assert list(iter_models(path, Rejected)) == slow
    assert [r.id for r in slow] == ["r1-0", "r1-0", "r1-2", "r1-3"] and slow[1].raw.startswith("\U0001f600 pair ")
    bad = {line.replace('"raw":"', '"raw":"\\ud800 '): "field 'raw': holds \\ud800, half of a UTF-16 surrogate pair",
           line.replace('"stage":"dedup"', '"stage":"nope"'): "field 'stage'",
           line[:-1] + "} trailing": "not valid JSON",
           line.replace('"raw":"', '"raw":"\udcff'): "not UTF-8 text"}  # written as the byte 0xff
    for text, says in bad.items():
        path.write_bytes(line.encode() + b"\n" + text.encode("utf-8", "surrogateescape") + b"\n")
        with pytest.raises(UserError) as slow_error:
            [validated(Rejected, o, f"{path}:{n}") for n, o in iter_jsonl(path, run_file=True)]
        with pytest.raises(UserError) as fast_error:
            list(iter_models(path, Rejected))
        assert str(fast_error.value) == str(slow_error.value) and f"{path}:2: " in str(fast_error.value)
        assert says in str(fast_error.value)


def test_rejection_heads_give_read_jsonls_stage_and_reason_head_without_parsing_our_lines(tmp_path):
    """stats.json counts every rejection by stage and by the reason's head; the fast path must
    give what a full parse gives, wherever an escape, a colon or another writer's line is."""
    from selfinstruct.config import UserError
    from selfinstruct.datafiles import read_jsonl, rejection_heads
    from selfinstruct.generate import compute_stats
    from selfinstruct.records import Rejected

    from conftest import provenance

    reasons = ["duplicate: ROUGE-L 0.901 > 0.7 with r1-0 'Write: a poem'", "too_short", 'quoted "word": yes',
               "back\\slash: x", "caf\u00e9 au lait: 2", "tab\there: 3", "no colon at all 'a: b'"]
    ours = [Rejected(id=f"r1-{i}", stage=stage, reason=reason, raw="x", instruction="Add.", provenance=provenance())
            for i, (stage, reason) in enumerate(zip(["dedup", "filter", "filter", "parse", "filter", "quota", "evolve"],
                                                     reasons))]
    path = tmp_path / "rejected.jsonl"
    lines = [r.model_dump_json() for r in ours] + ['{"reason": "late: 1", "id": "r2-0", "stage": "filter"}', "",
                                                   '{"id":"r2-1","stage":"x\\"y","reason":"odd: 1"}',
                                                   '{"id":"r2-2","stage":"b\\\\","reason":"odd: 2"}']
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b'\n{"id":"r3-0","stage":"cut-by-a-kill')
    full = [(o["stage"], o["reason"].split(":", 1)[0]) for o in read_jsonl(path)]
    assert list(rejection_heads(path)) == full
    assert full[:3] == [("dedup", "duplicate"), ("filter", "too_short"), ("filter", 'quoted "word"')]
    assert len(full) == 10 and full[-3:] == [("filter", "late"), ('x"y', "odd"), ("b\\", "odd")]
    stats = compute_stats(tmp_path, {})
    assert stats["rejected"] == 10 and stats["rejected_by_reason"]["late"] == 1 and stats["kept"] == 0
    assert list(rejection_heads(tmp_path / "missing.jsonl")) == []
    path.write_text('{"id":"r1-0","stage":"filter","reason":"a"}\n{"id": "r1-1", "stage": "filter"}\n')
    with pytest.raises(UserError, match=r"rejected.jsonl:2: not a rejected record"):
        list(rejection_heads(path))


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
@pytest.mark.parametrize("command", ["export", "dedup", "audit"])
def test_a_utf16_file_is_one_line_that_says_so(tmp_path, capsys, encoding, command):
    """Windows tools (PowerShell's `>`, Notepad's 'Unicode') write UTF-16 with a byte-order mark;
    the line said only 'invalid start byte at byte 0', which does not tell what to do."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(("\ufeff" if encoding == "utf-16-be" else "")
                     .encode(encoding) + '{"instruction": "Say hi.", "output": "Hi."}\n'.encode(encoding))
    extra = {"export": ["--out", tmp_path / "o.json"], "dedup": ["--out", tmp_path / "o"], "audit": []}[command]
    code, err = cli(capsys, command, data, *extra)
    assert code == 2
    assert one_line(err, command) == (f"selfinstruct {command}: error: {data}:1: not UTF-8 text but UTF-16 (it "
                                      "starts with UTF-16's byte-order mark); save it as UTF-8")


def test_reading_a_run_another_process_writes_says_so_once(tmp_path, capsys):
    """export, dedup and decontaminate of a run a generate is still writing read a snapshot, and a
    dataset card then named its rows beside the run's later counts: one line on stderr says so. A
    run no one holds, or one this process holds, reads without it."""
    from conftest import write_run

    from selfinstruct import datafiles

    rows = [{"instruction": f"Name a fruit that is red, number {i}.", "input": "", "output": "Apple."} for i in range(3)]
    run = Path(write_run(tmp_path / "run", rows))
    code = ("import sys; from pathlib import Path; from selfinstruct.datafiles import run_lock\n"
            "with run_lock(Path(sys.argv[1]), 'generate'):\n    print('held', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])})
    try:
        assert holder.stdout.readline() == "held\n"
        said = f"{run}: is being written by pid {holder.pid} (selfinstruct generate, since "
        assert datafiles.live_writer(run).startswith(f"pid {holder.pid} (selfinstruct generate")
        for argv in (["export", str(run), "--out", str(tmp_path / "a.jsonl")],
                     ["export", str(run / "kept.jsonl"), "--out", str(tmp_path / "k.jsonl")],  # the run named by its file
                     ["dedup", str(run), "--out", str(tmp_path / "d")],
                     ["decontaminate", str(run), "--against", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "c")]):
            datafiles._SAID_LIVE.clear()  # once a folder a process: each command here is a process of its own
            assert main(argv) == 0
            err = capsys.readouterr().err
            assert err.count(said) == 1, (argv, err)
    finally:
        holder.stdin.close()
        assert holder.wait(30) == 0
    datafiles._SAID_LIVE.clear()
    assert datafiles.live_writer(run) is None
    assert main(["export", str(run), "--out", str(tmp_path / "b.jsonl")]) == 0
    assert "is being written" not in capsys.readouterr().err
    with datafiles.run_lock(run, "respond"):  # this process's own lock is no other writer
        assert datafiles.live_writer(run) is None


@pytest.mark.parametrize("command", ["generate", "respond", "evolve"])
def test_a_run_inside_a_run_folder_is_refused_however_the_input_is_named(tmp_path, capsys, command):
    """`respond run/kept.jsonl --out run/x` (the run's own rows, named by their file) made a run folder
    inside the run, where `respond run --out run/x` was refused; generate's --out there was taken too."""
    from conftest import write_run

    run = Path(write_run(tmp_path / "run", [{"instruction": "Name a fruit that is red.", "input": "", "output": "Apple."}]))
    lead = ["generate"] if command == "generate" else [command, str(run / "kept.jsonl")]
    assert main([*lead, "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--api-key", "k",
                 "--out", str(run / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out is inside the run folder {run}; choose a folder outside it" in err, err
    assert not (run / "x").exists()



@pytest.mark.parametrize("name", [".selfinstruct-lock", ".selfinstruct-run", ".selfinstruct-filtered"])
def test_no_output_is_written_over_a_folders_lock_or_mark(tmp_path, capsys, name):
    """`export data.jsonl --out lk/.selfinstruct-lock` replaced a plain folder's lock, which a live
    audit held: a second holder then took it. Refused, in any folder, for export and filter alike."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Name a fruit that is red.", "input": "", "output": "Apple."}) + "\n")
    (tmp_path / "lk").mkdir()
    lock = tmp_path / "lk" / name
    lock.write_text("theirs\n")
    assert main(["export", str(data), "--format", "jsonl", "--out", str(lock)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{name} is selfinstruct's own file" in err, err
    assert lock.read_text() == "theirs\n"


@pytest.mark.parametrize("made", ["now", "before source_resolved", "out typed absolute"])
def test_a_respond_runs_relative_source_is_found_from_any_folder(tmp_path, capsys, monkeypatch, made):
    """`respond data.json --out r` in A, then `export A/r --out A/data.json` from another folder replaced
    the source: config.yaml keeps it as typed, and it was looked for from the folder export ran in.
    Now found where the run was made: recorded (source_resolved), or (a run made before it) from its
    --out as typed; where neither tells, an output that may be it is refused."""
    a, elsewhere = tmp_path / "A", tmp_path / "B"
    a.mkdir(), elsewhere.mkdir()
    (a / "data.json").write_text(json.dumps(ROWS))
    monkeypatch.chdir(a)
    out = str(a / "r") if made == "out typed absolute" else "r"
    with FakeTeacher() as fake:
        assert main(["respond", "data.json", "--base-url", fake.base_url, "--model", "fake", f"--api-key={fake.key}",
                     "--out", out, "--no-progress"]) == 0
    cfg = yaml.safe_load((a / "r" / "config.yaml").read_text())
    assert cfg["source"] == "data.json"
    if made == "now":
        assert cfg["source_resolved"] == str(a / "data.json")
    else:
        cfg.pop("source_resolved", None)  # (none before this change)
        (a / "r" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    capsys.readouterr()
    monkeypatch.chdir(elsewhere)
    before = (a / "data.json").read_bytes()
    code, err = cli(capsys, "export", a / "r", "--format", "alpaca", "--out", a / "data.json")
    said = "may be the file data.json that an input run reads" if made == "out typed absolute" else \
        f"--out would overwrite the input {a / 'data.json'}"
    assert code == 2 and said in one_line(err, "export"), err
    assert (a / "data.json").read_bytes() == before
    # a data.json of this folder's is another file, where the run's folder is known
    code, err = cli(capsys, "export", a / "r", "--format", "alpaca", "--out", elsewhere / "data.json")
    assert (code == 2) == (made == "out typed absolute"), err


def _tune_folder(path: Path, how: str) -> Path:
    """A folder as `tune` leaves it (no model trained: its marks are what is checked): finished
    (tune_config.yaml), with checkpoints (checkpoints/tune.json), or a first tune still training
    (heldout.jsonl beside the lock a tune held)."""
    from selfinstruct import datafiles

    path.mkdir()
    (path / "heldout.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    if how == "finished":
        (path / "tune_config.yaml").write_text("model: smollm2\n")
        (path / "adapter_config.json").write_text("{}\n")
    elif how == "checkpoints":
        (path / "checkpoints").mkdir()
        (path / "checkpoints" / "tune.json").write_text("{}\n")
    else:
        with datafiles.run_lock(path, "tune"):
            pass
    return path


@pytest.mark.parametrize("how", ["finished", "checkpoints", "training"])
def test_no_command_writes_a_tunes_own_files_or_a_run_inside_its_folder(tmp_path, capsys, how):
    """`export data --out OUT/heldout.jsonl` replaced the rows `try --heldout` reads as never trained on,
    and `respond --out OUT/x` made a run inside the adapter folder (a hub push carried it): a tune's
    folder is known by its marks, and its files and runs inside it are refused, as a run folder's are;
    a run inside a dedup output folder too. tune itself still writes there."""
    from selfinstruct import datafiles

    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    tuned = _tune_folder(tmp_path / "adapter", how)
    before = snapshot(tuned)
    for out, said in ((tuned / "heldout.jsonl", "heldout.jsonl is a tune's own file"),
                      (tuned / "tune_config.yaml", "tune_config.yaml is a tune's own file"),
                      (tuned / "checkpoints" / "rows.jsonl", "is a tune's own file"),
                      (tuned, "is a tune's output folder")):
        code, err = cli(capsys, "export", data, "--format", "jsonl", "--out", out)
        assert code == 2 and said in one_line(err, "export"), (out, err)
    for command in ("respond", "generate"):
        lead = [command] if command == "generate" else [command, data]
        code, err = cli(capsys, *lead, "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--api-key", "k",
                        "--out", tuned / "x", "--no-progress")
        assert code == 2 and f"--out is inside the tune's output folder {tuned}" in one_line(err, command), err
    assert snapshot(tuned) == before
    with pytest.raises(datafiles.UserError):
        datafiles.check_output(tuned, [data], writes=("heldout.jsonl", "tune_config.yaml"))
    datafiles.check_output(tuned, [data], writes=("heldout.jsonl", "tune_config.yaml"), tuning=True)  # tune's own
    # A new file of the user's beside the model is theirs to write; so is a heldout.jsonl in a folder of theirs.
    assert cli(capsys, "export", data, "--format", "jsonl", "--out", tuned / "notes.jsonl")[0] == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "heldout.jsonl").write_text("{}\n")
    assert cli(capsys, "export", data, "--format", "jsonl", "--out", tmp_path / "mine" / "heldout.jsonl")[0] == 0
    # a run inside a dedup output folder
    assert cli(capsys, "dedup", data, "--out", tmp_path / "dd")[0] == 0
    code, err = cli(capsys, "respond", data, "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--api-key", "k",
                    "--out", tmp_path / "dd" / "x", "--no-progress")
    assert code == 2 and "--out is inside the dedup or decontaminate output folder" in one_line(err, "respond"), err
    assert not (tmp_path / "dd" / "x").exists()
    # The line says what marks it (`dedup data.jsonl --out .` so marks the working folder), and doing what it
    # says frees the folder: the same respond goes on to look for its server.
    assert "(its .selfinstruct-filtered or .selfinstruct-lock marks it: if it holds no dedup" in err, err
    for name in (".selfinstruct-filtered", ".selfinstruct-lock", "kept.jsonl", "removed.jsonl", "summary.json"):
        (tmp_path / "dd" / name).unlink()
    code, err = cli(capsys, "respond", data, "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--api-key", "k",
                    "--out", tmp_path / "dd" / "x", "--no-progress")
    assert code == 2 and "inside" not in err and "127.0.0.1:9" in err, err


def _kill_when_temp(argv: list, folder: Path, cwd: Path) -> int:
    """Run `selfinstruct ARGV` and kill -9 it as soon as a temp of its (``.NAME.tmp-...``) is in
    ``folder``, mid-write; its pid (now dead and reaped)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "selfinstruct.cli", *map(str, argv)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if folder.is_dir() and any(".tmp-" in p.name and p.name.endswith(f"-{proc.pid}") for p in folder.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, f"{argv} ended before it wrote: make the input bigger"
    return proc.pid


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.mark.parametrize("command", ["export", "decontaminate"])
def test_a_rerun_removes_the_temps_a_kill_left_however_often_it_is_killed(tmp_path, command):
    """A kill -9 mid-write leaves the temps the write staged (the kill runs no cleanup). The next
    write removed them, but a rerun killed (or stopped) again before its own write left its temps
    beside them, a pile of one per kill: a rerun now removes the dead ones as it starts."""
    big = tmp_path / "big.jsonl"
    with big.open("w") as f:
        for i in range(150_000):
            f.write(json.dumps({"instruction": f"Describe item number {i} in two short sentences.", "input": "",
                                "output": f"It is item {i}."}) + "\n")
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is the boiling point of water at sea level in kelvin?"}) + "\n")
    # (parquet: the rows are staged before the file's own write, which removed a dead temp as it began)
    argv, folder = {"export": (["export", big, "--format", "parquet", "--out", tmp_path / "ex.parquet"], tmp_path),
                    "decontaminate": (["decontaminate", big, "--against", bench, "--out", tmp_path / "dc"],
                                      tmp_path / "dc")}[command]
    first = _kill_when_temp(argv, folder, Path.cwd())
    assert _temps(folder) and all(t.endswith(f"-{first}") for t in _temps(folder))
    second = _kill_when_temp(argv, folder, Path.cwd())
    left = _temps(folder)
    assert left and all(t.endswith(f"-{second}") for t in left), left  # the first kill's are gone
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "selfinstruct.cli", *map(str, argv)], env=env, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert _temps(folder) == []


def test_a_dedup_rerun_removes_its_folders_dead_temps_its_marks_too(tmp_path, capsys):
    """A kill while dedup wrote its folder's mark (written once) left its temp
    (``..selfinstruct-filtered.tmp-PID``) for good; under the folder's lock, which each writer of it
    holds, a rerun removes every temp of its files, whatever the pid (a live process, or this one,
    may have reused a dead writer's)."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    out = tmp_path / "dd"
    assert cli(capsys, "dedup", data, "--out", out)[0] == 0
    writer = subprocess.Popen([sys.executable, "-c", "import os, sys, time; "
                               "open(sys.argv[1] + '/..selfinstruct-filtered.tmp-%d' % os.getpid(), 'w').write('{'); "
                               "print(flush=True); time.sleep(60)", str(out)], stdout=subprocess.PIPE)
    writer.stdout.readline()
    writer.kill()
    writer.wait()
    (out / f".kept.jsonl.tmp-{os.getpid()}").write_text("a restarted container's pid, reused\n")
    (out / ".summary.json.tmp-1").write_text("{")  # pid 1 is alive: a reused pid
    assert len(_temps(out)) == 3
    assert cli(capsys, "dedup", data, "--out", out)[0] == 0
    assert _temps(out) == []


def test_an_hf_exports_earlier_folder_moved_aside_by_a_killed_export_is_put_back(tmp_path, capsys):
    """An hf export moves the earlier folder aside (.NAME.tmp-old-PID) while it puts the new one in;
    a kill in between left only that copy, which the next export's clean-up deleted."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    hf = tmp_path / "hf"
    assert cli(capsys, "export", data, "--format", "hf", "--out", hf)[0] == 0
    before = snapshot(hf)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    hf.rename(tmp_path / f".hf.tmp-old-{writer.pid}")
    writer.kill()
    writer.wait()
    # The rerun fails on a row with no answer, after its start: the earlier folder is back all the same.
    data.write_text(json.dumps([*ROWS, {"instruction": "Name a sea.", "input": ""}]))
    code, err = cli(capsys, "export", data, "--format", "hf", "--out", hf)
    assert code == 2, err
    assert hf.is_dir() and snapshot(hf) == before and _temps(tmp_path) == []
