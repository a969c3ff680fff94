"""Devices, FIFOs and damaged files met by the data commands: one line each, nothing replaced, nothing hung."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub from tests

import pytest

from selfinstruct.cli import main
from conftest import write_run

ROWS = [{"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
        {"instruction": "Name the color of a clear sky.", "input": "", "output": "Blue."}]
REPO = Path(__file__).resolve().parent.parent


def cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def run_cli(*argv, timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI in its own process: a read that waits on a FIFO for ever ends in the timeout, not a hung test."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "selfinstruct.cli", *map(str, argv)], capture_output=True,
                          timeout=timeout, env=env, cwd=REPO)


# ----------------------------------------------------------- 1. an output or a run file that is a FIFO

@pytest.mark.parametrize("fmt, name", [("alpaca", "pipe.json"), ("jsonl", "pipe.jsonl"), ("parquet", "pipe.parquet")])
def test_export_to_a_fifo_or_a_link_to_one_is_refused_and_the_fifo_stays(tmp_path, capsys, fmt, name):
    """`export --out /dev/null` replaced the device with a file (the write renames its temp over the
    target), for every program on the machine. A FIFO stands in for the device here."""
    run = write_run(tmp_path / "run", ROWS)
    fifo = tmp_path / name
    os.mkfifo(fifo)
    (tmp_path / f"link-{name}").symlink_to(fifo)
    for target in (fifo, tmp_path / f"link-{name}"):
        rc, err = cli(capsys, "export", run, "--format", fmt, "--out", target)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"{target}: is not a regular file (a device, FIFO or socket), which --out would replace" in err, err
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("name, argv", [("kept.jsonl", []), ("stats.json", ["--card"])])
def test_a_run_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path, name, argv):
    """export opened the run's kept.jsonl (or, for its card, stats.json) with a plain open: a FIFO
    of that name held it for ever."""
    run = Path(write_run(tmp_path / "run", ROWS))
    (run / name).unlink(missing_ok=True)
    os.mkfifo(run / name)
    r = run_cli("export", run, "--format", "jsonl", "--out", tmp_path / "o.jsonl", *argv, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1, err
    assert f"{run / name}: is not a regular file (a FIFO, device or socket)" in err, err
    assert "move it out of the way" in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_one_check_for_a_run_file_that_is_no_plain_file(tmp_path):
    """datafiles had its own copy of runfolder.check_regular_file with another message; one is left,
    with the message that says what to do, and it passes a missing file as the copy did (a run's
    reader takes a missing file as empty), where the old one raised FileNotFoundError."""
    import selfinstruct.datafiles as datafiles
    from selfinstruct.config import UserError
    from selfinstruct.runfolder import check_regular_file

    assert not hasattr(datafiles, "refuse_special_run_file")
    check_regular_file(tmp_path / "kept.jsonl")  # missing: no error
    os.mkfifo(tmp_path / "stats.json")
    with pytest.raises(UserError) as e:
        check_regular_file(tmp_path / "stats.json")
    assert str(e.value) == (f"{tmp_path / 'stats.json'}: is not a regular file (a FIFO, device or socket); "
                            "selfinstruct reads and writes this file itself: move it out of the way")
    (tmp_path / "rejected.jsonl").mkdir()
    with pytest.raises(UserError, match="rejected.jsonl: is a folder, not a file$"):
        check_regular_file(tmp_path / "rejected.jsonl")


def test_an_export_card_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    run = write_run(tmp_path / "run", ROWS)
    os.mkfifo(tmp_path / "README.md")
    r = run_cli("export", run, "--format", "jsonl", "--out", tmp_path / "o.jsonl", "--card", timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2 and "README.md: is not a regular file" in err and "--card" in err, err
    assert stat.S_ISFIFO(os.stat(tmp_path / "README.md").st_mode)


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
@pytest.mark.parametrize("command", ["generate", "dedup", "tune"])
def test_a_config_file_that_is_a_pipe_socket_or_device_is_refused_before_it_is_opened(tmp_path, command, kind):
    """`--config` naming a FIFO with no writer waited for ever (as `cat` would: its open waits for
    one); a socket said "No such device or address" and a device was read as its bytes (/dev/null
    as no options). Refused in one line naming what it is, before any open, nothing made."""
    import socket

    if kind == "fifo":
        os.mkfifo(config := tmp_path / "c.yaml")
        said = "is a pipe (FIFO), not a regular file; selfinstruct reads a config file from a regular file only " \
               "(opening a FIFO waits for a writer): write it to a file and give that"
    elif kind == "socket":
        config = tmp_path / "c.sock"
        (sock := socket.socket(socket.AF_UNIX)).bind(str(config))
        said = "is a socket, not a regular file"
    else:
        config, said = Path("/dev/null"), "is a device, not a regular file"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    argv = {"generate": ["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m"],
            "dedup": ["dedup", data], "tune": ["tune", data]}[command]
    try:
        r = run_cli(*argv, "--out", tmp_path / "out", "--config", config, timeout=30)
    finally:
        if kind == "socket":
            sock.close()
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith(f"selfinstruct {command}: error: {config}: {said}"), err
    assert not (tmp_path / "out").exists()


def test_a_parquet_input_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """A FIFO named like parquet went to pyarrow, whose open waited for a writer; a FIFO of any
    other name was refused as a pipe."""
    os.mkfifo(tmp_path / "rows.parquet")
    r = run_cli("export", tmp_path / "rows.parquet", "--format", "jsonl", "--out", tmp_path / "o.jsonl", timeout=30)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1, err
    assert f"{tmp_path / 'rows.parquet'}: is not a regular file (a pipe or device, read more than once here)" in err, err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("command", ["generate", "respond", "dedup", "tune"])
def test_an_out_that_is_a_device_is_said_to_be_one(tmp_path, capsys, command):
    """`generate --out /dev/null` said "/dev/null: is a file"; it is a device, and the line says so."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    argv = {"generate": ["generate"], "respond": ["respond", data], "dedup": ["dedup", data], "tune": ["tune", data]}[command]
    teacher = [] if command in ("dedup", "tune") else ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    rc, err = cli(capsys, *argv, "--out", "/dev/null", *teacher)
    assert rc == 2 and err.count("\n") == 1, err
    said = {"generate": "/dev/null: is a device; --out must be a folder (a new one, or a run folder to resume)",
            "respond": "/dev/null: is a device; --out must be a folder (a new one, or a run of respond to resume)",
            "dedup": "/dev/null: exists and is a device, not a folder",
            "tune": "/dev/null: exists and is a device, not a folder: choose another --out"}[command]
    assert err == f"selfinstruct {command}: error: {said}\n"


