"""The LLM judge and filter as a user who reruns, kills and misuses them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_audit import KEPT, JudgeServer, cli, run, wide_terminal  # noqa: F401 (fixtures)

from selfinstruct import audit


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_rerun_asks_again_the_records_whose_reply_had_no_score(run, tmp_path, capsys):
    """A reply without a score was written as unparsed and never asked again: a rerun with a better
    judge (or a larger --max-tokens) said 'all 6 records already judged' and filter dropped them. A
    rerun asks those again, the newer judgement stands, the file keeps one line per record, and
    judge_stats.json recounts judged and unparsed while adding the requests and tokens."""
    s = JudgeServer(garbled=("poem",))  # the two poems and the script tag: 3 of 6 without a score
    judge = ["--judge", "--base-url", s.url, "--model", "j"]
    try:
        rc, out, err = cli(capsys, "audit", run, *judge)
        assert rc == 0 and "3 replies without a score" in out, err
        s.garbled = ()  # a better judge: the poems get a score now, the script tag still none
        rc, out, err = cli(capsys, "audit", run, *judge)
        assert rc == 0, err
        assert len(s.requests) == 9  # 6, then the 3 without a score again
        assert "judge: 2 judged (3 asked again after a reply without a score), 3 already judged, " \
               "1 reply without a score (kept raw)" in out
        assert "Judge: 5 of 6 judged" in out and "1 unparsed" in out
        rc, out, err = cli(capsys, "audit", run, *judge)  # only the one still without a score
        assert rc == 0 and len(s.requests) == 10, err
    finally:
        s.close()
    rows = lines_of(run / "judgements.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in KEPT)  # one line each, none twice
    assert {r["id"]: r["score"] for r in rows} == {"r1-0": 5, "r1-1": 4, "r1-2": 5, "r1-3": 4, "r3-4": None, "r3-5": 2}
    st = json.loads((run / "judge_stats.json").read_text())
    assert (st["sessions"], st["requests"], st["judged"], st["unparsed"]) == (3, 10, 5, 1)
    assert (st["prompt_tokens"], st["completion_tokens"]) == (100, 50)
    assert (st["last_session"]["judged"], st["last_session"]["unparsed"]) == (0, 1)
    rc, out, err = cli(capsys, "filter", run, "--min-score", "4", "--out", tmp_path / "good.json")
    assert rc == 0 and "kept 4 of 6 records" in out and "1 without a score" in out, err


def judge_in_background(run: Path, url: str, session: Path, requests: int) -> subprocess.Popen:
    """`audit --judge` in its own process, returned once judge_session.json has counted ``requests``."""
    p = subprocess.Popen([sys.executable, "-m", "selfinstruct.cli", "audit", str(run), "--judge", "--base-url", url,
                          "--model", "j", "--concurrency", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        try:
            if json.loads(session.read_text())["session"]["requests"] == requests:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read()
    return p


def test_a_judge_killed_while_asking_again_loses_nothing_and_the_next_one_finishes(run, capsys):
    """kill -9 in the middle of a rerun that asks records again: each record reads back as one
    judgement (the newer where one came), the next rerun asks only what still has no score, and the
    file ends with one line per record and counts that add up over the three sessions."""
    gate = threading.Event()
    s = JudgeServer(garbled=("",))  # every reply without a score
    session, path = run / "judge_session.json", run / "judgements.jsonl"
    try:
        rc, out, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j")
        assert rc == 0 and "6 replies without a score" in out, err
        s.garbled = ()
        s.on_request = lambda n: n >= 9 and gate.wait(60)  # 3 asked again and answered, the 4th held
        first = judge_in_background(run, s.url, session, 4)
        first.kill()
        first.wait(60)
        gate.set()
        assert len(path.read_text().splitlines()) == 9  # the 6 without a score, and 3 newer
        back = audit.read_judgements(path)
        assert {k: v["score"] for k, v in back.items()} == \
            {"r1-0": 5, "r1-1": 4, "r1-2": 5, "r1-3": None, "r3-4": None, "r3-5": None}
        rc, out, err = cli(capsys, "audit", run)  # a plain audit reads the newer ones
        assert rc == 0 and "Judge: 3 of 6 judged" in out and "3 unparsed" in out, err
        rc, out, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j")
        assert rc == 0 and "judge: 2 judged (3 asked again after a reply without a score), 3 already judged" in out, err
    finally:
        gate.set()
        s.close()
    assert len(s.requests) == 13  # 6, 4 (one lost to the kill), 3
    rows = lines_of(path)
    assert sorted(r["id"] for r in rows) == [r.id for r in KEPT]  # one line each
    assert {r["id"]: r["score"] for r in rows} == {"r1-0": 5, "r1-1": 4, "r1-2": 5, "r1-3": 4, "r3-4": None, "r3-5": 2}
    st = json.loads((run / "judge_stats.json").read_text())
    assert (st["sessions"], st["requests"], st["judged"], st["unparsed"]) == (3, 13, 5, 1)
    assert (st["prompt_tokens"], st["completion_tokens"]) == (120, 60)  # 12 replies came back
    assert "ended" not in st["last_session"] and not session.exists()


@pytest.mark.parametrize("text, want", [
    # JSON is read as JSON: extra keys, other key case, a nesting, text after it; a boolean is no score.
    ('{"score": 4, "reason": "fine", "confidence": 0.9}', (4, "fine")),
    ('{"reason": "Most would give score 3; this is better.", "score": 4, "issues": []}', (4, "Most would give score 3; this is better.")),
    ('{"Score": 4, "Reason": "ok"}', (4, "ok")),
    ('{"judgement": {"score": 2, "reason": "thin"}}', (2, "thin")),
    ('{"score": 4, "reason": "x"} and a {stray brace}', (4, "x")),
    ('{"score": 5, "reason": "a"}{"score": 5, "reason": "a"}', (5, "a")),
    ('{"score": 4}', (4, "")),
    ('{"score": true, "reason": "x"}', (None, "")),
    ('{"score": "4", "reason": "x"}', (4, "x")),
    ('{"score": 4, "reason": 7}', (4, "")),
    ('{"score": 0, "reason": "x"}', (None, "")),
    ('{"score": 4, "reason": "a"} {"score": 2, "reason": "b"}', (None, "")),
    # One object with the key twice in two cases: two scores, as two objects are (the last one's 2 was taken).
    ('{"Score": 4, "score": 2, "reason": "x"}', (None, "")), ('{"Score": 4, "score": 4, "Reason": "x"}', (4, "x")),
    # JSON is the answer where there is some; a reasoning model's thoughts are not read.
    ('I first thought score: 2.\n{"score": 5, "reason": "b"}', (5, "b")),
    ('{"score": 4, "reason": "clear"}\nScore: 2', (4, "clear")),
    ('<think>\nMaybe score 3. No, better.\n</think>\n{"score": 4, "reason": "Correct."}', (4, "Correct.")),
    ("<think>Score: 2? Score: 5?</think>\nScore: 4\nReason: fine", (4, "fine")),
    ("<think>Score: 2, I would say, and the response", (None, "")),  # cut while thinking
    # A reply that is a score and nothing else.
    ("4", (4, "")), ("4/5", (4, "")), ("**4**", (4, "")), (" 5.\n", (5, "")), ("4 out of 5", (4, "")),
    ("0", (None, "")), ("6", (None, "")), ("4/10", (None, "")), ("4.5", (None, "")),
    # The reason is the text, not its markup.
    ("```\nScore: 4\n```", (4, "")),
    ("Score: 4. Clear and correct.", (4, "Clear and correct.")),
    # A number that goes on is not its first digit: a decimal comma (3,5 is 3.5), a range, an exponent.
    ("Score: 3,5\nReason: decent.", (None, "")), ("Score: 3-4", (None, "")), ("Score: 3 – 4", (None, "")),
    ("Score: 1e3", (None, "")), ("Score: 4, 5 would need sources.", (4, "5 would need sources.")),
    ("Score: 4 - solid", (4, "solid")),
])
def test_parse_judgement_reads_what_judges_write(text, want):
    from selfinstruct import judge

    assert judge.parse_judgement(text) == want


@pytest.mark.parametrize("text", ["{" * 100_000, '{"a":' * 100_000, "[" * 100_000 + '{"score": 4}', "Score: " * 100_000])
def test_parse_judgement_of_a_huge_or_deeply_nested_reply_is_quick_and_finds_no_score(text):
    """'{' * 40,000 took 1.4 s (a greedy regex tried from every brace: quadratic), 100,000 about 9 s,
    in the loop that every other request waits on; a nesting deeper than json's recursion limit must
    not raise. Checked by count of work, not time: each brace is tried once."""
    from selfinstruct import judge

    calls = []
    real = judge.json.JSONDecoder.raw_decode

    def counted(self, s, idx=0):
        calls.append(idx)
        return real(self, s, idx)

    judge.json.JSONDecoder.raw_decode = counted
    try:
        assert judge.parse_judgement(text)[0] in (None, 4)
    finally:
        judge.json.JSONDecoder.raw_decode = real
    assert len(calls) <= 100


def judged_file(tmp_path: Path, capsys) -> Path:
    """data.json of three rows, judged 5, 4 and 2 by a JudgeServer."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Write a poem about rain.", "input": "", "output": "Drip."},
                                {"instruction": "Name a prime number.", "input": "", "output": "Seven."},
                                {"instruction": "Summarize the plain paragraph.", "input": "Text.", "output": "Short."}]))
    s = JudgeServer()
    try:
        rc, out, err = cli(capsys, "audit", data, "--judge", "--base-url", s.url, "--model", "j")
    finally:
        s.close()
    assert rc == 0 and "3 judged" in out, err
    return data


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".pq", ".PQ"])  # .pq: JSON, which no reader took
def test_filter_writes_the_format_its_out_name_says(tmp_path, capsys, suffix):
    """filter wrote a JSON list whatever --out was named: good.parquet held JSON, which no reader
    (ours, datasets, pandas) opens as parquet, and good.jsonl a list, not lines. Readers pick the format
    by the suffix; so does filter now, as export writes its jsonl and parquet."""
    from selfinstruct.export import load_pairs

    data = judged_file(tmp_path, capsys)
    good = tmp_path / f"good{suffix}"
    rc, out, err = cli(capsys, "filter", data, "--min-score", "4", "--out", good)
    assert rc == 0 and "kept 2 of 3 records" in out, err
    want = json.loads(data.read_text())[:2]
    if suffix == ".jsonl":
        assert [json.loads(line) for line in good.read_text().splitlines()] == want
    else:
        import pyarrow.parquet as pq

        assert pq.read_table(good).to_pylist()[0]["instruction"] == want[0]["instruction"]
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in load_pairs(good)] == want


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_filter_with_nothing_at_the_bar_writes_nothing_whatever_the_suffix(tmp_path, capsys, suffix):
    """Nothing scored --min-score or more: .json got [] and .jsonl an empty file (rc 0), which
    export, tune and datasets all refuse ('file is empty'), while .parquet was refused. One rule
    now, export's: an empty dataset is one line, and a file already at --out stays as it was."""
    data = judged_file(tmp_path, capsys)  # scored 5, 4 and 2
    judgements = tmp_path / "data.judgements.jsonl"
    judgements.write_text("".join(json.dumps({**j, "score": 2}) + "\n" for j in lines_of(judgements)[:2]))
    good = tmp_path / f"good{suffix}"
    rc, out, err = cli(capsys, "filter", data, "--min-score", "3", "--out", good)
    assert rc == 2 and out == "", out
    assert err == (f"selfinstruct filter: error: {good}: no record is scored 3 or more (2 below, 1 without a score); "
                   "an empty dataset is not written: give a lower --min-score\n")
    assert not good.exists()
    good.write_bytes(b"earlier")
    assert cli(capsys, "filter", data, "--min-score", "3", "--out", good)[0] == 2
    assert good.read_bytes() == b"earlier"


