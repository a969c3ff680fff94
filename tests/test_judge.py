"""The judge's files beside a dataset: each dataset its own, found again after a rename of their scheme."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub from tests

import pytest

from test_audit import (PLAIN_ROWS, SPLIT_ROWS, JudgeServer, as_an_earlier_version_left_them, cli,  # noqa: F401
                        cli_in_a_process, ids_in, wide_terminal)  # (a fixture)


@pytest.fixture
def server():
    s = JudgeServer()
    yield s
    s.close()


def judge_path(capsys, server, path):
    return cli(capsys, "audit", path, "--judge", "--base-url", server.url, "--model", "j")


def dotted_neighbours(tmp_path: Path) -> tuple[Path, Path]:
    """a.b/ with the split c (SPLIT_ROWS) and a/ with the split b.c (PLAIN_ROWS), side by side."""
    from datasets import Dataset, DatasetDict

    DatasetDict({"c": Dataset.from_list(SPLIT_ROWS)}).save_to_disk(str(tmp_path / "a.b"))
    DatasetDict({"b.c": Dataset.from_list(PLAIN_ROWS)}).save_to_disk(str(tmp_path / "a"))
    return tmp_path / "a.b" / "c", tmp_path / "a" / "b.c"


def test_two_datasetdicts_whose_dotted_names_meet_keep_their_own_judge_files(server, tmp_path, capsys):
    """a.b/ split c and a/ split b.c were both judged into a.b.c.split-judgements.jsonl: the second
    found the first's judgements as its own, and their requests and costs were added together."""
    abc, a_bc = dotted_neighbours(tmp_path)
    rc, out, err = judge_path(capsys, server, abc)
    assert rc == 0 and "2 judged" in out, err
    rc, out, err = judge_path(capsys, server, a_bc)
    assert rc == 0 and "1 judged" in out and len(server.requests) == 3, err
    files = {p: (tmp_path / f"{p}.split-judgements.jsonl", tmp_path / f"{p}.split-judge_stats.json")
             for p in ("a.b.c", "a.b%2Ec")}
    assert len(ids_in(files["a.b.c"][0])) == 2 and len(ids_in(files["a.b%2Ec"][0])) == 1
    assert not set(ids_in(files["a.b.c"][0])) & set(ids_in(files["a.b%2Ec"][0]))
    assert [json.loads(files[p][1].read_text())["requests"] for p in files] == [2, 1]
    for given, said in ((abc, "kept 1 of 2 records"), (a_bc, "kept 1 of 1 record ")):  # scores 5, 2; 4
        rc, out, err = cli(capsys, "filter", given, "--min-score", "4", "--out", tmp_path / "good.json")
        assert rc == 0 and said in out, err


def test_no_output_may_overwrite_a_dotted_splits_judge_files(tmp_path, capsys):
    _, a_bc = dotted_neighbours(tmp_path)
    capsys.readouterr()  # datasets' own progress bars, saving them
    theirs = tmp_path / "a.b%2Ec.split-judgements.jsonl"
    rc, _, err = cli(capsys, "export", a_bc, "--format", "jsonl", "--out", theirs)
    assert rc == 2 and err.count("\n") == 1 and f"would overwrite the judgements of the input {a_bc}" in err, err
    assert not theirs.exists()


def test_a_dotted_splits_judge_files_of_the_old_name_are_moved_when_no_split_claims_them(server, tmp_path, capsys):
    """a/ split b.c's files were a.b.c.split-*: with no a.b/ split c beside it, they are its own, moved
    to the new names with one line, and nothing judged there is asked again."""
    from datasets import Dataset, DatasetDict

    DatasetDict({"b.c": Dataset.from_list(SPLIT_ROWS)}).save_to_disk(str(tmp_path / "a"))
    a_bc = tmp_path / "a" / "b.c"
    rc, out, err = judge_path(capsys, server, a_bc)
    assert rc == 0 and "2 judged" in out, err
    for name in ("judgements.jsonl", "judge_stats.json"):  # back where the earlier version wrote them
        (tmp_path / f"a.b%2Ec.split-{name}").rename(tmp_path / f"a.b.c.split-{name}")
    rc, out, err = judge_path(capsys, server, a_bc)
    assert rc == 0 and "all 2 records already judged" in out and len(server.requests) == 2, err
    old, new = tmp_path / "a.b.c.split-judgements.jsonl", tmp_path / "a.b%2Ec.split-judgements.jsonl"
    assert f"{old}: judgements an earlier version wrote there, moved to {new}" in err, err
    assert not old.exists() and not (tmp_path / "a.b.c.split-judge_stats.json").exists()
    assert json.loads((tmp_path / "a.b%2Ec.split-judge_stats.json").read_text())["requests"] == 2


