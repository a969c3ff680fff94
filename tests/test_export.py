"""Export: a run's rows written as alpaca, sharegpt, messages, jsonl, hf and parquet, and read back unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub from tests

import pytest

from selfinstruct.cli import main
from selfinstruct.config import UserError
from selfinstruct.export import (
    export_records,
    read_conversations,
    read_records,
    row_messages,
    to_alpaca,
    to_messages,
)
from conftest import write_run

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Name the color of a clear sky.", "input": "", "output": "Blue."},
    {"instruction": "Say hello in French.", "input": "", "output": "Bonjour ! \u00e7a va ?"},
]


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run", ROWS)


def out_name(fmt: str, stem: str = "out") -> str:
    """A file name whose suffix says what ``fmt`` writes (export refuses one that says another)."""
    return stem if fmt == "hf" else stem + {"parquet": ".parquet", "messages": ".jsonl", "jsonl": ".jsonl"}.get(fmt, ".json")


def load_json_dataset(path, tmp_path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache"))


def test_alpaca_loads_with_datasets_and_round_trips(run, tmp_path):
    out = tmp_path / "data.json"
    assert main(["export", run, "--format", "alpaca", "--out", str(out)]) == 0
    assert isinstance(json.loads(out.read_text(encoding="utf-8")), list)  # LLaMA-Factory alpaca: one JSON list
    ds = load_json_dataset(out, tmp_path)
    assert ds.column_names == ["instruction", "input", "output"]
    assert ds.to_list() == ROWS
    assert [to_alpaca(r, "x") for r in read_records(out)] == ROWS


def test_jsonl_is_one_alpaca_row_per_line(run, tmp_path):
    out = tmp_path / "data.jsonl"
    assert main(["export", run, "--format", "jsonl", "--out", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == ROWS
    assert load_json_dataset(out, tmp_path).to_list() == ROWS


def test_sharegpt_uses_conversations_from_value(run, tmp_path):
    out = tmp_path / "sharegpt.json"
    assert main(["export", run, "--format", "sharegpt", "--out", str(out)]) == 0
    first = json.loads(out.read_text(encoding="utf-8"))[0]
    # LLaMA-Factory's sharegpt defaults: column "conversations", tags from/value, human/gpt.
    assert first == {"conversations": [{"from": "human", "value": "Add the numbers.\n\n2 + 3"},
                                       {"from": "gpt", "value": "5"}]}
    ds = load_json_dataset(out, tmp_path)
    assert [to_messages(r, "x") for r in ds.to_list()] == [row_messages(r) for r in ROWS]


def test_messages_is_what_trl_calls_conversational(run, tmp_path):
    from trl.data_utils import is_conversational

    out = tmp_path / "messages.jsonl"
    assert main(["export", run, "--format", "messages", "--out", str(out)]) == 0
    ds = load_json_dataset(out, tmp_path)
    assert ds.column_names == ["messages"]
    assert is_conversational(ds[0])
    assert [r["messages"] for r in ds.to_list()] == [row_messages(r) for r in ROWS]
    # A single-exchange conversation comes back as an Alpaca row with the input folded into the instruction.
    assert to_alpaca(ds[0], "x") == {"instruction": "Add the numbers.\n\n2 + 3", "input": "", "output": "5"}


@pytest.mark.parametrize("fmt", ["hf", "parquet"])
def test_hf_and_parquet_hold_alpaca_and_messages_columns(run, tmp_path, fmt):
    from datasets import load_dataset, load_from_disk

    out = tmp_path / ("ds" if fmt == "hf" else "data.parquet")
    assert main(["export", run, "--format", fmt, "--out", str(out)]) == 0
    if fmt == "hf":
        ds = load_from_disk(str(out))
    else:
        ds = load_dataset("parquet", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in ds] == ROWS
    assert [r["messages"] for r in ds] == [row_messages(r) for r in ROWS]
    assert [to_alpaca(r, "x") for r in read_records(out)] == ROWS


def test_hf_export_replaces_an_earlier_export(run, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "ds"
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 0
    one = write_run(tmp_path / "one", ROWS[:1])
    assert main(["export", one, "--format", "hf", "--out", str(out)]) == 0
    assert len(load_from_disk(str(out))) == 1


def test_hf_export_never_replaces_a_folder_holding_the_users_files(run, tmp_path, capsys, monkeypatch):
    """An hf export replaces its folder whole: over an earlier export with its own card, yes;
    over one where the user wrote their own README.md or put a file, no (one line, all kept,
    said before the source is read and converted, not after)."""
    from selfinstruct import export

    reads = []
    read = export.iter_located
    monkeypatch.setattr(export, "iter_located", lambda *a, **kw: reads.append(1) or read(*a, **kw))
    out = tmp_path / "ds"
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 0
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 0  # its own card is rewritten
    (out / "README.md").write_text("MY OWN CARD")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds files an export did not write (README.md, notes.txt)" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the two exports that went through, each a pass to check and one to write; the refused one read nothing
    assert len(reads) == 4


def test_hf_export_to_a_symlink_is_one_line_before_the_conversion(run, tmp_path, capsys):
    """The folder is replaced whole and a link cannot be: refused before the work, and the
    earlier export the link points at stays."""
    out = tmp_path / "ds"
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    link = tmp_path / "link"
    link.symlink_to(out)
    capsys.readouterr()
    assert main(["export", run, "--format", "hf", "--out", str(link)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a symbolic link" in err, err
    assert link.is_symlink() and {p.name: p.read_bytes() for p in out.iterdir()} == before



@pytest.mark.parametrize("spelled", [".", "./", "../here"])
@pytest.mark.parametrize("earlier", [False, True], ids=["empty", "an-earlier-export"])
def test_hf_export_into_the_folder_the_user_is_in_is_one_line(run, tmp_path, capsys, monkeypatch, spelled, earlier):
    """`export RUN --format hf --out .` was a ValueError traceback ('PosixPath('.') has an empty name')
    after the whole conversion; spelled `../here`, the folder the shell is in was moved aside and deleted,
    the shell left in a folder that no longer exists. One line, before the source is read; what is there stays."""
    here = tmp_path / "here"
    if earlier:
        assert main(["export", run, "--format", "hf", "--out", str(here)]) == 0
    else:
        here.mkdir()
    before = {p.name: p.read_bytes() for p in here.iterdir()}
    monkeypatch.chdir(here)
    capsys.readouterr()
    assert main(["export", run, "--format", "hf", "--out", spelled]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the folder you are in" in err, err
    assert os.path.samefile(os.getcwd(), here) and {p.name: p.read_bytes() for p in here.iterdir()} == before


def test_hf_export_from_a_folder_since_deleted_replaces_an_earlier_export(run, tmp_path, monkeypatch):
    """The check for the folder the user is in asks for it: one since deleted is none of --out's."""
    from datasets import load_from_disk

    out = tmp_path / "ds"
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 0
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 0
    assert len(load_from_disk(str(out))) == len(ROWS)

@pytest.mark.parametrize("marked", [False, True], ids=["before-the-marker", "marked"])
def test_hf_export_into_a_folder_holding_only_our_lock_file(run, tmp_path, marked):
    """A dedup or decontaminate whose write failed (a full disk) leaves its --out folder holding
    only .selfinstruct-lock and, since the marker, .selfinstruct-filtered: no file of the user's, so an
    hf export may take the folder (the marker was refused as a file export did not write)."""
    from datasets import load_from_disk

    from selfinstruct.datafiles import claim_filtered

    out = tmp_path / "ds"
    out.mkdir()
    (out / ".selfinstruct-lock").write_text('{"pid": 1, "command": "selfinstruct dedup", "since": "x"}\n')
    if marked:
        claim_filtered(out, "dedup")  # what write_filtered writes first
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 0
    assert len(load_from_disk(str(out))) == len(ROWS)


class LockHolder:
    """A second process holding ``folder``'s lock as a dedup at work does (``run_lock``), until closed."""

    def __init__(self, folder: Path):
        import subprocess
        import sys

        code = ("import sys; from pathlib import Path; from selfinstruct.datafiles import run_lock\n"
                "out = Path(sys.argv[1]); out.mkdir(exist_ok=True)\n"
                "with run_lock(out, 'dedup'):\n    print('held', flush=True); sys.stdin.read()\n")
        self.p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                      [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])})
        assert self.p.stdout.readline() == "held\n"
        self.pid = self.p.pid

    def close(self) -> None:
        self.p.stdin.close()
        assert self.p.wait(30) == 0