def test_filter_to_a_folder_is_one_line_naming_it(tmp_path, capsys):
    data = judged_file(tmp_path, capsys)
    (tmp_path / "out").mkdir()
    rc, _, err = cli(capsys, "filter", data, "--min-score", "4", "--out", tmp_path / "out")
    assert rc == 2 and err.count("\n") == 1 and "out: is a folder; give a file name for --out" in err, err


def test_the_judge_holds_as_many_tasks_as_requests_in_flight_not_one_per_record(tmp_path, capsys, monkeypatch):
    """A task per record was made up front: judging 1,000,000 records held 1,000,000 asyncio tasks
    (1.5 GB and 18 s of scheduling before any reply, measured alone). Workers as many as
    --concurrency take records in turn; here the judge's own tasks are counted: 2, not 40."""
    import asyncio

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Name {n} birds.", "input": "", "output": "Gull."} for n in range(40)]))
    made = []
    real = asyncio.BaseEventLoop.create_task

    def counted(self, coro, **kw):
        made.append(getattr(coro, "__qualname__", ""))
        return real(self, coro, **kw)

    monkeypatch.setattr(asyncio.BaseEventLoop, "create_task", counted)
    s = JudgeServer()
    try:
        rc, out, err = cli(capsys, "audit", data, "--judge", "--base-url", s.url, "--model", "j", "--concurrency", "2")
    finally:
        s.close()
    assert rc == 0 and "40 judged" in out, err
    assert len([m for m in made if m.startswith("_judge_all.<locals>")]) == 2, made  # aiohttp's own aside