def test_old_names_another_split_claims_give_the_dotted_split_only_its_own_judgements(server, tmp_path, capsys):
    """The old a.b.c.split-judgements.jsonl held both splits' judgements (a.b/c's and a/b.c's): it is
    a.b/c's file now, so a/b.c copies its own records' from it and leaves it whole."""
    abc, a_bc = dotted_neighbours(tmp_path)
    rc, out, err = judge_path(capsys, server, abc)
    assert rc == 0 and "2 judged" in out, err
    rc, out, err = judge_path(capsys, server, a_bc)
    assert rc == 0 and "1 judged" in out, err
    old, new = tmp_path / "a.b.c.split-judgements.jsonl", tmp_path / "a.b%2Ec.split-judgements.jsonl"
    mine = ids_in(new)
    before = as_an_earlier_version_left_them(old, new, tmp_path / "a.b.c.split-judge_stats.json",
                                             tmp_path / "a.b%2Ec.split-judge_stats.json")
    rc, out, err = judge_path(capsys, server, a_bc)
    assert rc == 0 and "all 1 record" in out and len(server.requests) == 3, err
    assert f"{old}: judgements an earlier version wrote there, copied into {new}" in err, err
    assert ids_in(new) == mine
    assert (old.read_text(), (tmp_path / "a.b.c.split-judge_stats.json").read_text()) == before


def test_a_row_without_an_answer_is_not_judged_and_filter_leaves_it_out_with_its_reason(server, tmp_path, capsys):
    """A blank output, or a conversation's blank assistant turn, is no answer to judge (generate rejects
    it as empty_output; export and tune refuse it): the judge sends no request for it, and filter
    leaves it out, in --rejected with that reason, whatever score an earlier judge gave it."""
    rows = [{"instruction": "Name a prime number.", "input": "", "output": "Seven."},
            {"instruction": "Name the colour of a clear sky.", "input": "", "output": "  \n"},
            {"messages": [{"role": "user", "content": "Name the largest ocean."}, {"role": "assistant", "content": " "}]}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = judge_path(capsys, server, data)
    assert rc == 0, err
    asked = [r["messages"][-1]["content"] for r in server.requests]
    assert len(asked) == 1 and "Name a prime number." in asked[0]
    assert "2 records with an empty answer not asked (empty_output: filter leaves them out)" in out
    stats = json.loads((tmp_path / "data.judge_stats.json").read_text())
    assert stats["requests"] == 1 and stats["last_session"]["empty_output"] == 2

    def filtered() -> tuple[str, list[dict], list[dict]]:
        rc, out, err = cli(capsys, "filter", data, "--min-score", "1", "--out", tmp_path / "good.jsonl",
                           "--rejected", tmp_path / "left_out.jsonl")
        assert rc == 0, err
        read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
        return out, read("good.jsonl"), read("left_out.jsonl")

    out, good, left_out = filtered()
    assert good == [rows[0]]
    assert [(r["instruction"], r["reason"]) for r in left_out] == [
        ("Name the colour of a clear sky.", "empty_output: the output is empty"),
        ("Name the largest ocean.", "empty_output: the output is empty")]
    assert "kept 1 of 3 records (1 row)" in out and "2 rows with an empty answer (empty_output)" in out
    # An earlier version's judge scored the blanks as they were: still left out, for the same reason.
    with open(tmp_path / "data.judgements.jsonl", "a") as f:
        for r in left_out:
            f.write(json.dumps({"id": r["id"], "score": 5, "reason": "Fine.", "model": "j"}) + "\n")
    out, good, again = filtered()
    assert good == [rows[0]] and again == left_out
    # The judge, run again, still asks nothing for them.
    rc, out, err = judge_path(capsys, server, data)
    assert rc == 0 and len(server.requests) == 1, err


def test_the_judge_leaves_out_the_reason_generate_gives_an_empty_output():
    from selfinstruct.filters import check_instance
    from selfinstruct.judge import EMPTY_OUTPUT
    from selfinstruct.records import Instance

    assert check_instance(Instance(input="", output=" \n")) == (False, EMPTY_OUTPUT)


def test_a_dataset_with_no_answer_at_all_is_one_line_and_rejected_is_checked_as_out_is(server, tmp_path, capsys):
    data = tmp_path / "blank.json"
    data.write_text(json.dumps([{"instruction": "Name a prime number.", "input": "", "output": " "}]))
    rc, _, err = judge_path(capsys, server, data)
    assert rc == 2 and err.count("\n") == 1 and "every record's answer is empty (empty_output)" in err
    assert server.requests == []
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(PLAIN_ROWS))
    assert judge_path(capsys, server, plain)[0] == 0
    good = tmp_path / "good.json"
    for rejected, said in ((plain, "would overwrite the input"), (good, "--rejected"),
                           (tmp_path / "left.csv", "a .csv name for --rejected")):
        rc, _, err = cli(capsys, "filter", plain, "--min-score", "1", "--out", good, "--rejected", rejected)
        assert rc == 2 and err.count("\n") == 1 and said in err, err
    assert not good.exists() and json.loads(plain.read_text()) == PLAIN_ROWS


