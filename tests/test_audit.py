"""The audit stage: a user looks at what a run generated before tuning on it."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from selfinstruct import audit, judge
from selfinstruct.cli import main
from selfinstruct.datafiles import mark_run_folder
from selfinstruct.records import Instance, KeptRecord, Neighbor, Provenance, Rejected, Usage

EVIL = "<script>alert(1)</script> and ../../etc/passwd"


def prov(response_id: str, prompt: int = 100, completion: int = 50) -> Provenance:
    return Provenance(
        teacher_model="tiny-teacher", base_url="http://127.0.0.1:9/v1", mode="alpaca",
        sampling={"temperature": 1.0}, prompt_template="alpaca.txt", prompt_hash="h0",
        example_ids=["seed-1", "seed-2"], response_id=response_id,
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion),
        created_at="2025-01-01T00:00:00Z", elapsed_s=1.5,
    )


def kept(i: int, instruction: str, output: str, input: str = "", rouge: float = 0.3, cls: bool | None = False, resp: str = "r1"):
    return KeptRecord(
        id=f"{resp}-{i}", instruction=instruction, instances=[Instance(input=input, output=output)],
        is_classification=cls, nearest=[Neighbor(id="seed-1", instruction="Write a haiku.", rouge_l=rouge)],
        provenance=prov(resp),
    )


def rejected(i: int, stage: str, reason: str, instruction: str | None = None, resp: str = "r2"):
    return Rejected(id=f"{resp}-{i}", stage=stage, reason=reason, raw=f"raw teacher text {i}",
                    instruction=instruction, provenance=prov(resp))


KEPT = [
    kept(0, "Write a short poem about the sea.", "Waves fold over waves, grey and slow.", rouge=0.20),
    kept(1, "Classify the sentiment of the review.", "positive", input="I loved it.", rouge=0.40, cls=True),
    kept(2, "Write a poem about autumn leaves.", "Red and gold they fall.", rouge=0.50),
    kept(3, "Translate the sentence into French.", "Bonjour le monde.", input="Hello world.", rouge=0.60),
    kept(4, f"Explain this file path: {EVIL}", f"It climbs two folders up. {EVIL}", rouge=0.80, resp="r3"),
    kept(5, "Summarize the plain paragraph below in one sentence.", "A summary.", input="Some long text here.", rouge=0.10, resp="r3"),
]
REJECTED = [
    rejected(0, "dedup", "duplicate of 'Write a poem about the sea' (0.82)", "Write a poem about the sea."),
    rejected(1, "dedup", "duplicate of 'Translate into French' (0.91)", "Translate this into French."),
    rejected(2, "filter", "too long: 412 words", "Write an essay."),
    rejected(3, "parse", "no instruction found", resp="r4"),
]
STATS = {"candidates": 10, "kept": 6, "rejected": 4, "rejected_by_reason": {"duplicate": 2, "too long": 1, "parse": 1},
         "rejected_by_stage": {"dedup": 2, "filter": 1, "parse": 1}, "requests": 4, "errors": {"timeout": 1},
         "prompt_tokens": 1_500_000, "completion_tokens": 400_000, "wall_time_s": 90.0, "teacher_model": "tiny-teacher"}


def write_run(folder: Path, kept_records=KEPT, rejected_records=REJECTED, stats=STATS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    mark_run_folder(folder)
    (folder / "kept.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in kept_records), encoding="utf-8")
    (folder / "rejected.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in rejected_records), encoding="utf-8")
    if stats is not None:
        (folder / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    return folder


@pytest.fixture
def run(tmp_path) -> Path:
    return write_run(tmp_path / "run1")


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables at the terminal width
    monkeypatch.delenv("SELFINSTRUCT_API_KEY", raising=False)


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(map(str, argv)))
    out = capsys.readouterr()
    return rc, out.out, out.err


# --------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize("reason, key", [
    ("duplicate of 'Write a poem' (0.82)", "duplicate of"),
    ('duplicate of "x" (0.9)', "duplicate of"),
    ("too long: 412 words", "too long"),
    ("output is empty", "output is empty"),
    ("doesn't start with a verb (got 'What')", "doesn't start with a verb"),
    ("(0.9)", "(0.9)"),
])
def test_reason_key_groups_reasons_with_specifics(reason, key):
    assert audit.reason_key(reason) == key


@pytest.mark.parametrize("a, b", [
    ("Write a poem about cats", "Write a story about cats"),
    ("Give three tips for staying healthy.", "What are three tips for staying healthy?"),
    ("Don't stop: believe!", "dont STOP believing"),
    ("Sort the list [3, 1, 2].", "sort the following list of numbers 3 1 2"),
    ("", "anything at all"),
    ("¿Qué hora es?", "Translate: what time is it?"),
    ("a b c d e f g", "a b c d e f g h i j k l m"),  # 0.7 on paper; rouge_score says 0.7000000000000001
    ("a b c d e f g h i j k l m n o p q r s t u v w", "a b c d e f g h i j k l m n o p q r s t u " + "x " * 16),
])
def test_rouge_l_matches_rouge_score(a, b):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    want = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(a, b)["rougeL"].fmeasure
    assert audit.rouge_l(a, b) == want  # bit for bit, so 0.7 falls on the same side as in the dedup


NEIGHBOUR_TEXTS = ["Write a poem about cats", "Write a story about cats", "Add two numbers", "Add two numbers", "!!!", ""]


def test_nearest_neighbour_within_a_file_skips_itself_but_finds_exact_duplicates():
    got = audit.nearest_neighbours(NEIGHBOUR_TEXTS, [0, 1, 2, 3, 4, 5])
    assert got == {0: (1, pytest.approx(0.8)), 1: (0, pytest.approx(0.8)), 2: (3, 1.0), 3: (2, 1.0), 4: (4, 0.0), 5: (5, 0.0)}


def test_nearest_neighbour_without_numpy_agrees(monkeypatch):
    import random

    rng = random.Random(3)
    texts = NEIGHBOUR_TEXTS + [" ".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 9))) for _ in range(60)]
    rows = list(range(0, len(texts), 2))
    with_numpy = audit.nearest_neighbours(texts, rows)
    monkeypatch.setitem(sys.modules, "numpy", None)  # import numpy now fails
    without = audit.nearest_neighbours(texts, rows)
    assert {i: s for i, (_, s) in without.items()} == pytest.approx({i: s for i, (_, s) in with_numpy.items()})
    brute = {i: max(audit.rouge_l(texts[i], t) for j, t in enumerate(texts) if j != i) for i in rows}
    assert {i: s for i, (_, s) in without.items()} == pytest.approx(brute)


@pytest.mark.parametrize("values", [[1], [1, 2, 3, 4], [5, 1, 9, 3, 3, 7, 100], list(range(37))])
def test_percentile_matches_numpy(values):
    np = pytest.importorskip("numpy")
    for q in (50, 90, 99):
        assert audit.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


@pytest.mark.parametrize("text, pair", [
    ("Write a short poem about the sea.", ("write", "poem")),
    ("Please generate three ideas for a party.", ("generate", "ideas")),
    ("Explain why the sky is blue.", ("explain", None)),
    ("What is the capital of France?", (None, None)),
    ("Tell me a joke.", ("tell", "joke")),
])
def test_verb_object_heuristic(text, pair):
    assert audit.verb_object_heuristic(text) == pair


def test_auto_parser_falls_back_to_the_heuristic_and_says_so(monkeypatch):
    monkeypatch.setattr(audit, "load_spacy", lambda: (None, "spaCy is not installed"))
    pairs, label = audit.verb_object_pairs(["Write a poem."], "auto")
    assert pairs == [("write", "poem")] and label.startswith("heuristic") and "spaCy is not installed" in label
    with pytest.raises(audit.UserError, match="--parser spacy: spaCy is not installed"):
        audit.verb_object_pairs(["Write a poem."], "spacy")


def test_verb_object_with_spacy_when_installed():
    nlp, why = audit.load_spacy()
    if nlp is None:
        pytest.skip(why)
    pairs, label = audit.verb_object_pairs(
        ["Write a short poem about the sea.", "Given a list of numbers, find the largest number.",
         "Classify the sentiment of the following tweet.", "What is the capital of France?"], "spacy")
    assert "spaCy" in label
    assert pairs[0] == ("write", "poem")
    assert pairs[1] == ("find", "number")
    assert pairs[2] == ("classify", "sentiment")
    assert pairs[3][1] is None


# --------------------------------------------------------------------------- terminal summary


def test_summary_counts_reasons_tokens_cost_and_shapes(run):
    s = audit.summarize(audit.load_source(run), [0.5, 2.0])
    assert (s["candidates"], s["kept"], s["rejected"]) == (10, 6, 4)
    assert s["keep_rate"] == pytest.approx(0.6)
    assert [(r["stage"], r["reason"], r["count"]) for r in s["rejected_by_reason"]] == [
        ("dedup", "duplicate of", 2), ("filter", "too long", 1), ("parse", "no instruction found", 1)]
    assert s["rejected_by_reason"][0]["share"] == pytest.approx(0.5)
    # 1.5 M input tokens at $0.50 + 0.4 M output tokens at $2.00
    assert s["cost"]["input"] == pytest.approx(0.75) and s["cost"]["output"] == pytest.approx(0.80)
    assert s["cost"]["total"] == pytest.approx(1.55) and s["cost"]["per_kept"] == pytest.approx(1.55 / 6)
    assert s["classification"] == {"known": 6, "yes": 1, "share": pytest.approx(1 / 6)}
    assert s["with_input"] == {"count": 3, "share": pytest.approx(0.5)}
    assert s["leading_verbs"][0][:2] == ("write", 2)
    assert s["lengths"]["instruction"]["min"] == 5 and s["lengths"]["instruction"]["max"] == 8
    assert s["lengths"]["input"]["n"] == 3
    r = s["rouge_l"]
    assert (r["n"], r["min"], r["max"], r["at_least_0.7"]) == (6, 0.1, 0.8, 1)
    assert r["median"] == pytest.approx(0.45) and r["p90"] == pytest.approx(0.7)


def test_terminal_summary_prints_the_numbers(run, capsys):
    rc, out, err = cli(capsys, "audit", run, "--price-per-million", "0.5", "2")
    assert rc == 0, err
    assert re.search(r"kept\s+6 \(6 rows\)\s+60\.0%", out)
    assert re.search(r"dedup\s+duplicate of\s+2\s+50\.0%", out)
    assert re.search(r"filter\s+too long\s+1\s+25\.0%", out)
    assert "1,500,000" in out and "400,000" in out and "timeout 1" in out
    assert "$0.7500 + $0.8000 = $1.55" in out
    assert re.search(r"classification\s+1 of 6 known\s+16\.7%", out)
    assert re.search(r"with input\s+3\s+50\.0%", out)
    assert re.search(r"write\s+2\s+33\.3%", out) and re.search(r"classify\s+1\s+16\.7%", out)


def test_missing_stats_are_computed_from_the_records(tmp_path, capsys):
    run = write_run(tmp_path / "nostats", stats=None)
    s = audit.summarize(audit.load_source(run))
    assert s["candidates"] == 10 and s["rejected"] == 4 and s["teacher_model"] == "tiny-teacher"
    # responses r1..r4 each cost 100 + 50 tokens once, however many candidates they produced
    assert (s["prompt_tokens"], s["completion_tokens"], s["requests"]) == (400, 200, 4)
    assert s["tokens_from"] == "the records"
    rc, out, _ = cli(capsys, "audit", run, "--price-per-million", "1", "1")
    assert rc == 0 and "$0.000400 + $0.000200 = $0.000600" in out


def test_without_responses_a_rejection_never_asked_is_no_request(tmp_path):
    """respond and evolve reject some rows unasked (a control character): an empty response id, no
    usage. Counted by distinct response id, they all made one more request (5 for 4 asked)."""
    unasked = [Rejected(id=f"r{i:06d}-0", stage="filter", reason="control_characters: input holds U+0007",
                        raw="", instruction="Say hi.", provenance=prov("", 0, 0)) for i in (7, 8)]
    run = write_run(tmp_path / "nostats", rejected_records=REJECTED + unasked, stats=None)
    s = audit.summarize(audit.load_source(run))
    assert s["tokens_from"] == "the records" and s["rejected"] == 6
    assert (s["requests"], s["prompt_tokens"], s["completion_tokens"]) == (4, 400, 200)


def test_without_stats_only_replies_that_were_requests_count_as_requests(tmp_path):
    """responses.jsonl logs self-instruct's markers as replies ('failed:N', a follow-up that failed
    every retry; 'repeat:N', one not asked): each counted as a request, 6 here for 4 answered."""
    from selfinstruct.records import Reply, Response

    run = write_run(tmp_path / "nostats", stats=None)
    used = Usage(prompt_tokens=100, completion_tokens=50)
    replies = [Reply(purpose="tasks", text="Task 1: ...", usage=used),
               Reply(purpose="classify:0", text="No", usage=used), Reply(purpose="instances:0", text="...", usage=used),
               Reply(purpose="failed:1", text="connection: dropped"), Reply(purpose="repeat:2", text="0 1.0"),
               Reply(purpose="classify:3", text="No", usage=used)]
    resp = Response(id="r1", index=0, mode="self-instruct", prompt_hash="h0", example_ids=["seed-1"], replies=replies,
                    created_at="2025-01-01T00:00:00Z", elapsed_s=1.0)
    (run / "responses.jsonl").write_text(resp.model_dump_json() + "\n", encoding="utf-8")
    s = audit.summarize(audit.load_source(run))
    assert s["tokens_from"] == "responses.jsonl"
    assert (s["requests"], s["prompt_tokens"], s["completion_tokens"]) == (4, 400, 200)


def test_reasons_are_printed_as_text_not_terminal_markup(tmp_path, capsys):
    odd = [rejected(0, "filter", "bad [/] markup [red]x[/red]: details"), rejected(1, "filter", "bad [/] markup [red]x[/red]")]
    run = write_run(tmp_path / "odd", KEPT, odd, None)
    rc, out, err = cli(capsys, "audit", run)
    assert rc == 0, err
    assert re.search(r"filter\s+bad \[/\] markup \[red\]x\[/red\]\s+2\s+100\.0%", out)


def test_stats_that_lag_behind_the_records_are_noted(tmp_path, capsys):
    stats = {k: v for k, v in STATS.items() if k != "requests"} | {"kept": 4, "replies": 7}  # generate.py says replies
    run = write_run(tmp_path / "lagging", stats=stats)
    rc, out, _ = cli(capsys, "audit", run)
    assert rc == 0 and "stats.json says kept=4 but kept.jsonl has 6" in out
    assert re.search(r"requests\s+7\b", out)


def test_a_run_still_writing_its_last_line_is_audited(run, capsys):
    with open(run / "kept.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "r9-0", "instruc')  # the generator is mid-write
    rc, out, _ = cli(capsys, "audit", run)
    assert rc == 0 and "6 (6 rows)" in out


def test_a_run_that_kept_nothing_still_says_why(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the HTML report needs the 'audit' extra")
    run = write_run(tmp_path / "nothing", [], REJECTED, None)
    rc, out, err = cli(capsys, "audit", run, "--html", tmp_path / "r.html", "--parser", "heuristic")
    assert rc == 0, err
    assert re.search(r"rejected\s+4\s+100\.0%", out) and "No kept records yet." in out
    page = (tmp_path / "r.html").read_text()
    assert "id='rejections'" in page and "id='lengths'" not in page and len(images(page)) == 1


def test_a_run_that_recorded_no_nearest_gets_them_computed_among_its_kept_records(tmp_path, capsys):
    # generate's default --nearest-floor is its --threshold, so a kept record lists no nearest at all
    pytest.importorskip("matplotlib", reason="the HTML report needs the 'audit' extra")
    unrecorded = [r.model_copy(update={"nearest": []}) for r in KEPT[:3]]
    run = write_run(tmp_path / "floor", unrecorded, REJECTED, None)
    rc, out, err = cli(capsys, "audit", run, "--html", tmp_path / "r.html", "--parser", "heuristic")
    assert rc == 0, err
    # the two poems share 4 of 7 and 6 tokens (8/13); the sentiment one shares only 'the' with the first (2/13)
    assert "ROUGE-L to the nearest instruction" in out
    assert re.search(r"\n\s+3\s+0\.15\s+0\.62\s+0\.62\s+0\.62\s+66\.7%\s+0\.0%", out), out
    page = (tmp_path / "r.html").read_text()
    assert "id='similarity'" in page and "computed within the kept records" in page


def test_plain_alpaca_file_gets_nearest_rouge_from_the_file_itself(tmp_path, capsys):
    rows = [{"instruction": "Write a poem about cats", "input": "", "output": "Meow."},
            {"instruction": "Write a story about cats", "input": "", "output": "Once."},
            {"instruction": "Add two numbers", "input": "2 and 3", "output": "5"},
            {"instruction": "Name a colour", "output": "blue"}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    src = audit.load_source(path)
    audit.fill_nearest(src, 0, 0)
    s = audit.summarize(src, [1, 1])
    assert (s["kind"], s["kept"], s["rejected"], s["cost"]) == ("file", 4, 0, None)
    assert [round(it.nearest.rouge_l, 3) for it in src.items] == [0.8, 0.8, 0.0, 0.25]  # 'a' is shared
    assert s["classification"]["share"] is None and s["with_input"]["count"] == 1
    # JSONL works the same way, and audits from the command line
    pytest.importorskip("matplotlib", reason="the HTML report needs the 'audit' extra")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    rc, out, err = cli(capsys, "audit", jsonl, "--html", tmp_path / "r.html", "--parser", "heuristic")
    assert rc == 0, err
    assert (tmp_path / "r.html").exists()
    assert "not recorded" in out


@pytest.mark.parametrize("kind", ["file", "run folder"])
def test_one_record_has_no_nearest_instruction_not_a_rouge_l_of_zero(tmp_path, capsys, kind):
    """One record has nothing to be near: the audit showed a ROUGE-L of 0.00 to its nearest (n 1, median
    0.00, the report's card 0.00), a number for a comparison never made. It says there is no other record,
    and the summary's values are null (n 0)."""
    pytest.importorskip("matplotlib", reason="the HTML report needs the 'audit' extra")
    if kind == "file":
        path = tmp_path / "one.json"
        path.write_text(json.dumps([{"instruction": "Name three rivers of Asia.", "input": "", "output": "The Mekong."}]))
    else:  # a run records no nearest by default (--nearest-floor is its --threshold): the audit computes it
        path = write_run(tmp_path / "one", [KEPT[0].model_copy(update={"nearest": []})], REJECTED, None)
    src = audit.load_source(path)
    audit.fill_missing_nearest(src, audit.AuditOptions())
    s = audit.summarize(src)
    r = s["rouge_l"]
    assert (r["n"], r["min"], r["median"], r["max"]) == (0, None, None, None)
    assert "no other" in r["how"]
    assert [it.nearest for it in src.items] == [None]
    rc, out, err = cli(capsys, "audit", path, "--html", tmp_path / "r.html", "--parser", "heuristic")
    assert rc == 0, err
    assert "0.00" not in out
    assert re.search(r"ROUGE-L to the nearest instruction: none, no other (kept )?record", " ".join(out.split())), out
    page = (tmp_path / "r.html").read_text()
    assert "0.00" not in page and "no other" in page


def test_an_input_of_only_a_zero_width_space_is_no_input(tmp_path, capsys):
    """'with input' counted an input of only U+200B (or a BOM) as an input, and its one 'word' in the input
    lengths, where the rest of the project (filters.no_visible_text) takes a field that shows nothing as empty."""
    rows = [{"instruction": "Name three rivers of Asia.", "input": "\u200b", "output": "The Mekong."},
            {"instruction": "Name a colour of the sea.", "input": "\ufeff \u200b", "output": "Blue."},
            {"instruction": "Translate the sentence into French.", "input": "Hello.", "output": "Bonjour."}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    s = audit.summarize(audit.load_source(path))
    assert s["with_input"] == {"count": 1, "share": pytest.approx(1 / 3)}
    assert s["lengths"]["input"]["n"] == 1
    rc, out, err = cli(capsys, "audit", path, "--parser", "heuristic")
    assert rc == 0, err
    assert re.search(r"with input\s+1\s+33\.3%", out), out


# --------------------------------------------------------------------------- HTML report


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


@pytest.fixture
def report(run, tmp_path, capsys) -> Path:
    pytest.importorskip("matplotlib", reason="the HTML report needs the 'audit' extra")
    (run / "judgements.jsonl").write_text(
        "".join(json.dumps({"id": r.id, "score": 1 + i % 5, "reason": f"reason {i} {EVIL}"}) + "\n" for i, r in enumerate(KEPT)),
        encoding="utf-8")
    (run / "judge_stats.json").write_text(json.dumps(
        {"model": f"judge {EVIL}", "requests": 8, "prompt_tokens": 600, "completion_tokens": 90, "faults": {"http_500": 2}}))
    out = tmp_path / "report.html"
    rc, _, err = cli(capsys, "audit", run, "--html", out, "--price-per-million", "0.5", "2", "--parser", "heuristic")
    assert rc == 0, err
    return out


def test_html_report_is_self_contained_and_escapes_teacher_text(report):
    page = report.read_text(encoding="utf-8")
    for section in ("id='summary'", "id='rejections'", "id='lengths'", "id='similarity'", "id='diversity'",
                    "id='judge'", "id='kept'", "id='rejected'"):
        assert section in page
    pngs = images(page)
    assert len(pngs) == 5  # reasons, lengths, ROUGE-L, verb-noun, judge scores
    from PIL import Image

    for png in pngs:
        w, h = Image.open(io.BytesIO(png)).size
        assert w > 200 and h > 150
    assert "<script" not in page.lower() and "alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; and ../../etc/passwd" in page
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # nothing fetched from outside
    assert "Parser: heuristic" in page and "$1.55" in page
    assert "duplicate of" in page and "raw teacher text 3" in page
    assert "8 requests, 600 prompt + 90 completion tokens, faults: http_500 2" in page


def test_html_report_shows_the_control_characters_a_browser_would_hide(tmp_path, capsys):
    """A browser drops NUL, shows ESC as nothing and reads CR as a line break: the record rejected for
    'the output holds U+0000' looked clean. They are written out; tab, newline and RTL text stay."""
    pytest.importorskip("matplotlib", reason="the HTML report needs the 'audit' extra")
    bad = Rejected(id="r9-0", stage="filter", reason="control_characters: the output holds U+0000",
                   raw="x", instruction="Clear the screen.", instances=[Instance(input="", output="a\x00b\x1b[2J\r\nc")],
                   provenance=prov("r9"))
    good = kept(9, "Translate into Hebrew.", "\u05e9\u05dc\u05d5\u05dd\n\tindented \u202eevil")
    run = write_run(tmp_path / "run", [good], [bad], None)
    rc, _, err = cli(capsys, "audit", run, "--html", tmp_path / "r.html", "--parser", "heuristic")
    assert rc == 0, err
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "a\\x00b\\x1b[2J\\r\nc" in page and "\u05e9\u05dc\u05d5\u05dd\n\tindented \\u202eevil" in page
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", page)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return exe


def browse(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0", *extra,
           page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_report_opens_in_a_real_browser_without_errors(report, tmp_path):
    # A probe copy of the page: the same body plus a script that counts images that failed to decode.
    page = report.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(re.sub(r"<meta http-equiv='Content-Security-Policy'[^>]*>", "", page).replace(
        "</body>", "<script>addEventListener('load', () => { const bad = [...document.images].filter("
        "i => !i.complete || i.naturalWidth === 0).length; document.body.dataset.broken = bad;"
        " document.body.dataset.loaded = document.images.length; });</script></body>"), encoding="utf-8")
    dom = browse(probe, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-loaded="5"' in dom.stdout and 'data-broken="0"' in dom.stdout

    real = browse(report, tmp_path, "--dump-dom")
    assert real.returncode == 0
    assert real.stdout.count("<img") == 5
    assert "<script" not in real.stdout  # the teacher's <script> stayed text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in real.stdout
    console = [line for line in real.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []

    shot = tmp_path / "report.png"
    done = browse(report, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars")
    assert done.returncode == 0 and shot.exists()
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # a rendered page, not a blank one


# --------------------------------------------------------------------------- judge and filter


class JudgeServer:
    """A tiny OpenAI-compatible chat-completions server: deterministic scores from the instruction.

    ``faults`` maps a piece of a record's text to the statuses its first requests get (then 200;
    0 closes the connection without a reply); a record holding a piece of ``garbled`` (or a script tag) gets a reply with no score in it,
    one holding a piece of ``cut`` a reply cut at max_tokens (finish_reason "length") before its score.
    """

    def __init__(self, reject_schema: bool = False, api_key: str | None = None, faults: dict[str, list[int]] | None = None,
                 garbled: tuple[str, ...] = (), models: tuple[str, ...] = ("j", "judge-1"), on_request=None,
                 cut: tuple[str, ...] = ()):
        self.requests: list[dict] = []
        self.on_request = on_request  # called with n (0-based) before the n-th chat request is answered
        self.models = models  # what GET /v1/models lists (the judge's preflight)
        self.gets: list[str] = []  # the paths of GET requests, apart from the chat requests above
        self.garbled = garbled  # pieces of record text whose replies hold no score
        self.cut = cut  # pieces of record text whose replies are cut at max_tokens before the score
        self.reject_schema = reject_schema
        self.api_key = api_key
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def authorized(self) -> bool:
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self.reply(401, {"error": {"message": "Invalid API key.\nCheck it.", "type": "auth_error"}})
                    return False
                return True

            def do_GET(self):
                server.gets.append(self.path)
                if not self.authorized():
                    return
                if self.path != "/v1/models":  # as vLLM: every route is under /v1
                    return self.reply(404, {"detail": "Not Found"})
                self.reply(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "t"}
                                                            for m in server.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    n = len(server.requests)
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if server.on_request:
                    server.on_request(n)
                if not self.authorized():
                    return
                if self.path != "/v1/chat/completions":
                    return self.reply(404, {"detail": "Not Found"})
                if server.reject_schema and "response_format" in body:
                    return self.reply(400, {"error": {"message": "response_format json_schema is not supported",
                                                      "type": "invalid_request_error"}})
                user = body["messages"][-1]["content"]
                with lock:
                    plan = next((v for k, v in server.faults.items() if k in user and v), None)
                    status = plan.pop(0) if plan else None
                if status == 0:  # a dropped connection: the server was reached, then hung up
                    self.close_connection = True
                    return self.connection.shutdown(socket.SHUT_RDWR)
                if status == 429:
                    return self.reply(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "10"})
                if status:
                    return self.reply(status, {"error": {"message": f"injected {status}"}})
                finish = "stop"
                if any(c in user for c in server.cut):
                    text, finish = '{"reason": "The response is', "length"
                elif "<script>" in user or any(g in user for g in server.garbled):
                    text = "I would rather not say."
                elif "poem" in user:
                    text = json.dumps({"score": 5, "reason": "A clear creative task."})
                elif "plain paragraph" in user:
                    text = "Score: 2\nReason: too vague to be useful."
                else:
                    text = json.dumps({"score": 4, "reason": "Correct and helpful."})
                self.reply(200, {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": finish,
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

            def reply(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = JudgeServer()
    yield s
    s.close()


def test_judge_then_filter_round_trip(run, server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SELFINSTRUCT_API_KEY", "sk-test")
    rc, out, err = cli(capsys, "audit", run, "--judge", "--base-url", server.url, "--model", "judge-1", "--concurrency", "3")
    assert rc == 0, err
    assert len(server.requests) == 6 and all(r["path"] == "/v1/chat/completions" for r in server.requests)
    first = server.requests[0]
    assert first["auth"] == "Bearer sk-test" and first["model"] == "judge-1"
    assert first["response_format"]["json_schema"]["schema"]["required"] == ["score", "reason"]
    lines = [json.loads(line) for line in (run / "judgements.jsonl").read_text().splitlines()]
    scores = {line["id"]: line["score"] for line in lines}
    assert scores == {"r1-0": 5, "r1-1": 4, "r1-2": 5, "r1-3": 4, "r3-4": None, "r3-5": 2}
    assert next(line for line in lines if line["id"] == "r3-5")["reason"] == "too vague to be useful."
    assert next(line for line in lines if line["id"] == "r3-4")["raw"] == "I would rather not say."
    assert "5 judged" in out and "1 reply without a score" in out
    assert "Judge: 5 of 6 judged, mean 4.00; scores 1: 0, 2: 1, 3: 0, 4: 2, 5: 2; 1 unparsed" in out

    # Resumable: a second run asks only the record whose reply had no score.
    rc, out, _ = cli(capsys, "audit", run, "--judge", "--base-url", server.url, "--model", "judge-1")
    assert rc == 0 and len(server.requests) == 7 and "5 already judged" in out

    data = tmp_path / "clean.json"
    rc, out, err = cli(capsys, "filter", run, "--min-score", "4", "--out", data)
    assert rc == 0, err
    rows = json.loads(data.read_text())
    assert [r["instruction"] for r in rows] == [KEPT[i].instruction for i in (0, 1, 2, 3)]
    assert rows[1] == {"instruction": "Classify the sentiment of the review.", "input": "I loved it.", "output": "positive"}
    assert "kept 4 of 6 records (4 rows) with judge score >= 4; 1 below, 1 without a score" in out


def test_filter_refuses_when_no_judgement_was_parsed_and_when_all_are_below(run, tmp_path, capsys):
    """Replies the judge gave without a score leave nothing to filter on: one line naming the
    judgements file, nothing written. Scores that are all below the bar are another line: an
    empty dataset is not written, as export writes none."""
    judgements = run / "judgements.jsonl"
    judgements.write_text("".join(json.dumps({"id": r.id, "score": None, "reason": "", "raw": "I cannot rate this."})
                                  + "\n" for r in KEPT))
    out = tmp_path / "clean.json"
    rc, _, err = cli(capsys, "filter", run, "--min-score", "3", "--out", out)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{judgements}: no judgement could be parsed (6 replies without a score" in err
    assert not out.exists()
    # Judgements of other records only (the file was judged, then edited): refused the same way.
    judgements.write_text(json.dumps({"id": "someone-else", "score": 5, "reason": "fine"}) + "\n")
    rc, _, err = cli(capsys, "filter", run, "--min-score", "3", "--out", out)
    assert rc == 2 and "none of the 6 records is judged there" in err and not out.exists()

    judgements.write_text("".join(json.dumps({"id": r.id, "score": 2, "reason": "weak"}) + "\n" for r in KEPT))
    rc, printed, err = cli(capsys, "filter", run, "--min-score", "3", "--out", out)
    assert rc == 2 and printed == "" and not out.exists()
    assert err.count("\n") == 1 and "no record is scored 3 or more (6 below); an empty dataset is not written" in err


def test_filter_to_parquet_writes_no_progress_bar(run, tmp_path, capsys):
    """filter --out x.parquet printed datasets' 'Creating parquet from Arrow format' bar on stderr,
    where every other output says one line. The bars are off for the write only."""
    from datasets.utils import logging as datasets_logging

    (run / "judgements.jsonl").write_text("".join(json.dumps({"id": r.id, "score": 5, "reason": "good"}) + "\n"
                                                  for r in KEPT))
    out = tmp_path / "clean.parquet"
    rc, printed, err = cli(capsys, "filter", run, "--min-score", "4", "--out", out)
    assert rc == 0 and err == "", err
    assert "kept 6 of 6 records" in printed
    from selfinstruct.export import read_records

    assert [r["instruction"] for r in read_records(out)][:1] == [KEPT[0].instruction]
    assert datasets_logging.is_progress_bar_enabled()  # as it was before the write


def test_replies_without_a_score_are_counted_apart_from_the_judged(run, capsys):
    """A reply the judge gave without a score judged nothing: the terminal line, judge_stats.json,
    the summary and the HTML report count it as unparsed, never as judged."""
    s = JudgeServer(garbled=("poem",))  # two poems and the script tag: 3 of 6 replies without a score
    try:
        rc, out, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j")
    finally:
        s.close()
    assert rc == 0, err
    assert "judge: 3 judged, 0 already judged, 3 replies without a score (kept raw)" in out
    assert "Judge: 3 of 6 judged, mean 3.33; scores 1: 0, 2: 1, 3: 0, 4: 2, 5: 0; 3 unparsed" in out
    st = json.loads((run / "judge_stats.json").read_text())
    assert (st["judged"], st["unparsed"]) == (3, 3)
    assert (st["last_session"]["judged"], st["last_session"]["unparsed"]) == (3, 3)
    j = audit.summarize(audit.load_source(run), judgements=audit.read_judgements(run / "judgements.jsonl"))["judge"]
    assert (j["judged"], j["unparsed"], j["of"]) == (3, 3, 6)


@pytest.mark.parametrize("where", ["missing_folder", "a_folder"])
def test_an_html_path_that_cannot_be_written_is_refused_before_the_judge_runs(run, server, tmp_path, capsys, where):
    """--html is written last, after a judge pass that may take hours: a path in a missing
    folder, or one that is a folder, is one line before the first request."""
    html = tmp_path / "no" / "such" / "r.html" if where == "missing_folder" else tmp_path / "reports"
    (tmp_path / "reports").mkdir()
    rc, _, err = cli(capsys, "audit", run, "--judge", "--base-url", server.url, "--model", "j", "--html", html)
    assert rc == 2 and err.count("\n") == 1, err
    assert ("no such folder" if where == "missing_folder" else "is a folder; give a file name for --html") in err
    assert server.requests == [] and not (run / "judgements.jsonl").exists()


def test_the_judge_files_names_are_found_without_loading_the_audit(tmp_path):
    """datafiles.judge_files (every writer's check_output) imported audit's Source for the names: a
    low-level module reaching up. The names are datafiles' own now, and audit's Source uses them."""
    code = ("import sys; from selfinstruct.datafiles import judge_files; "
            f"print([p.name for p, _ in judge_files({str(tmp_path / 'data.jsonl')!r})]); "
            "print('selfinstruct.audit' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [
        "['data.judgements.jsonl', 'data.judge_stats.json', 'data.judge_session.json']", "False"]
    src = audit.Source(tmp_path / "data.jsonl", False)
    assert [src.judgements_path, src.judge_stats_path, src.judge_session_path] == [
        tmp_path / "data.judgements.jsonl", tmp_path / "data.judge_stats.json", tmp_path / "data.judge_session.json"]


@pytest.mark.parametrize("target", ["config", "judgements", "judge_stats", "judge_session"])
def test_an_html_path_naming_an_input_of_the_audit_is_refused(run, tmp_path, capsys, target):
    """--html over the --config file just read, or over a dataset's judgements beside it, replaced
    it with the report (the next audit read HTML as its options or judgements): one line, nothing written.
    A judge file is named for what it holds and whose it is, as every command's --out names it."""
    cfg = tmp_path / "ac.yaml"
    cfg.write_text("parser: heuristic\n")
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "Write a poem.", "input": "", "output": "Roses."}\n')
    (tmp_path / "data.judgements.jsonl").write_text("")
    (tmp_path / "data.judge_stats.json").write_text("{}")
    (tmp_path / "data.judge_session.json").write_text("{}")
    html = {"config": cfg, "judgements": tmp_path / "data.judgements.jsonl",
            "judge_stats": tmp_path / "data.judge_stats.json", "judge_session": tmp_path / "data.judge_session.json"}[target]
    before = html.read_text()
    rc, _, err = cli(capsys, "audit", run if target == "config" else data, "--config", cfg, "--html", html)
    assert rc == 2 and err.count("\n") == 1, err
    held = {"config": f"input {cfg}", "judgements": f"judgements of the input {data}",
            "judge_stats": f"judge stats of the input {data}", "judge_session": f"judging session of the input {data}"}[target]
    assert err == f"selfinstruct audit: error: {html}: --html would overwrite the {held}\n"
    assert html.read_text() == before


def test_a_second_judge_of_one_plain_file_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two judges of data.json would both append to data.judgements.jsonl: each record asked (and paid
    for) twice, and judge_stats.json written by both from the same totals. As for a run folder, the
    second is one line naming the first, and so is a filter reading the judgements meanwhile."""
    import os

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import FakeTeacher

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Name {n} birds of the coast.", "input": "", "output": "Gull, tern."}
                                for n in ("two", "three", "four")]))
    gate = threading.Event()
    with FakeTeacher(reply=lambda n: '{"score": 4, "reason": "Fine."}', on_request=lambda n: gate.wait(30),
                     models=("j",)) as fake:
        args = ["audit", str(data), "--judge", "--base-url", fake.base_url, "--model", "j", "--api-key", fake.key,
                "--concurrency", "1"]
        first = subprocess.Popen([sys.executable, "-m", "selfinstruct.cli", *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"})
        try:
            deadline = time.monotonic() + 60
            while not fake.prompts and time.monotonic() < deadline:  # the first judge is asking
                time.sleep(0.05)
            assert fake.prompts
            rc, out, err = cli(capsys, *args)
            assert rc == 2 and err.count("\n") == 1 and f"in use by pid {first.pid} (selfinstruct audit --judge" in err, err
            rc, out, err = cli(capsys, "filter", data, "--min-score", "3", "--out", tmp_path / "good.json")
            assert rc == 2 and f"in use by pid {first.pid}" in err, err
            assert not (tmp_path / "good.json").exists()
        finally:
            gate.set()
            assert first.wait(60) == 0, first.stderr.read()
    assert len(fake.prompts) == 3  # each record asked once
    assert len((tmp_path / "data.judgements.jsonl").read_text().splitlines()) == 3


def test_judge_resumes_after_a_kill_mid_line(run, server, capsys):
    (run / "judgements.jsonl").write_text('{"id": "r1-0", "score": 5, "reason": "ok"}\n{"id": "r1-1", "sc')
    rc, _, err = cli(capsys, "audit", run, "--judge", "--base-url", server.url, "--model", "j")
    assert rc == 0, err
    assert len(server.requests) == 5  # r1-0 was done; the cut line for r1-1 is judged again
    ids = [json.loads(line)["id"] for line in (run / "judgements.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(r.id for r in KEPT)


def test_a_judge_killed_with_sigkill_keeps_its_requests_faults_and_tokens(run, capsys):
    """judge_stats.json was written only when a session ended: one killed with kill -9 lost its
    requests, faults and tokens, and the next counted only its own. Its counts, saved every second
    in judge_session.json, are added by the next session; judged/unparsed are counted from the file."""
    gate = threading.Event()
    # r1-1 gets a 500 then an answer; the 5th request (r1-3) is held until the judge is killed.
    s = JudgeServer(faults={"Classify": [500]}, on_request=lambda n: n >= 4 and gate.wait(60))
    session = run / "judge_session.json"
    try:
        first = subprocess.Popen([sys.executable, "-m", "selfinstruct.cli", "audit", str(run), "--judge", "--base-url",
                                  s.url, "--model", "j", "--concurrency", "1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and first.poll() is None:  # until it has saved 5 requests
                try:
                    if json.loads(session.read_text())["session"]["requests"] == 5:
                        break
                except (OSError, ValueError, KeyError):
                    pass
                time.sleep(0.05)
            assert first.poll() is None, first.stderr.read()
            first.kill()
            first.wait(60)
        finally:
            gate.set()
        assert len((run / "judgements.jsonl").read_text().splitlines()) == 3 and not (run / "judge_stats.json").exists()
        rc, out, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j", "--concurrency", "1")
        assert rc == 0, err
        st = json.loads((run / "judge_stats.json").read_text())
        assert len(s.requests) == 8  # 5 before the kill (a 500 among them), 3 after
        assert (st["sessions"], st["requests"], st["faults"]) == (2, 8, {"http_500": 1})
        assert (st["prompt_tokens"], st["completion_tokens"]) == (60, 30)  # 3 replies before the kill, 3 after
        assert (st["judged"], st["unparsed"]) == (5, 1)
        assert not session.exists()
        # A kill between judge_stats.json and removing judge_session.json leaves a file it counted: not counted
        # again (the next session asks only r3-4 again, whose reply had no score: one request of its own).
        session.write_text(json.dumps({"id": st["last_session"]["id"], "wall_s": 1.0, "faults": {"timeout": 3},
                                       "session": {"requests": 9}}))
        rc, out, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j")
        assert rc == 0 and "5 already judged" in out, err
    finally:
        s.close()
    after = json.loads((run / "judge_stats.json").read_text())
    assert (after["sessions"], after["requests"], after["faults"]) == (3, 9, {"http_500": 1}) and not session.exists()
    assert (after["prompt_tokens"], after["judged"], after["unparsed"]) == (70, 5, 1)


def test_judge_falls_back_to_plain_text_when_the_server_has_no_structured_output(run, tmp_path, capsys):
    s = JudgeServer(reject_schema=True)
    try:
        rc, _, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j", "--concurrency", "1")
    finally:
        s.close()
    assert rc == 0, err
    assert sum("response_format" in r for r in s.requests) == 1 and len(s.requests) == 7
    scores = {json.loads(line)["id"]: json.loads(line)["score"] for line in (run / "judgements.jsonl").read_text().splitlines()}
    assert scores["r1-0"] == 5


def test_judge_and_filter_a_plain_alpaca_file(server, tmp_path, capsys):
    rows = [{"instruction": "Write a poem about rain.", "input": "", "output": "Drip."},
            {"instruction": "Summarize the plain paragraph.", "input": "Long text.", "output": "Short."}]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    rc, _, err = cli(capsys, "audit", data, "--judge", "--base-url", server.url, "--model", "j")
    assert rc == 0, err
    assert len((tmp_path / "alpaca.judgements.jsonl").read_text().splitlines()) == 2
    rc, out, err = cli(capsys, "filter", data, "--min-score", "3", "--out", tmp_path / "good.json")
    assert rc == 0, err
    assert "kept 1 of 2 records" in out
    assert json.loads((tmp_path / "good.json").read_text()) == rows[:1]
    rc, _, err = cli(capsys, "filter", data, "--min-score", "3", "--out", data)
    assert rc == 2 and "would overwrite the input" in err


def test_audit_judge_and_filter_a_saved_dataset_folder(server, tmp_path, capsys):
    """export --format hf writes a datasets folder, which export and tune read: audit reads it too
    (not "not a run folder"), and its judgements go beside it under the folder's whole name."""
    rows = [{"instruction": "Write a poem about rain.", "input": "", "output": "Drip."},
            {"instruction": "Summarize the plain paragraph.", "input": "Long text.", "output": "Short."}]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    ds = tmp_path / "data.hf"
    assert main(["export", str(data), "--format", "hf", "--out", str(ds)]) == 0
    rc, out, err = cli(capsys, "audit", ds, "--judge", "--base-url", server.url, "--model", "j")
    assert rc == 0, err
    assert "2 judged" in out and len((tmp_path / "data.hf.judgements.jsonl").read_text().splitlines()) == 2
    rc, out, err = cli(capsys, "filter", ds, "--min-score", "3", "--out", tmp_path / "good.json")
    assert rc == 0 and json.loads((tmp_path / "good.json").read_text()) == rows[:1], err
    (tmp_path / "plain").mkdir()
    rc, _, err = cli(capsys, "audit", tmp_path / "plain")
    assert rc == 2 and err.count("\n") == 1 and "not a run folder (no .selfinstruct-run) nor a saved" in err, err


def test_judging_one_split_of_a_saved_datasetdict_writes_beside_it_not_into_it(server, tmp_path, capsys):
    """DIR/NAME is a split inside the DatasetDict DIR: its judgements go beside DIR, as DIR.NAME.split-*,
    so the saved dataset holds only what datasets wrote (another file there would be uploaded with it)."""
    from datasets import Dataset, DatasetDict

    rows = [{"instruction": "Write a poem about rain.", "input": "", "output": "Drip."},
            {"instruction": "Summarize the plain paragraph.", "input": "Long text.", "output": "Short."}]
    dd = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(rows[:1]), "test": Dataset.from_list(rows)}).save_to_disk(str(dd))
    before = sorted(p.relative_to(dd) for p in dd.rglob("*"))
    rc, out, err = cli(capsys, "audit", dd / "test", "--judge", "--base-url", server.url, "--model", "j")
    assert rc == 0 and "2 judged" in out, err
    assert sorted(p.relative_to(dd) for p in dd.rglob("*")) == before
    assert len((tmp_path / "dd.test.split-judgements.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "dd.test.split-judge_stats.json").is_file()
    rc, out, err = cli(capsys, "filter", dd / "test", "--min-score", "3", "--out", tmp_path / "good.json")
    assert rc == 0 and json.loads((tmp_path / "good.json").read_text()) == rows[:1], err


def test_a_datasetdict_judged_as_dir_or_as_its_split_keeps_one_set_of_judge_files(server, tmp_path, capsys):
    """DIR reads its train split, the records DIR/train names: judged one way then the other, the
    second asks nothing, and both use DIR.train.split-*; DIR.judgements.jsonl held a second copy."""
    from datasets import Dataset, DatasetDict

    rows = [{"instruction": "Write a poem about rain.", "input": "", "output": "Drip."},
            {"instruction": "Summarize the plain paragraph.", "input": "Long text.", "output": "Short."}]
    dd = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(dd))
    judge = ["--judge", "--base-url", server.url, "--model", "j"]
    rc, out, err = cli(capsys, "audit", dd, *judge)
    assert rc == 0 and "2 judged" in out and len(server.requests) == 2, err
    rc, out, err = cli(capsys, "audit", dd / "train", *judge)
    assert rc == 0 and "all 2 records already judged" in out and len(server.requests) == 2, err
    assert sorted(p.name for p in tmp_path.glob("dd.*")) == ["dd.train.split-judge_stats.json",
                                                                 "dd.train.split-judgements.jsonl"]
    for given in (dd, dd / "train"):
        rc, out, err = cli(capsys, "filter", given, "--min-score", "3", "--out", tmp_path / "good.json")
        assert rc == 0 and "kept 1 of 2 records" in out, err


@pytest.mark.parametrize("earlier", ["inside-dir", "as-dir", "both-and-current"])
def test_judgements_an_earlier_version_wrote_for_a_datasetdict_split_are_moved_not_asked_again(server, tmp_path,
                                                                                               capsys, earlier):
    """Before judge files moved beside a DatasetDict DIR, DIR/NAME's were written inside it
    (DIR/NAME.judgements.jsonl); before DIR and DIR/train shared theirs, DIR's were DIR.judgements.jsonl.
    Both are moved (merged into files already there, their totals added), said in one line each, and
    no record judged there is asked again; filter finds them as well."""
    from datasets import Dataset, DatasetDict

    rows = [{"instruction": "Write a poem about rain.", "input": "", "output": "Drip."},
            {"instruction": "Summarize the plain paragraph.", "input": "Long text.", "output": "Short."},
            {"instruction": "Name a prime number.", "input": "", "output": "Seven."}]
    dd = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(dd))
    inside, as_dir = dd / "train", tmp_path / "dd"
    judge = ["--judge", "--base-url", server.url, "--model", "j"]
    rc, out, err = cli(capsys, "audit", dd / "train", *judge)
    assert rc == 0 and "3 judged" in out, err
    current = {s: tmp_path / f"dd.train.split-{s[1:]}" for s in (".judgements.jsonl", ".judge_stats.json")}
    lines = current[".judgements.jsonl"].read_text().splitlines()
    stats = json.loads(current[".judge_stats.json"].read_text())
    homes = {"inside-dir": [inside], "as-dir": [as_dir], "both-and-current": [inside, as_dir]}[earlier]
    # Put them back where an earlier version wrote them, split among the homes (and the current file).
    for k, home in enumerate(homes):
        mine = lines if len(homes) == 1 else [lines[k]]
        Path(f"{home}.judgements.jsonl").write_text("".join(f"{line}\n" for line in mine))
        Path(f"{home}.judge_stats.json").write_text(json.dumps(stats))
    if earlier == "both-and-current":
        current[".judgements.jsonl"].write_text(lines[2] + "\n")
    else:
        for path in current.values():
            path.unlink()
    asked = len(server.requests)

    rc, out, err = cli(capsys, "audit", dd, *judge)
    assert rc == 0 and "all 3 records already judged" in out and len(server.requests) == asked, err
    for home in homes:
        verb = "merged into" if earlier == "both-and-current" else "moved to"
        said = f"{home}.judgements.jsonl: judgements an earlier version wrote there, {verb} {current['.judgements.jsonl']}"
        assert said in err, err
        assert not Path(f"{home}.judgements.jsonl").exists() and not Path(f"{home}.judge_stats.json").exists()
    assert sorted(json.loads(line)["id"] for line in current[".judgements.jsonl"].read_text().splitlines()) == \
        sorted(json.loads(line)["id"] for line in lines)
    merged = json.loads(current[".judge_stats.json"].read_text())
    assert merged["requests"] == stats["requests"] * (len(homes) + (earlier == "both-and-current"))
    rc, out, err = cli(capsys, "filter", dd / "train", "--min-score", "3", "--out", tmp_path / "good.json")
    assert rc == 0 and "kept 2 of 3 records" in out, err


def test_judgements_of_a_file_beside_a_datasetdict_of_its_name_are_copied_not_taken(server, tmp_path, capsys):
    """data.json and the DatasetDict data/ beside it (the same rows, exported) both had
    data.judgements.jsonl: data/'s audit copies the judgements it lacks, and data.json's stay."""
    from datasets import Dataset, DatasetDict

    rows = [{"instruction": "Write a poem about rain.", "input": "", "output": "Drip."},
            {"instruction": "Summarize the plain paragraph.", "input": "Long text.", "output": "Short."}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "data"))
    judge = ["--judge", "--base-url", server.url, "--model", "j"]
    rc, out, err = cli(capsys, "audit", data, *judge)
    assert rc == 0 and "2 judged" in out, err
    shared = (tmp_path / "data.judgements.jsonl").read_text()
    rc, out, err = cli(capsys, "audit", tmp_path / "data", *judge)
    assert rc == 0 and "all 2 records already judged" in out and len(server.requests) == 2, err
    assert f"{tmp_path / 'data.judgements.jsonl'}: judgements an earlier version wrote there, copied into " \
        f"{tmp_path / 'data.train.split-judgements.jsonl'}" in err
    assert (tmp_path / "data.judgements.jsonl").read_text() == shared
    rc, out, err = cli(capsys, "audit", data, *judge)
    assert rc == 0 and "all 2 records already judged" in out and "earlier version" not in err, err
    rc, out, err = cli(capsys, "audit", tmp_path / "data", *judge)
    assert rc == 0 and "earlier version" not in err, err  # said once: nothing left to copy


def test_judge_retries_faults_counts_them_and_records_what_still_failed(run, capsys):
    """500s and a 429 are retried by the shared TeacherClient and counted; a record that fails
    every retry is left unjudged (and named in judge_stats.json) while the others go on; a rerun asks again."""
    s = JudgeServer(faults={"Translate": [429, 500], "Classify": [500, 500, 500]})
    try:
        rc, out, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j", "--max-retries", "2")
        assert rc == 0, err
        ids = [json.loads(line)["id"] for line in (run / "judgements.jsonl").read_text().splitlines()]
        assert sorted(ids) == ["r1-0", "r1-2", "r1-3", "r3-4", "r3-5"]  # r1-1 failed 3 of 3 tries
        st = json.loads((run / "judge_stats.json").read_text())
        assert st["faults"] == {"http_500": 4, "http_429": 1}
        assert st["requests"] == len(s.requests) == 10  # 4 clean + 3 for Translate + 3 for Classify
        assert st["prompt_tokens"] == 50 and st["completion_tokens"] == 25
        assert st["judged"] == 4 and st["unparsed"] == 1  # r3-4's reply has no score
        last = st["last_session"]
        assert last["failed"] == 1 and last["failed_ids"] == ["r1-1"] and last["first_error"].startswith("http_500")
        assert "1 failed (rerun to retry" in out
        assert "10 requests, 50 prompt + 25 completion tokens, faults: http_500 4, http_429 1" in out
        assert "Judge: 4 of 6 judged" in out

        rc, out, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j")
        assert rc == 0, err
        assert len(s.requests) == 12  # r1-1 again, and r3-4 whose reply had no score
        st = json.loads((run / "judge_stats.json").read_text())
        assert st["sessions"] == 2 and st["requests"] == 12 and st["judged"] == 5 and st["unparsed"] == 1
        assert st["faults"] == {"http_500": 4, "http_429": 1} and st["last_session"]["failed"] == 0
        assert "Judge: 5 of 6 judged" in out and "12 requests, 70 prompt + 35 completion tokens" in out
    finally:
        s.close()


def test_a_record_whose_last_retry_is_a_dropped_connection_fails_alone_and_the_judge_goes_on(run, capsys):
    """A server that answered and then hung up was reached: that record is left unjudged, as for a
    500, and the others are judged; only a server that no attempt could connect to stops the judge."""
    s = JudgeServer(faults={"Classify": [500, 500, 0]})
    try:
        rc, out, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j", "--max-retries", "2")
    finally:
        s.close()
    assert rc == 0, err
    ids = [json.loads(line)["id"] for line in (run / "judgements.jsonl").read_text().splitlines()]
    assert sorted(ids) == ["r1-0", "r1-2", "r1-3", "r3-4", "r3-5"]  # r1-1 failed 3 of 3 tries
    last = json.loads((run / "judge_stats.json").read_text())["last_session"]
    assert last["failed_ids"] == ["r1-1"] and last["first_error"].startswith("connection")
    assert "1 failed (rerun to retry" in out


@pytest.mark.parametrize("case", ["no /v1", "wrong key", "wrong model", "no server"])
def test_a_judge_server_that_fails_the_check_stops_with_one_line_before_any_record(run, capsys, monkeypatch, case):
    """As generate does, the judge asks GET /models first: a URL without /v1, a wrong key or model, or
    no server at all is one line naming the URL, before any record is asked or a file is written (a
    URL without /v1 was the openai client's 'NotFoundError: Error code: 404', after every record was sent)."""
    s = JudgeServer(api_key="sk-right")
    monkeypatch.setenv("SELFINSTRUCT_API_KEY", "sk-wrong" if case == "wrong key" else "sk-right")
    url = {"no /v1": s.url.removesuffix("/v1"), "no server": "http://127.0.0.1:9/v1"}.get(case, s.url)
    try:
        rc, _, err = cli(capsys, "audit", run, "--judge", "--base-url", url, "--model",
                         "other" if case == "wrong model" else "j")
    finally:
        s.close()
    assert rc == 2 and err.count("\n") == 1, err
    assert f"judge: the teacher at {url} " in err
    assert {"no /v1": f"has no {url}/models (http_404): is the base URL right? It usually ends in /v1",
            "wrong key": "the API key is wrong", "wrong model": "does not serve model 'other' (it serves: j, judge-1)",
            "no server": "cannot be reached (connection"}[case] in err
    assert s.requests == [] and not (run / "judgements.jsonl").exists() and not (run / "judge_stats.json").exists()


def test_the_judge_takes_openai_api_key_as_generate_and_respond_do(run, capsys, monkeypatch):
    """README: any OpenAI-compatible server's key may come from OPENAI_API_KEY. The judge read only
    SELFINSTRUCT_API_KEY, and sent 'EMPTY' (a 401) with the key in OPENAI_API_KEY."""
    s = JudgeServer(api_key="sk-right")
    monkeypatch.delenv("SELFINSTRUCT_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-right")
    try:
        rc, _, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j")
    finally:
        s.close()
    assert rc == 0, err
    assert len((run / "judgements.jsonl").read_text().splitlines()) == 6


def test_a_refusal_after_the_check_stops_the_judge_with_one_line(run, capsys):
    """A 401/403/404 to a record (the model unloaded, the key revoked mid-run) refuses every record
    alike: the judge stops at the first with one line, and a rerun resumes."""
    s = JudgeServer(faults={"Classify": [404]})
    try:
        rc, _, err = cli(capsys, "audit", run, "--judge", "--base-url", s.url, "--model", "j", "--concurrency", "1")
    finally:
        s.close()
    assert rc == 2 and err.count("\n") == 1, err
    assert "judge: NotFoundError: Error code: 404 - injected 404; 1 judged before it stopped" in err
    assert len(s.requests) == 2  # stopped at the first refusal
    assert len((run / "judgements.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_judge_without_base_url_uses_the_embedded_teacher(run, capsys):
    """Like generate, audit --judge with no server starts the embedded teacher: one judgement per record."""
    rc, out, err = cli(capsys, "audit", run, "--judge", "--max-tokens", "48", "--concurrency", "2")
    assert rc == 0, err
    lines = [json.loads(line) for line in (run / "judgements.jsonl").read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(r.id for r in KEPT)
    assert all(line["model"] for line in lines)
    st = json.loads((run / "judge_stats.json").read_text())
    assert st["judged"] + st["unparsed"] == 6 and st["requests"] >= 6 and st["completion_tokens"] > 0
    assert "starting the embedded teacher" in out and f"Judge: {st['judged']} of 6 judged" in out


@pytest.mark.parametrize("text, want", [
    ('{"score": 4, "reason": "Fine."}', (4, "Fine.")),
    ('Sure! ```json\n{"score": 1, "reason": "Wrong answer."}\n```', (1, "Wrong answer.")),
    ("Score: 3\nReason: okay but thin.", (3, "okay but thin.")),
    ("**Score:** 5 - excellent", (5, "excellent")),
    ("no idea", (None, "")),
    ('{"score": 9, "reason": "too high"}', (None, "")),
    ("Score: 4/5\nReason: clear.", (4, "clear.")),
    ("Score: 3 out of 5 - thin", (3, "thin")),
    # A score on another scale, below 1, not whole, or two different ones: no score, not a guess.
    ("Score: 4/10\nReason: weak.", (None, "")),
    ("score: 4 out of 10", (None, "")),
    ("Score: -1 (harmful)", (None, "")),
    ("Score: 4.5", (None, "")),
    ('{"score": 2, "reason": "a"} {"score": 5, "reason": "b"}', (None, "")),
    ("Score: 2\nReason: wrong.\nFinal score: 5", (None, "")),
    ("Score: 3\nReason: fine.\nScore: 3", (3, "fine.")),
])
def test_parse_judgement(text, want):
    assert judge.parse_judgement(text) == want


# --------------------------------------------------------------------------- user errors and config


def test_user_errors_are_one_line(tmp_path, run, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n{"instruction": "c"}\n')
    bad_run = write_run(tmp_path / "badrun")
    (bad_run / "kept.jsonl").write_text(KEPT[0].model_dump_json() + '\n{"id": "x", "instruction": "y"}\n')
    yaml_file = tmp_path / "audit.yaml"
    yaml_file.write_text("sample: 3\ncolour: blue\n")
    cases = [
        (["audit", tmp_path / "nope"], "nope: no such file or folder"),
        (["audit", empty], "empty.json: file is empty"),
        (["audit", broken], "broken.jsonl:2: not complete JSON: the line is cut short"),
        (["audit", bad_run], "kept.jsonl:2: field 'instances'"),
        (["audit", run, "--judge", "--model", "j"], "--model needs --base-url URL"),
        (["audit", run, "--judge", "--base-url", "http://127.0.0.1:9/v1"], "--judge needs --model NAME"),
        (["audit", run, "--config", yaml_file], "audit.yaml: field 'colour': unknown option"),
        (["filter", run, "--min-score", "4", "--out", tmp_path / "o.json"], "no judgements yet"),
        (["filter", run, "--out", tmp_path / "o.json"], "filter needs --min-score"),
        (["filter", run, "--min-score", "9", "--out", tmp_path / "o.json"], "--min-score: Input should be less than or equal to 5"),
    ]
    for argv, message in cases:
        rc, out, err = cli(capsys, *argv)
        assert rc == 2, (argv, out, err)
        assert message in err and err.count("\n") == 1, (argv, err)


def test_options_from_yaml_with_flags_on_top(run, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the HTML report needs the 'audit' extra")
    cfg = tmp_path / "audit.yaml"
    cfg.write_text("price_per_million: [0.5, 2]\nsample: 2\nparser: heuristic\n")
    rc, out, err = cli(capsys, "audit", run, "--config", cfg, "--html", tmp_path / "r.html")
    assert rc == 0, err
    assert "$1.55" in out
    page = (tmp_path / "r.html").read_text()
    assert "Sample of kept records (2 of 6)" in page and "Parser: heuristic" in page


def test_teacher_hour_and_tokens_per_kept_record(run, capsys):
    """A self-hosted teacher's cost: kept records per hour of its time, and tokens per kept record."""
    s = audit.summarize(audit.load_source(run))
    assert s["kept_per_teacher_hour"] == pytest.approx(6 / (90 / 3600))  # 6 kept in 90 s: 240 an hour
    assert s["tokens_per_kept"] == pytest.approx(1_900_000 / 6)
    rc, out, _ = cli(capsys, "audit", run)
    assert rc == 0 and "kept per teacher-hour" in out and "240" in out and "316,667" in out
    plain = audit.summarize(audit.load_source(write_run(run.parent / "nostats", stats=None)))
    assert plain["kept_per_teacher_hour"] is None  # no wall time, no figure


def test_a_runs_rejections_are_held_slim_and_the_sample_is_read_back_whole(tmp_path):
    """A run of millions of rejections must fit: the audit holds what it counts of each, and
    reads the report's sample whole from rejected.jsonl by line (a cut last line skipped)."""
    from selfinstruct import report

    run = write_run(tmp_path / "run")
    with open(run / "rejected.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "r9-0", "stage": "par')  # a kill mid-line
    src = audit.load_source(run)
    assert [(r.id, r.stage, r.line, r.response_id) for r in src.rejected] == [
        ("r2-0", "dedup", 1, "r2"), ("r2-1", "dedup", 2, "r2"), ("r2-2", "filter", 3, "r2"), ("r4-3", "parse", 4, "r4")]
    assert not any(hasattr(r, "raw") for r in src.rejected)
    assert src.rejected_records([src.rejected[3], src.rejected[0]]) == [REJECTED[3], REJECTED[0]]
    page = report.render_html(audit.summarize(src), src, {}, audit.AuditOptions(sample=4))
    assert "raw teacher text 3" in page and "Write an essay." in page  # read back whole


@pytest.mark.parametrize("then", ["another run's", "same ids", "not records", "emptied"])
def test_a_rejected_file_replaced_between_load_and_report_is_one_line(tmp_path, then):
    """The report reads its sample back by line: a rejected.jsonl replaced since the audit loaded
    it must not show another file's records as this run's, nor end in a pydantic traceback."""
    run = write_run(tmp_path / "run")
    src = audit.load_source(run)
    with open(run / "rejected.jsonl", "a", encoding="utf-8") as f:  # a generate still writing appends
        f.write(REJECTED[0].model_copy(update={"id": "r9-0"}).model_dump_json() + "\n")
    assert src.rejected_records(src.rejected[1:3]) == REJECTED[1:3]
    text = {"another run's": "".join(r.model_copy(update={"id": f"x{i}"}).model_dump_json() + "\n"
                                     for i, r in enumerate(REJECTED)),
            # another run numbers its records as this one did: the same ids, other records
            "same ids": "".join(r.model_copy(update={"reason": r.reason + " (another run)"}).model_dump_json() + "\n"
                                for r in REJECTED),
            "not records": '{"id": "r2-1"}\n' * 4, "emptied": ""}[then]
    (run / "rejected.jsonl").write_text(text, encoding="utf-8")
    with pytest.raises(audit.UserError, match=re.escape(f"{run / 'rejected.jsonl'}:2: ") + (
            "field 'stage'" if then == "not records" else "no longer holds record r2-1: the file changed")):
        src.rejected_records(src.rejected[1:3])


def test_a_multi_turn_dataset_is_one_line_that_names_no_flag_audit_lacks(tmp_path, capsys):
    """audit summarises single exchanges; a multi-turn record was refused with export's advice,
    'use --format messages or sharegpt', a flag audit does not have."""
    data = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Bye."}]
    data.write_text(json.dumps({"messages": turns}) + "\n")
    assert main(["audit", str(data)]) == 2
    assert capsys.readouterr().err == (f"selfinstruct audit: error: {data}:1: only a single user/assistant exchange "
                                       "fits alpaca (this is multi-turn or has no reply); audit reads single "
                                       "exchanges only\n")


# --------------------------------------------------------------------------- held in memory


@pytest.mark.parametrize("given", ["run", "file"])
def test_the_audit_holds_what_it_counts_not_the_records(tmp_path, monkeypatch, capsys, given):
    """At a million rows the records with their outputs were 5.1 GB held through the audit; it now
    holds their counts, word counts and instructions, and the report reads its sample back."""
    import tracemalloc

    pytest.importorskip("matplotlib", reason="the HTML report needs the 'audit' extra")
    asks = ["Write a poem about the sea.", "Translate good morning to French.", "List three prime numbers."]
    big = [kept(i, asks[i % 3], f"OUTPUT-{i} " + "x" * 1_000_000, rouge=0.1 * i) for i in range(6)]
    if given == "run":
        path = write_run(tmp_path / "run", big, REJECTED, STATS)
    else:
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps({"instruction": r.instruction, "output": r.instances[0].output}) + "\n"
                                for r in big))
    write_run(tmp_path / "warm")
    assert main(["audit", str(tmp_path / "warm"), "--html", str(tmp_path / "w.html"), "--parser", "heuristic"]) == 0
    held, summarize = [], audit.summarize

    def watched(*a, **kw):
        held.append(tracemalloc.get_traced_memory()[0])  # bytes allocated since the start and still alive
        return summarize(*a, **kw)

    monkeypatch.setattr(audit, "summarize", watched)
    tracemalloc.start()
    try:
        rc = main(["audit", str(path), "--html", str(tmp_path / "r.html"), "--parser", "heuristic", "--sample", "2"])
    finally:
        tracemalloc.stop()
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert held[0] < 2_000_000, held  # the six outputs are 6 MB
    assert re.search(r"output\s+6\s+2\s+2\s+2\s+2", out.out)  # 'OUTPUT-i xxx...': two words each
    page = (tmp_path / "r.html").read_text()
    assert "Sample of kept records (2 of 6)" in page and page.count("998,509 more characters") == 2


def test_summary_values_are_those_of_the_whole_records(tmp_path):
    """Gathered a record at a time, the numbers are those of the records held whole: exact
    percentiles, every instance counted, the recorded or computed nearest."""
    import random

    import numpy as np

    rng = random.Random(1)
    words = "write list explain the a poem of sea data model name give".split()

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    records = [KeptRecord(id=f"r{i % 5}-{i}", instruction=text(rng.randint(1, 30)),
                          instances=[Instance(input=text(rng.randint(0, 4)) if rng.random() < 0.4 else " ",
                                              output=text(rng.randint(0, 50))) for _ in range(rng.randint(1, 3))],
                          is_classification=[None, True, False][i % 3],
                          nearest=[Neighbor(id="s", instruction="x", rouge_l=rng.random()) for _ in range(i % 3)],
                          provenance=prov(f"r{i % 5}")) for i in range(101)]
    src = audit.load_source(write_run(tmp_path / "run", records, REJECTED, None))

    def dist(values):
        return {"n": len(values), "min": min(values), "median": float(np.median(values)),
                "p90": float(np.percentile(values, 90)), "max": max(values)}

    instances = [i for r in records for i in r.instances]
    s = audit.summarize(src)
    assert s["lengths"] == {
        "instruction": pytest.approx(dist([len(r.instruction.split()) for r in records])),
        "input": pytest.approx(dist([len(i.input.split()) for i in instances if i.input.strip()])),
        "output": pytest.approx(dist([len(i.output.split()) for i in instances]))}
    assert (s["kept"], s["rows"]) == (101, len(instances))
    assert s["with_input"]["count"] == sum(any(i.input.strip() for i in r.instances) for r in records)
    assert s["classification"] == {"known": 67, "yes": 34, "share": pytest.approx(34 / 67)}
    assert s["teacher_model"] == "tiny-teacher" and (s["requests"], s["tokens_from"]) == (5, "the records")
    assert s["leading_verbs"][0][1] == max(Counter(r.instruction.split()[0] for r in records).values())
    assert s["rouge_l"]["n"] == 67 and s["rouge_l"]["median"] == pytest.approx(
        float(np.median([max(n.rouge_l for n in r.nearest) for r in records if r.nearest])))
    # A run that recorded no nearest for a third of its records: computed for all, recorded ones set aside.
    audit.fill_missing_nearest(src, audit.AuditOptions(rouge_sample=0))
    assert audit.summarize(src)["rouge_l"]["n"] == 101
    mine = {r.id: r.instruction for r in records}
    for it in src.items:
        assert it.nearest.id != it.id and it.nearest.instruction == mine[it.nearest.id]
        assert it.nearest.rouge_l == pytest.approx(audit.rouge_l(it.instruction, it.nearest.instruction))


def test_the_report_samples_the_records_the_seed_drew_before(run, tmp_path):
    """The report draws its kept sample as positions and reads them back: the records a seed drew
    from the whole list (after the verb sample) are the ones it shows."""
    import random

    pytest.importorskip("matplotlib", reason="the HTML report needs the 'audit' extra")
    from selfinstruct import report

    opts = audit.AuditOptions(sample=3, verb_sample=4, seed=5, parser="heuristic")
    src = audit.load_source(run)
    page = report.render_html(audit.summarize(src), src, {}, opts)
    rng = random.Random(5)
    rng.sample([r.instruction for r in KEPT], 4)
    drawn = rng.sample(KEPT, 3)
    kept_section = page.split("<section id='kept'>")[1].split("</section>")[0]
    shown = re.findall(r"<div class='meta'>(?:<span[^>]*>[^<]*</span>)*(r\d-\d)</div>", kept_section)
    assert shown == [r.id for r in drawn], shown


@pytest.mark.parametrize("then", ["appended", "replaced", "same ids", "shortened"])
def test_a_kept_file_changed_between_load_and_report_is_one_line(tmp_path, then):
    """The report reads its kept sample back: a run still writing gives the records loaded; a
    kept.jsonl replaced or cut since must not show other records as the ones counted."""
    run = write_run(tmp_path / "run")
    src = audit.load_source(run)
    with open(run / "kept.jsonl", "a", encoding="utf-8") as f:
        f.write(KEPT[0].model_copy(update={"id": "r9-0"}).model_dump_json() + "\n")
    assert [it.id for it in src.items.pick([5, 0])] == ["r3-5", "r1-0"]
    if then == "appended":
        assert [it.id for it in src.items] == [r.id for r in KEPT]
        return
    records = {"replaced": [r.model_copy(update={"id": f"x{i}"}) for i, r in enumerate(KEPT)],
               # another run's kept.jsonl: every run numbers its records the same way (found by the review probe)
               "same ids": [r.model_copy(update={"instruction": r.instruction + " Again."}) for r in KEPT],
               "shortened": KEPT[:4]}[then]
    (run / "kept.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in records), encoding="utf-8")
    first = 5 if then == "shortened" else 1
    with pytest.raises(audit.UserError, match=re.escape(f"{run / 'kept.jsonl'}: record {first} is no longer the one "
                                                         "the audit read: the file changed")):
        src.items.pick([5, 0])


def test_judge_concurrency_over_4096_is_one_line(tmp_path, capsys):
    """As generate's: the judge took --concurrency 1000000 (found by the review probe). The line is
    in our words, naming the flag and the bound, as generate's (it was pydantic's "Input should be
    less than or equal to 4096"); 4096 itself is taken (config.MAX_CONCURRENCY, every command's bound)."""
    run = write_run(tmp_path / "run")
    rc, _, err = cli(capsys, "audit", run, "--judge", "--base-url", "http://127.0.0.1:9/v1", "--model", "j",
                     "--concurrency", "4097")
    assert rc == 2 and err == ("selfinstruct audit: error: --concurrency: at most 4096 judge requests in flight, "
                               "not 4097: each one holds its record, its prompt and its reply in memory\n")
    assert audit.AuditOptions(concurrency=4096).concurrency == 4096


def test_the_judge_reads_the_records_as_it_asks_them(tmp_path, capsys, monkeypatch):
    """The judge made a list of every record to ask, outputs and all (about 5 GB for a million never
    judged); it now reads each from the source as a request is free. Twelve 1 MB outputs: about 5 MB
    is held at each request (the record, its prompt, the request's body), where the list held 16 MB."""
    import tracemalloc

    asks = ["Write a poem about the sea.", "Translate good morning to French.", "List three prime numbers."]
    run = write_run(tmp_path / "run", [kept(i, asks[i % 3], f"OUTPUT-{i} " + "x" * 1_000_000) for i in range(12)])
    held = []

    def measure(n):
        server.requests.clear()  # the server keeps each request's body; it runs in this process
        held.append(tracemalloc.get_traced_memory()[0])  # bytes allocated since the start and still alive

    server = JudgeServer(on_request=measure)
    monkeypatch.setenv("SELFINSTRUCT_API_KEY", "sk-test")
    warm = write_run(tmp_path / "warm")  # the client's imports, before the count starts
    assert cli(capsys, "audit", warm, "--judge", "--base-url", server.url, "--model", "j")[0] == 0
    held.clear()
    tracemalloc.start()
    try:
        rc, _, err = cli(capsys, "audit", run, "--judge", "--base-url", server.url, "--model", "j", "--concurrency", "1")
    finally:
        tracemalloc.stop()
        server.close()
    assert rc == 0, err
    assert len(held) == 12 and max(held) < 9_000_000, held  # a record, its prompt and its request, not twelve records


@pytest.mark.parametrize("given", ["flag", "config"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_judge_concurrency_below_1_is_one_line_in_our_words(tmp_path, capsys, given, value):
    """The judge's --concurrency 0 said pydantic's 'Input should be greater than or equal to 1'; it is
    our line, as the over-4096 one is, naming the flag or the file's field."""
    run = write_run(tmp_path / "run")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"concurrency: {value}\n")
    more = [f"--concurrency={value}"] if given == "flag" else ["--config", str(cfg)]
    rc, _, err = cli(capsys, "audit", run, "--judge", "--base-url", "http://127.0.0.1:9/v1", "--model", "j", *more)
    where = "--concurrency" if given == "flag" else f"{cfg}: field 'concurrency'"
    assert rc == 2 and err == (f"selfinstruct audit: error: {where}: at least 1 judge request in flight, not {value}: "
                               "with none, no request would ever be sent\n")
    assert not (run / "judgements.jsonl").exists()


@pytest.mark.parametrize("given", ["au/", "au"])
def test_html_naming_the_folder_that_holds_the_input_is_refused_as_a_folder(tmp_path, capsys, monkeypatch, given):
    """`audit au/data.json --html au/` said '--html would overwrite the input au/data.json', which a report
    written into the folder would not: it is refused for naming a folder, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "au").mkdir()
    (tmp_path / "au" / "data.json").write_text(json.dumps([{"instruction": "Add 1 and 1.", "input": "", "output": "2"}]))
    before = sorted(p.name for p in (tmp_path / "au").iterdir())
    assert main(["audit", "au/data.json", "--html", given]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "folder" in err and "overwrite the input" not in err, err
    assert sorted(p.name for p in (tmp_path / "au").iterdir()) == before


@pytest.mark.parametrize("argv, given", [
    (["--base-url", "http://127.0.0.1:9/v1"], "--base-url"),
    (["--model", "instant"], "--model"),
    (["--api-key", "K"], "--api-key"),
    (["--no-judge", "--max-tokens", "50"], "--max-tokens"),
    (["--concurrency", "2"], "--concurrency"),
    (["--timeout-s", "5"], "--timeout-s"),
    (["--max-retries", "0"], "--max-retries"),
])
def test_the_judges_options_without_judge_are_refused(run, capsys, argv, given):
    """A user who forgot --judge learned it only when filter found nothing judged."""
    rc, out, err = cli(capsys, "audit", run, *argv)
    assert rc == 2 and out == "", err
    assert err == (f"selfinstruct audit: error: {given} is an option of the judge, which audit runs with --judge: "
                   f"add --judge, or leave {given} out\n")
    assert not (run / "judgements.jsonl").exists()


def test_the_judges_options_in_a_config_file_without_judge_are_refused(run, tmp_path, capsys):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("sample: 3\nmodel: instant\n")
    rc, out, err = cli(capsys, "audit", run, "--config", cfg)
    assert rc == 2 and out == "", err
    assert err == (f"selfinstruct audit: error: {cfg}: field 'model': an option of the judge, which audit runs with "
                   "judge: true (or --judge): add it, or leave model out\n")
    cfg.write_text("judge: false\nmax_tokens: 64\n")
    rc, _, err = cli(capsys, "audit", run, "--config", cfg)
    assert rc == 2 and "field 'max_tokens': an option of the judge" in err and err.count("\n") == 1
    # The file's own judge turned off by --no-judge: its options go with it, and the audit reads.
    cfg.write_text("judge: true\nmodel: instant\nbase_url: http://127.0.0.1:9/v1\n")
    rc, out, err = cli(capsys, "audit", run, "--config", cfg, "--no-judge")
    assert rc == 0 and "Audit of" in out, err


@pytest.mark.parametrize("prices", [("nan", "1"), ("1", "inf"), ("inf", "inf"), ("1", "1e400")])
def test_a_price_that_is_not_a_finite_number_is_refused(run, capsys, prices):
    """nan passed 'min(v) < 0' (it compares false) and the cost printed as $nan."""
    rc, out, err = cli(capsys, "audit", run, "--price-per-million", *prices)
    assert rc == 2 and out == "" and "$nan" not in err, err
    assert "--price-per-million: give two prices >= 0, not nan or inf" in err and err.count("\n") == 1


@pytest.mark.parametrize("prices", [("1e308", "1e308"), ("0.5", "1000001")])
def test_a_price_past_any_teachers_is_refused(run, capsys, prices):
    """--price-per-million 1e308 1e308 printed a cost of hundreds of digits: a price is at most $1,000,000 per
    million tokens (a dollar a token), and one past it is one line."""
    rc, out, err = cli(capsys, "audit", run, "--price-per-million", *prices)
    assert rc == 2 and out == "", err
    assert err == ("selfinstruct audit: error: --price-per-million: give two prices >= 0, not nan or inf, each at "
                   "most 1,000,000 (a dollar a token): INPUT OUTPUT (dollars per million tokens)\n"), err
    rc, out, err = cli(capsys, "audit", run, "--price-per-million", "1000000", "1000000")  # the bound itself
    assert rc == 0 and "$1,500,000.00 + $400,000.00 = $1,900,000.00" in out, err


def test_a_price_in_a_config_file_that_is_nan_is_refused(run, tmp_path, capsys):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("price_per_million: [.nan, 1]\n")
    rc, out, err = cli(capsys, "audit", run, "--config", cfg)
    assert rc == 2 and out == "", err
    assert f"{cfg}: field 'price_per_million': give two prices >= 0, not nan or inf" in err and err.count("\n") == 1


# A saved DatasetDict's split and a data file beside it keep apart judge files.

SPLIT_ROWS = [{"instruction": "Write a poem about rain.", "input": "", "output": "Drip."},
         {"instruction": "Summarize the plain paragraph.", "input": "Long text.", "output": "Short."}]
PLAIN_ROWS = [{"instruction": "Name a prime number.", "input": "", "output": "Seven."}]


def as_an_earlier_version_left_them(old: Path, new: Path, old_stats: Path, new_stats: Path) -> tuple[str, str]:
    """Move a split's judge files back into the shared old-named ones (both datasets' judgements in
    one file), as an earlier version left them; returns what the old files then hold."""
    old.write_text(old.read_text() + new.read_text())
    before = old.read_text(), old_stats.read_text()
    new.unlink()
    new_stats.unlink()
    return before


def ids_in(path: Path) -> list[str]:
    return sorted(json.loads(line)["id"] for line in path.read_text().splitlines())


def datasetdict_and_file(tmp_path: Path) -> tuple[Path, Path]:
    """dd/ with a test split of SPLIT_ROWS, and a data file dd.test.jsonl of PLAIN_ROWS beside it."""
    from datasets import Dataset, DatasetDict

    dd = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(PLAIN_ROWS), "test": Dataset.from_list(SPLIT_ROWS)}).save_to_disk(str(dd))
    plain = tmp_path / "dd.test.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in PLAIN_ROWS))
    return dd, plain


def judge_path(capsys, server, path) -> tuple[int, str, str]:
    return cli(capsys, "audit", path, "--judge", "--base-url", server.url, "--model", "j")


def test_a_split_and_a_data_file_named_like_it_keep_their_own_judge_files(server, tmp_path, capsys):
    """dd/test judged into dd.test.judgements.jsonl, the very names of the data file dd.test.jsonl's
    judge files: one's requests, tokens and judged counts were added to the other's."""
    dd, plain = datasetdict_and_file(tmp_path)
    rc, out, err = judge_path(capsys, server, dd / "test")
    assert rc == 0 and "2 judged" in out, err
    rc, out, err = judge_path(capsys, server, plain)
    assert rc == 0 and "1 judged" in out and len(server.requests) == 3, err
    split_files = tmp_path / "dd.test.split-judgements.jsonl", tmp_path / "dd.test.split-judge_stats.json"
    plain_files = tmp_path / "dd.test.judgements.jsonl", tmp_path / "dd.test.judge_stats.json"
    assert len(ids_in(split_files[0])) == 2 and len(ids_in(plain_files[0])) == 1
    assert not set(ids_in(split_files[0])) & set(ids_in(plain_files[0]))
    assert json.loads(split_files[1].read_text())["requests"] == 2
    assert (json.loads(plain_files[1].read_text())["requests"], json.loads(plain_files[1].read_text())["judged"]) == (1, 1)
    for given, said in ((dd / "test", "kept 1 of 2 records"), (plain, "kept 1 of 1 record ")):  # scores 5, 2; 4
        rc, out, err = cli(capsys, "filter", given, "--min-score", "4", "--out", tmp_path / "good.json")
        assert rc == 0 and said in out, err


def test_a_splits_judge_files_of_the_old_names_are_moved_when_no_data_file_claims_them(server, tmp_path, capsys):
    """An earlier version wrote dd/test's as dd.test.judgements.jsonl: with no data file of that stem
    beside dd, they are the split's, moved to the new names with one line, and nothing is asked again."""
    from datasets import Dataset, DatasetDict

    dd = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(PLAIN_ROWS), "test": Dataset.from_list(SPLIT_ROWS)}).save_to_disk(str(dd))
    rc, out, err = judge_path(capsys, server, dd / "test")
    assert rc == 0 and "2 judged" in out, err
    for name in ("judgements.jsonl", "judge_stats.json"):  # back where the earlier version wrote them
        (tmp_path / f"dd.test.split-{name}").rename(tmp_path / f"dd.test.{name}")
    rc, out, err = judge_path(capsys, server, dd / "test")
    assert rc == 0 and "all 2 records already judged" in out and len(server.requests) == 2, err
    assert (f"{tmp_path / 'dd.test.judgements.jsonl'}: judgements an earlier version wrote there, moved to "
            f"{tmp_path / 'dd.test.split-judgements.jsonl'}") in err
    assert not (tmp_path / "dd.test.judgements.jsonl").exists() and not (tmp_path / "dd.test.judge_stats.json").exists()
    assert json.loads((tmp_path / "dd.test.split-judge_stats.json").read_text())["requests"] == 2


@pytest.mark.parametrize("claimant", ["file", "dataset folder"])
def test_old_names_a_data_file_claims_give_the_split_only_its_own_judgements(server, tmp_path, capsys, claimant):
    """The old dd.test.judgements.jsonl held both datasets' judgements (the split's and dd.test.jsonl's):
    the split copies its own records' from it, and the file keeps its files whole."""
    from datasets import Dataset

    dd, plain = datasetdict_and_file(tmp_path)
    if claimant == "dataset folder":
        plain.unlink()
        plain = tmp_path / "dd.test"
        Dataset.from_list(PLAIN_ROWS).save_to_disk(str(plain))
    rc, out, err = judge_path(capsys, server, plain)
    assert rc == 0 and "1 judged" in out, err
    rc, out, err = judge_path(capsys, server, dd / "test")
    assert rc == 0 and "2 judged" in out, err
    old, new = tmp_path / "dd.test.judgements.jsonl", tmp_path / "dd.test.split-judgements.jsonl"
    split_ids = ids_in(new)
    before = as_an_earlier_version_left_them(old, new, tmp_path / "dd.test.judge_stats.json",
                                             tmp_path / "dd.test.split-judge_stats.json")
    rc, out, err = judge_path(capsys, server, dd / "test")
    assert rc == 0 and "all 2 records already judged" in out and len(server.requests) == 3, err
    assert f"{old}: judgements an earlier version wrote there, copied into {new}" in err
    assert ids_in(new) == split_ids  # not the file's record
    assert (old.read_text(), (tmp_path / "dd.test.judge_stats.json").read_text()) == before
    rc, out, err = judge_path(capsys, server, plain)
    assert rc == 0 and "all 1 record" in out and len(server.requests) == 3, err


# --------------------------------------------------------------------------- --html never replaces what a run reads


@pytest.mark.parametrize("what", ["seeds", "seeds-json", "source", "prompts", "bundled", "data-suffix"])
def test_html_never_overwrites_what_the_run_reads(run, tmp_path, capsys, monkeypatch, what):
    """`audit si --html my_seeds` replaced the seed file the run was made with by the report (rc 0,
    and the next resume refused); so did a respond run's source, a file in its --prompts folder or
    the bundled prompts. As the pipeline's audit.html is, it is one line, and nothing is written.
    The files here have no suffix, so only what the run recorded can tell them."""
    import yaml

    from selfinstruct import prompts

    mine = tmp_path / "mine"  # the run's --seeds, --source or --prompts; here a file of no data suffix
    mine.mkdir()
    kept = mine / "my_seeds"
    kept.write_text('{"instruction": "Write a poem.", "input": "", "output": "Roses."}\n')
    bundled = tmp_path / "package" / "prompts"
    bundled.mkdir(parents=True)
    monkeypatch.setattr(prompts, "bundled_dir", lambda name: tmp_path / "package" / name)
    cfg = {"seeds": {"seeds": [str(kept)]}, "seeds-json": {"seeds": ["elsewhere/my_seeds"]},
           "source": {"mode": "respond", "source": str(kept)}, "prompts": {"prompts": str(mine)},
           "bundled": {}, "data-suffix": {}}[what]
    (run / "config.yaml").write_text(yaml.safe_dump({"mode": "alpaca", **cfg}))
    if what == "seeds-json":  # config.yaml keeps a relative --seeds as typed; seeds.json where it was
        (run / "seeds.json").write_text(json.dumps({"sha256": "x", "tasks": 1, "files": [str(kept)]}))
    html = {"prompts": mine / "report.html", "bundled": bundled / "report.html",
            "data-suffix": tmp_path / "notes.yaml"}.get(what, kept)
    before = sorted(p.name for p in tmp_path.rglob("*")), kept.read_text()
    rc, _, err = cli(capsys, "audit", run, "--html", html, "--parser", "heuristic")
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"selfinstruct audit: error: {html}: --html "), err
    said = {"prompts": f"is inside the run's --prompts folder {mine}", "bundled": f"is inside the bundled prompts {bundled}",
            "data-suffix": "names a .yaml file, but the report is one HTML page: give a name such as"}
    assert said.get(what, f"would overwrite the input {kept}") in err, err
    assert (sorted(p.name for p in tmp_path.rglob("*")), kept.read_text()) == before


@pytest.mark.parametrize("name", ["data.json", "d.jsonl", "d.parquet", "c.yaml", "c.yml", "alpaca.txt", "D.JSON"])
def test_html_named_as_data_is_refused_and_an_earlier_report_is_written_over(tmp_path, capsys, name):
    """A report over data.json, a YAML file or a template left HTML where data was: the name says data, so it is
    refused before the audit reads anything; a report written before is replaced, as it always was."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "Write a poem.", "input": "", "output": "Roses."}\n')
    target = tmp_path / name
    target.write_text("mine\n")
    rc, _, err = cli(capsys, "audit", data, "--html", target, "--parser", "heuristic")
    assert rc == 2 and err == (f"selfinstruct audit: error: {target}: --html names a {Path(name).suffix} file, but the "
                               f"report is one HTML page: give a name such as {target.with_suffix('.html')}\n"), err
    assert target.read_text() == "mine\n"
    report = tmp_path / "report.html"
    for _ in range(2):
        rc, _, err = cli(capsys, "audit", data, "--html", report, "--parser", "heuristic")
        assert rc == 0 and report.read_text().startswith("<!DOCTYPE html"), err


@pytest.mark.parametrize("what", ["data-suffix", "bundled"])
def test_pipeline_audit_html_gets_the_same_check_as_audit(tmp_path, capsys, monkeypatch, what):
    """The pipeline's audit.html and audit's --html check in one place: a data suffix, or the bundled prompts."""
    from selfinstruct import prompts

    monkeypatch.setattr(prompts, "bundled_dir", lambda name: tmp_path / "package" / name)
    (tmp_path / "package" / "prompts").mkdir(parents=True)
    html = {"data-suffix": tmp_path / "out.jsonl", "bundled": tmp_path / "package" / "prompts" / "r.html"}[what]
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"audit: {{html: '{html}'}}\n")
    # A teacher that is not there: were the check late, the run would fail on it instead.
    rc, _, err = cli(capsys, "pipeline", "--config", cfg, "--out", tmp_path / "run", "--skip-tune",
                     "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0")
    assert rc == 2 and err.count("\n") == 1 and f"{cfg}: field 'audit.html': {html}: audit.html " in err, err
    assert ("names a .jsonl file" if what == "data-suffix" else "is inside the bundled prompts") in err, err
    assert not (tmp_path / "run").exists()


def test_the_judge_usage_line_says_one_request_not_one_requests():
    """A one-record dataset's judge line read 'Judge requests: 1 requests, ...'."""
    from selfinstruct.audit import _judge_usage_line

    assert _judge_usage_line({"requests": 1, "prompt_tokens": 82, "completion_tokens": 4}).startswith(
        "1 request, 82 prompt + 4 completion tokens")
    assert _judge_usage_line({"requests": 1200, "faults": {"http_500": 2}}) == \
        "1,200 requests, 0 prompt + 0 completion tokens, faults: http_500 2"


def test_word_counts_are_whole_numbers_in_the_length_table(tmp_path, capsys):
    """One row of one-word outputs showed "median 1.0, p90 1.0" beside "min 1, max 1" (terminal and HTML)."""
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "Hi"}) + "\n")
    rc, out, err = cli(capsys, "audit", data, "--html", tmp_path / "r.html")
    assert rc == 0, err
    rc, out, err = cli(capsys, "audit", data)
    assert rc == 0, err
    row = next(line for line in out.splitlines() if line.split()[:1] == ["output"])
    assert row.split() == ["output", "1", "1", "1", "1", "1"], row
    page = (tmp_path / "r.html").read_text()
    assert "<td>output</td><td>1</td><td>1</td><td>1</td><td>1</td><td>1</td>" in page
    assert "<td>1.0</td>" not in page


def test_a_hand_edited_stats_json_with_figures_that_are_not_counts_is_shown_without_them(tmp_path, capsys):
    """stats.json with -1 requests, NaN or Infinity tokens, an error counted as a string and a list as the
    teacher: the audit showed '-1', 'inf min', 'nan' and "teacher ['a']", the HTML report was a
    traceback, and Infinity in judge_stats.json was one too. A figure that is not a count is not shown.
    (An Infinity wall_time_s, a figure each session adds to, is refused by every reader of stats.json.)"""
    bad = {**STATS, "requests": -1, "prompt_tokens": float("inf"), "completion_tokens": float("nan"),
           "errors": {"timeout": "b", "http_500": 2}, "teacher_model": ["a"]}
    run = write_run(tmp_path / "run1", stats=bad)
    (run / "judgements.jsonl").write_text(json.dumps({"id": KEPT[0].id, "score": 4, "reason": "ok"}) + "\n")
    (run / "judge_stats.json").write_text(json.dumps({"requests": float("inf"), "prompt_tokens": float("nan")}))
    rc, out, err = cli(capsys, "audit", run)
    assert rc == 0, err
    assert "inf" not in out and "nan" not in out and " -1 " not in out and "['a']" not in out, out
    assert "http_500 2" in out and "timeout b" not in out, out
    rc, out, err = cli(capsys, "audit", run, "--html", tmp_path / "r.html")
    assert rc == 0, err
    page = (tmp_path / "r.html").read_text()
    assert "errors: http_500" in page and "errors: timeout" not in page


def test_a_hand_edited_stats_json_with_counts_past_any_run_is_shown_without_them(tmp_path, capsys):
    """stats.json with 10**400 prompt tokens (JSON's integers have no bound) was an OverflowError traceback once
    priced, and 1e300 completion tokens a cost of hundreds of digits: a count past 10**15 is no run's."""
    bad = {**STATS, "prompt_tokens": 10**400, "completion_tokens": 1e300}
    run = write_run(tmp_path / "run1", stats=bad)
    for more in ([], ["--html", tmp_path / "r.html"]):
        rc, out, err = cli(capsys, "audit", run, "--price-per-million", "1", "1", *more)
        assert rc == 0, err
        assert not re.search(r"\d{20}", out.replace(",", "")), out


def cli_in_a_process(*argv, timeout: float = 30) -> subprocess.CompletedProcess:
    """The CLI in a process of its own, failed if it runs past ``timeout``: a command that opens a FIFO
    waits for a writer, and would hold the test run itself."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "COLUMNS": "200"}
    try:
        return subprocess.run([sys.executable, "-m", "selfinstruct.cli", *map(str, argv)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{argv[0]} waited (on a FIFO?) past {timeout} s")


@pytest.mark.parametrize("name", ["kept.jsonl", "rejected.jsonl", "stats.json"])
def test_a_run_file_that_is_a_fifo_is_one_line_not_a_wait(tmp_path, name):
    """A run folder whose kept.jsonl, rejected.jsonl or stats.json was a FIFO held audit (and filter, and
    the judge) forever: a plain open waits for a writer."""
    run = write_run(tmp_path / "run1")
    (run / name).unlink()
    os.mkfifo(run / name)
    p = cli_in_a_process("audit", run)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and f"{run / name}: is not a regular file" in p.stderr, p.stderr


def test_html_replaces_only_a_report_it_wrote(tmp_path, capsys):
    """`audit data.jsonl --html README.md` replaced the project's README with the report: --html writes over
    nothing but an earlier report (or an empty file). The user's file is left as it was, in one line."""
    pytest.importorskip("matplotlib", reason="the HTML report needs the 'audit' extra")
    from selfinstruct.report import REPORT_MARK

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": t, "input": "", "output": "ok"}) + "\n"
                            for t in ("Add 2 and 3.", "Name a river in Africa.")), encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text("# My project\n", encoding="utf-8")
    rc, out, err = cli(capsys, "audit", data, "--html", readme, "--parser", "heuristic")
    assert rc == 2 and err.strip().endswith(f"{readme}: exists and is not a report selfinstruct wrote; give --html "
                                            "another name, or move the file away"), err
    assert readme.read_text(encoding="utf-8") == "# My project\n"
    report = tmp_path / "r.html"
    report.write_bytes(b"")  # an empty file holds nothing to lose
    for _ in range(2):  # and the report it wrote is replaced by the next run's
        rc, out, err = cli(capsys, "audit", data, "--html", report, "--parser", "heuristic")
        assert rc == 0, err
        assert REPORT_MARK in report.read_text(encoding="utf-8")