def test_hf_export_refuses_a_folder_whose_lock_a_live_dedup_holds(run, tmp_path, capsys):
    """While dedup works, its --out holds only .selfinstruct-lock. The hf export took that for a
    leftover, swapped the folder out and deleted the live lock: the folder ended as the dataset
    plus dedup's files, or dedup lost its work. Now it is one line naming the holder, and the
    folder and its lock stay as they were; once dedup is done, the lock left is no one's."""
    from datasets import load_from_disk

    out = tmp_path / "dd"
    holder = LockHolder(out)
    try:
        lock = (out / ".selfinstruct-lock").stat().st_ino
        capsys.readouterr()
        assert main(["export", run, "--format", "hf", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"in use by pid {holder.pid} (selfinstruct dedup" in err, err
        assert [p.name for p in out.iterdir()] == [".selfinstruct-lock"]
        assert (out / ".selfinstruct-lock").stat().st_ino == lock
    finally:
        holder.close()
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 0
    assert len(load_from_disk(str(out))) == len(ROWS)


def test_a_dedup_that_takes_the_folder_while_the_hf_export_converts_is_not_swapped_out(run, tmp_path, capsys,
                                                                                       monkeypatch):
    """The folder was free when the export looked, and a dedup took it while the rows were
    converted: the swap must not move it aside and delete its lock. The export is refused with
    one line and leaves nothing behind; dedup's folder is untouched."""
    from selfinstruct import export

    out = tmp_path / "dd"
    holders = []
    read = export.iter_located

    def dedup_begins(*a, **kw):
        if not holders:
            holders.append(LockHolder(out))
        return read(*a, **kw)

    monkeypatch.setattr(export, "iter_located", dedup_begins)
    try:
        capsys.readouterr()
        assert main(["export", run, "--format", "hf", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"in use by pid {holders[0].pid} (selfinstruct dedup" in err, err
        assert [p.name for p in out.iterdir()] == [".selfinstruct-lock"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dd", "run"]  # no temp of the export left
    finally:
        for h in holders:
            h.close()


def test_a_dedup_that_began_and_ended_while_the_hf_export_converted_keeps_its_result(run, tmp_path, capsys,
                                                                                       monkeypatch):
    """The folder was new when the export looked, and a dedup wrote its result there while the rows
    were converted: the swap replaced the folder whole, its kept.jsonl with it. It is looked at
    again under the lock, and refused as any file an export did not write."""
    from selfinstruct import export

    out = tmp_path / "dd"
    read = export.iter_located

    def dedup_ran(*a, **kw):
        if not out.exists():
            out.mkdir()
            (out / ".selfinstruct-lock").write_text("")
            (out / "kept.jsonl").write_text('{"instruction": "mine", "input": "", "output": "kept"}\n')
        return read(*a, **kw)

    monkeypatch.setattr(export, "iter_located", dedup_ran)
    capsys.readouterr()
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds files an export did not write (kept.jsonl)" in err, err
    assert (out / "kept.jsonl").read_text().startswith('{"instruction": "mine"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dd", "run"]


def test_an_hf_export_racing_another_says_the_other_is_writing_its_card(run, tmp_path, capsys):
    """Two hf exports of one folder: the second saw the first's card temp (.README.md.tmp-PID) and
    called it a file an export did not write. A live one is the other export at work, said so; a
    dead one (a killed export's) is replaced with the folder."""
    import subprocess
    import sys

    from datasets import load_from_disk

    out = tmp_path / "ds"
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 0
    live = out / f".README.md.tmp-{os.getppid()}"  # a live process's, not this one's
    live.write_text("writing")
    capsys.readouterr()
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"another export (pid {os.getppid()}) is writing its card here" in err, err
    assert "did not write" not in err and live.exists()
    live.unlink()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / f".README.md.tmp-{gone.pid}").write_text("killed")
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 0
    assert len(load_from_disk(str(out))) == len(ROWS) and not list(out.glob(".README.md.tmp-*"))


@pytest.mark.parametrize("fmt", ["parquet", "alpaca"])
@pytest.mark.parametrize("where", ["missing_folder", "a_folder"])
def test_an_out_that_cannot_be_written_is_refused_before_the_data_is_read(run, tmp_path, capsys, monkeypatch, fmt, where):
    """The file is written last, after reading and converting every record: a path in a missing
    folder, or one that is a folder, is one line before the source is read."""
    from selfinstruct import export

    read = []
    monkeypatch.setattr(export, "read_located", lambda path: read.append(path) or [])
    out = tmp_path / "no" / "such" / f"data.{fmt}"
    if where == "a_folder":
        out = tmp_path / "a-folder"
        out.mkdir()
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("no such folder" if where == "missing_folder" else "is a folder") in err, err
    assert read == [] and not (tmp_path / "no").exists()


def test_sharegpt_and_messages_files_are_read_as_input(tmp_path):
    sharegpt = tmp_path / "in.json"
    sharegpt.write_text(json.dumps([{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye"}]}]), encoding="utf-8")
    convs = read_conversations(sharegpt)
    assert [m["role"] for m in convs[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert convs[0]["alpaca"] is None

    messages = tmp_path / "in.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello"}]}) + "\n", encoding="utf-8")
    assert read_conversations(messages)[0]["messages"][1] == {"role": "assistant", "content": "Hello"}

    # Multi-turn data cannot become Alpaca rows, but converts to messages and sharegpt.
    with pytest.raises(UserError, match="single user/assistant exchange"):
        export_records(read_records(sharegpt), "alpaca", tmp_path / "x.json")
    assert export_records(read_records(sharegpt), "messages", tmp_path / "x.jsonl") == 1
    assert export_records(read_records(sharegpt), "hf", tmp_path / "x-hf") == 1


@pytest.mark.parametrize("fmt", ["hf", "parquet"])
def test_a_multi_turn_export_has_only_its_messages_column_and_says_no_more(tmp_path, capsys, fmt):
    from datasets import Dataset, load_from_disk

    src = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    src.write_text(json.dumps({"messages": turns + turns}) + "\n", encoding="utf-8")
    out = tmp_path / ("ds" if fmt == "hf" else "data.parquet")
    assert main(["export", str(src), "--format", fmt, "--out", str(out)]) == 0
    ds = load_from_disk(str(out)) if fmt == "hf" else Dataset.from_parquet(str(out), cache_dir=str(tmp_path / "c"))
    assert ds.column_names == ["messages"]
    err = " ".join(capsys.readouterr().err.split())  # rich wraps the hint
    assert "columns instruction, input, output and messages" not in err, err
    assert "a messages column, plus instruction, input and output when every record is one exchange" in err


def test_alpaca_system_field_survives(tmp_path):
    src = tmp_path / "sys.json"
    src.write_text(json.dumps([{"instruction": "Hi", "input": "", "output": "Hello", "system": "Be brief."}]))
    out = tmp_path / "sys.jsonl"
    export_records(read_records(src), "messages", out)
    msgs = json.loads(out.read_text().splitlines()[0])["messages"]
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert to_alpaca({"messages": msgs}, "x") == {"instruction": "Hi", "input": "", "output": "Hello",
                                                  "system": "Be brief."}


@pytest.mark.parametrize("fmt", ["hf", "parquet"])
def test_a_system_prompt_of_later_rows_only_keeps_its_column(tmp_path, fmt):
    """The columns of an hf or parquet export are every row's, not the first row's: a system
    prompt that only the second row has is in its `system` column, and reads back."""
    from datasets import Dataset, load_from_disk

    src = tmp_path / "sys.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1] | {"system": "Be brief."}) + "\n")
    out = tmp_path / ("ds" if fmt == "hf" else "data.parquet")
    assert main(["export", str(src), "--format", fmt, "--out", str(out)]) == 0
    ds = load_from_disk(str(out)) if fmt == "hf" else Dataset.from_parquet(str(out), cache_dir=str(tmp_path / "c"))
    assert ds["system"] == [None, "Be brief."]
    assert [to_alpaca(r, "x") for r in read_records(out)] == [ROWS[0], ROWS[1] | {"system": "Be brief."}]


def test_a_broken_parquet_file_is_one_line_on_stderr(tmp_path):
    """datasets logs a broken parquet's error to stderr itself (a handler capsys does not see):
    run as the user does, stderr holds our one line only."""
    import subprocess
    import sys

    (tmp_path / "bad.parquet").write_text("not parquet")
    p = subprocess.run([sys.executable, "-m", "selfinstruct.cli", "export", str(tmp_path / "bad.parquet"),
                        "--out", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("selfinstruct export: error: "), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("case", ["empty_run", "empty_file", "unknown_format", "missing", "bad_record", "out_is_dir",
                                  "out_parent_missing", "bad_parquet"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    run = write_run(tmp_path / "run", ROWS)
    out = str(tmp_path / "out.json")
    fmt = "alpaca"
    if case == "empty_run":
        src = write_run(tmp_path / "empty", [])
    elif case == "empty_file":
        src = str(tmp_path / "empty.json")
        (tmp_path / "empty.json").write_text("")
    elif case == "missing":
        src = str(tmp_path / "nope.json")
    elif case == "bad_parquet":
        src = str(tmp_path / "bad.parquet")
        (tmp_path / "bad.parquet").write_text("not parquet")
    elif case == "bad_record":
        src = str(tmp_path / "bad.jsonl")
        (tmp_path / "bad.jsonl").write_text('{"question": "what?"}\n')
    else:
        src = run
    if case == "unknown_format":
        fmt = "csv"
    if case == "out_is_dir":
        out = str(tmp_path)
    if case == "out_parent_missing":
        out = str(tmp_path / "no" / "such" / "out.json")
    code = main(["export", src, "--format", fmt, "--out", out])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("selfinstruct export: error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["export", "audit", "dedup", "respond"])
@pytest.mark.parametrize("name, text, where", [
    ("data.json", '[{"instruction": "Add 2 and 3.", "output": "5"},\n {"instruction": "Say hi.", "output": "bad \\ud800"}]',
     "data.json:2: item 1: field 'output': holds \\ud800"),
    ("data.jsonl", '{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "\\udc00!"}]}\n',
     "data.jsonl:1: field 'messages[1].content': holds \\udc00"),
])
def test_a_lone_surrogate_in_a_dataset_is_one_line_naming_the_field(tmp_path, capsys, command, name, text, where):
    """JSON may escape half of a UTF-16 pair; no UTF-8 file can hold it, so every command once crashed writing it."""
    (tmp_path / name).write_text(text)
    code = main([command, str(tmp_path / name), "--out", str(tmp_path / "out")][:2 if command == "audit" else 4])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"selfinstruct {command}: error: {tmp_path / where}"), err
    assert not (tmp_path / "out").exists()


def test_an_escaped_surrogate_pair_is_text_and_exports_as_its_character(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"instruction": "Smile.", "output": "\\ud83d\\ude00 ok"}\n')
    assert main(["export", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "out.json")]) == 0
    assert json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))[0]["output"] == "\U0001F600 ok"


def test_a_runs_data_json_is_written_a_row_at_a_time_with_the_bytes_of_one_dump(tmp_path):
    """data.json is rewritten at every session's end; streamed, it must still be exactly the
    indented JSON list it was, whatever the text holds (newlines, quotes, U+2028, astral)."""
    from selfinstruct.export import run_rows, write_alpaca_json

    rows = [*ROWS, {"instruction": "Quote \"this\"\nand\u2028that \U0001F600", "input": "a\\nb\r\n\t[]", "output": "{}"},
            {"instruction": "Two instances.", "input": "", "output": "  spaced  "}]
    run = Path(write_run(tmp_path / "run", rows))
    assert write_alpaca_json(run_rows(run), run / "data.json") == len(rows)
    assert (run / "data.json").read_text(encoding="utf-8") == json.dumps(rows, ensure_ascii=False, indent=2)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".data.json")]  # no temp file left
    empty = Path(write_run(tmp_path / "empty", []))
    assert write_alpaca_json(run_rows(empty), empty / "data.json") == 0 and (empty / "data.json").read_text() == "[]"


def test_a_kept_instance_without_its_input_key_is_a_row_with_an_empty_input(tmp_path):
    """A kept line whose instance leaves out "input" (a hand edit) is valid, as Instance's default
    is "": data.json reads it as load_kept does, not a KeyError traceback at the session's end."""
    from selfinstruct.datafiles import load_kept
    from selfinstruct.export import alpaca_rows, run_rows

    run = Path(write_run(tmp_path / "run", ROWS[:2]))
    lines = (run / "kept.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace('"input":"",', "").replace(f'"input":{json.dumps(ROWS[0]["input"])},', "")
    assert '"input"' not in lines[0]
    (run / "kept.jsonl").write_text("\n".join(lines) + "\n")
    assert list(run_rows(run)) == alpaca_rows(load_kept(run)) == [{**ROWS[0], "input": ""}, ROWS[1]]


def _killed_before_the_rename(argv: list[str]) -> None:
    """Run ``selfinstruct ARGV`` in a process that kill -9s itself where write_atomic would rename its temp."""
    import signal
    import subprocess
    import sys

    code = ("import os, signal, sys\nfrom selfinstruct import datafiles\n"
            "datafiles.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            "from selfinstruct.cli import main\nsys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr


@pytest.mark.parametrize("fmt", ["jsonl", "hf"])
def test_the_temp_a_killed_export_left_is_removed_by_the_next_write(run, tmp_path, fmt):
    """kill -9 mid-write leaves the old export whole and write_atomic's temp beside it (a file, or
    for hf a folder as big as the dataset); the next write of that path removes it. A temp
    whose process is alive (another export of the same path, writing now) is left alone."""
    out = tmp_path / ("data.jsonl" if fmt == "jsonl" else "data_hf")
    assert main(["export", run, "--format", fmt, "--out", str(out)]) == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    _killed_before_the_rename(["export", run, "--format", fmt, "--out", str(out)])
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert left and all(p.name.startswith(f".{out.name}.tmp-") for p in left)  # the kill left its temp
    if fmt == "jsonl":
        assert len(out.read_text().splitlines()) == 3  # the old export is whole
    live = tmp_path / f".{out.name}.tmp-{os.getppid()}"  # a live process's: never removed
    live.write_text("writing")
    assert main(["export", run, "--format", fmt, "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, live.name])


@pytest.mark.parametrize("at", ["rmtree", "replace"])
def test_an_hf_export_stopped_while_it_swaps_folders_keeps_the_old_one(run, tmp_path, monkeypatch, at):
    """An hf export replaces its folder whole. Ctrl-C while the old one was being removed (seconds,
    for a big dataset) or before the new one was renamed in took both: the old one half or wholly
    deleted, the new one removed as a failed write's temp. Now the old one stays until the new
    one is in place."""
    import shutil

    from datasets import load_from_disk

    from selfinstruct import datafiles, export

    out = tmp_path / "data_hf"
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 0
    more = tmp_path / "more.json"
    more.write_text(json.dumps(ROWS * 2))

    real, calls = getattr(shutil if at == "rmtree" else datafiles.os, at), []

    def stop(path, *a, **k):
        if out.name not in Path(path).name or not Path(path).exists():  # datasets' own calls
            return real(path, *a, **k)
        calls.append(path)
        if len(calls) > 1:
            return real(path, *a, **k)
        if at == "rmtree":  # stopped part way: the data removed, the rest not yet
            next(Path(path).glob("*.arrow")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil if at == "rmtree" else datafiles.os, at, stop)
    with pytest.raises(KeyboardInterrupt):
        export.export_records(export.read_records(more), "hf", out)
    monkeypatch.undo()
    # A whole dataset: the old export, or the new one once it was renamed in; never half or none.
    assert len(load_from_disk(str(out))) in (3, 6)
    assert main(["export", str(more), "--format", "hf", "--out", str(out)]) == 0
    assert len(load_from_disk(str(out))) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_hf", "more.json", "run"]
    shutil.rmtree(out)


@pytest.fixture
def splits(tmp_path):
    """A saved DatasetDict of two splits: train holds ROWS[:2], test ROWS[2:]."""
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(ROWS[:2]), "test": Dataset.from_list(ROWS[2:])}).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("command", ["export", "audit", "dedup", "decontaminate"])
def test_a_dataset_of_several_splits_says_which_it_reads_and_dir_name_reads_another(tmp_path, capsys, splits, command):
    """A saved DatasetDict was read as its train split without a word: the test rows of a train + test
    folder silently left out of an export, an audit or a dedup. One line on stderr now names the
    split read and how to read another (DIR/NAME, the split's own folder); an unknown one lists them."""
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is the boiling point of water at sea level in Kelvin?"}) + "\n")

    def read(source, out):
        extra = {"export": ["--format", "jsonl", "--out", str(out)], "audit": [], "dedup": ["--out", str(out)],
                 "decontaminate": ["--against", str(bench), "--out", str(out)]}[command]
        code = main([command, str(source), *extra])
        captured, shown = capsys.readouterr(), set()
        if command == "audit":
            shown = {r["instruction"] for r in ROWS if f" {r['instruction'].split()[0].lower()} " in captured.out}  # verbs
        elif code == 0:
            text = (out if command == "export" else out / "kept.jsonl").read_text()
            shown = {json.loads(line)["instruction"] for line in text.splitlines()}
        return code, captured.err, shown

    capsys.readouterr()  # the fixture's save
    code, err, shown = read(splits, tmp_path / "all")
    assert code == 0 and shown == {r["instruction"] for r in ROWS[:2]}, err
    notice = f"{splits}: holds the splits train, test; reading train (give {splits / 'test'} to read another)"
    assert [line for line in err.splitlines() if "splits" in line] == [notice], err

    code, err, shown = read(splits / "test", tmp_path / "test")
    assert code == 0 and shown == {ROWS[2]["instruction"]} and "holds the splits" not in err, err

    code, err, _ = read(splits / "tset", tmp_path / "typo")
    assert code == 2 and err == (f"selfinstruct {command}: error: {splits / 'tset'}: {splits} has no split 'tset' "
                                 "(its splits: train, test)\n")
    assert not (tmp_path / "typo").exists()


def test_tunes_reader_says_its_split_and_a_dict_without_train_gives_its_first(tmp_path, capsys):
    """tune reads its data through read_conversations: the same line, the same DIR/NAME. A dict with
    no train split gives its first, named; one of a single split reads it without a word."""
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "dd"
    DatasetDict({"validation": Dataset.from_list(ROWS[:1]), "test": Dataset.from_list(ROWS[1:])}).save_to_disk(str(folder))
    capsys.readouterr()  # the saves'
    assert [c["alpaca"] for c in read_conversations(folder)] == ROWS[:1]
    assert capsys.readouterr().err == (f"{folder}: holds the splits validation, test; reading validation "
                                       f"(give {folder / 'test'} to read another)\n")
    assert [c["alpaca"] for c in read_conversations(folder / "test")] == ROWS[1:]
    assert capsys.readouterr().err == ""

    one = tmp_path / "one"
    DatasetDict({"test": Dataset.from_list(ROWS)}).save_to_disk(str(one))
    capsys.readouterr()
    assert [c["alpaca"] for c in read_conversations(one)] == ROWS
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["export", "dedup", "audit"])
def test_a_saved_empty_dataset_is_no_records_not_a_traceback(tmp_path, capsys, command):
    """datasets cannot load back an empty dataset it saved (an IndexError inside load_from_disk):
    that was a traceback; now it reads as no records, the line an empty file gives."""
    from datasets import Dataset

    empty = tmp_path / "empty"
    Dataset.from_list([]).save_to_disk(str(empty))
    capsys.readouterr()
    extra = {"export": ["--format", "jsonl", "--out", str(tmp_path / "x.jsonl")], "dedup": ["--out", str(tmp_path / "d")],
             "audit": []}[command]
    assert main([command, str(empty), *extra]) == 2
    assert capsys.readouterr().err == f"selfinstruct {command}: error: {empty}: no records\n"


def test_the_command_list_names_every_export_format():
    from selfinstruct.cli import COMMANDS
    from selfinstruct.export import FORMATS

    said = COMMANDS["export"][1]
    assert [f for f in FORMATS if (f if f != "hf" else "Hugging Face") not in said] == []


def test_a_json_list_is_read_in_one_pass_whatever_its_size(tmp_path):
    """Each item's line was counted from the file's start: 200,000 rows on one line (json.dumps
    without indent) took 8 minutes to export. Counting from the previous item, the newlines of
    the whole text are scanned about once, and every item still gets its own line."""
    from selfinstruct.datafiles import json_list_items

    class Scanned(str):  # a str that adds up how much of itself str.count scans
        scanned = 0

        def count(self, sub, start=0, end=None):
            end = len(self) if end is None else end
            Scanned.scanned += max(0, end - start)
            return str.count(self, sub, start, end)

    rows = [{"instruction": f"Task {i}.", "output": str(i)} for i in range(2000)]
    text = Scanned("[" + ",".join(json.dumps(r) for r in rows[:1000]) + ",\n" + ",\n".join(json.dumps(r) for r in rows[1000:]) + "]")
    items = list(json_list_items(text))
    assert [obj for _, obj in items] == rows
    assert [line for line, _ in items] == [1] * 1000 + list(range(2, 1002))
    assert Scanned.scanned <= 2 * len(text)


@pytest.mark.parametrize("text, line", [
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"},\n]\n', 2),
    ('[{"instruction": "a", "output": "b"}, ]', 1),
    ('[\n  {"instruction": "a", "output": "b"}\n  ,\n\n]', 3),
])
def test_a_comma_after_a_json_lists_last_item_is_one_line_naming_it(tmp_path, capsys, text, line):
    """[a, b,] was read as [a, b], where json, pandas and datasets refuse the file: a dataset
    that every step here passed failed in the trainer that loads it. The line is the comma's."""
    src = tmp_path / "data.json"
    src.write_text(text)
    assert main(["export", str(src), "--out", str(tmp_path / "o.jsonl"), "--format", "jsonl"]) == 2
    err = capsys.readouterr().err
    assert err == f"selfinstruct export: error: {src}:{line}: not valid JSON (a comma after the last item; JSON allows none)\n"
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("after", ["\x0c", "\x0b", "\x1c", "\xa0", "\u2028", "\u3000"])
def test_whitespace_json_does_not_allow_after_a_json_list_is_one_line_naming_it(tmp_path, capsys, after):
    """JSON's whitespace is space, tab, LF and CR. A form feed (or a no-break space) after the list
    was taken as whitespace, where json.loads, pandas and datasets refuse the file."""
    src = tmp_path / "data.json"
    text = '[{"instruction": "a", "output": "b"}]\n\n' + after + "\n"
    src.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError, match="Extra data: line 3 column 1"):
        json.loads(text)  # the reference: the same message and line
    assert main(["export", str(src), "--out", str(tmp_path / "o.jsonl"), "--format", "jsonl"]) == 2
    assert capsys.readouterr().err == f"selfinstruct export: error: {src}:3: not valid JSON (Extra data at column 1)\n"
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_export_to_parquet_or_hf_prints_no_progress_bar(tmp_path, capsys, fmt):
    """datasets drew its bars ('Creating parquet from Arrow format', 'Saving the dataset') on stderr
    between export's own lines; they are off for the write, and on again after it."""
    from datasets.utils import logging as datasets_logging

    src = tmp_path / "data.json"
    src.write_text(json.dumps([{"instruction": "Add 1 and 1.", "input": "", "output": "2"}]))
    out = tmp_path / ("o.parquet" if fmt == "parquet" else "o")
    capsys.readouterr()
    assert main(["export", str(src), "--format", fmt, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"wrote 1 row as {fmt} to") and "%|" not in err and "\r" not in err, err
    assert datasets_logging.is_progress_bar_enabled()


def test_reading_a_parquet_input_prints_no_progress_bar(tmp_path, capsys):
    """datasets drew 'Generating train split' on stderr at the first read of each parquet input (export,
    audit, dedup): the read is as quiet as the write, and the bars are on again after it."""
    from datasets.utils import logging as datasets_logging

    src = tmp_path / "data.json"
    src.write_text(json.dumps([{"instruction": "Add 1 and 1.", "input": "", "output": "2"}]))
    assert main(["export", str(src), "--format", "parquet", "--out", str(tmp_path / "d.parquet")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "d.parquet"), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("wrote 1 row as jsonl to") and "split" not in err and "\r" not in err, err
    assert datasets_logging.is_progress_bar_enabled()


def test_openai_content_parts_are_read_as_their_text(tmp_path):
    """OpenAI's messages may hold content as a list of parts ([{"type": "text", "text": ...}]);
    every command refused them ('expected ... content: text'). Text parts are joined by newlines."""
    from selfinstruct.export import read_conversations

    rec = {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                        {"role": "user", "content": [{"type": "text", "text": "Add 2 and 3."},
                                                     {"type": "text", "text": "Show the sum."}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "5"}]}]}
    (tmp_path / "parts.jsonl").write_text(json.dumps(rec) + "\n")
    assert main(["export", str(tmp_path / "parts.jsonl"), "--out", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text()) == [
        {"instruction": "Add 2 and 3.\nShow the sum.", "input": "", "output": "5", "system": "Be brief."}]
    assert read_conversations(tmp_path / "parts.jsonl")[0]["messages"][1]["content"] == "Add 2 and 3.\nShow the sum."


@pytest.mark.parametrize("turns, said", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
      {"role": "assistant", "content": "A cat."}], "messages[0].content[0]: a 'image_url' part; only text parts are read"),
    ([{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]},
      {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
     "messages[1]: field 'tool_calls': tool calls are not read (nor tool turns); leave them out of the data"),
    ([{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "sunny"}],
     "messages[1]: role 'tool': expected user, assistant or system"),
    ([{"role": "user", "content": " "}, {"role": "assistant", "content": "Hi."}], "messages[0]: the user turn is empty"),
])
@pytest.mark.parametrize("fmt", ["alpaca", "messages"])
def test_a_turn_that_cannot_be_read_whole_is_one_line_naming_it(tmp_path, capsys, turns, said, fmt):
    """A tool call was dropped without a word (an assistant turn with content "" was kept alone),
    and an empty user turn became an Alpaca row with an empty instruction, which export's own
    reader then refused: each is now refused, naming the turn, before anything is written."""
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": turns}) + "\n")
    out = tmp_path / out_name(fmt)
    assert main(["export", str(tmp_path / "d.jsonl"), "--format", fmt, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"selfinstruct export: error: {tmp_path / 'd.jsonl'}:1: {said}\n"
    assert not out.exists()


@pytest.mark.parametrize("fmt, name", [("jsonl", "data.parquet"), ("alpaca", "data.parquet"), ("parquet", "data.json"),
                                       ("parquet", "data.JSONL")])
def test_an_out_named_for_another_format_is_refused_before_anything_is_written(run, tmp_path, capsys, fmt, name):
    """Every reader (ours, datasets') picks parquet or JSON by the file's suffix: JSON lines
    written as data.parquet could not be read back ('cannot read parquet'), and an existing
    file of that name was replaced by them."""
    out = tmp_path / name
    out.write_text("the user's own file\n")
    assert main(["export", run, "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"selfinstruct export: error: {out}: a {out.suffix} name for --format {fmt}") and err.count("\n") == 1, err
    assert out.read_text() == "the user's own file\n"


@pytest.mark.parametrize("fmt", ["alpaca", "messages", "parquet"])
@pytest.mark.parametrize("system", [5, ["Be brief."]])
def test_a_system_field_that_is_not_text_is_one_line_naming_it(tmp_path, capsys, fmt, system):
    """An Alpaca row's `system` of another type went into a messages file as is (content 5, a
    file export's own reader then refused) and was dropped from alpaca without a word."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi.", "system": system}) + "\n")
    out = tmp_path / out_name(fmt)
    assert main(["export", str(data), "--format", fmt, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"selfinstruct export: error: {data}:1: field 'system': must be a string, "
                                       f"got {type(system).__name__}\n")
    assert not out.exists()


@pytest.mark.parametrize("rec, said", [
    ({"messages": [{"from": "human", "value": "Q"}, {"role": "assistant", "content": "A"}]},
     "messages[0]: expected {'role': user|assistant|system, 'content': text}, got a ShareGPT turn (from/value)"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"role": "assistant", "content": "A"}]},
     "conversations[1]: expected {'from': human|gpt|system, 'value': text}, got a messages turn (role/content)"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "{}"}]},
     "conversations[1]: from 'function_call': expected human, gpt or system"),
])
def test_a_turn_of_the_other_shape_is_named_as_such(tmp_path, capsys, rec, said):
    """A file joined from a ShareGPT and an OpenAI source mixes from/value and role/content; the
    line said what was expected, not that the turn was the other shape's."""
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    assert main(["export", str(tmp_path / "d.jsonl"), "--format", "messages", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err == f"selfinstruct export: error: {tmp_path / 'd.jsonl'}:1: {said}\n"


@pytest.mark.parametrize("fmt", ["alpaca", "jsonl", "sharegpt", "messages", "parquet"])
def test_fields_an_export_does_not_write_are_named_with_their_counts(tmp_path, capsys, fmt):
    """A user's id or category was dropped from every format without a word (a sharegpt record's
    top-level system is its system turn now). A null column, as parquet fills for rows without
    it, holds nothing to lose and is not named."""
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": 1, "category": "math", "instruction": "Add 1 and 1.", "input": "", "output": "2", "note": None},
        {"id": 2, "instruction": "Name a colour.", "output": "Red."},
        {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]},
    ]))
    out = tmp_path / ("o.parquet" if fmt == "parquet" else "o.json" if fmt in ("alpaca", "sharegpt") else "o.jsonl")
    assert main(["export", str(src), "--out", str(out), "--format", fmt]) == 0
    err = capsys.readouterr().err
    said = [l for l in err.splitlines() if l.startswith("not written")]
    assert said == ["not written (export keeps each record's text and roles only): id (2 of 3 records), "
                    "category (1 of 3)"], err
    # A file whose every field is carried says nothing, its own hf/parquet export's messages column included.
    again = tmp_path / "again.jsonl"
    for source in (tmp_path / "o.parquet",) if fmt == "parquet" else (out,):
        assert main(["export", str(source), "--out", str(again), "--format", "jsonl"]) == 0
        assert "not written" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
def test_the_fields_selfinstruct_wrote_are_not_named_a_users_own_still_are(tmp_path, capsys, run, command):
    """A run's dedup (or decontaminate) output keeps each task's id, nearest and provenance on its
    rows: exporting its kept.jsonl said they were 'not written', as if the user's data were lost,
    while exporting the run itself said nothing. They are selfinstruct's own, said of neither; a
    field the user added to those rows, and a user's own id on a row of theirs, are still named."""
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "How far away is the moon from the earth?"}) + "\n")
    against = ["--against", str(bench)] if command == "decontaminate" else []
    assert main([command, run, *against, "--out", str(tmp_path / "checked")]) == 0
    kept = tmp_path / "checked" / "kept.jsonl"
    rows = [json.loads(line) for line in kept.read_text().splitlines()]
    assert len(rows) == 3 and all({"id", "nearest", "provenance"} <= r.keys() for r in rows)  # what it writes
    capsys.readouterr()
    for source in (run, kept):
        assert main(["export", str(source), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl")]) == 0
        err = capsys.readouterr().err
        assert "not written" not in err, err
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in [*({**r, "category": "math"} for r in rows),
                                                           {"id": 7, "instruction": "Name a colour.", "output": "Red."}]))
    assert main(["export", str(mine), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl")]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("not written")]
    assert said == ["not written (export keeps each record's text and roles only): category (3 of 4 records), "
                    "id (1 of 4)"], said


@pytest.mark.parametrize("fmt", ["sharegpt", "messages", "alpaca", "jsonl", "parquet", "hf"])
def test_a_conversations_top_level_system_is_its_system_turn(tmp_path, capsys, fmt):
    """LLaMA-Factory's sharegpt records (and its messages ones) give the system prompt beside the
    turns, {"system": ..., "conversations": [...]}: export named it 'not written' and dropped it,
    and tune trained without it. It is the conversation's first turn now, in every format (an
    Alpaca row's system field), and one the conversation already opens with is not doubled."""
    src = tmp_path / "data.jsonl"
    turns = [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Arr."}]
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"system": "You are a pirate.", "conversations": turns},
        {"system": "Be brief.", "messages": [{"role": "user", "content": "Add 1 and 1."},
                                             {"role": "assistant", "content": "2"}]},
        {"system": "Be kind.", "conversations": [{"from": "system", "value": "Be kind."}, *turns]},
        {"system": None, "conversations": turns},
    ]))
    want = [["You are a pirate.", "Hi.", "Arr."], ["Be brief.", "Add 1 and 1.", "2"], ["Be kind.", "Hi.", "Arr."],
            ["Hi.", "Arr."]]
    assert [[m["content"] for m in c["messages"]] for c in read_conversations(src)] == want  # what tune reads
    out = tmp_path / ("o.parquet" if fmt == "parquet" else "hf" if fmt == "hf" else "o.json" if fmt in (
        "alpaca", "sharegpt") else "o.jsonl")
    assert main(["export", str(src), "--out", str(out), "--format", fmt]) == 0
    assert "not written" not in capsys.readouterr().err
    assert [[m["content"] for m in c["messages"]] for c in read_conversations(out)] == want
    if fmt in ("alpaca", "jsonl"):
        assert [r.get("system") for r in read_records(out)] == ["You are a pirate.", "Be brief.", "Be kind.", None]
    capsys.readouterr()  # the datasets reader's progress bars
    src.write_text(json.dumps({"system": "Be brief.", "conversations": [{"from": "system", "value": "Be long."},
                                                                        *turns]}) + "\n")
    assert main(["export", str(src), "--out", str(tmp_path / "x.jsonl"), "--format", "messages"]) == 2
    assert capsys.readouterr().err == (f"selfinstruct export: error: {src}:1: field 'system' and conversations[0] are "
                                       "two different system prompts; keep one\n")


@pytest.mark.parametrize("fmt", ["alpaca", "jsonl", "parquet", "hf"])
@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
def test_a_kept_file_that_a_check_emptied_says_why_it_holds_no_records(tmp_path, capsys, command, fmt):
    """dedup or decontaminate removing every record leaves an empty kept.jsonl, and exporting it
    said 'file is empty' as if the file were broken. Nothing is written in any format (datasets
    cannot load an empty JSON file, nor train on none), and the line says which check emptied it."""
    rows = [{"instruction": "Name three primary colours.", "input": "", "output": "Red, blue, yellow."},
            {"instruction": "Give the boiling point of water in Celsius.", "input": "", "output": "100."}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"question": r["instruction"]}) + "\n" for r in rows))
    checked = tmp_path / "checked"
    assert main([command, str(data), "--against", str(data if command == "dedup" else bench), "--out", str(checked)]) == 0
    assert (checked / "kept.jsonl").read_text() == ""
    capsys.readouterr()
    out = tmp_path / out_name(fmt, "hf" if fmt == "hf" else "o")
    assert main(["export", str(checked / "kept.jsonl"), "--out", str(out), "--format", fmt, "--card"]) == 2
    assert capsys.readouterr().err == (f"selfinstruct export: error: {checked / 'kept.jsonl'}: no records left: {command} "
                                       f"removed all 2 records of {data} (each with its reason in "
                                       f"{checked / 'removed.jsonl'})\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.jsonl", "checked", "data.json"]