@pytest.mark.parametrize("name", ["judge_stats.json", "judge_session.json", "judgements.jsonl"])
@pytest.mark.parametrize("where", ["run", "plain"])
def test_a_folder_where_the_judge_writes_a_file_is_refused_before_any_record_is_judged(server, tmp_path, capsys,
                                                                                        where, name):
    """judge_stats.json a folder: every record was judged (and paid for), then 'cannot write (Is a
    directory)'. Each file the judge writes is looked at before the first request."""
    from test_audit import write_run

    if where == "run":
        source = write_run(tmp_path / "run1")
        blocker = source / name
    else:
        source = tmp_path / "data.json"
        source.write_text(json.dumps(PLAIN_ROWS))
        blocker = tmp_path / f"data.{name}"
    blocker.mkdir()
    rc, _, err = judge_path(capsys, server, source)
    assert rc == 2 and err.count("\n") == 1 and f"{blocker}: is a folder" in err, err
    assert "the judge keeps its" in err and server.requests == [], err


def test_the_judge_and_filter_show_paths_escaped_not_raw(server, tmp_path, capsys):
    """The judge's '-> PATH' lines and filter's '-> OUT' printed the paths raw: an ESC sequence in
    a file's name reached the terminal."""
    data = tmp_path / "d\x1b[2Ja.json"
    data.write_text(json.dumps(PLAIN_ROWS))
    for argv in (["audit", data, "--judge", "--base-url", server.url, "--model", "j"],
                 ["audit", data, "--judge", "--base-url", server.url, "--model", "j"],  # all already judged
                 ["filter", data, "--min-score", "1", "--out", tmp_path / "g\x1b[2Jo.json",
                  "--rejected", tmp_path / "r\x07.jsonl"]):
        rc, out, err = cli(capsys, *argv)
        assert rc == 0 and "\x1b" not in out + err and "\x07" not in out + err, repr(out + err)
        assert "\\x1b[2J" in out, out


def test_a_fifo_named_judge_stats_json_does_not_hold_the_audit(tmp_path):
    """audit read data.judge_stats.json with a plain open: a FIFO of that name held it forever."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(PLAIN_ROWS))
    os.mkfifo(tmp_path / "data.judge_stats.json")
    p = cli_in_a_process("audit", data, timeout=60)
    assert p.returncode == 0 and "Audit of" in p.stdout, p.stderr


def test_filter_names_what_its_alpaca_rows_do_not_hold(server, tmp_path, capsys):
    """filter writes instruction, input and output: a row's system prompt (a field, or a conversation's
    system turn) and a user's own fields were dropped without a word (export names what it leaves out)."""
    rows = [{"instruction": "Name a prime number.", "input": "", "output": "Seven.", "system": "Be brief.", "id": "x9"},
            {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Name an ocean."},
                          {"role": "assistant", "content": "The Pacific."}]},
            {"instruction": "Name a colour.", "input": "", "output": "Red."}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = judge_path(capsys, server, data)
    assert rc == 0, err
    rc, out, err = cli(capsys, "filter", data, "--min-score", "1", "--out", tmp_path / "good.jsonl")
    assert rc == 0, err
    assert "not written (filter keeps instruction, input and output): system (2 of 3 records), id (1 of 3)" in err, err
    assert "system" not in (tmp_path / "good.jsonl").read_text()  # what it says: the rows are Alpaca's three fields
    data.write_text(json.dumps(rows[2]) + "\n")  # nothing to lose: nothing said
    rc, out, err = judge_path(capsys, server, data)
    rc, out, err = cli(capsys, "filter", data, "--min-score", "1", "--out", tmp_path / "good.jsonl")
    assert rc == 0 and "not written" not in err, err