@pytest.mark.parametrize("value, said", [
    ("nan", "--min-score: Input should be a finite number"), ("inf", "--min-score: Input should be a finite number"),
    ("0", "--min-score: Input should be greater than or equal to 1"), ("-1", "greater than or equal to 1"),
    ("5.5", "--min-score: Input should be less than or equal to 5"),
])
def test_a_min_score_off_the_scale_is_one_line_saying_why(run, tmp_path, capsys, value, said):
    """--min-score nan was 'should be less than or equal to 5' (nan fails every comparison)."""
    rc, _, err = cli(capsys, "filter", run, "--min-score", value, "--out", tmp_path / "o.json")
    assert rc == 2 and err.count("\n") == 1 and said in err, err


def test_replies_cut_at_max_tokens_are_said_so_and_asked_again(run, capsys):
    """A reply cut at --max-tokens before its score was one more 'reply without a score': nothing said
    that a larger --max-tokens would mend it. Such a line is marked finish_reason "length", and the
    terminal line says how many were cut and at what."""
    s = JudgeServer(cut=("poem",))
    try:
        rc, out, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j", "--max-tokens", "32")
        assert rc == 0, err
        assert "3 replies without a score (kept raw; 2 cut at --max-tokens 32: give more and rerun)" in out
        rows = {r["id"]: r for r in lines_of(run / "judgements.jsonl")}
        assert rows["r1-0"]["finish_reason"] == "length" and rows["r1-0"]["raw"] == '{"reason": "The response is'
        assert "finish_reason" not in rows["r3-4"]  # the script tag: no score, but not cut
        s.cut = ()
        rc, out, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j", "--max-tokens", "64")
        assert rc == 0 and "judge: 2 judged (3 asked again" in out and "cut at" not in out, err
    finally:
        s.close()
    rows = {r["id"]: r for r in lines_of(run / "judgements.jsonl")}
    assert rows["r1-0"]["score"] == 5 and "finish_reason" not in rows["r1-0"]