def test_the_cards_language_is_the_users_to_set(tmp_path, capsys):
    """Every card said language: en, whatever the data's language. --language sets it (nothing
    is detected); a comma-joined value is refused with one line before anything is written."""
    from selfinstruct.card import parse_header

    src = tmp_path / "data.json"
    src.write_text(json.dumps([{"instruction": "Nommez trois couleurs primaires.", "input": "", "output": "Rouge, bleu, jaune."}]))
    assert main(["export", str(src), "--out", str(tmp_path / "o.json"), "--card"]) == 0
    assert parse_header((tmp_path / "README.md").read_text())["language"] == ["en"]  # the default, as before
    assert main(["export", str(src), "--out", str(tmp_path / "o.json"), "--card", "--language", "fr", "de"]) == 0
    assert parse_header((tmp_path / "README.md").read_text())["language"] == ["fr", "de"]
    assert main(["export", str(src), "--format", "hf", "--out", str(tmp_path / "hf"), "--language", "pt-BR"]) == 0
    assert parse_header((tmp_path / "hf" / "README.md").read_text())["language"] == ["pt-BR"]
    capsys.readouterr()
    assert main(["export", str(src), "--out", str(tmp_path / "p.json"), "--card", "--language", "en,fr"]) == 2
    assert capsys.readouterr().err == ("selfinstruct export: error: --language: 'en,fr' is not a language code "
                                       "(ISO 639: en, fr, zh; give several as --language en fr)\n")
    assert not (tmp_path / "p.json").exists()