def test_filter_of_a_file_with_no_answer_says_so_not_run_the_judge(server, tmp_path, capsys):
    """filter of a file whose answers are all blank said "no judgements yet; run audit --judge first",
    while the judge says there is nothing to judge: the line says what is true and what to do."""
    data = tmp_path / "blank.json"
    data.write_text(json.dumps([{"instruction": "Name a prime number.", "input": "", "output": " "},
                                {"instruction": "Name a colour.", "input": "", "output": "\n"}]))
    rc, _, err = cli(capsys, "filter", data, "--min-score", "3", "--out", tmp_path / "good.json")
    assert rc == 2 and err.count("\n") == 1, err
    assert "--judge" not in err and "every row's answer is empty (2 rows, empty_output)" in err, err
    assert "selfinstruct respond" in err and not (tmp_path / "good.json").exists()


def test_a_folder_given_as_rejected_or_out_is_called_a_folder_not_the_input(server, tmp_path, capsys, monkeypatch):
    """`filter d.json --rejected .` said "--rejected would overwrite the input d.json": the folder holds
    the input, but what is wrong is that a folder was given where a file is written."""
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(PLAIN_ROWS))
    assert judge_path(capsys, server, plain)[0] == 0
    monkeypatch.chdir(tmp_path)
    for flag, given in (("--rejected", "."), ("--rejected", str(tmp_path)), ("--out", ".")):
        argv = ["--out", "good.json", "--rejected", "left.jsonl"]
        argv[argv.index(flag) + 1] = given
        rc, _, err = cli(capsys, "filter", "plain.json", "--min-score", "1", *argv)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"{given}: is a folder; give a file name for {flag}" in err and "the input" not in err, err
    assert not (tmp_path / "good.json").exists() and not (tmp_path / "left.jsonl").exists()


def test_rejected_writes_what_its_suffix_says_and_refuses_what_it_cannot_write(server, tmp_path, capsys):
    """`--rejected x.json` got JSON Lines under a .json name: it now gets a JSON list, as `--out x.json`
    does; .jsonl (or a name without a data suffix) gets JSON Lines, and .parquet is one line."""
    plain = tmp_path / "plain.json"  # scored 4 and 5: --min-score 5 leaves one out
    plain.write_text(json.dumps([*PLAIN_ROWS, {"instruction": "Write a poem about rain.", "input": "", "output": "Drops."}]))
    assert judge_path(capsys, server, plain)[0] == 0
    for name in ("left.json", "left.jsonl", "left"):
        rc, _, err = cli(capsys, "filter", plain, "--min-score", "5", "--out", tmp_path / "good.jsonl",
                         "--rejected", tmp_path / name)
        assert rc == 0, err
        text = (tmp_path / name).read_text()
        rows = json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]
        assert text.startswith("[" if name.endswith(".json") else "{"), text
        assert [(r["instruction"], r["reason"]) for r in rows] == [(PLAIN_ROWS[0]["instruction"],
                                                                    "below_min_score: scored 4, under 5")], rows
    rc, _, err = cli(capsys, "filter", plain, "--min-score", "5", "--out", tmp_path / "good.jsonl",
                     "--rejected", tmp_path / "left.parquet")
    assert rc == 2 and err.count("\n") == 1 and "a .parquet name for --rejected, which writes JSON Lines" in err, err
    assert not (tmp_path / "left.parquet").exists()