def test_a_read_only_file_system_is_said_to_be_one_not_permission_denied(tmp_path, capsys):
    """A file to write in a folder of a read-only mount was "permission denied on FOLDER", which sent
    the user to chmod; it is the file system, and the line says so."""
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
    try:
        run = write_run(tmp_path / "run", ROWS)
        for argv in (["export", run, "--format", "jsonl", "--out", ro / "o.jsonl"], ["audit", run, "--html", ro / "a.html"],
                     ["tune", run, "--out", ro / "t"]):
            rc, err = cli(capsys, *argv)
            assert rc == 2 and err.count("\n") == 1, err
            assert err.endswith(f": cannot write ({ro} is on a read-only file system)\n"), err
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_a_jsonl_line_cut_short_is_said_to_be_cut_short_with_file_and_line(tmp_path, capsys):
    """A line cut inside a string and followed by more lines (a run file's, or a plain file's) was
    "Invalid control character ... (U+000A inside a string)": the line's own newline. Cut after a
    key's colon it was "Expecting value at column 1". Each is said to be cut short, at file:line."""
    from selfinstruct.datafiles import run_file_ids

    run = Path(write_run(tmp_path / "run", ROWS))
    whole = (run / "kept.jsonl").read_text().splitlines(keepends=True)
    (run / "kept.jsonl").write_text(whole[0] + whole[1][:60] + "\n" + whole[1])
    rc, err = cli(capsys, "export", run, "--format", "jsonl", "--out", tmp_path / "o.jsonl")
    assert rc == 2 and err == (f"selfinstruct export: error: {run / 'kept.jsonl'}:2: not complete JSON: the line is cut "
                               f"short (it ends inside a string begun at column {whole[1][:60].rindex(chr(34)) + 1})\n"), err
    plain = tmp_path / "d.jsonl"
    plain.write_text(json.dumps(ROWS[0]) + "\n" + '{"instruction": "Add.", "output": \n' + json.dumps(ROWS[1]) + "\n")
    rc, err = cli(capsys, "export", plain, "--format", "jsonl", "--out", tmp_path / "o.jsonl")
    assert rc == 2 and err == (f"selfinstruct export: error: {plain}:2: not complete JSON: the line is cut short (it "
                               "ends before its JSON does)\n"), err
    rejected = tmp_path / "rejected.jsonl"  # a line not in our writer's shape: parsed whole
    rejected.write_text('{"reason": "x", "id": "r1-0"}\n{"reason": "cut')
    assert list(run_file_ids(rejected)) == ["r1-0"]  # a cut last line is a write in progress
    rejected.write_text('{"reason": "cut\n{"reason": "x", "id": "r1-0"}\n')
    with pytest.raises(Exception, match=r"rejected.jsonl:1: not complete JSON: the line is cut short \(it ends inside "
                                        r"a string begun at column 12\)$"):
        list(run_file_ids(rejected))
    assert not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------- 2. stats.json's carried counts