# --------------------------------------------------------------------------- at a million records

# Rows of every kind export converts: a system prompt that only a later row has (a column
# from_list added in the order the rows first gave it), quotes, newlines, U+2028, astral text.
VARIED = [{"instruction": "Add.", "input": "1 + 1", "output": "2", "id": 1},
          {"instruction": "Say \"hi\"\nthere\u2028now \U0001F600", "input": "", "output": "h\u00e9llo\r\n\t{}",
           "system": "Be kind."},
          {"instruction": "Three.", "output": "3", "category": "x"}]


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages", "jsonl", "parquet", "hf"])
def test_a_streamed_export_writes_the_bytes_the_whole_list_gave(tmp_path, fmt):
    """Each format is written a record at a time now (a million rows were held three ways at
    once); the file is byte for byte what converting the whole list and dumping it wrote."""
    from datasets import Dataset

    from selfinstruct.datafiles import json_line

    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in VARIED), encoding="utf-8")
    suffix = {"parquet": "parquet", "alpaca": "json", "sharegpt": "json"}.get(fmt, "jsonl")
    out = tmp_path / ("ds" if fmt == "hf" else f"o.{suffix}")
    assert main(["export", str(src), "--format", fmt, "--out", str(out)]) == 0
    located = [(f"r{i}", r) for i, r in enumerate(VARIED)]
    if fmt in ("alpaca", "jsonl"):
        rows = [to_alpaca(r, w) for w, r in located]
    elif fmt == "sharegpt":
        rows = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                    "value": m["content"]} for m in to_messages(r, w)]} for w, r in located]
    else:
        rows = [{"messages": to_messages(r, w)} for w, r in located]
    if fmt in ("alpaca", "sharegpt"):
        assert out.read_bytes() == json.dumps(rows, ensure_ascii=False, indent=2).encode()
    elif fmt in ("jsonl", "messages"):
        assert out.read_bytes() == "".join(map(json_line, rows)).encode()
    else:  # the dataset export_records built with Dataset.from_list, saved the same way
        rows = [to_alpaca(r, w) | {"messages": to_messages(r, w)} for w, r in located]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        ds = Dataset.from_list([{k: r.get(k) for k in columns} for r in rows])
        ref = tmp_path / ("ref" if fmt == "hf" else "ref.parquet")
        ds.save_to_disk(str(ref)) if fmt == "hf" else ds.to_parquet(str(ref))
        if fmt == "parquet":
            assert out.read_bytes() == ref.read_bytes()
        else:  # state.json's fingerprint is a cache key, random for a dataset read from a file
            assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in ref.iterdir()] + ["README.md"])
            for p in ref.iterdir():
                if p.name != "state.json":
                    assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages", "jsonl"])