def test_a_run_that_kept_nothing_is_said_so_by_the_judge_and_by_filter(tmp_path, capsys):
    """A run with rejections only: the judge said 'all 0 records already judged', and filter 'no
    judgements yet; run audit --judge first', which judges nothing: a loop for the user."""
    from test_audit import REJECTED, write_run

    empty = write_run(tmp_path / "run", kept_records=[], rejected_records=REJECTED)
    s = JudgeServer()
    try:
        rc, out, err = cli(capsys, "audit", empty, "--judge", "--base-url", s.url, "--model", "j")
    finally:
        s.close()
    assert rc == 0 and "judge: the run kept no records; nothing to judge" in out, err
    assert s.requests == [] and "already judged" not in out
    rc, _, err = cli(capsys, "filter", empty, "--min-score", "3", "--out", tmp_path / "o.json")
    assert rc == 2 and err.count("\n") == 1 and f"{empty}: the run kept no records; nothing to filter" in err, err


def test_a_reply_kept_raw_that_now_parses_is_read_not_asked_again(run, capsys):
    """Replies kept raw by an earlier version that read no score in them ('**4**', a reasoning
    judge's thoughts before its JSON) are read again first: no request is paid for what is in the file."""
    raw = {"r1-0": "**4**", "r1-1": '<think>A 2? No.</think>{"score": 5, "reason": "Right."}'}
    (run / "judgements.jsonl").write_text("".join(
        json.dumps({"id": r.id, "score": None, "reason": "", "model": "old", "raw": raw.get(r.id, "I cannot rate this.")})
        + "\n" for r in KEPT))
    (run / "judge_stats.json").write_text(json.dumps({"sessions": 1, "requests": 6, "judged": 0, "unparsed": 6}))
    s = JudgeServer()
    try:
        rc, out, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j")
    finally:
        s.close()
    assert rc == 0, err
    assert "judge: 2 replies kept raw hold a score this version reads: not asked again" in out
    assert len(s.requests) == 4  # the other four
    rows = {r["id"]: r for r in lines_of(run / "judgements.jsonl")}
    assert len(rows) == 6 and (rows["r1-0"]["score"], rows["r1-1"]["score"], rows["r1-1"]["reason"]) == (4, 5, "Right.")
    assert "raw" not in rows["r1-0"] and rows["r1-0"]["model"] == "old"
    st = json.loads((run / "judge_stats.json").read_text())
    assert (st["sessions"], st["requests"], st["judged"], st["unparsed"]) == (2, 10, 5, 1)


