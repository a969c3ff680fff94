"""Decontamination: planted copies, light edits and near misses, found exactly; the CLI's files."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from rouge_score import rouge_scorer

from selfinstruct.decontaminate import NgramIndex, decontaminate, load_data, record_texts
from selfinstruct.rouge import tokenize

from conftest import write_run

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

# A GSM8K-like set (question/answer) and an Alpaca-like one.
GSM = [
    {"question": "Natalia sold clips to forty eight of her friends in April and then she sold half as many "
                 "clips in May, how many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48 divided by 2 which is 24 clips in May so she sold 72 clips altogether in both months"},
    {"question": "Weng earns twelve dollars an hour for babysitting and yesterday she did fifty minutes of "
                 "babysitting, how much did she earn for the time she spent?",
     "answer": "Weng earns 12 divided by 60 which is 0.2 dollars per minute so she earned 10 dollars"},
]
ALPACA = [
    {"instruction": "Name the capital city of Australia.", "input": "", "output": "Canberra."},
    {"instruction": "Rewrite the sentence in the passive voice.", "input": "The cat chased the mouse.",
     "output": "The mouse was chased by the cat."},
]

Q0 = GSM[0]["question"]
PLANTED = [
    # (instruction, input, contaminated?, why)
    (Q0, "", True, "exact copy"),
    ("NATALIA sold clips to forty-eight of her friends in April; and then she sold half as many clips in June. "
     "How many did she sell?", "", True, "light edit: case, punctuation, one word changed late"),
    ("Check this worked solution for errors.", GSM[0]["answer"], True, "the answer copied into the input"),
    ("Name the capital city of Australia, please.", "", True, "ROUGE-L 0.92 with a short benchmark instruction"),
    # 12 shared words in a row (one short of 13), and ROUGE-L well under 0.7: must stay.
    ("Write a short story in which Natalia sold clips to forty eight of her friends in April and later at the school "
     "fair, with a twist ending about a lost dog and a rainy afternoon in the park", "", False, "12-gram near miss"),
    # The end of the question and the start of its answer: a 13-gram across two fields is no n-gram.
    ("Summarize: altogether in April and May Natalia sold 48 divided by 2 which is 24 clips", "", False,
     "an n-gram spanning two fields"),
    ("Name the largest city of Australia by area today.", "", False, "ROUGE-L near miss (0.63)"),
    ("Explain how photosynthesis works in simple terms.", "", False, "clean"),
]


@pytest.fixture()
def bench_files(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps(r) + "\n" for r in GSM))
    alp = tmp_path / "alpaca_eval.json"
    alp.write_text(json.dumps(ALPACA))
    return [str(gsm), str(alp)]


def test_planted_contamination_found_exactly(tmp_path, bench_files):
    rows = [{"instruction": i, "input": x, "output": "An answer."} for i, x, _, _ in PLANTED]
    records = [(r, record_texts(r, f"row {k}")) for k, r in enumerate(rows)]
    checked, timing = decontaminate(records, bench_files)
    assert timing["benchmark_items"] == 4
    matches = [m for _, m in checked]
    for (ins, inp, dirty, why), m in zip(PLANTED, matches):
        assert bool(m) == dirty, f"{why}: {m}"
    # The exact copy is found by both rules and names the file, item and the n-gram.
    rules = {x["rule"]: x for x in matches[0]}
    assert rules["ngram"]["benchmark"] == bench_files[0] and rules["ngram"]["item"] == 0
    assert rules["ngram"]["ngram"] == " ".join(tokenize(Q0)[:13])
    assert rules["rougeL"]["score"] == 1.0
    # The light edit still shares 13 words; the answer in the input is found by n-gram only.
    assert [x["rule"] for x in matches[1]][0] == "ngram"
    assert [x["rule"] for x in matches[2]] == ["ngram"] and matches[2][0]["item"] == 0
    # The short instruction is found by ROUGE-L, with rouge_score's own score.
    (r,) = matches[3]
    assert r["rule"] == "rougeL" and r["benchmark"] == bench_files[1] and r["item"] == 0
    ref = SCORER.score(ALPACA[0]["instruction"], PLANTED[3][0])["rougeL"].fmeasure
    assert r["score"] == pytest.approx(ref, abs=1e-6) and ref > 0.7
    # The near misses really are near: 12 shared words, ROUGE-L under 0.7.
    assert " ".join(tokenize(Q0)[:12]) in " ".join(tokenize(PLANTED[4][0]))
    near = SCORER.score(ALPACA[0]["instruction"], PLANTED[6][0])["rougeL"].fmeasure
    assert 0.6 < near <= 0.7


@pytest.mark.parametrize("collide", [False, True])
def test_ngram_index_against_a_plain_set(collide, monkeypatch):
    """Random texts over 6 words with n=3: many hits and misses, each as a set of tuples says.

    ``collide``: every n-gram hashes to 0, so every lookup is a collision the word-by-word check must settle.
    """
    import numpy as np

    from selfinstruct import decontaminate as d

    if collide:
        monkeypatch.setattr(d, "_R", np.zeros(64, dtype=np.uint64))
    rng = random.Random(7)
    words = "red blue green cat dog sun".split()
    bench = [" ".join(rng.choices(words, k=rng.randint(0, 8))) for _ in range(40)]
    texts = [" ".join(rng.choices(words + ["zebra"], k=rng.randint(0, 10))) for _ in range(400)]
    idx = NgramIndex(3)
    for i, b in enumerate(bench):
        idx.add(b, i)
    idx.build()
    found = idx.find_many(texts)
    grams = {}
    for i, b in enumerate(bench):
        t = tokenize(b)
        for j in range(len(t) - 2):
            grams.setdefault(tuple(t[j : j + 3]), i)
    hits = 0
    for text, f in zip(texts, found):
        t = tokenize(text)
        first = next((tuple(t[j : j + 3]) for j in range(len(t) - 2) if tuple(t[j : j + 3]) in grams), None)
        if first is None:
            assert f is None
        else:
            hits += 1
            assert f[1] == " ".join(first)  # the first shared n-gram of the text
            assert first in {tuple(tokenize(bench[f[0]])[j : j + 3]) for j in range(len(tokenize(bench[f[0]])))}
    assert 50 < hits < 390


def test_record_shapes():
    assert record_texts({"messages": [{"role": "user", "content": "Hi there"},
                                      {"role": "assistant", "content": "Hello"}]}, "x") == ("Hi there", "Hi there")
    assert record_texts({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "x")[0] == "Q"
    # A record of the dataset is an Alpaca row or a conversation, as dedup reads it; a benchmark's item may be more.
    with pytest.raises(Exception, match="x: field 'instruction': missing"):
        record_texts({"label": 1}, "x")
    with pytest.raises(Exception, match="x: no instruction"):
        record_texts({"label": 1}, "x", benchmark=True)
    # A field that is there but not text is named as such, not reported missing.
    with pytest.raises(Exception, match="x: field 'instruction': must be a string, got list"):
        record_texts({"instruction": ["a", "b"], "output": "y"}, "x")
    with pytest.raises(Exception, match="x: field 'question': must be a string or a list of strings, got int"):
        record_texts({"question": 5, "answer": "5"}, "x", benchmark=True)
    # A benchmark line that is no object says what it is in JSON's words (it said 'got NoneType').
    for line, said in ((None, "null"), ([], "an empty list \\[\\]"), (3, "a number")):
        with pytest.raises(Exception, match=f"^x: expected a JSON object, got {said}$"):
            record_texts(line, "x", benchmark=True)


def test_cli_writes_kept_removed_summary(tmp_path, bench_files):
    run = write_run(tmp_path / "run", [{"instruction": i, "input": x, "output": "An answer."} for i, x, _, _ in PLANTED])
    out = tmp_path / "clean"
    cmd = [sys.executable, "-m", "selfinstruct.cli", "decontaminate", run, "--against", *bench_files, "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    kept = [json.loads(l) for l in (out / "kept.jsonl").read_text().splitlines()]
    removed = [json.loads(l) for l in (out / "removed.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in kept] == [i for i, _, d, _ in PLANTED if not d]
    assert [r["instruction"] for r in removed] == [i for i, _, d, _ in PLANTED if d]
    assert all(r["provenance"]["teacher_model"] == "teacher" for r in kept)  # a run's fields are kept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["removed"] == 4 and summary["kept"] == 4 and summary["removed_by_rule"]["rougeL"] >= 1
    # The output is a dataset the data layer reads back.
    assert len(load_data(str(out / "kept.jsonl"))) == 4
    # A benchmark that is no dataset, or an --out that is the run itself: one line, rc 2.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"label": 1}\n')
    for argv in ([run, "--against", str(bad), "--out", str(tmp_path / "o2")], [run, "--against", *bench_files, "--out", run]):
        p = subprocess.run([sys.executable, "-m", "selfinstruct.cli", "decontaminate", *argv],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_dataset_field_not_text_is_one_line_naming_it(tmp_path, capsys):
    """The dataset's instruction and input are what is checked: one that is not text is refused
    as dedup refuses it (file, line, field), not skipped; a benchmark's shapes are its own."""
    from selfinstruct.cli import main

    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is the capital of France?", "input": {"lang": "en"}}) + "\n")
    ok = {"instruction": "Name a colour.", "input": "", "output": "Red."}
    for bad, said in (({"instruction": "Add the numbers.", "input": {"a": 1}, "output": "2"}, "field 'input': must be a string, got dict"),
                      ({"instruction": ["Add."], "input": "What is the capital of France?", "output": "x"},
                       "field 'instruction': must be a string, got list")):
        data = tmp_path / "data.jsonl"
        data.write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
        out = tmp_path / "clean"
        assert main(["decontaminate", str(data), "--against", str(bench), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{data}:2: {said}" in err and not out.exists(), err
    data.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "input": None}) + "\n")  # null is no input
    assert main(["decontaminate", str(data), "--against", str(bench), "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["kept"] == 2


def test_benchmark_items_with_no_word_are_counted_not_silent(tmp_path):
    """Words are rouge_score's [a-z0-9] runs, so an item in another script can match nothing,
    not even its exact copy: the summary counts those items (and the table says so)."""
    items = ["Какой город является столицей Франции? Объясните подробно.", "日本の首都はどこですか?",
             "What is the capital of France and why did it become the capital?"]
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"question": q}) + "\n" for q in items), encoding="utf-8")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": q, "input": "", "output": "x"} for q in items]), encoding="utf-8")
    out = tmp_path / "clean"
    cmd = [sys.executable, "-m", "selfinstruct.cli", "decontaminate", str(data), "--against", str(bench), "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wordless_items"] == 2 and summary["removed"] == 1
    assert "2: no a-z or 0-9 word, so they match nothing" in p.stderr