@pytest.mark.parametrize("stats, said", [
    ('{"wall_time_s": NaN, "sessions": 1}', "field 'wall_time_s': must be seconds (a finite number, 0 or more), not NaN"),
    ('{"wall_time_s": Infinity}', "field 'wall_time_s': must be seconds (a finite number, 0 or more), not Infinity"),
    ('{"sessions": -3}', "field 'sessions': must be a count (a whole number, 0 or more), not -3"),
    ('{"faults": {"timeout": -1}}', "field 'faults.timeout': must be a count (a whole number, 0 or more), not -1"),
])
def test_a_stats_json_with_nan_or_a_negative_count_is_one_line_for_export(tmp_path, capsys, stats, said):
    """generate refused these on resume; export's card (and audit, respond, evolve) took them: the
    card said "nan" teacher-hours, respond added its session to them and wrote them back."""
    run = Path(write_run(tmp_path / "run", ROWS))
    (run / "stats.json").write_text(stats)
    rc, err = cli(capsys, "export", run, "--format", "jsonl", "--out", tmp_path / "o.jsonl", "--card")
    assert rc == 2 and err == f"selfinstruct export: error: {run / 'stats.json'}: {said}\n", err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "README.md").exists()


# ----------------------------------------------------------- 3. text that shows nothing

INVISIBLE = "\u200b\u2060\ufeff"  # a zero-width space, a word joiner, a BOM: str.strip keeps all three


@pytest.mark.parametrize("row, said", [
    ({"instruction": "Add 2 and 3.", "output": INVISIBLE}, "field 'output': shows nothing (only invisible characters"),
    ({"instruction": "\u200b", "output": "5"}, "field 'instruction': shows nothing (only invisible characters"),
    ({"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": INVISIBLE}]},
     "conversation has an empty assistant turn"),
])
def test_a_field_of_only_zero_width_characters_is_empty_to_export_and_tune(tmp_path, capsys, row, said):
    """filter and the judge call an answer of zero-width characters empty (filters.no_visible_text);
    export wrote it as training data and tune trained on it."""
    from selfinstruct.config import UserError
    from selfinstruct.export import read_conversations

    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps({"instruction": "Name a prime.", "output": "7"}) + "\n" + json.dumps(row) + "\n")
    rc, err = cli(capsys, "export", src, "--format", "jsonl", "--out", tmp_path / "o.jsonl")
    assert rc == 2 and err.startswith(f"selfinstruct export: error: {src}:2") and said in err, err
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(UserError) as e:  # what tune reads its data with
        read_conversations(src)
    assert said in str(e.value)


# ----------------------------------------------------------- 5. the positional's name in --help

@pytest.mark.parametrize("command", ["export", "dedup", "decontaminate", "audit"])
def test_every_data_commands_positional_is_run_or_file(capsys, command):
    """dedup's was 'data' (usage: selfinstruct dedup [-h] ... data) where every other command's is RUN_OR_FILE."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    usage = capsys.readouterr().out
    assert "RUN_OR_FILE" in usage and "positional arguments:\n  RUN_OR_FILE" in usage, usage
    with pytest.raises(SystemExit):  # without it: argparse names what is missing, as --help does
        main([command])
    assert "required: RUN_OR_FILE" in capsys.readouterr().err


# ----------------------------------------------------------- 4. a raw control character in a JSON string

def test_a_raw_control_character_in_a_jsonl_line_is_named_by_line_and_column(tmp_path, capsys):
    """`not valid JSON (Invalid control character at)`: json's message ends in its position, which was dropped."""
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n" + '{"instruction": "Say\x1b[1mhi", "output": "hi"}\n')
    rc, err = cli(capsys, "export", src, "--format", "jsonl", "--out", tmp_path / "o.jsonl")
    assert rc == 2 and err == (f"selfinstruct export: error: {src}:2: not valid JSON (Invalid control character at "
                               "column 21 (U+001B inside a string; JSON writes it escaped, as \\u001b))\n"), err


@pytest.mark.parametrize("piece", [5, 64, 1 << 20])
def test_a_raw_tab_in_a_json_list_is_named_at_jsons_own_line_and_column(tmp_path, monkeypatch, piece):
    """A JSON list is read a piece at a time (its line counted on as pieces are dropped): the column
    is json's own for the whole text, whichever piece the line began in."""
    from selfinstruct import datafiles
    from selfinstruct.config import UserError

    rows = [{"instruction": f"Row {i} " + "words " * 9, "output": "ok"} for i in range(4)]
    text = json.dumps(rows, indent=2)
    at = text.rindex('"ok"')
    text = text[:at] + '"o\tk"' + text[at + 4:]  # the last row's output holds a raw tab
    src = tmp_path / "data.json"
    src.write_text(text)
    with pytest.raises(json.JSONDecodeError) as whole:
        json.loads(text)
    monkeypatch.setattr(datafiles, "_PIECE", piece)
    with pytest.raises(UserError) as e:
        list(datafiles.iter_json_records(src))
    assert str(e.value).startswith(f"{src}:{whole.value.lineno}: not valid JSON (Invalid control character at column "
                                   f"{whole.value.colno}"), str(e.value)