def test_a_record_the_server_refuses_as_sent_is_not_promised_to_a_rerun(run, capsys):
    """A 400 to one record (a prompt too long for the judge's context) was '1 failed (rerun to retry',
    and every rerun sent it again to the same refusal. The line says such records fail again as sent."""
    s = JudgeServer(faults={"Translate": [400] * 5, "Classify": [500] * 9})
    try:
        rc, out, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j", "--max-retries", "1")
    finally:
        s.close()
    assert rc == 0, err
    said = " ".join(out.split())  # rich wraps a long line at the terminal's width
    assert "2 failed (rerun to retry; 1 refused as sent (too long for the judge?), which a rerun sends as it is; " \
           "first: " in said


def test_filter_writes_the_rows_as_it_reads_them(tmp_path, capsys):
    """filter gathered every record it kept, then wrote them as one string: at 1,000,000 records,
    gigabytes. Each row is now written as it is read, to a file staged beside --out. Twelve 1 MB
    outputs: the run peaks at 4 MB, about one record (the list and its text peaked at 36 MB)."""
    import tracemalloc

    from test_audit import kept, write_run

    asks = ["Write a poem about the sea.", "Translate good morning to French.", "List three prime numbers."]
    recs = [kept(i, asks[i % 3], f"OUTPUT-{i} " + "x" * 1_000_000) for i in range(12)]
    run = write_run(tmp_path / "run", kept_records=recs)
    (run / "judgements.jsonl").write_text("".join(json.dumps({"id": r.id, "score": 5 - i % 2, "reason": "ok"}) + "\n"
                                                  for i, r in enumerate(recs)))
    warm = write_run(tmp_path / "warm", kept_records=recs[:1])  # imports done before the count starts
    (warm / "judgements.jsonl").write_text(json.dumps({"id": recs[0].id, "score": 5, "reason": "ok"}) + "\n")
    assert cli(capsys, "filter", warm, "--min-score", "4", "--out", tmp_path / "warm.json")[0] == 0
    good = tmp_path / "good.json"
    tracemalloc.start()
    try:
        rc, out, err = cli(capsys, "filter", run, "--min-score", "4", "--out", good)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rc == 0 and "kept 12 of 12 records (12 rows)" in out, err
    assert peak < 10_000_000, peak  # a record, its line and its JSON text, not twelve records and their text
    rows = [{"instruction": r.instruction, "input": "", "output": r.instances[0].output} for r in recs]
    assert good.read_text(encoding="utf-8") == json.dumps(rows, ensure_ascii=False, indent=2)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # the staged file was moved into place


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_filter_writes_the_bytes_it_wrote_when_it_gathered_the_rows(tmp_path, capsys, suffix):
    """Streamed, filter writes what it wrote when it gathered the rows first (the reference below is
    that code's own write: json.dumps of the list; a JSON line a row; export's parquet of the list),
    for a run whose tasks have several instances and whose text holds what JSON escapes or leaves raw."""
    from test_audit import kept, write_run

    from selfinstruct.datafiles import json_line
    from selfinstruct.export import export_records
    from selfinstruct.records import Instance

    odd = ["é 日本語 😀", "line\nbreak \t tab", '"quoted" back\\slash', "\u2028 \u2029 \x85", "</script> \x00"]
    recs = [kept(i, f"Task {i}: {odd[i % 5]}", f"Answer {odd[(i + 2) % 5]}", input=odd[(i + 1) % 5]) for i in range(10)]
    recs[3].instances.append(Instance(input="", output=odd[4]))
    recs[4].instances.extend([Instance(input=odd[0], output=odd[1]), Instance(input=odd[2], output="")])
    run = write_run(tmp_path / "run", kept_records=recs)
    scores = [5, 2, None, 4, 4, 1, 3, 5, None, 4]
    (run / "judgements.jsonl").write_text("".join(json.dumps({"id": r.id, "score": s, "reason": "r"}) + "\n"
                                                  for r, s in zip(recs, scores)))
    # recs[4]'s empty output is left out (empty_output), as the row it would make has no answer.
    rows = [{"instruction": r.instruction, "input": inst.input, "output": inst.output}
            for r, s in zip(recs, scores) if s is not None and s >= 4 for inst in r.instances if inst.output]
    ref = tmp_path / f"ref{suffix}"
    if suffix == ".json":
        ref.write_bytes(json.dumps(rows, ensure_ascii=False, indent=2).encode("utf-8"))
    elif suffix == ".jsonl":
        ref.write_bytes("".join(map(json_line, rows)).encode("utf-8"))
    else:
        export_records(rows, "parquet", ref)
    good = tmp_path / f"good{suffix}"
    rc, out, err = cli(capsys, "filter", run, "--min-score", "4", "--out", good)
    assert rc == 0 and "kept 5 of 10 records (7 rows)" in out and "1 row with an empty answer" in out, err
    assert good.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_filter_failing_midway_leaves_the_file_at_out_whole(tmp_path, capsys, monkeypatch, suffix):
    """Rows are written as they are read: a failure after some are written (here the source
    changing under it) is one line, the staged file is removed, and a file already at --out is
    left as it was."""
    from test_audit import write_run

    from selfinstruct.audit import Source

    run = write_run(tmp_path / "run")
    (run / "judgements.jsonl").write_text("".join(json.dumps({"id": r.id, "score": 5, "reason": "ok"}) + "\n"
                                                  for r in KEPT))
    good = tmp_path / f"good{suffix}"
    good.write_bytes(b"earlier")
    real = Source.read_items

    def cut(self, quiet=False):
        for n, pair in enumerate(real(self, quiet)):
            if n == 4 and quiet:  # the filter's reading, not load_source's
                raise audit.UserError(f"{run / 'kept.jsonl'}: record 5 is no longer the one the audit read")
            yield pair

    monkeypatch.setattr(Source, "read_items", cut)
    rc, out, err = cli(capsys, "filter", run, "--min-score", "4", "--out", good)
    assert rc == 2 and out == "" and err.count("\n") == 1 and "record 5 is no longer" in err, err
    assert good.read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good" + suffix, "run"]  # no staged file left