def test_both_rules_off_is_refused_not_a_summary_that_claims_a_check(tmp_path, capsys):
    """--ngram 0 and --threshold 1 each turn one rule off; both off would check nothing, yet
    write a summary (which export's card reads as a decontamination): one line, nothing made."""
    from selfinstruct.cli import main

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "What is 2 + 2?", "input": "", "output": "4"}]))
    out = tmp_path / "clean"
    assert main(["decontaminate", str(data), "--against", str(data), "--ngram", "0", "--threshold", "1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ngram 0 and --threshold 1 turn both rules off" in err and not out.exists(), err
    # Given in a --config file, they are named as its keys (the line named flags the user had not typed).
    (tmp_path / "d.yaml").write_text("ngram: 0\nthreshold: 1.0\n")
    assert main(["decontaminate", str(data), "--against", str(data), "--config", str(tmp_path / "d.yaml"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'd.yaml'}: ngram: 0 and threshold: 1 turn both rules off" in err and not out.exists(), err
    assert main(["decontaminate", str(data), "--against", str(data), "--ngram", "0", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["removed"] == 1  # one rule on still checks
    err = capsys.readouterr().err
    assert "n-gram rule off, ROUGE-L > 0.7" in err and "0-gram" not in err, err  # the summary names the rule off


def test_a_saved_dataset_dict_benchmark_is_checked_split_by_split(tmp_path, capsys):
    """`load_dataset("gsm8k", "main").save_to_disk(DIR)` saves train and test together: the test
    split, the one a benchmark's scores come from, is checked as well as train, each split named
    as the folder that holds it (DIR/test, which load_from_disk reads); only train was read."""
    from datasets import Dataset, DatasetDict

    from selfinstruct.cli import main

    bench = tmp_path / "gsm8k"
    DatasetDict({"train": Dataset.from_list([GSM[1]]), "test": Dataset.from_list([GSM[0]])}).save_to_disk(str(bench))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": g["question"], "input": "", "output": "x"} for g in GSM]
                               + [{"instruction": "Explain how photosynthesis works.", "input": "", "output": "x"}]))
    out = tmp_path / "clean"
    assert main(["decontaminate", str(data), "--against", str(bench), "--out", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark_items"] == 2 and summary["removed"] == 2 and summary["kept"] == 1
    removed = [json.loads(l) for l in (out / "removed.jsonl").read_text().splitlines()]
    assert [(r["contamination"][0]["benchmark"], r["contamination"][0]["item"]) for r in removed] == \
        [(str(bench / "test"), 0), (str(bench / "train"), 0)]
    assert summary["removed_by_benchmark"] == {str(bench / "test"): 1, str(bench / "train"): 1}


def test_a_user_turn_of_openai_content_parts_is_checked_as_its_text():
    """export and dedup read a turn of text parts ([{"type": "text", "text": ...}]) as its text;
    decontaminate found no user turn in it and refused the record ('no instruction, user turn...')."""
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Add 2 and 3."},
                                                     {"type": "text", "text": "Show it."}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "5"}]}]}
    assert record_texts(rec, "x") == ("Add 2 and 3.\nShow it.", "Add 2 and 3.\nShow it.")


def test_an_empty_split_of_a_dataset_dict_benchmark_is_skipped_and_said(tmp_path, capsys):
    """A saved DatasetDict may hold an empty split (a validation split with no rows): the whole
    run was refused ('DIR/validation: no records') though the other splits hold the items."""
    from datasets import Dataset, DatasetDict

    from selfinstruct.cli import main

    bench = tmp_path / "gsm8k"
    DatasetDict({"test": Dataset.from_list(GSM), "validation": Dataset.from_list(GSM).select([])}).save_to_disk(str(bench))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": GSM[0]["question"], "input": "", "output": "x"},
                                {"instruction": "Explain how photosynthesis works.", "input": "", "output": "x"}]))
    capsys.readouterr()
    assert main(["decontaminate", str(data), "--against", str(bench), "--out", str(tmp_path / "clean")]) == 0
    assert f"{bench / 'validation'}: an empty split, skipped" in capsys.readouterr().err
    summary = json.loads((tmp_path / "clean" / "summary.json").read_text())
    assert (summary["benchmark_items"], summary["removed"], summary["kept"]) == (len(GSM), 1, 1)
    only_empty = tmp_path / "empty"
    DatasetDict({"test": Dataset.from_list(GSM).select([]), "train": Dataset.from_list(GSM).select([])}).save_to_disk(
        str(only_empty))
    assert main(["decontaminate", str(data), "--against", str(only_empty), "--out", str(tmp_path / "c2")]) == 2
    assert capsys.readouterr().err.endswith(f"error: {only_empty}: no records (every split is empty)\n")