def test_export_writes_rows_while_it_reads_the_source(tmp_path, monkeypatch, fmt):
    """The source is read a record at a time and each row written as it comes: when the reader
    reaches the end, most of the file is already written (it was read whole, then converted
    whole, then dumped as one string)."""
    from selfinstruct import datafiles, export

    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"Task {i}.", "output": "x" * 20_000}) + "\n"
                           for i in range(20)))
    out = tmp_path / ("o.json" if fmt in ("alpaca", "sharegpt") else "o.jsonl")
    written_when_read = []

    def watched(real):
        def read(*a, **kw):
            yield from real(*a, **kw)
            written_when_read.append(sum(p.stat().st_size for p in tmp_path.glob(f".{out.name}.tmp-*")))
        return read

    monkeypatch.setattr(export, "iter_located", watched(getattr(datafiles, "iter_located", None)), raising=False)
    monkeypatch.setattr(export, "read_located", lambda *a, **kw: list(watched(datafiles.read_located)(*a, **kw)))
    assert main(["export", str(src), "--format", fmt, "--out", str(out)]) == 0
    assert written_when_read and written_when_read[0] > 300_000, written_when_read
    assert len(out.read_bytes()) > 400_000


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_a_bad_record_late_in_a_streamed_export_leaves_the_output_as_it_was(tmp_path, capsys, fmt):
    """Streamed, the rows before a bad one are already in the temp file: the export still stops
    with one line naming the record, the earlier output untouched and no temp left behind."""
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    bad.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + '{"instruction": 5}\n')
    out = tmp_path / {"jsonl": "o.jsonl", "parquet": "o.parquet", "hf": "ds"}[fmt]
    assert main(["export", str(good), "--format", fmt, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else out.read_bytes()
    capsys.readouterr()
    assert main(["export", str(bad), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4: field 'instruction': must be a string, got int" in err and err.count("\n") == 1
    assert ({p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else out.read_bytes()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_jsonl_file_is_read_a_line_at_a_time(tmp_path, monkeypatch):
    """The data layer's reader of a JSONL file gives its records as it reads its lines: the
    records before a broken line come out first (its whole text was read, then every line parsed,
    before the first record)."""
    from selfinstruct import datafiles

    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "{broken\n")
    monkeypatch.setattr(datafiles, "read_text", lambda *a, **kw: pytest.fail("read the whole file"))
    records = datafiles.iter_json_records(src)
    assert [next(records)[1] for _ in ROWS] == ROWS
    with pytest.raises(UserError, match=r"data.jsonl:4: not valid JSON"):
        next(records)


def test_a_json_list_is_read_an_item_at_a_time(tmp_path, monkeypatch):
    """A JSON list (Alpaca's data.json) gives its items as its text is read: the items before a
    broken one come out first, and the whole text is never held (at 100,000 rows, export
    --format jsonl from data.json peaked at 456 MB, from the same rows as JSONL at 25 MB)."""
    from selfinstruct import datafiles

    src = tmp_path / "data.json"
    src.write_text("[\n" + ",\n".join(json.dumps(r, indent=2) for r in ROWS) + ',\n{"instruction": "x" "y"}\n]')
    monkeypatch.setattr(datafiles, "read_text", lambda *a, **kw: pytest.fail("read the whole file"))
    monkeypatch.setattr(datafiles, "_PIECE", 16)  # characters read at a time: each item spans several
    records = datafiles.iter_json_records(src)
    assert [next(records) for _ in ROWS] == [(f"{src}:{2 + 5 * i}: item {i}", r) for i, r in enumerate(ROWS)]
    with pytest.raises(json.JSONDecodeError) as whole:  # where json.loads places it, read in pieces of 16 too
        json.loads(src.read_text())
    assert whole.value.lineno == 2 + 5 * len(ROWS)
    with pytest.raises(UserError, match=rf"data.json:{whole.value.lineno}: not valid JSON \(Expecting ',' delimiter "
                                        rf"at column {whole.value.colno}\)$"):
        next(records)


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1 << 20])
@pytest.mark.parametrize("text", [
    '\ufeff[1.5e3, -0.25, 12345, true, null, "é😀", {"instruction": "Add.\\n", "output": "2"}]\n',
    '[{"a": 1},\n\n {"b": "Ω"}  ,\r\n [2, 3]\n]  \n',
    '[{"a": 1},\n {"b": 2},\n]',  # a comma after the last item, on line 2
    '[{"a": 1}\n {"b": 2}]',  # no comma
    '[{"a": 1}]\n x',  # after the list
    '[{"a": 1},\n {"b": "\\ud800"}]',  # half of a UTF-16 pair
])
def test_a_json_list_read_in_pieces_gives_what_its_whole_text_gives(tmp_path, monkeypatch, piece, text):
    """Whatever the pieces' size, the items, their lines and the errors are those of the whole
    text at once: a number cut at a piece's end ("1" of "1.5e3"), a character cut between pieces."""
    from selfinstruct import datafiles

    src = tmp_path / "data.json"
    src.write_bytes(text.encode())

    def read():
        try:
            return list(datafiles.iter_json_records(src))
        except UserError as e:
            return str(e)

    monkeypatch.setattr(datafiles, "_PIECE", 1 << 30)
    whole = read()
    monkeypatch.setattr(datafiles, "_PIECE", piece)
    assert read() == whole
    if text.startswith("\ufeff"):
        assert [obj for _, obj in whole] == json.loads(text[1:])


# The string opens at column 58 of line 2; its raw newline, 40 MB on, ends it (U+000A: no char said that far on).
@pytest.mark.parametrize("end, said", [("\n]\n", f"Invalid control character at column {59 + 40 * 40_000 * 26}"),
                                       ("", "Unterminated string starting at column 58")])
def test_a_string_that_never_ends_early_in_a_huge_json_list_is_said_without_holding_the_rest(tmp_path, capsys, end, said):
    """A string left open in the first item of a big data.json runs on to the next newline or to
    the file's end: the list parser read on (its buffer doubling) and held all of it before it said
    so, 80 MB for 40 MB. Its end is now looked for a piece at a time: the same file:line and message."""
    import tracemalloc

    src = tmp_path / "data.json"
    with open(src, "w") as f:
        f.write('[\n{"instruction": "Write a poem about the sea.", "output": "')
        for _ in range(40):
            f.write("The sea is wide and grey. " * 40_000)  # 40 MB, no quote, no newline
        f.write(end)
    (tmp_path / "warm.json").write_text('[{"instruction": "Add." "output": "2"}]')
    assert main(["export", str(tmp_path / "warm.json"), "--format", "jsonl", "--out", str(tmp_path / "w.jsonl")]) == 2
    capsys.readouterr()  # imports done
    tracemalloc.start()
    try:
        assert main(["export", str(src), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl")]) == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert capsys.readouterr().err == f"selfinstruct export: error: {src}:2: not valid JSON ({said})\n"
    assert peak < 8_000_000, peak  # a few pieces of 1 MB
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("piece, held", [(7, 0), (16, 40), (1 << 20, 0)])
def test_a_string_longer_than_what_is_held_of_it_is_read_again_whole(tmp_path, monkeypatch, piece, held):
    """A string cut by a piece's end is read on without being held past a bound, to see whether it
    ends; one that ends well is read again from where it was cut: the same items, byte for byte
    (a BOM, characters of two to four bytes cut between blocks, escapes cut between pieces)."""
    from selfinstruct import datafiles

    rows = [{"instruction": "Write a poem.", "output": ("Sea é€𝄞 \"wave\"\n\\ 😀 " * 300) + str(i)} for i in range(3)]
    text = json.dumps(rows, indent=2, ensure_ascii=False).replace("😀", "\\ud83d\\ude00")  # a pair's escapes
    src = tmp_path / "data.json"
    src.write_bytes(("\ufeff" + text).encode())
    monkeypatch.setattr(datafiles, "_PIECE", piece)
    monkeypatch.setattr(datafiles, "_HELD_STRING", held)
    assert [obj for _, obj in datafiles.iter_json_records(src)] == rows
    cut = json.dumps(rows, indent=2)[:-300]  # the last string cut off by the file's end
    src.write_text(cut)
    with pytest.raises(json.JSONDecodeError) as whole:
        json.loads(cut)
    assert whole.value.msg == "Unterminated string starting at"
    with pytest.raises(UserError) as e:
        list(datafiles.iter_json_records(src))
    assert str(e.value) == (f"{src}:{whole.value.lineno}: not valid JSON (Unterminated string starting at column "
                            f"{whole.value.colno})")  # json's own line and column, whatever the pieces


def test_a_json_list_names_a_byte_that_is_not_utf8_by_its_line_and_place(tmp_path, monkeypatch):
    from selfinstruct import datafiles

    src = tmp_path / "data.json"
    bad = b"\xe2\x28"  # a three-byte character's first byte, then "("
    data = '[{"a": "é"},\n {"b": "€"},\n {"c": "'.encode() + bad + b'"}]'
    src.write_bytes(data)
    for piece in (1, 2, 1 << 20):
        monkeypatch.setattr(datafiles, "_PIECE", piece)
        with pytest.raises(UserError) as e:
            list(datafiles.iter_json_records(src))
        assert str(e.value) == f"{src}:3: not UTF-8 text (invalid continuation byte at byte {data.index(bad)})"


@pytest.mark.parametrize("fmt", ["hf", "parquet"])
def test_a_two_pass_export_of_a_dataset_dict_names_its_split_once(tmp_path, capsys, splits, fmt):
    """hf and parquet read the source twice (a check, then the rows): the split read is said once."""
    out = tmp_path / ("out" if fmt == "hf" else "out.parquet")
    capsys.readouterr()
    assert main(["export", str(splits), "--format", fmt, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "holds the splits" in line] == [
        f"{splits}: holds the splits train, test; reading train (give {splits / 'test'} to read another)"], err


@pytest.mark.parametrize("fmt", ["alpaca", "jsonl"])
def test_a_runs_kept_jsonl_given_as_a_file_exports_as_its_run_does(tmp_path, capsys, fmt):
    """RUN/kept.jsonl holds each task with its instances and no output: read as a plain row its
    instances were dropped and every output was empty. Each instance is a row, as from RUN itself."""
    from conftest import provenance

    from selfinstruct.datafiles import mark_run_folder
    from selfinstruct.records import Instance, KeptRecord

    run = tmp_path / "run"
    run.mkdir()
    mark_run_folder(run)
    tasks = [KeptRecord(id="r1-0", instruction="Sort the numbers.", provenance=provenance(),
                        instances=[Instance(input="3 1 2", output="1 2 3"), Instance(input="9 8", output="8 9")]),
             KeptRecord(id="r2-0", instruction="Name a planet.", instances=[Instance(output="Mars")], provenance=provenance())]
    (run / "kept.jsonl").write_text("".join(t.model_dump_json() + "\n" for t in tasks))
    suffix = "json" if fmt == "alpaca" else "jsonl"
    assert main(["export", str(run / "kept.jsonl"), "--format", fmt, "--out", str(tmp_path / f"file.{suffix}")]) == 0
    assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / f"run.{suffix}")]) == 0
    got = (tmp_path / f"file.{suffix}").read_text()
    assert got == (tmp_path / f"run.{suffix}").read_text()
    rows = json.loads(got) if fmt == "alpaca" else [json.loads(l) for l in got.splitlines()]
    assert [(r["instruction"], r["input"], r["output"]) for r in rows] == [
        ("Sort the numbers.", "3 1 2", "1 2 3"), ("Sort the numbers.", "9 8", "8 9"), ("Name a planet.", "", "Mars")]
    assert f"wrote 3 rows as {fmt}" in capsys.readouterr().err


def test_a_one_row_export_says_row(tmp_path, capsys):
    src = tmp_path / "one.json"
    src.write_text(json.dumps([{"instruction": "Name a planet.", "output": "Mars"}]))
    assert main(["export", str(src), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl")]) == 0
    assert "wrote 1 row as jsonl to" in capsys.readouterr().err


NEEDS = "instruction and output (alpaca), conversations (sharegpt) or messages"


@pytest.mark.parametrize("items, kind", [(["a", "b"], "a string"), ([[{"instruction": "x", "output": "y"}]], "a list")])
@pytest.mark.parametrize("fmt", ["jsonl", "messages", "alpaca", "parquet"])
def test_a_list_item_that_is_no_record_is_one_line(tmp_path, capsys, items, kind, fmt):
    """A JSON list of strings, or of lists, was an AttributeError traceback ('str' object has no
    attribute 'keys') from the count of fields left out, before the shape was checked."""
    src = tmp_path / "d.json"
    src.write_text(json.dumps(items))
    out = tmp_path / out_name(fmt)
    assert main(["export", str(src), "--format", fmt, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"selfinstruct export: error: {src}:1: item 0: is {kind}, not a record: a "
                                       f"record is a JSON object with {NEEDS}\n")
    assert not out.exists()


@pytest.mark.parametrize("line, said", [
    ("{}", "has no fields ({}, or only null ones): a record needs " + NEEDS),
    ("[]", "is an empty list [], not a record: a record is a JSON object with " + NEEDS),
    ("null", "is null, not a record: a record is a JSON object with " + NEEDS),
    ('{"conversations": "Hi"}', "field 'conversations': must be a list of turns, got a string"),
    ('{"messages": null}', "has no fields ({}, or only null ones): a record needs " + NEEDS),  # a null is absent
    ('{"prompt": "Hi"}', "not an alpaca, sharegpt or messages record (has ['prompt']; it needs " + NEEDS + ")"),
])
@pytest.mark.parametrize("command", ["export", "audit"])
def test_an_empty_object_list_or_null_line_says_what_it_is_and_what_a_record_needs(tmp_path, capsys, line, said,
                                                                                    command):
    """A line {} was 'not an alpaca, sharegpt or messages record (has [])' (its sorted keys), null
    'has NoneType', and a conversations that was no list 'has ['conversations']'."""
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    out = tmp_path / "o.json"
    assert main([command, str(src), *(["--out", str(out)] if command == "export" else [])]) == 2
    assert capsys.readouterr().err == f"selfinstruct {command}: error: {src}:2: {said}\n"
    assert not out.exists()


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
@pytest.mark.parametrize("command", ["export", "dedup"])
def test_json_nested_past_the_recursion_limit_is_one_line(tmp_path, capsys, name, command):
    """json's decoder recurses once per level: 5,000 nested lists, as a list item or in a JSONL line,
    were a RecursionError traceback in every reader (found by the review probe)."""
    src = tmp_path / name
    deep = "[" * 5000 + "1" + "]" * 5000
    src.write_text(deep if name.endswith(".json") else '{"instruction": ' + deep + ', "output": "x"}\n')
    out = tmp_path / ("out.jsonl" if command == "export" else "out")
    argv = ["export", str(src), "--format", "jsonl", "--out", str(out)] if command == "export" else \
        ["dedup", str(src), "--out", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"selfinstruct {command}: error: {src}:1: not valid JSON (nested too deeply to "
                                       "read; a record holds text, not a thousand levels of lists)\n")
    assert not out.exists()


@pytest.mark.parametrize("rec", [{"instruction": "Add 2 and 3.", "output": "5", "system": "  \n"},
                                 {"conversations": [{"from": "human", "value": "Add 2 and 3."},
                                                    {"from": "gpt", "value": "5"}], "system": " "}])
def test_a_blank_system_prompt_is_no_system_turn(tmp_path, rec):
    """"" and null were dropped, but a system prompt of spaces became a blank system turn (found
    by the review probe)."""
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(rec) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["export", str(src), "--format", "messages", "--out", str(out)]) == 0
    assert [m["role"] for m in json.loads(out.read_text())["messages"]] == ["user", "assistant"]


JUDGE_FILES = ["data.judgements.jsonl", "data.judge_stats.json", "data.judge_session.json"]


@pytest.mark.parametrize("judge_file", JUDGE_FILES)
@pytest.mark.parametrize("command", [
    ["export", "{data}", "--out", "{out}"],
    ["export", "{data}", "--format", "hf", "--out", "{out}"],
    ["filter", "{data}", "--min-score", "3", "--out", "{out}"],
    ["dedup", "{data}", "--out", "{out}/"],  # a folder not there yet, named as the judge's file
    ["decontaminate", "{data}", "--against", "{bench}", "--out", "{out}/"],
])
@pytest.mark.parametrize("there", [True, False])
def test_no_command_writes_over_a_datasets_judge_files(tmp_path, capsys, command, judge_file, there):
    """export and filter wrote an Alpaca list over dd/data.judgements.jsonl (or the judge stats) with
    rc 0, and the next filter or audit failed on it. Every command writing beside a dataset refuses
    its judge files' names, there or not yet, with one line, and writes nothing."""
    dd = tmp_path / "dd"
    dd.mkdir()
    data = dd / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Task {i}: name a colour of the sea at hour {i}.",
                                        "input": "", "output": "Blue."}) + "\n" for i in range(3)))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is the boiling point of water at sea level?"}) + "\n")
    if there:
        for name in JUDGE_FILES:
            (dd / name).write_text(f'{{"kept": "{name}"}}\n')
    before = {p.name: p.read_bytes() for p in dd.iterdir()}
    out = dd / judge_file
    argv = [a.format(data=data, out=out, bench=bench) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    what = {"data.judgements.jsonl": "judgements", "data.judge_stats.json": "judge stats",
            "data.judge_session.json": "judging session"}[judge_file]
    # A folder command given the file itself is refused first as that (it writes a folder there).
    said = (f"{out}: exists and is not a folder" if there and command[0] in ("dedup", "decontaminate")
            else f"{out}: --out would overwrite the {what} of the input {data}")
    assert err.count("\n") == 1 and said in err, err
    assert {p.name: p.read_bytes() for p in dd.iterdir()} == before


@pytest.mark.parametrize("fmt, example", [("alpaca", "data.json"), ("sharegpt", "data.json"), ("messages", "data.jsonl"),
                                          ("jsonl", "data.jsonl"), ("parquet", "data.parquet")])
def test_a_file_out_typed_as_a_folder_is_one_line_and_writes_nothing(run, tmp_path, capsys, fmt, example):
    """`export RUN --format jsonl --out expdir/` said 'wrote 3 rows ... to expdir/' and wrote a JSON
    Lines file named expdir: Path dropped the slash the user typed to say "a folder"."""
    out = f"{tmp_path / 'expdir'}{os.sep}"
    assert main(["export", str(run), "--format", fmt, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err == (f"selfinstruct export: error: {out}: --out names a folder (the trailing slash), but --format {fmt} "
                   f"writes one file ({'a parquet file' if fmt == 'parquet' else 'a JSON list' if example.endswith('.json') else 'JSON Lines'}): "
                   f"give a file name such as {tmp_path / 'expdir' / example}\n")
    assert not (tmp_path / "expdir").exists()
    with pytest.raises(UserError, match="names a folder"):  # and from the library, for a caller of its own
        export_records(ROWS, fmt, out)
    assert not (tmp_path / "expdir").exists()


@pytest.mark.parametrize("fmt, name, fit", [("alpaca", "x.csv", "x.json"), ("sharegpt", "s.parquet", "s.json"),
                                            ("messages", "m.arrow", "m.jsonl"), ("jsonl", "j.arrow", "j.jsonl"),
                                            ("parquet", "p.csv", "p.parquet"), ("parquet", "p.json", "p.parquet"),
                                            # .pq is parquet to every reader here (datafiles.PARQUET_SUFFIXES):
                                            # JSON written there was 'cannot read parquet' to audit, export, tune
                                            ("jsonl", "j.pq", "j.jsonl"), ("alpaca", "a.PQ", "a.json")])
def test_an_out_whose_suffix_says_another_format_is_refused(run, tmp_path, capsys, fmt, name, fit):
    """`--format alpaca --out x.csv` wrote JSON into x.csv, rc 0: readers pick csv, arrow or parquet by
    the suffix (pandas, datasets' builders), so none read it back. The line names the fitting name, in
    the same folder."""
    out = tmp_path / name
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"selfinstruct export: error: {out}: a {out.suffix} name for --format {fmt}, which writes ")
    assert err.endswith(f"; readers take the format by the suffix: name it {tmp_path / fit}\n") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["jsonl", "alpaca", "parquet"])
def test_an_existing_file_of_no_data_suffix_is_replaced_only_if_it_holds_an_export(run, tmp_path, capsys, fmt):
    """A name without a data suffix is the user's to choose (`--out data`, `data.txt`), but an existing one
    was written over whatever it held: `export RUN --out notes.md` replaced the user's notes. Such a file is
    replaced only where it holds what an export writes (JSON, or parquet's PAR1), as the second export
    to the same name does; anything else is one line and the file is left as it was."""
    notes = tmp_path / "notes.md"
    notes.write_text("# My notes\n\nNothing here is JSON.\n")
    assert main(["export", str(run), "--format", fmt, "--out", str(notes)]) == 2
    err = capsys.readouterr().err
    assert err == (f"selfinstruct export: error: {notes}: exists and holds no data export (it begins "
                   "'# My notes'), which --format " + fmt + " would write over: give a new name, or remove it first\n")
    assert notes.read_text() == "# My notes\n\nNothing here is JSON.\n"
    out = tmp_path / "data.txt"
    for _ in range(2):  # the second export replaces the first
        assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0, capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.write_text("")
    assert main(["export", str(run), "--format", fmt, "--out", str(empty)]) == 0
    assert empty.stat().st_size > 0


def test_parquet_to_a_pq_name_is_written_and_reads_back(run, tmp_path):
    """.pq is a parquet name, as the readers take it: --format parquet writes it."""
    out = tmp_path / "p.pq"
    assert main(["export", str(run), "--format", "parquet", "--out", str(out)]) == 0
    assert [to_alpaca(r, "x") for r in read_records(out)] == ROWS


@pytest.mark.parametrize("fmt, name", [("alpaca", "a.jsonl"), ("sharegpt", "s.jsonl"), ("messages", "train.json"),
                                       ("jsonl", "j.json")])
def test_a_json_list_or_json_lines_under_the_other_json_suffix_is_written_and_reads_back(run, tmp_path, fmt, name):
    """A JSON list in x.jsonl or JSON Lines in train.json (a common name for a messages export) was
    refused for a while: our readers and datasets.load_dataset("json") tell the two apart by the first
    character, so the file reads back whatever its JSON suffix."""
    from datasets import load_dataset

    from selfinstruct.datafiles import read_records

    out = tmp_path / name
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    assert len(read_records(out)) == len(load_dataset("json", data_files=str(out), split="train")) > 0


@pytest.mark.parametrize("fmt, name, fit", [("jsonl", "x.jsonl.gz", "x.jsonl"), ("alpaca", "a.json.zst", "a.json"),
                                            ("messages", "m.bz2", "m.jsonl")])
def test_an_out_named_as_compressed_is_refused(run, tmp_path, capsys, fmt, name, fit):
    """`--format jsonl --out x.jsonl.gz` wrote plain JSON Lines into a .gz name, rc 0, and
    datasets.load_dataset("json") then failed with BadGzipFile: refused, naming the plain name."""
    out = tmp_path / name
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not compressed; readers would try to decompress it" in err, err
    assert err.endswith(f"name it {tmp_path / fit}\n"), err
    assert not out.exists()


@pytest.mark.parametrize("name", ["data", "data.txt"])
def test_an_out_without_a_data_suffix_is_written_as_asked(run, tmp_path, capsys, name):
    """No suffix a reader takes a format from: the name is the user's, as before."""
    assert main(["export", str(run), "--format", "jsonl", "--out", str(tmp_path / name)]) == 0
    assert len((tmp_path / name).read_text().splitlines()) == len(ROWS)


def test_an_hf_folder_named_as_a_data_file_is_refused_unless_the_slash_says_it(run, tmp_path, capsys):
    """`--format hf --out lic1.jsonl` made a folder named lic1.jsonl, which every reader takes for a
    JSON Lines file. A trailing slash (or a folder already there) says the name is meant, as for dedup."""
    out = tmp_path / "lic1.jsonl"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"selfinstruct export: error: {out}: a .jsonl name for --format hf, which writes a folder (a saved "
                   f"dataset), not a .jsonl file: give a folder such as {tmp_path / 'lic1'} (or {out}/, with the "
                   "slash, for a folder of that name)\n")
    assert not out.exists()
    assert main(["export", str(run), "--format", "hf", "--out", f"{out}{os.sep}"]) == 0
    assert (out / "dataset_info.json").is_file()
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0  # now a folder: the same export again


@pytest.mark.parametrize("fmt", ["alpaca", "jsonl", "messages", "sharegpt", "parquet", "hf"])
@pytest.mark.parametrize("answer,said", [(None, "missing"), ("left out", "missing"), ("  ", "is empty")])
def test_a_row_without_its_answer_is_refused_not_exported_as_an_empty_one(tmp_path, capsys, fmt, answer, said):
    """A row with no output, a null or a blank one was written as a row whose answer is "" (the data
    layer reads it so, for respond): tuning on the export trained on empty answers, unsaid. Like any
    row export cannot write whole, it stops the export with one line naming file, line and field."""
    row = {"instruction": "Name a prime number.", "input": ""} | ({} if answer == "left out" else {"output": answer})
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS, row]))
    out = tmp_path / out_name(fmt)
    assert main(["export", str(src), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{src}:4: field 'output': {said}; a row without its answer would train" in err, err
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt", "parquet"])
@pytest.mark.parametrize("turns,said", [
    ([{"role": "user", "content": "Name a prime number."}], "has no assistant turn"),
    ([{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": " "}], "has an empty assistant turn"),
    ([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": ""}, {"role": "user", "content": "And?"},
      {"role": "assistant", "content": "Two."}], "has an empty assistant turn"),
])
def test_a_conversation_without_its_answer_is_refused_as_a_row_without_one_is(tmp_path, capsys, fmt, turns, said):
    """A conversation with no assistant turn, or a blank one, went through export (and tune) as it was:
    training on it trains on no answer. The same line as an Alpaca row without its output."""
    src = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]}
    src.write_text("".join(json.dumps(r) + "\n" for r in [good, {"messages": turns}]))
    out = tmp_path / out_name(fmt)
    assert main(["export", str(src), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{src}:2: conversation {said}; it would train on no answer" in err, err
    assert not out.exists()
    with pytest.raises(UserError, match=f"{src}:2: conversation {said}"):
        read_conversations(src)


def test_tune_reads_no_row_without_its_answer(tmp_path):
    """tune reads its data through read_conversations, which gave such a row an empty assistant turn."""
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS, {"instruction": "Name a prime number."}]))
    with pytest.raises(UserError) as e:
        read_conversations(src)
    assert str(e.value).startswith(f"{src}:4: field 'output': missing; a row without its answer would train")


@pytest.mark.parametrize("name", ["a\x1b[2J\x07b.jsonl", "a\nb.jsonl", "[red]a.jsonl"])
def test_exports_success_lines_show_the_out_path_escaped_not_raw(run, tmp_path, capsys, monkeypatch, name):
    """'wrote N rows ... to PATH' and 'dataset card -> PATH' printed --out raw: an ESC sequence in it
    reached the terminal (cleared the screen), a newline split the line, a [tag] was read as markup."""
    from selfinstruct.config import printable

    monkeypatch.setenv("COLUMNS", "500")  # rich wraps at the terminal width
    pub = tmp_path / "pub"
    pub.mkdir()
    out = pub / name
    capsys.readouterr()
    assert main(["export", run, "--format", "jsonl", "--out", str(out), "--card"]) == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err, repr(err)
    lines = err.splitlines()
    assert f"wrote 3 rows as jsonl to {printable(out)}" in lines, lines
    assert f"dataset card -> {pub / 'README.md'}" in lines, lines
    assert out.is_file()


def test_a_field_name_left_out_is_shown_escaped(tmp_path, capsys, monkeypatch):
    """The line naming the fields not written printed the input's keys raw: an ESC in one reached the terminal."""
    monkeypatch.setenv("COLUMNS", "500")
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({**ROWS[0], "tag\x1b]0;owned\x07": 1}) + "\n")
    capsys.readouterr()
    assert main(["export", str(data), "--format", "jsonl", "--out", str(tmp_path / "out.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err, repr(err)
    assert "not written (export keeps each record's text and roles only): tag\\x1b]0;owned\\x07 (1 of 1 records)" in err


@pytest.mark.parametrize("name", ["big.json", "big.jsonl"])
@pytest.mark.parametrize("command", ["export", "decontaminate"])
def test_a_number_too_long_for_python_to_read_is_one_line(tmp_path, capsys, name, command):
    """Python reads no int of over 4,300 digits: a record (or a benchmark item) holding one, as a list
    item or in a JSONL line, was a ValueError traceback ('Exceeds the limit (4300 digits) for integer
    string conversion ...') in every reader."""
    src = tmp_path / name
    rec = '{"instruction": "Add the numbers.", "input": "", "output": "x", "n": ' + "9" * 5000 + "}"
    src.write_text(f"[{rec}]" if name.endswith(".json") else rec + "\n")
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps(ROWS[0]) + "\n")
    out = tmp_path / ("out.jsonl" if command == "export" else "out")
    argv = ["export", str(src), "--format", "jsonl", "--out", str(out)] if command == "export" else \
        ["decontaminate", str(ok), "--against", str(src), "--out", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"selfinstruct {command}: error: {src}:1: not valid JSON (a number of over "
                                       "4,300 digits, more than Python reads)\n")
    assert not out.exists()


@pytest.mark.parametrize("where", ["out", "benchmark", "respond"])
def test_a_symbolic_link_loop_is_one_line_not_a_runtime_error(tmp_path, capsys, where):
    """Two links that lead to each other (a path that leads nowhere, forever) given as an output, or as an
    input checked against the outputs, were a RuntimeError traceback ('Symlink loop from ...') from
    Path.resolve in the check that an output overwrites no input: export, decontaminate's --against and
    respond's own folder check are one line too (the command line's handler, cli._path_problem)."""
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n")
    if where == "out":
        command, argv = "export", ["export", str(src), "--out", str(tmp_path / "loop1" / "x.json")]
    elif where == "benchmark":
        command, argv = "decontaminate", ["decontaminate", str(src), "--against", str(tmp_path / "loop1"),
                                          "--out", str(tmp_path / "clean")]
    else:  # respond's and evolve's own check of their run folder
        command, argv = "respond", ["respond", str(src), "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                                    "--out", str(tmp_path / "loop1")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"selfinstruct {command}: error: {tmp_path / 'loop1'}") \
        and "Too many levels of symbolic links" in err, err
    assert not (tmp_path / "clean").exists()


@pytest.mark.parametrize("name", ["state.json", "dataset_info.json", "data-00000-of-00001.arrow"])
def test_an_out_that_is_a_saved_datasets_own_file_is_refused(run, tmp_path, capsys, name):
    """`export d --format alpaca --out hf/state.json` wrote over the saved dataset's state.json, and
    `audit hf` and `export hf` were then a TypeError from datasets.load_from_disk. The files datasets
    reads in such a folder are refused as an --out; its card is still written beside them."""
    hf = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(hf), "--card"]) == 0
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    assert name in before
    fmt = "jsonl" if name.endswith(".arrow") else "alpaca"
    capsys.readouterr()
    assert main(["export", str(run), "--format", fmt, "--out", str(hf / name)]) == 2
    assert capsys.readouterr().err == (f"selfinstruct export: error: {hf / name}: is a file of the saved dataset {hf}, "
                                       "which `datasets` reads; choose an --out outside it\n")
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    assert main(["export", str(hf), "--format", "jsonl", "--out", str(tmp_path / "back.jsonl")]) == 0


@pytest.mark.parametrize("fmt", ["jsonl", "hf"])
def test_an_out_of_a_dash_is_refused_not_written_as_a_file_named_dash(run, tmp_path, monkeypatch, capsys, fmt):
    """`export RUN --out -` wrote a file (or folder) named '-', rc 0, where a Unix tool writes to standard
    output. One line, nothing made."""
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), "--format", fmt, "--out", "-"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfinstruct export: error: -: --out is written as a file, not to standard output"), err
    assert err.count("\n") == 1 and not (tmp_path / "-").exists()


@pytest.mark.parametrize("name, text, said", [
    ("b.csv", "question,answer\nWhat is 2+2?,4\n", "a .csv file, not JSON (it begins 'question,answer'); selfinstruct reads "
     "JSON, JSON Lines or parquet: convert it (pandas: read_csv(...).to_json(out, orient='records', lines=True))"),
    ("n.jsonl", "hello there\n{\"instruction\": \"x\"}\n", "not JSON (it begins 'hello there'); selfinstruct reads JSON, "
     "JSON Lines or parquet: convert it"),
])
@pytest.mark.parametrize("command", ["export", "decontaminate"])
def test_a_file_that_is_not_json_from_its_first_line_says_what_it_begins_with(tmp_path, capsys, name, text, said, command):
    """A CSV benchmark (or data file) was "b.csv:1: not valid JSON (Expecting value at column 1)", which said
    nothing of what it is: the line says what the file begins with and what selfinstruct reads."""
    bad = tmp_path / name
    bad.write_text(text)
    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"instruction": "Name a colour.", "input": "", "output": "Blue."}) + "\n")
    argv = (["export", str(bad), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl")] if command == "export" else
            ["decontaminate", str(good), "--against", str(bad), "--out", str(tmp_path / "dc")])
    assert main(argv) == 2
    assert capsys.readouterr().err == f"selfinstruct {command}: error: {bad}: {said}\n"


def test_ctrl_c_while_parquet_is_written_is_the_one_line_and_keeps_the_old_export(run, tmp_path):
    """The datasets library writes through a Python file object (fsspec) that Arrow's C++ writer
    calls: a Ctrl-C (or a SIGTERM, handled as one) raised in that call, as a page of a column is
    flushed, broke parquet's column writer, which aborted the process ("Check failed: _s.ok()", a
    core dump, code -6, its temps left). Here the second write of the export's own file (a page
    of a column of 30,000 rows, flushed as it is written) signals, so the stop lands there each time."""
    import subprocess
    import sys

    import random

    out = tmp_path / "out.parquet"
    assert main(["export", run, "--format", "parquet", "--out", str(out)]) == 0
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    more = tmp_path / "more.jsonl"
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    more.write_text("".join(json.dumps({"instruction": " ".join(rng.sample(words, 10)), "output": " ".join(rng.sample(words, 6))})
                            + "\n" for _ in range(30_000)))
    code = ("import signal, sys\nfrom fsspec.implementations import local\nwrite = local.LocalFileOpener.write\n"
            "writes = []\n"
            "def interrupted(self, *a, **kw):\n"
            "    if '.tmp-rows-' not in self.path:\n"  # the export's file, not the rows staged before it
            "        writes.append(1)\n"
            "        if len(writes) == 2:\n"
            "            signal.raise_signal(signal.SIGINT)\n"
            "    return write(self, *a, **kw)\n"
            "local.LocalFileOpener.write = interrupted\n"
            "from selfinstruct.cli import main\nsys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "export", str(more), "--format", "parquet", "--out", str(out)],
                       capture_output=True, timeout=120)
    assert (p.returncode, p.stderr.decode()[-2000:]) == (130, "selfinstruct export: interrupted\n")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p != more) == before  # no temp left
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == len(ROWS)
