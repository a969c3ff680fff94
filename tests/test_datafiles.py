"""The data layer: one reading of every file, the same for every command that reads records."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub from tests

import pytest

from selfinstruct.cli import main

ROWS = [{"instruction": "Write a short poem about the sea at night.", "output": "Waves."},
        {"instruction": "Name three prime numbers below ten.", "output": "2, 3, 5."}]


def filter_command(command: str, source, tmp_path) -> list[str]:
    """dedup or decontaminate of ``source``, against a benchmark sharing nothing with it."""
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "How far away is the moon from the earth?"}) + "\n")
    against = ["--against", str(bench)] if command == "decontaminate" else []
    return [command, str(source), *against, "--out", str(tmp_path / "out")]


def nan_table(tmp_path, shape: str, **columns):
    """A parquet file (or a saved dataset) of ``columns``, whose NaN stays NaN: pyarrow's own write
    of a float column (pandas' to_parquet makes NaN null; a table built from numpy does not)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    if shape == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(table, path)
        return path
    from datasets import Dataset

    path = tmp_path / "data"
    Dataset(table).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("shape", ["parquet", "hf"])
@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
def test_a_nan_in_a_float_column_is_that_rows_value_missing(tmp_path, capsys, command, shape):
    """A float column holds NaN where a row has no value (numpy and pandas mark a missing number so):
    dedup and decontaminate refused the file ('a number JSON cannot hold'). It reads as a null does,
    the field missing for that row, and the row is kept without it."""
    import numpy as np

    src = nan_table(tmp_path, shape, instruction=[r["instruction"] for r in ROWS], output=[r["output"] for r in ROWS],
                    score=np.array([4.5, np.nan]))
    if shape == "parquet":
        import pyarrow.parquet as pq

        score = pq.read_table(src).column("score")
        assert score.null_count == 0 and score.to_pylist()[1] != score.to_pylist()[1]  # a NaN, not a null
    assert main(filter_command(command, src, tmp_path)) == 0, capsys.readouterr().err
    kept = [json.loads(line) for line in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    assert [r.get("score", "missing") for r in kept] == [4.5, "missing"]
    assert [r["instruction"] for r in kept] == [r["instruction"] for r in ROWS]


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
def test_a_nan_where_text_is_needed_is_still_one_line_naming_file_record_and_field(tmp_path, capsys, command):
    import numpy as np

    src = nan_table(tmp_path, "parquet", instruction=np.array([np.nan, 2.0]), output=[r["output"] for r in ROWS])
    assert main(filter_command(command, src, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{src}: row 1: field 'instruction': missing" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", ["parquet", "hf", "split"])
@pytest.mark.parametrize("command", ["export", "dedup", "decontaminate", "audit"])
def test_a_bad_row_of_a_table_is_named_by_its_row_counted_from_1(tmp_path, capsys, command, shape):
    """A parquet or datasets row was numbered from 0 ("data.parquet: record 1" for the second row),
    where a JSON file's lines count from 1: a user counting rows (or a JSONL export's lines) looked
    at the wrong one. The second row is "row 2", in each table format and each command reading data."""
    import pyarrow as pa

    rows = [ROWS[0], {"instruction": "", "output": "Nothing asked."}, ROWS[1]]
    table = pa.table({k: [r[k] for r in rows] for k in ("instruction", "output")})
    if shape == "parquet":
        import pyarrow.parquet as pq

        src = where = tmp_path / "data.parquet"
        pq.write_table(table, src)
    else:
        from datasets import Dataset, DatasetDict

        src = tmp_path / "data"
        if shape == "hf":
            Dataset(table).save_to_disk(str(src))
            where = src
        else:  # a saved DatasetDict: its train split is read, and named as its folder
            DatasetDict({"train": Dataset(table)}).save_to_disk(str(src))
            where = src / "train"
    capsys.readouterr()  # datasets' own progress bar of the save
    args = (["export", str(src), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl")] if command == "export" else
            ["audit", str(src)] if command == "audit" else filter_command(command, src, tmp_path))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{where}: row 2: field 'instruction': is empty" in err, err


@pytest.mark.parametrize("command", ["export", "dedup", "decontaminate", "audit"])
def test_a_parquet_file_with_columns_and_no_row_holds_no_records(tmp_path, capsys, command):
    """pandas' `df.head(0).to_parquet()` writes the columns and no row; datasets' builder failed on it
    with a traceback (rc 1) in every command that reads data. It holds no record, as an empty JSON
    list holds none: that line, rc 2."""
    import pandas as pd

    src = tmp_path / "empty.parquet"
    pd.DataFrame(ROWS).head(0).to_parquet(src)
    args = (["export", str(src), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl")] if command == "export" else
            ["audit", str(src)] if command == "audit" else filter_command(command, src, tmp_path))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{src}: no records" in err, err


@pytest.mark.parametrize("name", ["DATA.PARQUET", "data.pq", "data.bin"])
def test_a_parquet_file_is_read_as_parquet_whatever_its_suffix_says(tmp_path, capsys, name):
    """The suffix was compared case-sensitively, and `.pq` (or any other name) was read as JSON: "not
    UTF-8 text (invalid start byte at byte 345)". A parquet file is known by its magic bytes too."""
    import pandas as pd

    src = tmp_path / name
    pd.DataFrame(ROWS).to_parquet(src, engine="pyarrow")
    out = tmp_path / "o.jsonl"
    assert main(["export", str(src), "--format", "jsonl", "--out", str(out)]) == 0, capsys.readouterr().err
    assert [json.loads(line)["instruction"] for line in out.read_text().splitlines()] == [r["instruction"] for r in ROWS]
    assert main(["dedup", str(src), "--out", str(tmp_path / "dd")]) == 0, capsys.readouterr().err
    assert len((tmp_path / "dd" / "kept.jsonl").read_text().splitlines()) == 2


def test_parquet_seeds_are_refused_naming_the_formats_seeds_take(tmp_path, capsys):
    """Seeds are JSON or JSONL; a parquet --seeds was "not UTF-8 text", which names no way out."""
    import pandas as pd

    src = tmp_path / "seeds.parquet"
    pd.DataFrame(ROWS).to_parquet(src)
    assert main(["generate", "--seeds", str(src), "--out", str(tmp_path / "run"), "--num", "1",
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert f"{src}: a parquet file; seed files are JSON or JSONL (selfinstruct export {src} --format jsonl" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["export", "dedup", "generate"])
def test_a_pipe_given_as_input_is_refused_in_one_line_not_read_as_empty(tmp_path, capsys, command):
    """`export /dev/stdin` or `--seeds <(zcat seeds.jsonl.gz)`: the input is opened more than once (its
    first byte tells a JSON list from JSONL), so a pipe read as "no records" or "holds no seed tasks"."""
    import threading

    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)

    def feed():  # a writer for each open, so that a reader of the pipe gets the rows rather than hanging
        for _ in range(20):
            try:
                with open(fifo, "w") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in ROWS))
            except OSError:  # the reader closed it early (it read its first byte only)
                pass

    threading.Thread(target=feed, daemon=True).start()
    args = {"export": ["export", str(fifo), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl")],
            "dedup": ["dedup", str(fifo), "--out", str(tmp_path / "dd")],
            "generate": ["generate", "--seeds", str(fifo), "--out", str(tmp_path / "run"), "--num", "1",
                         "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]}[command]
    import signal

    def too_long(*_):  # a reader that opens the pipe again waits for a writer forever: fail instead
        raise TimeoutError("the command waited on the pipe")

    old = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(20)
    try:
        code = main(args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{fifo}: is not a regular file (a pipe or device, read more" in err, err


def test_a_replaced_file_keeps_its_mode(tmp_path, capsys):
    """write_atomic's temp took the default umask: a 0600 output became 0644 (world-readable) when
    written again. A file replaced keeps its mode; a new one gets the umask's."""
    from selfinstruct.datafiles import write_atomic

    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    private = tmp_path / "private.jsonl"
    private.write_text("old\n")
    private.chmod(0o600)
    assert main(["export", str(data), "--format", "jsonl", "--out", str(private)]) == 0
    assert (private.stat().st_mode & 0o777, len(private.read_text().splitlines())) == (0o600, 2)
    shared = tmp_path / "shared.txt"
    shared.write_text("old")
    shared.chmod(0o664)
    write_atomic(shared, "new")
    assert (shared.stat().st_mode & 0o777, shared.read_text()) == (0o664, "new")
    umask = os.umask(0)
    os.umask(umask)
    write_atomic(tmp_path / "new.txt", "new")
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_output_that_is_a_symbolic_link_is_written_through_and_one_to_nothing_is_one_line(tmp_path, capsys):
    """export and filter replaced a linked --out with a plain file (the link gone, its target as it
    was); now the target is replaced and the link stays, as `>` and cp do. A link to nothing is one line
    (dedup's said 'cannot create the folder (File exists)'), and nothing is made."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    real, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    real.write_text("old\n")
    link.symlink_to(real)
    assert main(["export", str(data), "--format", "jsonl", "--out", str(link)]) == 0
    assert link.is_symlink() and len(real.read_text().splitlines()) == 2
    capsys.readouterr()
    nowhere = tmp_path / "gone" / "x.jsonl"
    for argv in (["export", str(data), "--format", "jsonl"], filter_command("dedup", data, tmp_path)[:-2],
                 filter_command("decontaminate", data, tmp_path)[:-2]):
        dangling = tmp_path / f"dangling-{argv[0]}"
        dangling.symlink_to(nowhere)
        assert main([*argv, "--out", str(dangling)]) == 2
        err = capsys.readouterr().err
        assert err == (f"selfinstruct {argv[0]}: error: {dangling}: is a symbolic link to {nowhere}, which is not "
                       "there; give an --out that is (or the link's target made first)\n"), err
    assert not (tmp_path / "gone").exists()


ALPACA_SHAPE = "an Alpaca record is a JSON object with instruction, input and output"


# What dedup and decontaminate read (dedup.READS), and a seed file (seeds.READS).
ANY_SHAPE = "a record is a JSON object with instruction (alpaca), conversations (sharegpt) or messages"
SEED_SHAPE = ("a seed task is a JSON object with id, instruction and instances (self-instruct) or instruction, input and "
              "output (alpaca)")


@pytest.mark.parametrize("command, line, said", [
    ("dedup", "{}", "has no fields ({}, or only null ones): " + ANY_SHAPE),
    ("generate", "{}", "has no fields ({}, or only null ones): " + SEED_SHAPE),
    ("dedup", "[]", "is an empty list [], not a record: " + ANY_SHAPE),
    ("dedup", "null", "is null, not a record: " + ANY_SHAPE),
    ("dedup", "3", "is a number, not a record: " + ANY_SHAPE),
])  # a seed line that is no object is refused by seeds.py first, in its own words
def test_an_empty_object_list_or_null_line_in_an_alpaca_file_says_what_it_is(tmp_path, capsys, command, line, said):
    """datafiles.alpaca_row said a null line was 'expected a JSON object, got NoneType', and {} that its
    instruction was missing (for a seed file, '(and 1 more)'), not that the line is empty."""
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"}) + "\n"
                   + line + "\n")
    argv = {"dedup": ["dedup", src, "--out", tmp_path / "out"],
            "generate": ["generate", "--seeds", src, "--out", tmp_path / "out", "--num", "1",
                         "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]}[command]
    assert main([str(a) for a in argv]) == 2
    assert capsys.readouterr().err == f"selfinstruct {command}: error: {src}:2: {said}\n"
    assert not (tmp_path / "out").exists()


EXPORT_SHAPE = "a record needs instruction and output (alpaca), conversations (sharegpt) or messages"
TURN = {"sharegpt": {"conversations": [{"from": "human", "value": "Add 2 and 3."}, {"from": "gpt", "value": "5"}]},
        "messages": {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]},
        "alpaca": {"instruction": "Add 2 and 3.", "input": "", "output": "5"}}


@pytest.mark.parametrize("layout", list(TURN))
@pytest.mark.parametrize("command, said", [
    ("dedup", ANY_SHAPE), ("decontaminate", ANY_SHAPE),
    ("export", EXPORT_SHAPE), ("respond", EXPORT_SHAPE), ("evolve", EXPORT_SHAPE), ("filter", EXPORT_SHAPE),
])
def test_an_empty_record_is_told_what_its_reader_reads(tmp_path, capsys, command, said, layout):
    """A {} line in a file of ShareGPT conversations was told by dedup and decontaminate (datafiles.alpaca_row)
    that 'an Alpaca record has instruction, input and output', as if Alpaca rows were all they read."""
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(TURN[layout]) + "\n{}\n")
    other = tmp_path / "bench.jsonl"
    other.write_text(json.dumps(TURN["alpaca"]) + "\n")
    teacher = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    argv = {"dedup": ["dedup", src], "decontaminate": ["decontaminate", src, "--against", other],
            "export": ["export", src],
            "respond": ["respond", src, *teacher], "evolve": ["evolve", src, *teacher],
            "filter": ["filter", src, "--min-score", "3"]}[command]
    assert main([str(a) for a in argv] + ["--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == \
        f"selfinstruct {argv[0]}: error: {src}:2: has no fields ({{}}, or only null ones): {said}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["generate --out LONG", "export DATA --out LONG.json", "dedup DATA --out LONG",
                                     "export LONG.json --out OUT.json", "audit LONG"])
def test_a_name_longer_than_the_file_system_allows_is_one_line(tmp_path, capsys, command):
    """A path with a name over 255 bytes (a run named from its many options by a script) was a
    traceback, `OSError: [Errno 36] File name too long`, from the first stat of it: one line naming it."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Name a prime number.", "input": "", "output": "Seven."}]))
    long = tmp_path / ("a" * 300)
    words = {"LONG": str(long), "LONG.json": f"{long}.json", "DATA": str(data), "OUT.json": str(tmp_path / "out.json")}
    argv = [words.get(w, w) for w in command.split()]
    if argv[0] == "generate":  # a teacher that is not there: the name is refused before any is asked
        argv += ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    rc, err = main(argv), capsys.readouterr().err
    # The path the system refused: the name given, or a file in it (generate's --out/config.yaml).
    assert rc == 2 and err.startswith(f"selfinstruct {argv[0]}: error: {long}") and err.count("\n") == 1, err
    assert err.endswith(": File name too long\n"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


@pytest.mark.parametrize("command", ["generate --out LOOP/run", "generate --out RUN --seeds LOOP", "export LOOP --out OUT.json",
                                     "export DATA --out LOOP/x.json"])
def test_a_loop_of_symbolic_links_is_one_line(tmp_path, capsys, command):
    """Two links naming each other (`ln -s b a; ln -s a b`) given as a path: pathlib's resolve()
    raised `RuntimeError: Symlink loop from '.../a'`, a traceback, where other commands said the
    path was not there. One line naming it, exit 2, nothing written."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Name a prime number.", "input": "", "output": "Seven."}]))
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    words = {"LOOP": str(tmp_path / "a"), "LOOP/x.json": str(tmp_path / "a" / "x.json"), "DATA": str(data),
             "LOOP/run": str(tmp_path / "a" / "run"),
             "OUT.json": str(tmp_path / "out.json"), "RUN": str(tmp_path / "run")}
    argv = [words.get(w, w) for w in command.split()]
    if argv[0] == "generate":  # a teacher that is not there: the path is refused before any is asked
        argv += ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    rc, err = main(argv), capsys.readouterr().err
    assert rc == 2 and err.startswith(f"selfinstruct {argv[0]}: error: {tmp_path / 'a'}") and err.count("\n") == 1, err
    assert "Too many levels of symbolic links" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "data.json"]