def test_a_benchmark_whose_question_is_a_list_of_turns_is_checked_turn_by_turn(tmp_path, capsys):
    """MT-Bench's items are {"turns": [first request, follow-up]} (Arena-Hard's [{"content": ...}]):
    they were refused ('no instruction, user turn or question field'), and a question field holding
    a list of strings was 'must be a string'. The first turn is the instruction ROUGE-L compares;
    every turn is searched for shared n-grams. In the dataset being cleaned a list is still refused."""
    from selfinstruct.cli import main

    travel = ("Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
              "experiences and must-see attractions.")
    rewrite = "Rewrite your previous response so that every single sentence of it starts with the letter A please."
    bench = tmp_path / "mt_bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question_id": 81, "category": "writing", "turns": [travel, rewrite]},
        {"question_id": "a1", "turns": [{"content": "Explain the difference between a mutex and a semaphore in C."}]},
        {"question": ["Name the largest planet of the solar system.", "And the smallest?"]},
    ]))
    rows = [("Compose an engaging travel blog post about a recent trip to Hawaii highlighting must-see attractions.", "rougeL"),
            ("Take this text. " + rewrite, "ngram"),
            ("Explain the difference between a mutex and a semaphore in C.", "rougeL"),
            ("Name the largest planet of the solar system.", "rougeL"),
            ("Write a haiku about autumn leaves falling into a quiet river.", None)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": i, "input": "", "output": "x"}) + "\n" for i, _ in rows))
    out = tmp_path / "clean"
    assert main(["decontaminate", str(data), "--against", str(bench), "--out", str(out)]) == 0, capsys.readouterr().err
    removed = {r["instruction"]: {m["rule"] for m in r["contamination"]}
               for r in map(json.loads, (out / "removed.jsonl").read_text().splitlines())}
    assert sorted(removed) == sorted(i for i, rule in rows if rule)
    assert all(rule in removed[i] for i, rule in rows if rule), removed
    assert [json.loads(l)["instruction"] for l in (out / "kept.jsonl").read_text().splitlines()] == [rows[-1][0]]
    # A list that holds no text is one line naming the field and what it holds.
    bench.write_text(json.dumps({"question": [1, 2], "answer": 3}) + "\n")
    assert main(["decontaminate", str(data), "--against", str(bench), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.endswith(f"{bench}:1: field 'question': must be a string or a list of strings, "
                                            "got a list holding int\n")


def _rows_and_bench(tmp_path, n: int, output_chars: int = 20):
    """``n`` Alpaca rows (every third a copy of a GSM question, every fifth ALPACA's first
    instruction reworded), the benchmark files, and the data file."""
    rows = []
    for i in range(n):
        ins = (GSM[i % 2]["question"] if i % 3 == 0 else PLANTED[3][0] if i % 5 == 0
               else f"Write a note number {i} about the {random.Random(i).choice(['sea', 'hills', 'sky'])}.")
        rows.append({"instruction": ins, "input": "", "output": f"OUT-{i} " + "x" * output_chars})
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps(r) + "\n" for r in GSM))
    alp = tmp_path / "alpaca_eval.json"
    alp.write_text(json.dumps(ALPACA))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, [str(gsm), str(alp)], data


def _files(folder) -> dict:
    """A folder's files and their bytes, but the lock's (each run writes its pid and time there)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".selfinstruct-lock"}


def test_a_batch_of_rows_is_held_not_the_whole_input(tmp_path, monkeypatch, capsys):
    """decontaminate read every record (and its texts) before checking the first: 3.3 GB at a
    million rows. It reads, checks and writes a batch at a time now, holding one batch."""
    import tracemalloc

    from selfinstruct import decontaminate as d
    from selfinstruct.cli import main

    rows, bench, data = _rows_and_bench(tmp_path, 16, output_chars=500_000)  # 8 MB of outputs
    warm = tmp_path / "warm.jsonl"
    warm.write_text(json.dumps(rows[1]) + "\n")
    assert main(["decontaminate", str(warm), "--against", *bench, "--out", str(tmp_path / "warm")]) == 0  # imports done
    monkeypatch.setattr(d, "BATCH", 2, raising=False)
    tracemalloc.start()
    try:
        assert main(["decontaminate", str(data), "--against", *bench, "--out", str(tmp_path / "out")]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6_000_000, peak  # two rows (1 MB) and the copies one row's reading and writing make (4.2 MB)
    removed = [json.loads(line) for line in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()]
    kept = [json.loads(line) for line in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    assert [r["output"].split()[0] for r in removed] == [f"OUT-{i}" for i in range(16) if i % 3 == 0 or i % 5 == 0]
    assert [r["output"] for r in kept] == [r["output"] for i, r in enumerate(rows) if i % 3 and i % 5]


@pytest.mark.parametrize("given", ["file", "run"])
def test_the_files_are_the_same_whatever_the_batch(tmp_path, monkeypatch, capsys, given):
    """Rows are checked and written a batch at a time: kept.jsonl, removed.jsonl and summary.json
    (but its seconds) are byte for byte what one batch of them all gives."""
    from selfinstruct import decontaminate as d
    from selfinstruct.cli import main

    rows, bench, data = _rows_and_bench(tmp_path, 23)
    src = data if given == "file" else write_run(tmp_path / "run", rows)

    def files(batch: int) -> dict:
        monkeypatch.setattr(d, "BATCH", batch)
        out = tmp_path / f"out{batch}"
        assert main(["decontaminate", str(src), "--against", *bench, "--out", str(out)]) == 0
        summary = [line for line in (out / "summary.json").read_text().splitlines() if not line.strip().startswith(
            ('"index_s"', '"check_s"'))]
        return {"kept": (out / "kept.jsonl").read_bytes(), "removed": (out / "removed.jsonl").read_bytes(),
                "summary": summary, "folder": sorted(p.name for p in out.iterdir())}

    whole = files(1000)
    assert whole["kept"].count(b"\n") == 12 and whole["removed"].count(b"\n") == 11
    assert whole["folder"] == [".selfinstruct-filtered", ".selfinstruct-lock", "kept.jsonl", "removed.jsonl",
                               "summary.json"]
    for batch in (1, 4, 23):
        assert files(batch) == whole, batch


@pytest.mark.parametrize("given", ["file", "run"])
def test_each_record_is_checked_once(tmp_path, monkeypatch, capsys, given):
    """A file's record was checked as dedup checks it (dataset_row) where it was read, so that a bad
    one stops the command before anything is written, then checked again when its texts were taken;
    a run's task was searched for NaN, then each of its rows again. One check a record now, the
    texts taken from it."""
    from selfinstruct import decontaminate as d
    from selfinstruct import dedup
    from selfinstruct.cli import main

    rows, bench, data = _rows_and_bench(tmp_path, 7)
    src = data if given == "file" else write_run(tmp_path / "run", rows)
    calls = {"dataset_row": 0, "refuse_non_finite": 0}

    def counting(name, module):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting("dataset_row", dedup)
    counting("refuse_non_finite", d)
    assert main(["decontaminate", str(src), "--against", *bench, "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["records"] == 7 and summary["removed"] > 0  # the texts taken from the one check still match
    assert calls == {"dataset_row": 7, "refuse_non_finite": 7}, calls


def test_a_bad_row_after_the_first_batch_leaves_the_out_folder_as_it_was(tmp_path, monkeypatch, capsys):
    """A bad row is found as its batch is read, after the rows before it are written (staged):
    one line naming file, line and field, the earlier result untouched, nothing staged left,
    and a new --out taken back. A file staged by a run killed with -9 goes at the next write."""
    from selfinstruct import decontaminate as d
    from selfinstruct.cli import main

    monkeypatch.setattr(d, "BATCH", 2)
    rows, bench, data = _rows_and_bench(tmp_path, 7)
    out = tmp_path / "out"
    out.mkdir()
    dead = out / ".kept.jsonl.tmp-staged-999999999"  # no such pid: a killed run's
    dead.write_text("half a row")
    assert main(["decontaminate", str(data), "--against", *bench, "--out", str(out)]) == 0
    assert not dead.exists()
    before = _files(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]) + json.dumps({**rows[5], "input": {"a": 1}}) + "\n")
    capsys.readouterr()
    for target in (out, tmp_path / "new" / "out"):
        assert main(["decontaminate", str(bad), "--against", *bench, "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{bad}:6: field 'input': must be a string, got dict" in err, err
    assert _files(out) == before
    assert not (tmp_path / "new").exists()


def test_a_write_that_fails_midway_is_one_line_and_leaves_the_out_folder_as_it_was(tmp_path):
    """The rows are written as they are checked: a write that fails on the way (a full disk; here
    a file size limit) is one line naming the file, and the earlier result stays as it was."""
    rows, bench, data = _rows_and_bench(tmp_path, 300, output_chars=2000)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "selfinstruct.cli", "decontaminate", str(data), "--against", *bench, "--out", str(out)]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert subprocess.run([*cmd[:4], str(small), *cmd[5:]], capture_output=True, timeout=120).returncode == 0
    before = _files(out)

    def limited() -> None:  # a file may not grow past 100 KB (each of kept.jsonl and removed.jsonl is more)
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    p = subprocess.run(cmd, capture_output=True, timeout=120, preexec_fn=limited)
    (line,) = p.stderr.decode().strip().splitlines()
    said = [f"selfinstruct decontaminate: error: {out / name}: cannot write (File too large)"
            for name in ("kept.jsonl", "removed.jsonl")]
    assert p.returncode == 2 and line in said, line
    assert _files(out) == before


def test_an_alpaca_rows_output_that_is_not_text_is_refused_as_dedup_refuses_it(tmp_path, capsys):
    """An output of 1e400 (read as inf) was kept and written to kept.jsonl as Infinity, rc 0,
    while dedup and export refuse the file: decontaminate checks an Alpaca row as dedup does."""
    from selfinstruct.cli import main

    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is the capital of France?"}) + "\n")
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "Name a colour.", "input": "", "output": "Red."}\n'
                    '{"instruction": "a b c d", "input": "", "output": 1e400}\n')
    out = tmp_path / "clean"
    for command in (["decontaminate", str(data), "--against", str(bench)], ["dedup", str(data)]):
        assert main([*command, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"selfinstruct {command[0]}: error: {data}:2: field 'output': must be a string, got float\n", err
        assert not out.exists()


NON_FINITE = "a number JSON cannot hold (NaN, Infinity, or past 1.8e308 as 1e400): make it a number or null, or remove it"


@pytest.mark.parametrize("command", ["decontaminate", "dedup"])
@pytest.mark.parametrize("extra, field", [('"score": NaN', "score"), ('"w": [1, {"z": -Infinity}]', "w[1].z"),
                                          ('"big": 1e400', "big")])
def test_a_non_finite_number_anywhere_in_a_record_is_one_line_not_invalid_json(tmp_path, capsys, command, extra,
                                                                                 field):
    """Python's json reads NaN, Infinity and 1e400 (as inf); both commands wrote them back to
    kept.jsonl as NaN and Infinity, which is no JSON: jq, JSON.parse and strict readers refuse it."""
    from selfinstruct.cli import main

    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is the capital of France?"}) + "\n")
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "Name a colour.", "input": "", "output": "Red."}\n'
                    '{"instruction": "Name a shape.", "input": "", "output": "A circle.", ' + extra + '}\n')
    out = tmp_path / "clean"
    argv = [command, str(data), "--out", str(out)] + (["--against", str(bench)] if command == "decontaminate" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"selfinstruct {command}: error: {data}:2: field '{field}': {NON_FINITE}\n", err
    assert not out.exists()


@pytest.mark.parametrize("command", ["decontaminate", "dedup"])
def test_a_run_whose_kept_record_holds_nan_is_refused_naming_the_record(tmp_path, capsys, command):
    from selfinstruct.cli import main

    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is the capital of France?"}) + "\n")
    run = write_run(tmp_path / "run", [{"instruction": "Name a colour.", "input": "", "output": "Red."},
                                       {"instruction": "Name a shape.", "input": "", "output": "A circle."}])
    kept = tmp_path / "run" / "kept.jsonl"
    lines = kept.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["provenance"]["elapsed_s"] = float("nan")
    kept.write_text(lines[0] + "\n" + json.dumps(rec) + "\n")
    out = tmp_path / "clean"
    argv = [command, run, "--out", str(out)] + (["--against", str(bench)] if command == "decontaminate" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"selfinstruct {command}: error: {kept}: record 2: field 'provenance.elapsed_s': {NON_FINITE}\n", err
    assert not out.exists()


def test_json_line_refuses_nan_rather_than_write_invalid_json():
    from selfinstruct.datafiles import json_line

    assert json_line({"a": 1.5}) == '{"a": 1.5}\n'
    with pytest.raises(ValueError):
        json_line({"a": float("nan")})


@pytest.mark.parametrize("bad,said", [
    ({"question": "What is the boiling point of water at sea level?"}, "field 'instruction': missing"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                   {"role": "assistant", "content": "A cat."}]}, "messages[0].content[0]: a 'image_url' part"),
    ({"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "Hm."}]},
     "messages[0]: the user turn is empty"),
    ({"conversations": [{"from": "human", "value": "Hi."}, {"from": "tool", "value": "{}"}]},
     "conversations[1]: from 'tool': expected human, gpt or system"),
])
def test_dedup_and_decontaminate_take_and_refuse_the_same_records(tmp_path, capsys, bad, said):
    """decontaminate took a record with a question field alone (dedup refused it), and read a chat's
    turns apart from export's to_messages (an image turn, an empty user turn, a tool turn went
    through). Both now read a record one way: the same one line, naming file, line and field."""
    from selfinstruct.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Explain how photosynthesis works.", "output": "Light."}) + "\n"
                    + json.dumps(bad) + "\n")
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is the capital of France?"}) + "\n")
    lines = []
    for cmd in (["dedup"], ["decontaminate", "--against", str(bench)]):
        out = tmp_path / f"out-{cmd[0]}"
        assert main([cmd[0], str(data), *cmd[1:], "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and not out.exists(), err
        lines.append(err.split("error: ", 1)[1])
    assert lines[0] == lines[1] and lines[0].startswith(f"{data}:2: {said}"), lines


def test_a_table_of_rows_and_conversations_with_nulls_is_read_alike_by_dedup_and_decontaminate(tmp_path, capsys):
    """A file written from a table holding Alpaca rows and conversations has "instruction": null in each
    conversation's row (and "messages": null in each Alpaca row's). decontaminate and export read that
    as a conversation; dedup refused it ('field 'instruction': missing'). Both keep both records now."""
    from selfinstruct.cli import main

    rows = [{"instruction": "Explain how photosynthesis works.", "input": "", "output": "Light.", "messages": None},
            {"instruction": None, "input": None, "output": None,
             "messages": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7."}]}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is the capital of France?"}) + "\n")
    for cmd in (["dedup"], ["decontaminate", "--against", str(bench)]):
        out = tmp_path / f"out-{cmd[0]}"
        assert main([cmd[0], str(data), *cmd[1:], "--out", str(out)]) == 0, capsys.readouterr().err
        kept = [json.loads(line) for line in (out / "kept.jsonl").read_text().splitlines()]
        assert [r.get("messages") is not None for r in kept] == [False, True], kept


def test_one_benchmark_in_a_config_file_is_that_one_item(tmp_path, capsys):
    """`against: bench.jsonl` in --config is what `--against bench.jsonl` gives; it was refused as
    "Input should be a valid list", where generate's `seeds: my_seeds.jsonl` was taken."""
    from selfinstruct.cli import main

    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is the capital of France?"}) + "\n")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "What is the capital of France?", "input": "", "output": "Paris."}) + "\n"
                    + json.dumps({"instruction": "Name a colour.", "input": "", "output": "Red."}) + "\n")
    cfg = tmp_path / "d.yaml"
    cfg.write_text(f"against: {bench}\n")
    out = tmp_path / "clean"
    assert main(["decontaminate", str(data), "--config", str(cfg), "--out", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == 1 and summary["removed"] == 1


@pytest.mark.parametrize("given", [["--ngram", str(2**63)], ["--config", "d.yaml"]])
def test_an_ngram_past_any_text_is_one_line_not_an_overflow(tmp_path, monkeypatch, capsys, given):
    """--ngram 100000000000000000000 (a typo, or "off" by a large number) was an OverflowError
    traceback from numpy, after the benchmarks were read: a bound, one line, nothing made."""
    from selfinstruct.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.yaml").write_text("ngram: 100000000000000000000\n")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "What is 2 + 2?", "input": "", "output": "4"}]))
    out = tmp_path / "clean"
    assert main(["decontaminate", str(data), "--against", str(data), *given, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ngram" in err and "less than or equal to" in err and not out.exists(), err


@pytest.mark.parametrize("value, said", [
    ("1.0e+20", "1e+20 is too large to read as a whole number from this notation; write it in digits "
                "(100000000000000000000)"),
    ("-1.5e+20", "-1.5e+20 is too far below zero to read as a whole number from this notation; write it in digits "
                 "(-150000000000000000000)"),
    ("1.0e+300", "1e+300 is too large to read as a whole number from this notation; write it in digits"),
    ("1e20", "'1e20' is text to YAML; write 100000000000000000000"),
    ("'" + "9" * 5000 + "'", "a number too long to read (over 4,300 digits)"),
])
def test_a_config_number_too_large_for_a_whole_one_is_said_as_it_is(tmp_path, monkeypatch, capsys, value, said):
    """YAML's ngram: 1.0e+20 (a float, which pydantic takes as an integer only below 2**63) was said to be
    'a number too long to read (over 4,300 digits)'; and 1e20 (text to YAML) pydantic's 'unable to parse
    string as an integer'. A quoted one of 5,000 digits is still too long to read."""
    from selfinstruct.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.yaml").write_text(f"ngram: {value}\n")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "What is 2 + 2?", "input": "", "output": "4"}]))
    out = tmp_path / "clean"
    assert main(["decontaminate", str(data), "--against", str(data), "--config", "d.yaml", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"selfinstruct decontaminate: error: d.yaml: field 'ngram': {said}\n"
    assert not out.exists()


def test_a_benchmark_given_twice_is_one_line_not_counted_twice(tmp_path, monkeypatch, capsys):
    """`--against bench/*.jsonl bench/gsm8k.jsonl` (a glob and a name that overlap) checked gsm8k twice:
    summary.json, and the card export writes from it, said 2 items for 1 and named the file twice."""
    from selfinstruct.cli import main

    monkeypatch.chdir(tmp_path)
    bench = tmp_path / "gsm.jsonl"
    bench.write_text(json.dumps({"question": "What is the capital of France?", "answer": "Paris"}) + "\n")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Name a colour.", "input": "", "output": "Red."}]))
    assert main(["decontaminate", str(data), "--against", "gsm.jsonl", "./gsm.jsonl", "--out", "clean"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "./gsm.jsonl: a benchmark given twice (as gsm.jsonl, and as ./gsm.jsonl); give each once" in err, err
    assert not (tmp_path / "clean").exists()
    assert main(["decontaminate", str(data), "--against", "gsm.jsonl", "--out", "clean"]) == 0
    assert json.loads((tmp_path / "clean" / "summary.json").read_text())["benchmark_items"] == 1