def test_an_answer_of_only_a_zero_width_space_is_not_judged_and_filter_leaves_it_out(server, tmp_path, capsys):
    rows = [{"instruction": "Name a prime number.", "input": "", "output": "Seven."},
            {"instruction": "Name the colour of a clear sky.", "input": "", "output": "\u200b\u2060"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = judge_path(capsys, server, data)
    assert rc == 0 and len(server.requests) == 1 and "1 record with an empty answer not asked" in out, out + err
    rc, out, err = cli(capsys, "filter", data, "--min-score", "1", "--out", tmp_path / "good.jsonl",
                       "--rejected", tmp_path / "left.jsonl")
    assert rc == 0 and "1 row with an empty answer (empty_output)" in out, out + err
    left = [json.loads(line) for line in (tmp_path / "left.jsonl").read_text().splitlines()]
    assert [(r["instruction"], r["reason"]) for r in left] == [(rows[1]["instruction"], "empty_output: the output is empty")]


def test_a_judgements_file_with_scores_no_judge_gives_keeps_none_of_them(tmp_path, capsys):
    """A hand-edited (or another tool's) judgements file with NaN, Infinity, 7 or 1e308 as scores:
    filter kept Infinity, 7 and 1e308 as high scores, put NaN 'below', and audit said 'mean nan'.
    Such a score is no score: left out as unjudged, and a rerun of the judge asks again."""
    from selfinstruct.audit import _row_id

    rows = [{"instruction": f"Name thing number {i} please.", "input": "", "output": f"Thing {i}."} for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = ["NaN", "Infinity", "-Infinity", "7", "1e308", "0", "4", "2"]
    (tmp_path / "d.judgements.jsonl").write_text("".join(
        f'{{"id": "{_row_id(r)}", "score": {s}, "reason": "ok", "model": "j"}}\n' for r, s in zip(rows, scores)))
    rc, out, err = cli(capsys, "filter", data, "--min-score", "3", "--out", tmp_path / "good.json")
    assert rc == 0, err
    assert [r["instruction"] for r in json.loads((tmp_path / "good.json").read_text())] == [rows[6]["instruction"]]
    assert "kept 1 of 8 records (1 row) with judge score >= 3; 1 below, 6 without a score" in out, out
    rc, out, err = cli(capsys, "audit", data)
    assert rc == 0 and "nan" not in out and "Judge: 2 of 8 judged, mean 3.00" in out, out


@pytest.mark.parametrize("flag", ["--out", "--rejected", "--html"])
def test_an_output_that_is_a_fifo_or_device_is_refused_not_replaced(server, tmp_path, capsys, flag):
    """`filter ... --out /dev/null` replaced the device itself with a file of JSON (the write ends with a
    rename over its target), for every program on the machine. Anything there that is not a regular
    file (a FIFO here: the test must not touch /dev/null) is refused in one line, and left as it was;
    a link to one too."""
    import stat

    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(PLAIN_ROWS))
    assert judge_path(capsys, server, plain)[0] == 0
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(fifo)
    for target in (fifo, tmp_path / "link"):
        if flag == "--html":
            argv = ["audit", plain, "--html", target]
        else:
            argv = ["filter", plain, "--min-score", "1", "--out", tmp_path / "good.json"]
            argv += ["--rejected", target] if flag == "--rejected" else []
            argv[argv.index("--out") + 1] = target if flag == "--out" else argv[argv.index("--out") + 1]
        rc, _, err = cli(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1 and "is not a regular file" in err and flag in err, err
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not (tmp_path / "good.json").exists()


def test_a_fifo_named_judgements_jsonl_holds_neither_audit_nor_filter(tmp_path):
    """audit and filter opened data.judgements.jsonl with a plain open: a FIFO of that name held them
    forever (judge_stats.json's was mended so). audit reads no judgements from it, filter and the
    judge refuse it in one line."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(PLAIN_ROWS))
    os.mkfifo(tmp_path / "data.judgements.jsonl")
    runs = {name: cli_in_a_process(*argv) for name, argv in (
        ("audit", ["audit", data]),
        ("filter", ["filter", data, "--min-score", "1", "--out", tmp_path / "f.json"]),
        ("judge", ["audit", data, "--judge", "--base-url", "http://127.0.0.1:9/v1", "--model", "j"]))}
    assert runs["audit"].returncode == 0 and "Audit of" in runs["audit"].stdout, runs["audit"].stderr
    for name in ("filter", "judge"):
        err = runs[name].stderr
        assert runs[name].returncode == 2 and err.count("\n") == 1 and "data.judgements.jsonl: is not a file" in err, err


def test_a_garbled_judge_stats_json_is_one_line_and_kept_as_it_is(server, tmp_path, capsys):
    """judge_stats.json that was not valid JSON (a hand edit) was read as no stats at all: a plain
    audit said nothing of it, and the next judging session wrote its own counts over it, the earlier
    sessions' requests and tokens lost. Now one line naming file, line and column, as any JSON file's."""
    plain = tmp_path / "data.json"
    plain.write_text(json.dumps(PLAIN_ROWS))
    assert judge_path(capsys, server, plain)[0] == 0
    stats = tmp_path / "data.judge_stats.json"
    garbled = stats.read_text().replace('"requests"', "requests", 1)
    stats.write_text(garbled)
    line = garbled[:garbled.index("requests")].count("\n") + 1
    # A row not judged yet: the rerun asks, and wrote '"sessions": 1' over the garbled file.
    plain.write_text(json.dumps(PLAIN_ROWS + [{"instruction": "Name a color.", "input": "", "output": "Blue."}]))
    for argv in (["audit", plain], ["audit", plain, "--judge", "--base-url", server.url, "--model", "j"]):
        rc, _, err = cli(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"{stats}:{line}: not valid JSON (Expecting property name enclosed in double quotes" in err, err
        assert stats.read_text() == garbled
    stats.write_text("[1, 2]")
    rc, _, err = cli(capsys, "audit", plain)
    assert rc == 2 and err.endswith(f"{stats}: expected a JSON object, got a list\n"), err
