"""respond: every instruction answered again, the old answer kept, filters applied, resumable after kill -9."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from selfinstruct.cli import main
from selfinstruct.export import user_text
from selfinstruct.records import KeptRecord, Rejected

from conftest import Busy, FakeTeacher, NoChoicesTeacher, kill_when_lines, lines, write_run

ROWS = [{"instruction": f"Describe the {w} in two sentences for a young reader.", "input": inp, "output": f"Old {w}."}
        for w, inp in (("lantern", ""), ("meadow", "It is spring."), ("violin", ""), ("glacier", ""))]


def answers(n: int) -> str:
    return "I'm sorry, but I cannot help with that." if n == 2 else f"A new and better answer, number {n}."


@contextlib.contextmanager
def fresh_teacher(monkeypatch):
    """A FakeTeacher whose every answer is new ("A fresh answer, number N."), its key in the environment."""
    with FakeTeacher(reply=lambda n: f"A fresh answer, number {n}.", models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        yield fake


def rows_file(tmp_path, rows: list[dict]):
    """``rows`` as tmp_path/data.json, and the run folder to make from them."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    return data, tmp_path / "a"


def fake_vllm_bin(tmp_path):
    """An executable named vllm, for the check that it is there (``find_vllm_bin``); never run."""
    path = tmp_path / "vllm-bin" / "vllm"
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(0o755)
    return path


def respond_args(fake, run, out, *more):
    return ["respond", str(run), "--base-url", fake.base_url, "--model", "big-model", "--out", str(out),
            "--no-progress", *more]


def embedded_run_parts(tmp_path, command):
    """A rows file, its out folder, evolve's one round, and a --teacher-model file never read (the
    teacher is the fake)."""
    gguf = tmp_path / "teacher.gguf"
    gguf.write_bytes(b"GGUF")
    data, out = rows_file(tmp_path, ROWS)
    return data, out, ["--rounds", "1"] if command == "evolve" else [], gguf


def fake_embedded_teacher(monkeypatch, fake, looks_for_the_file: bool = False) -> None:
    """The embedded teacher answered by ``fake``; ``looks_for_the_file``: it looks for its GGUF file as it
    starts, as the real one does."""
    import types

    from selfinstruct import servers

    @contextlib.contextmanager
    def embedded(path, **kwargs):
        if looks_for_the_file:
            servers.embedded_model_file(path)
        yield types.SimpleNamespace(base_url=fake.base_url, api_key=fake.key, model="big-model")

    monkeypatch.setattr(servers, "embedded_teacher", embedded)


def no_teacher_starts(monkeypatch) -> None:
    """Starting a teacher (embedded or vLLM) fails the test: the refusal under test must come first."""
    from selfinstruct import servers

    def started(*args, **kwargs):
        raise AssertionError("a teacher was started")

    monkeypatch.setattr(servers, "embedded_teacher", started)
    monkeypatch.setattr(servers, "vllm_server", started)


def test_every_row_answered_again_with_the_old_answer_kept(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", ROWS)
    out = tmp_path / "big"
    with FakeTeacher(reply=answers, models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, run, out, "--concurrency", "1")) == 0
    # The teacher was asked each instruction, with its input after a blank line, once.
    assert fake.prompts == [user_text(r["instruction"], r["input"]) for r in ROWS]
    kept = [KeptRecord.model_validate(o) for o in lines(out / "kept.jsonl")]
    rejected = [Rejected.model_validate(o) for o in lines(out / "rejected.jsonl")]
    assert [r.id for r in kept] == ["r000001-0", "r000002-0", "r000004-0"]
    assert [r.instances[0].output for r in kept] == [answers(0), answers(1), answers(3)]
    assert kept[1].instances[0].input == "It is spring."
    for rec, row in zip(kept, [ROWS[0], ROWS[1], ROWS[3]]):
        prov = rec.provenance
        assert prov.mode == "respond" and prov.teacher_model == "big-model"
        assert prov.previous.output == row["output"] and prov.previous.teacher_model == "teacher"
        assert prov.previous.source == run
    # The refusal is rejected by the same output filter generate uses, its text kept.
    (rej,) = rejected
    assert rej.id == "r000003-0" and rej.reason.startswith("refusal:") and rej.raw == answers(2)
    assert rej.provenance.previous.output == ROWS[2]["output"]
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["kept"], stats["rejected"], stats["rows"], stats["mode"]) == (3, 1, 4, "respond")
    assert stats["completion_tokens"] > 0
    assert len(json.loads((out / "data.json").read_text())) == 3
    # It is a run folder like any other: audit and export read it, and the card says where the questions came from.
    assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "`big-model`" in card and f"`{run}`" in card
    assert "answering existing instructions again" in card and "from seed tasks" not in card
    # respond filters its answers and dedups nothing: the card said "filtered and deduplicated".
    assert "filtered and deduplicated" not in card and "not deduplicated" in card and "| Dedup |" not in card


def test_a_dataset_file_in_and_refusals_of_bad_outs(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    with FakeTeacher(reply=lambda n: f"Fresh answer {n}.", models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, data, tmp_path / "a", "--limit", "2")) == 0  # the first 2 rows only
        assert len(lines(tmp_path / "a" / "kept.jsonl")) == 2
        assert main(respond_args(fake, data, tmp_path / "a", "--limit", "4")) == 0  # --limit may grow: the rest are asked
        assert len(fake.prompts) == 4
        kept = [KeptRecord.model_validate(o) for o in lines(tmp_path / "a" / "kept.jsonl")]
        assert sorted(r.provenance.previous.id for r in kept) == ["row 1", "row 2", "row 3", "row 4"]  # in finishing order
        capsys.readouterr()
        # The input changed under a run: refused, one line, nothing asked.
        data.write_text(json.dumps(ROWS[::-1]))
        (tmp_path / "a" / "kept.jsonl").write_text("")  # so the logged replies would be processed again
        assert main(respond_args(fake, data, tmp_path / "a")) == 2
        assert "the input changed" in capsys.readouterr().err and len(fake.prompts) == 4
        # An --out that is the input, or a changed option on resume: one line each.
        assert main(respond_args(fake, data, data)) == 2
        capsys.readouterr()
        (tmp_path / "f").write_text("")
        assert main(respond_args(fake, data, tmp_path / "f")) == 2  # 'a respond run'; evolve's was 'a evolve run'
        assert "--out must be a folder (a new one, or a run of respond to resume)" in capsys.readouterr().err
        assert main(respond_args(fake, data, tmp_path / "a", "--temperature", "0.1")) == 2
        assert "--temperature: this run was made with 0.7, not 0.1" in capsys.readouterr().err


def test_a_rows_input_is_kept_as_it_was_asked(tmp_path, monkeypatch):
    """An indented code input lost its first line's indent (and its last newline) in kept.jsonl, though the
    teacher was asked the whole of it."""
    rows = [{"instruction": "Explain what this Python snippet prints.", "input": "    x = 1\n    print(x + 1)\n",
             "output": "2"}, {"instruction": "Translate the phrase into French.", "input": "\u00a0good day\u200b ",
                              "output": "bonjour"}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    with FakeTeacher(reply=lambda n: f"  Fresh answer {n}.\n", models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, data, tmp_path / "a", "--concurrency", "1")) == 0
    assert fake.prompts == [user_text(r["instruction"], r["input"]) for r in rows]
    kept = [KeptRecord.model_validate(o) for o in lines(tmp_path / "a" / "kept.jsonl")]
    assert [(r.instances[0].input, r.instances[0].output) for r in kept] == [
        (rows[0]["input"], "Fresh answer 0."), (rows[1]["input"], "Fresh answer 1.")]


def test_an_answer_that_only_repeats_the_question_is_rejected(tmp_path, monkeypatch):
    """A small teacher often hands the question back: it passed every output filter and was kept as
    the row's answer, teaching a model to echo. Now it is rejected with its reason, the rest kept."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    echoes = ["describe the LANTERN in two sentences, for a young reader",  # the instruction, case and commas aside
              user_text(ROWS[1]["instruction"], ROWS[1]["input"]),  # the whole user turn: instruction and input
              "The violin is a small wooden instrument. Describe the violin in two sentences for a young reader.",
              "A glacier is a river of ice."]
    with FakeTeacher(reply=lambda n: echoes[n], models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, data, tmp_path / "a", "--concurrency", "1")) == 0
    kept = [KeptRecord.model_validate(o) for o in lines(tmp_path / "a" / "kept.jsonl")]
    rejected = [Rejected.model_validate(o) for o in lines(tmp_path / "a" / "rejected.jsonl")]
    assert [r.instances[0].output for r in kept] == echoes[2:]  # an answer that also holds the question stays
    assert [(r.id, r.stage, r.reason.split(":")[0], r.raw) for r in rejected] == [
        ("r000001-0", "filter", "output_repeats_instruction", echoes[0]),
        ("r000002-0", "filter", "output_repeats_instruction", echoes[1])]


def test_a_placeholder_answer_is_rejected_and_a_one_mark_answer_kept(tmp_path, monkeypatch):
    """'...' (only dots, ellipses, dashes and spaces) was kept as a row's answer; it is rejected as
    placeholder_output. One mark stays an answer: '?' to 'Which punctuation mark ends a question?'."""
    rows = [{"instruction": "Which punctuation mark ends a question?", "input": "", "output": "?"},
            {"instruction": "Name the largest planet of the solar system.", "input": "", "output": "Jupiter."},
            {"instruction": "Describe the sea in one sentence.", "input": "", "output": "Wide and grey."},
            {"instruction": "Which punctuation mark ends a plain sentence?", "input": "", "output": "."}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    replies = ["?", "...", " \u2026 \u2014 - ", "."]
    with FakeTeacher(reply=lambda n: replies[n], models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, data, tmp_path / "a", "--concurrency", "1")) == 0
    kept = [KeptRecord.model_validate(o) for o in lines(tmp_path / "a" / "kept.jsonl")]
    rejected = [Rejected.model_validate(o) for o in lines(tmp_path / "a" / "rejected.jsonl")]
    assert [(r.id, r.instances[0].output) for r in kept] == [("r000001-0", "?"), ("r000004-0", ".")]
    assert [(r.id, r.stage, r.reason.split(":")[0], r.raw) for r in rejected] == [
        ("r000002-0", "filter", "placeholder_output", "..."), ("r000003-0", "filter", "placeholder_output", replies[2])]
    assert json.loads((tmp_path / "a" / "stats.json").read_text())["rejected_by_reason"] == {"placeholder_output": 2}


def test_an_answer_that_repeats_itself_is_rejected_as_degenerate_as_magpie_does(tmp_path, monkeypatch):
    """'###\\n###\\n###', and one block 2,000 times over (its finish_reason 'stop'), passed every output
    filter and were kept; magpie rejects them as degenerate (prompts.cut_degenerate), and so does respond."""
    data, out = rows_file(tmp_path, ROWS)
    replies = ["###\n###\n###", "Step one: light the wick.\nStep two: close the glass.\n" * 2000,
               "The tide goes out.\nThe tide comes in.\nThe tide goes out.", "A glacier is a river of ice."]
    with FakeTeacher(reply=lambda n: replies[n], models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, data, out, "--concurrency", "1")) == 0
    kept, rejected = (lines(out / name) for name in ("kept.jsonl", "rejected.jsonl"))
    assert [r["instances"][0]["output"] for r in kept] == replies[2:]  # a line twice, apart, is not a repeat
    assert [(r["id"], r["stage"], r["reason"], r["raw"]) for r in rejected] == [
        ("r000001-0", "parse", "degenerate: the answer repeats itself", replies[0]),
        ("r000002-0", "parse", "degenerate: the answer repeats itself", replies[1])]
    assert json.loads((out / "stats.json").read_text())["rejected_by_reason"] == {"degenerate": 2}


def test_an_answer_of_one_line_that_repeats_a_word_is_rejected_as_degenerate(tmp_path, monkeypatch):
    """One line of 'tide tide ...' is no repeated line for cut_degenerate, so respond kept it (as magpie
    did a 200 KB line of 'a a a'); a long line of numbers is an answer, kept."""
    data, out = rows_file(tmp_path, ROWS[:2])
    replies = ["tide " * 1000, ", ".join(map(str, range(1, 501)))]
    with FakeTeacher(reply=lambda n: replies[n], models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, data, out, "--concurrency", "1")) == 0
    kept, rejected = (lines(out / name) for name in ("kept.jsonl", "rejected.jsonl"))
    assert [r["instances"][0]["output"] for r in kept] == [replies[1]]
    assert [(r["id"], r["stage"], r["reason"]) for r in rejected] == [
        ("r000001-0", "parse", "degenerate: the answer repeats itself within a line "
                               "(one line of 1000 words repeats 1 distinct word)")]


def test_rows_with_a_system_prompt_are_counted_and_said_and_the_teacher_answers_without_it(tmp_path, monkeypatch,
                                                                                            capsys):
    """A ShareGPT or messages row's system prompt has no place in the Alpaca record: it was dropped
    without a word. Now one line at the start says how many rows had one, stats.json counts them,
    and the teacher is asked the user turn alone (the record is what was asked)."""
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "system", "content": "Always answer in French."},
                      {"role": "user", "content": ROWS[0]["instruction"]}, {"role": "assistant", "content": "Old."}]},
        {"messages": [{"role": "user", "content": ROWS[2]["instruction"]}, {"role": "assistant", "content": "Old."}]},
        {"conversations": [{"from": "system", "value": "You are a pirate."},
                           {"from": "human", "value": ROWS[3]["instruction"]}, {"from": "gpt", "value": "Old."}]},
        {"instruction": ROWS[1]["instruction"], "input": ROWS[1]["input"], "output": "Old.", "system": "Be brief."},
    ]) + "\n")
    with FakeTeacher(reply=lambda n: f"A new and better answer, number {n}.", models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, data, tmp_path / "a", "--limit", "3")) == 0
        err = capsys.readouterr().err
        assert ("respond: 2 of 3 rows have a system prompt; the teacher is not sent it, and the records "
                "(instruction, input, output) do not keep it") in err
        assert json.loads((tmp_path / "a" / "stats.json").read_text())["system_prompts_dropped"] == 2
        assert [[m["role"] for m in b["messages"]] for b in fake.bodies] == [["user"]] * 3
        assert main(respond_args(fake, data, tmp_path / "a", "--limit", "4")) == 0  # --limit grows: the Alpaca row's "system" too
        assert "3 of 4 rows have a system prompt" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "stats.json").read_text())["system_prompts_dropped"] == 3
    data_rows = json.loads((tmp_path / "a" / "data.json").read_text())
    assert len(data_rows) == 4 and all(set(r) == {"instruction", "input", "output"} for r in data_rows)


@pytest.mark.parametrize("change", ["edited row", "smaller limit"])
def test_a_refused_resume_leaves_every_file_as_it_was(tmp_path, monkeypatch, capsys, change):
    """A resume whose input changed under the run (found only in the loop, after config.yaml took the
    new --limit, session.json was written and the teacher started), or whose --limit shrank below a
    row already answered (taken silently: stats.json then counted fewer rows than kept.jsonl held),
    is one line before anything is written; the same --limit goes on."""
    from conftest import snapshot

    data, out = rows_file(tmp_path, ROWS)
    with FakeTeacher(reply=lambda n: f"Fresh answer {n}.", models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, data, out, "--limit", "3")) == 0
        before, asked = snapshot(out), len(fake.prompts)
        capsys.readouterr()
        if change == "edited row":  # and no --limit: the run's own, but row 0 is another question now
            data.write_text(json.dumps([{**ROWS[0], "instruction": "Describe a lantern in one word."}, *ROWS[1:]]))
            again, says = [], "reply r000001 answers a row that"
        else:
            # Left out, --limit is the run's own: the way to every row is its number, not leaving it out.
            again, says = ["--limit", "2"], ("--limit 2: this run has answered row 3 already; --limit may grow on "
                                             "resume, not shrink: give --limit 3 or more (or --limit 4 for every row)")
        assert main(respond_args(fake, data, out, *again)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
        assert snapshot(out) == before and len(fake.prompts) == asked
        if change == "smaller limit":
            assert main(respond_args(fake, data, out, "--limit", "3")) == 0
            assert json.loads((out / "stats.json").read_text())["rows"] == 3


def test_generate_into_a_respond_run_is_refused_as_another_commands_run(tmp_path, monkeypatch, capsys):
    """It was 'config.yaml: field 'mode': Input should be 'alpaca', ...', as if the file were broken."""
    from conftest import snapshot

    run = write_run(tmp_path / "run", ROWS)
    out = tmp_path / "big"
    with FakeTeacher(reply=answers, models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, run, out)) == 0
        before = snapshot(out)
        capsys.readouterr()
        for mode in ([], ["--mode", "alpaca"]):
            assert main(["generate", "--out", str(out), "--base-url", fake.base_url, "--model", "big-model",
                         "--no-progress", *mode]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"error: {out}: is a run folder of 'respond', not of 'generate'" in err, err
        # The other way, a generate run is named as the command that made it, not by its mode alone
        # (it was "a run folder of 'alpaca', not of 'respond'").
        gen = tmp_path / "gen"
        assert main(["generate", "--out", str(gen), "--base-url", fake.base_url, "--model", "big-model", "--num", "1",
                     "--max-requests", "1", "--no-progress"]) in (0, 1)
        capsys.readouterr()
        assert main(respond_args(fake, run, gen)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: {gen}: is a run folder of 'generate --mode alpaca', not of 'respond'" in err
    assert snapshot(out) == before


def test_kill_9_and_resume_answer_every_row_exactly_once(tmp_path):
    rows = [{"instruction": f"Write one line about the number {i} and a {w}.", "input": "", "output": "old"}
            for i, w in enumerate(["kite", "fox", "oak", "fern", "owl"] * 8)]
    run = write_run(tmp_path / "run", rows)
    out = tmp_path / "big"
    with FakeTeacher(reply=lambda n: f"A line, answer {n}.", on_request=lambda n: time.sleep(0.05),
                     models=("big-model",)) as fake:
        cmd = [sys.executable, "-m", "selfinstruct.cli", *respond_args(fake, run, out, "--concurrency", "3")]
        env = {**os.environ, "SELFINSTRUCT_API_KEY": fake.key}
        acknowledged = set()
        logged_at = []  # after each session: (prompts the teacher had by then, the rows whose reply was logged)

        def complete_lines(path):
            raw = path.read_bytes() if path.exists() else b""
            return [json.loads(l) for l in raw[: raw.rfind(b"\n") + 1].decode().splitlines()]

        def note_acknowledged():
            acknowledged.update(o["id"] for o in complete_lines(out / "kept.jsonl"))
            logged_at.append((len(fake.prompts), {o["index"] for o in complete_lines(out / "responses.jsonl")}))

        kills = kill_when_lines(cmd, env, out / "kept.jsonl", (5, 15, 25), after=note_acknowledged)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    assert kills >= 2
    ids = [o["id"] for o in lines(out / "kept.jsonl")] + [o["id"] for o in lines(out / "rejected.jsonl")]
    assert sorted(ids) == [f"r{i + 1:06d}-0" for i in range(len(rows))]  # every row once, none twice
    assert acknowledged <= set(ids)
    # A row whose reply was logged is never asked again. (Which others repeat depends on timing: the
    # requests in flight at the kill, and replies not yet made durable by the writer.)
    row_of = {r["instruction"]: i for i, r in enumerate(rows)}
    for asked_before, logged in logged_at:
        again = sorted(row_of[p] for p in fake.prompts[asked_before:] if row_of[p] in logged)
        assert not again, f"rows logged before a kill were asked again: {again}"
    assert len(logged_at) == 3 and all(logged for _, logged in logged_at)
    assert len(fake.prompts) < 2 * len(rows)  # the repeats are the few replies lost with each session
    logged = [o["index"] for o in lines(out / "responses.jsonl")]
    assert sorted(logged) == list(range(len(rows)))
    # Each session is counted, the killed ones too (from the session.json each left).
    assert json.loads((out / "stats.json").read_text())["sessions"] == 4


def test_a_session_killed_before_its_loop_leaves_the_teacher_in_stats(tmp_path, monkeypatch):
    """Its session.json names no model or server yet: stats.json said '' for both, and rows 0."""
    from selfinstruct.runfolder import SessionCounts

    run = write_run(tmp_path / "run", ROWS)
    out = tmp_path / "big"
    from selfinstruct import respond
    from selfinstruct.config import UserError

    async def stopped(*args, **kwargs):
        raise UserError("stopped before its loop")

    with FakeTeacher(reply=answers, models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, run, out, "--limit", "2")) == 0
        SessionCounts(out, started=time.monotonic() - 3).save(faults={}, servers={})  # as one killed at its start leaves it
        # This session ends before its loop (a teacher gone ends it at the preflight, before the
        # folder is written: the killed one is counted by the next session that passes it).
        monkeypatch.setattr(respond, "_loop", stopped)
        assert main(respond_args(fake, run, out)) == 2
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sessions"] == 2 and stats["last_session"]["ended"] == "interrupted" and stats["wall_time_s"] >= 3
    assert (stats["teacher_model"], stats["base_url"], stats["rows"]) == ("big-model", fake.base_url, 2)
    assert main(["export", str(out), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "`big-model`" in (tmp_path / "hf" / "README.md").read_text()  # the card names the teacher


@pytest.mark.slow
def test_embedded_teacher_answers_three_rows(tmp_path):
    run = write_run(tmp_path / "run", [{"instruction": t, "input": "", "output": "old"} for t in (
        "Give two tips for sleeping better.", "Name three colours of the rainbow.", "What is the capital of France?")])
    out = tmp_path / "emb"
    p = subprocess.run([sys.executable, "-m", "selfinstruct.cli", "respond", run, "--out", str(out), "--max-tokens", "64",
                        "--no-progress"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = lines(out / "kept.jsonl") + lines(out / "rejected.jsonl")
    assert sorted(r["id"] for r in recs) == ["r000001-0", "r000002-0", "r000003-0"]
    assert all(r["provenance"]["previous"]["output"] == "old" for r in recs)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] + stats["rejected"] == 3 and stats["completion_tokens"] > 0


@pytest.mark.parametrize("senders", [[], ["--client-processes", "1"]], ids=["in-process", "sender"])
def test_several_servers_share_the_rows_and_a_dead_one_is_taken_out(tmp_path, monkeypatch, senders):
    """--base-url given three times, one of them a port nothing listens on: every row is
    answered once by one of the two live servers, each record names the server that wrote it,
    and stats.json counts each server's requests and faults."""
    rows = [{"instruction": f"Describe the {w} in two sentences for a young reader.", "input": "", "output": f"Old {w}."}
            for w in ("lantern", "meadow", "violin", "glacier", "harbor", "orchard", "compass", "thimble",
                      "volcano", "saffron", "quartz", "lagoon")]
    run = write_run(tmp_path / "run", rows)
    out = tmp_path / "big"
    busy = Busy()
    with FakeTeacher(reply=answers, on_request=busy, models=("big-model",)) as a, \
            FakeTeacher(reply=answers, on_request=busy, models=("big-model",)) as b:
        b.key = a.key
        dead = "http://127.0.0.1:1/v1"
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", a.key)
        assert main(["respond", str(run), "--base-url", a.base_url, dead, "--base-url", b.base_url, "--model", "big-model",
                     "--out", str(out), "--no-progress", "--concurrency", "1", "--max-retries", "8", *senders]) == 0
    assert sorted(a.prompts + b.prompts) == sorted(user_text(r["instruction"], "") for r in rows)
    assert busy.most == 2  # --concurrency 1 is per server: both were busy at once
    kept = [KeptRecord.model_validate(o) for o in lines(out / "kept.jsonl")]
    rejected = [Rejected.model_validate(o) for o in lines(out / "rejected.jsonl")]
    assert len(kept) + len(rejected) == len(rows)
    for rec in kept + rejected:
        asked = a if rec.instruction in " ".join(a.prompts) else b
        assert rec.provenance.base_url == asked.base_url
    stats = json.loads((out / "stats.json").read_text())
    assert stats["base_url"] == [a.base_url, dead, b.base_url]
    s = stats["servers"]
    assert s[a.base_url]["requests"] == len(a.prompts) and s[b.base_url]["requests"] == len(b.prompts)
    # The check before the first request put the dead one aside: no request went to it.
    assert s[dead]["requests"] == 0 and s[dead]["faults"] == {} and s[dead]["taken_out"] == 1
    # Each live server was asked GET /models once at the start (it was twice: the check before the
    # folder is written, then the client's preflight).
    assert (a.model_lists, b.model_lists) == (1, 1)
    assert (out / "errors.jsonl").read_text() == ""
    # The per-server tokens add up to the run's.
    assert sum(v["completion_tokens"] for v in s.values()) == stats["completion_tokens"] > 0
    assert sum(v["prompt_tokens"] for v in s.values()) == stats["prompt_tokens"] > 0


def test_a_resume_that_leaves_out_the_server_uses_the_runs_own(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", ROWS)
    out = tmp_path / "big"
    with FakeTeacher(reply=answers, models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, run, out, "--limit", "2")) == 0
        # The same command without --base-url: the run's server, not the embedded teacher.
        assert main(["respond", str(run), "--model", "big-model", "--out", str(out), "--no-progress", "--limit", "3"]) == 0
        # Without --model too: the model those servers serve is the run's (it was refused: "field
        # 'model': this run was made with 'big-model', not None").
        assert main(["respond", str(run), "--out", str(out), "--no-progress", "--limit", "4"]) == 0
    assert sorted(fake.prompts) == sorted(user_text(r["instruction"], r["input"]) for r in ROWS)
    records = lines(out / "kept.jsonl") + lines(out / "rejected.jsonl")
    assert len(records) == 4 and {o["provenance"]["base_url"] for o in records} == {fake.base_url}
    assert {o["provenance"]["teacher_model"] for o in records} == {"big-model"}


def test_a_resume_with_another_teacher_is_refused_on_teacher(tmp_path, monkeypatch, capsys):
    """A run answered by a server, resumed with --teacher embedded: the run's servers are not
    brought back to contradict the teacher given; the change of teacher is what is refused."""
    from selfinstruct import servers

    def started(*args, **kwargs):
        raise AssertionError("a teacher was started")

    run = write_run(tmp_path / "run", ROWS)
    out = tmp_path / "big"
    with FakeTeacher(reply=answers, models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, run, out, "--limit", "2")) == 0
    capsys.readouterr()
    monkeypatch.setattr(servers, "embedded_teacher", started)
    assert main(["respond", str(run), "--teacher", "embedded", "--out", str(out), "--no-progress"]) == 2
    assert "--teacher: this run was made with 'openai', not 'embedded'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["respond", "evolve"])
@pytest.mark.parametrize("teacher", ["embedded", "vllm"])
def test_a_teacher_that_starts_its_own_server_with_base_url_is_one_line(tmp_path, monkeypatch, capsys, command,
                                                                       teacher):
    """As in generate: --teacher embedded or vllm with --base-url names two teachers, one that
    would answer and one that config.yaml would record. Refused before anything starts."""
    no_teacher_starts(monkeypatch)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    out = tmp_path / "run"
    code = main([command, str(data), "--teacher", teacher, "--base-url", "http://127.0.0.1:1/v1", "--model", "M",
                 "--out", str(out), "--no-progress"])
    assert code == 2
    assert f"--teacher {teacher} starts its own teacher, so --base-url does not apply" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", ["respond", "evolve"])
def test_flags_after_the_dashes_go_to_vllm_when_the_input_comes_first(tmp_path, monkeypatch, command):
    """The README's `respond data.json --teacher vllm --model M --out DIR -- --tensor-parallel-size 4`:
    argparse alone ends the `-- FLAGS` positional at RUN_OR_FILE and calls the rest unrecognized."""
    from selfinstruct import servers
    from selfinstruct.config import UserError

    seen = []

    def started(model, **kwargs):
        seen.append(kwargs["extra_args"])
        raise UserError("stop here")

    monkeypatch.setattr(servers, "vllm_server", started)
    monkeypatch.setenv("SELFINSTRUCT_VLLM_BIN", str(fake_vllm_bin(tmp_path)))  # looked for before the folder is made
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    code = main([command, str(data), "--teacher", "vllm", "--model", "M", "--out", str(tmp_path / "run"), "--no-progress",
                 "--", "--tensor-parallel-size", "4"])
    assert code == 2 and seen == [["--tensor-parallel-size", "4"]]


@pytest.mark.parametrize("command", ["respond", "evolve"])
@pytest.mark.parametrize("flags, want", [
    (["--base-url", "http://127.0.0.1:1/v1"], "--base-url needs --model"),
    (["--teacher", "vllm"], "--teacher vllm needs --model"),
    (["--model", "big"], "--model 'big' names the model of a --base-url server"),  # else the embedded teacher answered
])
def test_a_teacher_without_its_model_is_one_line_before_the_folder_is_made(tmp_path, monkeypatch, capsys, command,
                                                                          flags, want):
    """As in generate: the checks that need no server leave no folder for the corrected command to meet."""
    from selfinstruct import servers
    from selfinstruct.config import UserError

    def started(*args, **kwargs):
        raise UserError("a teacher was started")

    monkeypatch.setattr(servers, "embedded_teacher", started)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    out = tmp_path / "run"
    assert main([command, str(data), *flags, "--out", str(out), "--no-progress"]) == 2
    assert want in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", ["respond", "evolve"])
def test_one_server_that_cannot_be_reached_stops_the_run_at_once_with_one_line(tmp_path, monkeypatch, capsys, command):
    """A typo in the only --base-url: the check before the first request says so, instead of
    every row failing its retries into errors.jsonl (a minute for 30 rows)."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    run = write_run(tmp_path / "run", ROWS)
    monkeypatch.setenv("SELFINSTRUCT_API_KEY", "key")
    t0 = time.monotonic()
    assert main([command, str(run), "--base-url", url, "--model", "big-model", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"the teacher at {url} cannot be reached" in err and "Traceback" not in err
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "out").exists()  # checked before the folder is made


@pytest.mark.parametrize("command", ["respond", "evolve"])
@pytest.mark.parametrize("flags, want", [
    (["--teacher-model", "other.gguf"], "--teacher-model applies to --teacher embedded (no --base-url), not this run's teacher (openai)"),
    (["--vllm-bin", "vllm"], "--vllm-bin applies to --teacher vllm, not this run's teacher (openai)"),
])
def test_an_option_of_another_teacher_is_one_line_before_the_folder_is_made(tmp_path, monkeypatch, capsys, command,
                                                                           flags, want):
    """As generate refuses since f66b851: with --base-url, --teacher-model was taken and unused (the server made the data)."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    out = tmp_path / "run"
    assert main([command, str(data), "--base-url", "http://127.0.0.1:1/v1", "--model", "big", *flags,
                 "--out", str(out), "--no-progress"]) == 2
    assert want in capsys.readouterr().err
    assert not out.exists()


def test_a_resume_takes_its_input_however_it_is_spelled(tmp_path, monkeypatch, capsys):
    """config.yaml keeps the input as typed: './run/' or the absolute path was 'this run was made with ...'."""
    write_run(tmp_path / "run", ROWS)
    write_run(tmp_path / "other", ROWS)
    out = tmp_path / "big"
    monkeypatch.chdir(tmp_path)
    with FakeTeacher(reply=answers, models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, "run", out, "--limit", "1")) == 0
        assert main(respond_args(fake, "./run/", out, "--limit", "2")) == 0, capsys.readouterr().err
        assert main(respond_args(fake, str((tmp_path / "run").resolve()), out, "--limit", "3")) == 0, capsys.readouterr().err
        assert main(respond_args(fake, "other", out, "--limit", "4")) == 2  # another input is still refused
    assert "field 'source'" in capsys.readouterr().err
    assert len(lines(out / "kept.jsonl")) + len(lines(out / "rejected.jsonl")) == 3


def test_windows_line_endings_in_a_row_are_newlines_and_a_control_character_is_never_kept(tmp_path, monkeypatch):
    """A row's CR LF (a dataset saved by a Windows tool) was sent as it was, and its input then rejected as
    'control_characters: the input holds U+000D' after the teacher had answered; the same in the instruction
    was kept. CR LF is a newline, as in a teacher's reply; an ESC in the instruction is rejected, as in the input."""
    rows = [{"instruction": "Summarize the notes below in one sentence.", "input": "line one\r\nline two\r\n",
             "output": "old"},
            {"instruction": "Describe the lantern\r\nin two short sentences.", "input": "", "output": "old"},
            {"instruction": "Describe the meadow \x1b[2J in two sentences.", "input": "", "output": "old"}]
    data, out = rows_file(tmp_path, rows)
    with fresh_teacher(monkeypatch) as fake:
        assert main(respond_args(fake, data, out, "--concurrency", "1")) == 0
    assert not any("\r" in p for p in fake.prompts)
    kept = [KeptRecord.model_validate(o) for o in lines(out / "kept.jsonl")]
    assert [(r.instruction, r.instances[0].input) for r in kept] == [
        (rows[0]["instruction"], "line one\nline two\n"), ("Describe the lantern\nin two short sentences.", "")]
    (rej,) = [Rejected.model_validate(o) for o in lines(out / "rejected.jsonl")]
    assert rej.id == "r000003-0" and rej.reason == "control_characters: the instruction holds U+001B"


@pytest.mark.parametrize("n,said", [(1, "respond: 1 of 3 rows has a system prompt;"),
                                    (2, "respond: 2 of 3 rows have a system prompt;")])
def test_the_system_prompt_line_says_has_of_one_row(capsys, n, said):
    from selfinstruct.records import Previous
    from selfinstruct.respond import Row, say_system_prompts

    rows = [Row(instruction="Say hi.", input="", previous=Previous(source="d", id=f"row {i}", output=""),
                system="Be brief." if i < n else "") for i in range(3)]
    assert say_system_prompts(rows, "respond") == {"system_prompts_dropped": n}
    assert said in capsys.readouterr().err


def too_long(prompt: str) -> str | None:
    """FakeTeacher's ``refuse``: as vLLM refuses a prompt longer than its context (here: 1,500 characters)."""
    return "This model's maximum context length is 64 tokens" if len(prompt) > 1500 else None


@pytest.mark.parametrize("command", ["respond", "evolve"])
def test_a_row_the_teacher_refuses_as_sent_is_said_apart(tmp_path, monkeypatch, capsys, command):
    """A row too long for the teacher's context got a 400 at each rerun, said only as '1 failed prompt'
    and exit code 1: the end now says it is refused as sent, which a rerun sends as it is."""
    rows = [dict(ROWS[0]), {**ROWS[2], "input": "word " * 400}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    with FakeTeacher(reply=lambda n: "A new and better answer, in words.", models=("big-model",), refuse=too_long) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        args = [command, str(data), "--base-url", fake.base_url, "--model", "big-model", "--out", str(tmp_path / "out"),
                "--no-progress", "--concurrency", "1", *(["--rounds", "1"] if command == "evolve" else [])]
        assert main(args) == 1
    err = capsys.readouterr().err
    noun = "row" if command == "respond" else "record"
    assert (f"{command}: 1 {noun} refused as sent by the teacher (http_400 1: too long for its context?), "
            "which a rerun sends as it is") in err, err
    (failed,) = lines(tmp_path / "out" / "errors.jsonl")
    assert failed["index"] == 1 and failed["kind"] == "http_400"


@pytest.mark.parametrize("command", ["respond", "evolve"])
@pytest.mark.parametrize("name,kind", [("errors.jsonl", "folder"), ("errors.jsonl", "fifo"), ("kept.jsonl", "fifo"),
                                       ("responses.jsonl", "fifo"), ("config.yaml", "fifo"), ("stats.json", "fifo"),
                                       # found only when written, after the session's requests were spent
                                       ("data.json", "folder"), ("data.json", "fifo"),
                                       # refused after config.yaml was rewritten (a FIFO there is skipped and removed)
                                       ("session.json", "folder")])
def test_a_run_file_that_is_not_a_file_is_one_line_and_the_folder_untouched(tmp_path, monkeypatch, capsys, command,
                                                                           name, kind):
    """errors.jsonl made a folder was a traceback from the resume's repair (IsADirectoryError); a FIFO in
    place of a run file held the resume forever, its open waiting for a writer."""
    from conftest import snapshot

    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    out = tmp_path / "out"
    with FakeTeacher(reply=lambda n: f"A new and better answer, number {n}.", models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        args = respond_args(fake, data, out, *(["--rounds", "1"] if command == "evolve" else []))
        args[0] = command
        assert main(args) == 0
        (out / name).unlink(missing_ok=True)  # session.json is gone at a session's end
        (out / name).mkdir() if kind == "folder" else os.mkfifo(out / name)
        before, asked = snapshot(out), len(fake.prompts)
        capsys.readouterr()
        assert main(args) == 2
    err = capsys.readouterr().err
    said = "is a folder, not a file" if kind == "folder" else "is not a regular file"
    assert err.count("\n") == 1 and f"{out / name}: {said}" in err, err
    assert snapshot(out) == before and len(fake.prompts) == asked


@pytest.mark.parametrize("command", ["respond", "evolve"])
def test_failed_prompts_counts_the_rows_still_unanswered(tmp_path, monkeypatch, capsys, command):
    """A row that failed in one session and was answered in the next stayed 'failed prompts 1'
    (every line of errors.jsonl was counted), beside every row kept."""
    rows = [dict(ROWS[0]), {**ROWS[2], "input": "word " * 400}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "out"
    more = ["--rounds", "1"] if command == "evolve" else []
    with FakeTeacher(reply=lambda n: "A new and better answer, in words.", models=("big-model",), refuse=too_long) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main([command, str(data), "--base-url", fake.base_url, "--model", "big-model", "--out", str(out),
                     "--no-progress", *more]) == 1
    assert json.loads((out / "stats.json").read_text())["failed_units"] == 1
    with FakeTeacher(reply=lambda n: f"Instruction: {rows[1]['instruction']} Twice.\nInput: <noinput>"
                     if "#Given Task#" in fake.prompts[n] else f"A new and better answer, number {n}.",
                     models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main([command, str(data), "--base-url", fake.base_url, "--model", "big-model", "--out", str(out),
                     "--no-progress", *more]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["kept"] + stats["rejected"], stats["failed_units"], stats["errors"]) == (2, 0, {"http_400": 1})


@pytest.mark.parametrize("command", ["respond", "evolve"])
def test_failed_prompts_leaves_out_a_failed_row_since_rejected_unasked(tmp_path, monkeypatch, capsys, command):
    """A run made before rows holding a control character were rejected unasked had asked such a row,
    and a failure of every retry left its line in errors.jsonl. Rerun, the row is rejected unasked, so
    never answered: 'failed prompts 1' stayed beside every row decided."""
    rows = [dict(ROWS[0]), {**ROWS[2], "instruction": "Describe the violin \x07 in two sentences."}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "out"
    more = ["--rounds", "1"] if command == "evolve" else []
    args = [command, str(data), "--model", "big-model", "--out", str(out), "--no-progress", *more]
    with FakeTeacher(reply=lambda n: f"Instruction: {rows[0]['instruction']} Twice.\nInput: <noinput>"
                     if "#Given Task#" in fake.prompts[n] else f"A new and better answer, number {n}.",
                     models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main([*args, "--base-url", fake.base_url]) == 0
        # The old code's line for row 1 (evolve: of round 1), as ask_all writes it.
        failure = {"index": 1, **({"round": 1} if command == "evolve" else {}), "kind": "connection",
                   "message": "connection: dropped", "at": "2025-01-01T00:00:00Z"}
        with open(out / "errors.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(failure) + "\n")
        capsys.readouterr()
        assert main([*args, "--base-url", fake.base_url]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["kept"] + stats["rejected"], stats["failed_units"]) == (2, 0)
    assert stats["errors"] == {"connection": 1}  # errors.jsonl keeps the failure itself
    assert re.search(r"failed prompts\W+0\b", capsys.readouterr().err)  # the closing table


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
def test_a_filtering_commands_output_folder_names_its_kept_jsonl(tmp_path, monkeypatch, capsys, command):
    """dedup's and decontaminate's --out is a folder of three files; given whole it was 'not a run
    folder ... nor a saved Hugging Face dataset', which left the user to guess what to give."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    dd = tmp_path / "dd"
    more = ["--against", str(tmp_path / "bench.json")] if command == "decontaminate" else []
    (tmp_path / "bench.json").write_text(json.dumps([{"instruction": "Name a planet.", "input": "", "output": "Mars."}]))
    assert main([command, str(data), "--out", str(dd), *more]) == 0
    capsys.readouterr()
    with FakeTeacher(reply=lambda n: "A new answer.", models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, dd, tmp_path / "out")) == 2
        assert fake.prompts == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{dd}: is a {command} output folder, not a dataset; give {dd / 'kept.jsonl'} (the records it kept)" in err
    assert not (tmp_path / "out").exists()


def test_a_row_holding_a_control_character_is_rejected_without_asking_the_teacher(tmp_path, monkeypatch, capsys):
    """A BEL in a row's own instruction (or its input) was sent to the teacher, and the answer then
    rejected for the row's character: a request spent on a row no answer could make keepable. It is
    rejected as before (stage, reason, the row's input), with no request; a rerun asks nothing, and
    one whose input no longer holds the rejected row is refused as for an answered row."""
    from conftest import snapshot

    rows = [{"instruction": "Describe the lantern in two sentences.", "input": "", "output": "old"},
            {"instruction": "Describe the meadow \x07 in two sentences.", "input": "", "output": "old"},
            {"instruction": "Describe the violin in two sentences.", "input": "a bell \x07 rings", "output": "old"},
            {"instruction": "Describe the glacier in two sentences.", "input": "", "output": "old"}]
    data, out = rows_file(tmp_path, rows)
    with fresh_teacher(monkeypatch) as fake:
        assert main(respond_args(fake, data, out, "--concurrency", "1")) == 0
        assert fake.prompts == [rows[0]["instruction"], rows[3]["instruction"]]  # the two clean rows only
        rejected = [Rejected.model_validate(o) for o in lines(out / "rejected.jsonl")]
        assert [(r.id, r.stage, r.reason) for r in rejected] == [
            ("r000002-0", "filter", "control_characters: the instruction holds U+0007"),
            ("r000003-0", "filter", "control_characters: the input holds U+0007")]
        assert [(r.instruction, r.instances[0].input, r.raw) for r in rejected] == [
            (rows[1]["instruction"], "", ""), (rows[2]["instruction"], "a bell \x07 rings", "")]
        prov = rejected[1].provenance
        assert prov.mode == "respond" and prov.previous.id == "row 3" and prov.response_id == ""  # no reply
        assert prov.usage.prompt_tokens == prov.usage.completion_tokens == 0
        stats = json.loads((out / "stats.json").read_text())
        assert (stats["kept"], stats["rejected"], stats["responses"]) == (2, 2, 2)
        assert stats["rejected_by_reason"] == {"control_characters": 2}
        # A rerun: nothing asked, nothing written twice.
        assert main(respond_args(fake, data, out)) == 0
        assert len(fake.prompts) == 2 and len(lines(out / "rejected.jsonl")) == 2
        # The rejected row mended in the input: refused, one line, the folder as it was.
        before = snapshot(out)
        capsys.readouterr()
        data.write_text(json.dumps([rows[0], {**rows[1], "instruction": "Describe the meadow in two sentences."},
                                    *rows[2:]]))
        assert main(respond_args(fake, data, out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "r000002-0 rejects a row that" in err, err
        assert snapshot(out) == before and len(fake.prompts) == 2


def test_a_rerun_that_leaves_out_the_runs_options_goes_on_with_them(tmp_path, monkeypatch, capsys):
    """A run made with --temperature 0.3 (or --top-p, --max-tokens, --stop, --teacher-seed) and rerun
    without them was refused naming the default: "field 'temperature': this run was made with 0.3,
    not 0.7", a value the user never typed. Left out, each is the run's own (config.yaml), as in
    generate, and every request is sent with it; given with another value, it is still refused."""
    data, out = rows_file(tmp_path, ROWS)
    own = ["--temperature", "0.3", "--top-p", "0.5", "--max-tokens", "64", "--stop", "###", "--teacher-seed", "7"]
    with fresh_teacher(monkeypatch) as fake:
        assert main(respond_args(fake, data, out, *own, "--limit", "2")) == 0
        made = yaml.safe_load((out / "config.yaml").read_text())
        capsys.readouterr()
        assert main(["respond", str(data), "--out", str(out), "--no-progress", "--limit", "4"]) == 0, \
            capsys.readouterr().err
        assert len(fake.prompts) == 4 and len(lines(out / "kept.jsonl")) == 4
        assert yaml.safe_load((out / "config.yaml").read_text()) == {**made, "limit": 4}
        sent = {(b["temperature"], b["top_p"], b["max_tokens"], tuple(b["stop"]), b["seed"] is not None)
                for b in fake.bodies}
        assert sent == {(0.3, 0.5, 64, ("###",), True)}
        capsys.readouterr()
        for flag, value, was in (("--temperature", "0.9", "0.3"), ("--max-tokens", "128", "64")):
            assert main(respond_args(fake, data, out, flag, value)) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"this run was made with {was}, not {value}" in err, err
        assert len(fake.prompts) == 4


def test_a_rerun_of_a_vllm_run_without_its_teacher_options_uses_the_runs_own(tmp_path, monkeypatch, capsys):
    """A --teacher vllm --model M run rerun without them was refused ("field 'teacher': this run was
    made with 'vllm', not None"); with --teacher vllm alone it was '--teacher vllm needs --model'.
    Left out, the teacher, its model and its flags after -- are the run's own."""
    import types

    from selfinstruct import servers

    started = []
    with FakeTeacher(reply=lambda n: f"A fresh answer, number {n}.", models=("M",)) as fake:
        @contextlib.contextmanager
        def vllm(model, **kwargs):
            started.append((model, kwargs["extra_args"]))
            yield types.SimpleNamespace(base_url=fake.base_url, api_key=fake.key, model=model)

        monkeypatch.setattr(servers, "vllm_server", vllm)
        monkeypatch.setenv("SELFINSTRUCT_VLLM_BIN", str(fake_vllm_bin(tmp_path)))  # looked for before the folder is made
        data, out = rows_file(tmp_path, ROWS)
        assert main(["respond", str(data), "--teacher", "vllm", "--model", "M", "--out", str(out), "--no-progress",
                     "--limit", "1", "--", "--max-num-seqs", "4"]) == 0
        capsys.readouterr()
        assert main(["respond", str(data), "--out", str(out), "--no-progress", "--limit", "2"]) == 0, \
            capsys.readouterr().err
        assert main(["respond", str(data), "--teacher", "vllm", "--out", str(out), "--no-progress", "--limit", "4"]) == 0, \
            capsys.readouterr().err
    assert started == [("M", ["--max-num-seqs", "4"])] * 3
    assert len(fake.prompts) == 4 and len(lines(out / "kept.jsonl")) == 4


def test_a_row_whose_input_ends_with_a_colon_is_rejected_without_asking_the_teacher(tmp_path, monkeypatch):
    """A row whose input ends with ':' ("Translate this:") was asked, and its answer, whatever it said,
    then rejected as ends_with_colon: a request for nothing. It is rejected before it is asked, with the
    same stage and reason; a row that holds a control character too is rejected for it, as it was."""
    rows = [{"instruction": "Describe the lantern in two sentences.", "input": "", "output": "old"},
            {"instruction": "Translate the sentence into French.", "input": "The sentence is:", "output": "old"},
            {"instruction": "Fill in the blank.", "input": "Paris is the capital of:  \n", "output": "old"},
            {"instruction": "Describe the meadow \x07 in two sentences.", "input": "Words:", "output": "old"},
            {"instruction": "Name the colour below.", "input": "The colour: blue", "output": "old"}]
    data, out = rows_file(tmp_path, rows)
    with fresh_teacher(monkeypatch) as fake:
        assert main(respond_args(fake, data, out, "--concurrency", "1")) == 0
        assert fake.prompts == [user_text(r["instruction"], r["input"]) for r in (rows[0], rows[4])]
        rejected = [Rejected.model_validate(o) for o in lines(out / "rejected.jsonl")]
        colon = "ends_with_colon: input ends with a colon"
        assert [(r.id, r.stage, r.reason, r.raw, r.provenance.response_id) for r in rejected] == [
            ("r000002-0", "filter", colon, "", ""), ("r000003-0", "filter", colon, "", ""),
            ("r000004-0", "filter", "control_characters: the instruction holds U+0007", "", "")]
        assert [r.instances[0].input for r in rejected] == [r["input"] for r in rows[1:4]]
        assert main(respond_args(fake, data, out)) == 0  # a rerun asks nothing
        assert len(fake.prompts) == 2 and len(lines(out / "rejected.jsonl")) == 3


def test_a_colon_before_a_zero_width_character_is_seen_before_the_row_is_asked(tmp_path, monkeypatch):
    """'The sentence is:' and a zero-width space (or a BOM, a word joiner) after it: str.strip keeps those,
    so the row was asked and its answer then rejected for the colon; it is rejected unasked, as without them.
    An input of only zero-width characters ends with no colon, and is asked as no input: it was sent after
    the instruction and kept as the record's input."""
    rows = [{"instruction": "Translate the sentence into French.", "input": f"The sentence is:{tail}", "output": "old"}
            for tail in ("\u200b", " \ufeff\n", "\u2060\u00a0")]
    rows.append({"instruction": "Name the colour of the sky.", "input": "\u200b", "output": "old"})
    data, out = rows_file(tmp_path, rows)
    with fresh_teacher(monkeypatch) as fake:
        assert main(respond_args(fake, data, out, "--concurrency", "1")) == 0
        assert fake.prompts == [rows[3]["instruction"]]
    (kept,) = lines(out / "kept.jsonl")
    assert kept["instances"][0]["input"] == ""
    rejected = [Rejected.model_validate(o) for o in lines(out / "rejected.jsonl")]
    assert [(r.id, r.reason, r.provenance.response_id) for r in rejected] == [
        (f"r00000{k}-0", "ends_with_colon: input ends with a colon", "") for k in (1, 2, 3)]


@pytest.mark.parametrize("last_row", ["ends with a colon", "holds a control character"])
def test_a_limit_below_a_row_rejected_unasked_says_it_was_rejected_not_answered(tmp_path, monkeypatch, capsys, last_row):
    """A --limit below a row rejected before it was asked (its input ends with ':', or it holds a
    control character) said "this run has answered row 2 already", of a row no one answered. It
    says the row was rejected without asking it; one line, the folder as it was."""
    from conftest import snapshot

    last = ({"instruction": "Translate the sentence into French.", "input": "The sentence is:", "output": "old"}
            if last_row == "ends with a colon" else
            {"instruction": "Describe the meadow \x07 in two sentences.", "input": "", "output": "old"})
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Describe the lantern in two sentences.", "input": "", "output": "old"},
                                last]))
    out = tmp_path / "a"
    with fresh_teacher(monkeypatch) as fake:
        assert main(respond_args(fake, data, out)) == 0
        assert len(fake.prompts) == 1  # the second row was never asked
        before = snapshot(out)
        capsys.readouterr()
        assert main(respond_args(fake, data, out, "--limit", "1")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "answered" not in err, err
        assert ("--limit 1: this run has rejected (without asking it) row 2 already; --limit may grow on resume, "
                "not shrink: give --limit 2 or more\n") in err, err  # 2 rows: no '(or --limit 2 for every row)'
        assert snapshot(out) == before and len(fake.prompts) == 1
        # From a --config file, its field is named: '--limit 1' named a flag the user never typed.
        (tmp_path / "c.yaml").write_text("limit: 1\n")
        assert main(respond_args(fake, data, out, "--config", str(tmp_path / "c.yaml"))) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--limit" not in err, err
        assert (f"{tmp_path / 'c.yaml'}: limit: 1, but this run has rejected (without asking it) row 2 "
                "already; limit may grow on resume, not shrink: give limit: 2 or more") in err, err
        assert snapshot(out) == before and len(fake.prompts) == 1


@pytest.mark.parametrize("command", ["respond", "evolve"])
@pytest.mark.parametrize("case", ["model", "teacher_model", "teacher"])
def test_a_config_files_teacher_options_are_named_by_the_file_and_its_keys(tmp_path, monkeypatch, capsys, command,
                                                                          case):
    """As generate names them: a --config file's model, teacher_model or teacher was named '--model',
    '--teacher-model', '--teacher', flags the user never typed. The file and its keys are named; the
    same options as flags are named as flags. One line, nothing started, no folder made."""
    no_teacher_starts(monkeypatch)
    server = ["--base-url", "http://127.0.0.1:9/v1", "--model", "big"]
    options, flags, keyed, flagged = {
        "model": ({"model": "big"}, ["--model", "big"],
                  "model: 'big' names the model of a --base-url server or of --teacher vllm; the embedded teacher "
                  "serves its own (--teacher-model FILE.gguf for another): give --base-url (or --teacher vllm), or "
                  "leave model out", "--model 'big' names the model"),
        "teacher_model": ({"teacher_model": "other.gguf"}, ["--teacher-model", "other.gguf", *server],
                          "teacher_model applies to --teacher embedded (no --base-url), not this run's teacher "
                          "(openai); leave it out", "--teacher-model applies to --teacher embedded"),
        "teacher": ({"teacher": "vllm", "base_url": "http://127.0.0.1:9/v1", "model": "big"}, ["--teacher", "vllm", *server],
                    "teacher: vllm starts its own teacher, so base_url does not apply; give base_url alone (or with "
                    "teacher: openai) to use that server", "--teacher vllm starts its own teacher, so --base-url"),
    }[case]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items()))
    out = tmp_path / "run"
    more = ["--config", str(cfg)] + (server if case == "teacher_model" else [])
    assert main([command, str(data), *more, "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"selfinstruct {command}: error: {cfg}: {keyed}\n"
    assert main([command, str(data), *flags, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{cfg}" not in err and flagged in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", ["respond", "evolve"])
@pytest.mark.parametrize("case", ["missing gguf", "gguf a folder", "missing vllm", "missing local model"])
def test_a_teacher_whose_files_are_not_there_is_one_line_and_no_folder(tmp_path, monkeypatch, capsys, command, case):
    """As in generate: a --teacher-model that is not a file, a --vllm-bin that is not there, or a local
    --model that is not there was said in one line, but only once the teacher started, after the run
    folder was made: it was left behind with its marker, lock, config.yaml and session.json."""
    no_teacher_starts(monkeypatch)
    monkeypatch.setenv("SELFINSTRUCT_VLLM_BIN", str(fake_vllm_bin(tmp_path)))
    flags, want = {
        "missing gguf": (["--teacher-model", str(tmp_path / "nope.gguf")], "teacher model file not found"),
        "gguf a folder": (["--teacher-model", str(tmp_path)], "a folder, not a GGUF file"),
        "missing vllm": (["--teacher", "vllm", "--model", "M", "--vllm-bin", str(tmp_path / "nonexistent")],
                         "not an executable vllm"),
        "missing local model": (["--teacher", "vllm", "--model", "./missing/model"], "model folder not found"),
    }[case]
    data, out = rows_file(tmp_path, ROWS)
    assert main([command, str(data), *flags, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and want in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", ["respond", "evolve"])
def test_a_rerun_without_limit_keeps_the_runs_own_limit(tmp_path, monkeypatch, capsys, command):
    """A `--limit 2` trial of 4 rows rerun without --limit answered all 4 (config.yaml: limit null):
    a resumed trial sent the whole dataset to a paid teacher. Left out, the limit is the run's own, as
    every option left out is (evolve's already was); respond's grows when a larger one is given,
    evolve's cannot change."""
    data, out = rows_file(tmp_path, ROWS)
    more = ["--rounds", "1"] if command == "evolve" else []
    with fresh_teacher(monkeypatch) as fake:
        args = [command, str(data), "--base-url", fake.base_url, "--model", "big-model", "--out", str(out),
                "--no-progress", *more]
        assert main([*args, "--limit", "2"]) == 0
        asked, decided = len(fake.prompts), len(lines(out / "kept.jsonl")) + len(lines(out / "rejected.jsonl"))
        assert decided == 2
        capsys.readouterr()
        assert main([command, str(data), "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
        assert len(fake.prompts) == asked
        assert len(lines(out / "kept.jsonl")) + len(lines(out / "rejected.jsonl")) == decided
        assert yaml.safe_load((out / "config.yaml").read_text())["limit"] == 2
        assert json.loads((out / "stats.json").read_text())["rows"] == 2
        if command == "respond":
            assert main([command, str(data), "--out", str(out), "--no-progress", "--limit", "3"]) == 0
            assert len(fake.prompts) == 3 and yaml.safe_load((out / "config.yaml").read_text())["limit"] == 3
            assert len(lines(out / "kept.jsonl")) == 3
        else:
            assert main([command, str(data), "--out", str(out), "--no-progress", "--limit", "3"]) == 2
            assert "--limit: this run was made with 2, not 3" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["respond", "evolve"])
def test_a_resumed_run_whose_teacher_file_is_gone_is_one_line_and_the_folder_as_it_was(tmp_path, monkeypatch,
                                                                                      capsys, command):
    """A run of an embedded teacher on --teacher-model FILE.gguf, resumed after the file was moved: one
    line before the folder is touched (session.json, config.yaml, stats.json as they were)."""
    from conftest import snapshot

    data, out, more, gguf = embedded_run_parts(tmp_path, command)
    with fresh_teacher(monkeypatch) as fake:
        fake_embedded_teacher(monkeypatch, fake, looks_for_the_file=True)
        assert main([command, str(data), "--teacher-model", str(gguf), "--out", str(out), "--no-progress",
                     "--limit", "2", *more]) == 0
        before, asked = snapshot(out), len(fake.prompts)
        capsys.readouterr()
        gguf.unlink()
        assert main([command, str(data), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{gguf}: teacher model file not found" in err, err
        assert snapshot(out) == before and len(fake.prompts) == asked


@pytest.mark.parametrize("command", ["generate", "respond", "evolve"])
@pytest.mark.parametrize("options, keyed, flags, flagged", [
    ({"base_url": "http://127.0.0.1:1/v1"}, "base_url needs model (the model name the server serves)",
     ["--base-url", "http://127.0.0.1:1/v1"], "--base-url needs --model (the model name the server serves)"),
    ({"teacher": "vllm"}, "teacher: vllm needs model (a hub id or a local folder)",
     ["--teacher", "vllm"], "--teacher vllm needs --model (a hub id or a local folder)"),
    ({"teacher": "openai"}, "teacher: openai needs base_url", ["--teacher", "openai"], "--teacher openai needs --base-url"),
], ids=["base_url", "vllm", "openai"])
def test_a_config_files_teacher_without_its_model_is_named_by_the_file_and_its_keys(tmp_path, monkeypatch, capsys,
                                                                                   command, options, keyed, flags,
                                                                                   flagged):
    """A --config file's base_url or teacher without its model was refused as '--base-url needs --model'
    or '--teacher vllm needs --model', flags the user never typed: the file and its keys are named,
    the same options as flags as flags. One line, nothing started, no folder made (--teacher openai
    without --base-url is refused before the folder too, as in generate). One helper for the three
    commands (generate.refuse_a_teacher_without_its_model)."""
    from selfinstruct import servers

    no_teacher_starts(monkeypatch)
    monkeypatch.setattr(servers, "find_vllm_bin", lambda *a: "vllm")  # no vllm here: the model is what is missing
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items()))
    out = tmp_path / "run"
    source = [] if command == "generate" else [str(data)]
    assert main([command, *source, "--config", str(cfg), "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"selfinstruct {command}: error: {cfg}: {keyed}\n"
    assert main([command, *source, *flags, "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"selfinstruct {command}: error: {flagged}\n"
    assert not out.exists()


@pytest.mark.parametrize("command", ["respond", "evolve"])
def test_an_empty_stop_is_not_sent(tmp_path, monkeypatch, command):
    """`--stop ''` was sent to the teacher as [""] by respond and evolve (llama.cpp, respond's default
    teacher, stops at once on it: every answer one token long); generate drops it, and so do they now,
    keeping the others."""
    data, out = rows_file(tmp_path, ROWS)
    more = ["--rounds", "1"] if command == "evolve" else []
    with fresh_teacher(monkeypatch) as fake:
        assert main([command, str(data), "--base-url", fake.base_url, "--model", "big-model", "--out", str(out),
                     "--no-progress", "--limit", "1", "--stop", "", "###", *more]) == 0
    sent = [b["stop"] for b in fake.bodies if "messages" in b or "prompt" in b]
    assert sent and all(s == ["###"] for s in sent), sent


@pytest.mark.parametrize("command", ["respond", "evolve", "generate"])
def test_a_server_that_fails_its_check_writes_nothing_and_the_first_command_still_resumes(tmp_path, monkeypatch,
                                                                                        capsys, command):
    """A resume naming a server that does not serve the run's model (or a typo'd URL) saved that
    server in config.yaml and a session, and then the run's own command failed the same way; a
    first command that failed the check left a run folder behind. The check comes first now."""
    from conftest import snapshot

    data, out = rows_file(tmp_path, ROWS)
    first = {"generate": ["generate", "--num", "2", "--tasks-per-request", "2", "--concurrency", "1"],
             "respond": ["respond", str(data), "--limit", "2"],
             "evolve": ["evolve", str(data), "--limit", "2", "--rounds", "1"]}[command]
    again = ["--num", "3"] if command == "generate" else ["--limit", "3"] if command == "respond" else []
    with fresh_teacher(monkeypatch) as fake, FakeTeacher(models=("other-model",)) as other:
        if command == "generate":
            from conftest import diverse_tasks

            fake.reply = diverse_tasks
        other.key = fake.key
        args = [*first, "--out", str(out), "--no-progress"]
        assert main([*args, "--base-url", fake.base_url, "--model", "big-model"]) == 0, capsys.readouterr().err
        before = snapshot(out)
        capsys.readouterr()
        for url in (other.base_url, "http://127.0.0.1:9/v1"):
            assert main([*args, *again, "--base-url", url]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"the teacher at {url} " in err, err
            assert snapshot(out) == before  # config.yaml, stats.json and session.json as they were
        assert main(args) == 0, capsys.readouterr().err  # the run's own server, from its config.yaml
        new = tmp_path / "new"
        assert main([*first, "--out", str(new), "--no-progress", "--base-url", other.base_url,
                     "--model", "big-model"]) == 2
        assert not new.exists()


@pytest.mark.parametrize("command", ["respond", "evolve", "generate"])
def test_the_runs_own_teacher_named_resumes_and_another_is_refused_before_its_needs(tmp_path, monkeypatch, capsys,
                                                                                   command):
    """A run made with --base-url (the teacher left out: null in config.yaml), resumed with
    --teacher openai, was refused: "this run was made with None, not 'openai'"; the teachers are
    compared, not the key. Switching it to --teacher vllm said '--teacher vllm needs --model' (or
    that vLLM is not there), and whoever followed that advice was refused on 'teacher': the change
    of teacher is said first, naming both teachers."""
    import yaml

    data, out = rows_file(tmp_path, ROWS)
    first = {"generate": ["generate", "--num", "2", "--tasks-per-request", "2", "--concurrency", "1"],
             "respond": ["respond", str(data), "--limit", "2"],
             "evolve": ["evolve", str(data), "--limit", "2", "--rounds", "1"]}[command]
    args = [*first, "--out", str(out), "--no-progress"]
    with fresh_teacher(monkeypatch) as fake:
        if command == "generate":
            from conftest import diverse_tasks

            fake.reply = diverse_tasks
        assert main([*args, "--base-url", fake.base_url, "--model", "big-model"]) == 0, capsys.readouterr().err
        assert yaml.safe_load((out / "config.yaml").read_text())["teacher"] is None
        capsys.readouterr()
        assert main([*args, "--teacher", "openai"]) == 0, capsys.readouterr().err
        capsys.readouterr()
        for more in (["--teacher", "vllm"], ["--teacher", "vllm", "--model", "M"], ["--teacher", "embedded"]):
            assert main([*args, *more]) == 2
            err = capsys.readouterr().err
            # named as given: the flag, not the run's config.yaml
            assert err.count("\n") == 1 and f"--teacher: this run was made with 'openai', not '{more[1]}'" in err, err


@pytest.mark.parametrize("command", ["respond", "evolve"])
def test_a_changed_option_is_refused_naming_where_the_user_gave_it(tmp_path, monkeypatch, capsys, command):
    """A resume whose option differs from the run's named the run's config.yaml, which the user never
    edited, for a value from their --config file or a flag: the line names the --config file and its
    key, or the flag, and says to leave it out (generate's words). The folder is left as it was, and
    the corrected command resumes."""
    from conftest import snapshot

    data, out = rows_file(tmp_path, ROWS)
    mine = tmp_path / "my.yaml"
    with fresh_teacher(monkeypatch) as fake:
        args = respond_args(fake, data, out, "--limit", "2", *(["--rounds", "1"] if command == "evolve" else []))
        args[0] = command
        assert main(args) == 0, capsys.readouterr().err
        before, asked = snapshot(out), len(fake.prompts)
        capsys.readouterr()
        for text, more, said in (
                ("temperature: 0.2\n", [], f"{mine}: field 'temperature': this run was made with 0.7, not 0.2; use a "
                 "new --out folder, or leave temperature out of this file to resume with the run's own"),
                ("teacher: embedded\n", [], f"{mine}: field 'teacher': this run was made with 'openai', not 'embedded'; "
                 "use a new --out folder, or leave teacher out of this file to resume with the run's own"),
                ("temperature: 0.2\n", ["--temperature", "0.3"], "--temperature: this run was made with 0.7, not 0.3; "
                 "use a new --out folder, or leave --temperature out to resume with the run's own"),
                ("timeout: 30\n", ["--teacher", "embedded"], "--teacher: this run was made with 'openai', not 'embedded'; "
                 "use a new --out folder, or leave --teacher out to resume with the run's own")):
            mine.write_text(text)
            assert main([*args, "--config", str(mine), *more]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.endswith(f"error: {said}\n"), err
        assert snapshot(out) == before and len(fake.prompts) == asked
        # The corrected command (the file's key left out) resumes.
        mine.write_text("timeout: 30\n")
        assert main([*args, "--config", str(mine)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("command", ["respond", "evolve"])
def test_an_embedded_run_resumes_with_teacher_embedded_named(tmp_path, monkeypatch, capsys, command):
    """A run of the embedded teacher (no --teacher, no --base-url: null in config.yaml) resumed with
    --teacher embedded was refused: "this run was made with None, not 'embedded'"."""
    data, out, more, gguf = embedded_run_parts(tmp_path, command)
    with fresh_teacher(monkeypatch) as fake:
        fake_embedded_teacher(monkeypatch, fake)
        args = [command, str(data), "--teacher-model", str(gguf), "--out", str(out), "--no-progress", *more]
        assert main([*args, "--limit", "2"]) == 0
        capsys.readouterr()
        assert main([*args, "--teacher", "embedded"]) == 0, capsys.readouterr().err
        assert len(lines(out / "kept.jsonl")) + len(lines(out / "rejected.jsonl")) >= 2


def test_one_stop_string_in_a_config_file_is_that_one_item(tmp_path):
    """`stop: "###"` in a --config file was refused as "not a valid list": it is `--stop '###'`'s list."""
    import argparse

    from selfinstruct.config import resolve
    from selfinstruct.respond import RespondOptions, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = tmp_path / "c.yaml"
    config.write_text('stop: "###"\n')
    cfg = resolve(RespondOptions, parser.parse_args(["src", "--out", "r", "--config", str(config)]))
    assert cfg.stop == resolve(RespondOptions, parser.parse_args(["src", "--out", "r", "--stop", "###"])).stop == ["###"]


@pytest.mark.parametrize("command", ["respond", "evolve"])
def test_a_resume_that_leaves_out_vllm_bin_uses_the_runs_own(tmp_path, monkeypatch, capsys, command):
    """As in generate: a `--teacher vllm --vllm-bin PATH` run resumed without --vllm-bin looked for
    vllm on PATH ('vLLM not found', or another version). Left out, it is the run's own."""
    import types

    from selfinstruct import servers

    monkeypatch.delenv("SELFINSTRUCT_VLLM_BIN", raising=False)
    vllm_bin = str(fake_vllm_bin(tmp_path))
    data, out = rows_file(tmp_path, ROWS)
    more = ["--rounds", "1"] if command == "evolve" else []
    started = []
    with fresh_teacher(monkeypatch) as fake:
        @contextlib.contextmanager
        def vllm_server(model, vllm_bin=None, **kwargs):
            started.append(vllm_bin)
            yield types.SimpleNamespace(base_url=fake.base_url, api_key=fake.key, model=model)

        monkeypatch.setattr(servers, "vllm_server", vllm_server)
        assert main([command, str(data), "--teacher", "vllm", "--model", "big-model", "--vllm-bin", vllm_bin,
                     "--out", str(out), "--no-progress", "--limit", "1", *more]) == 0, capsys.readouterr().err
        assert main([command, str(data), "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert started == [vllm_bin, vllm_bin]
    assert yaml.safe_load((out / "config.yaml").read_text())["vllm_bin"] == vllm_bin


@pytest.mark.parametrize("command", ["respond", "evolve"])
@pytest.mark.parametrize("given", ["flags", "config"])
def test_more_senders_than_requests_in_flight_is_one_line_naming_both(tmp_path, capsys, command, given):
    """As in generate: --client-processes 9 at --concurrency 4 on one server started 4 senders while
    config.yaml said 9. One line, each option named as given, before any folder."""
    server = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    data, out = rows_file(tmp_path, ROWS)
    config = tmp_path / "c.yaml"
    config.write_text("client_processes: 9\nconcurrency: 4\n")
    options = ["--config", str(config)] if given == "config" else ["--client-processes", "9", "--concurrency", "4"]
    assert main([command, str(data), *server, "--out", str(out), *options]) == 2
    said = (f"{config}: client_processes: 9 must be at most concurrency: 4" if given == "config"
            else "--client-processes 9 must be at most --concurrency 4")
    assert capsys.readouterr().err == (f"selfinstruct {command}: error: {said} (the requests in flight per server, "
                                       "on 1 server: 5 senders would never have a request to send)\n")
    assert not out.exists()


def test_a_config_key_set_to_null_is_the_default_not_an_option_given(tmp_path, monkeypatch, capsys):
    """`limit: null` and `teacher_seed: null` in a --config file say "the default": a resume keeps the
    run's own --limit 2 and --teacher-seed 5, as it does with the keys left out (null was taken as given:
    the run's limit dropped, or its seed refused as changed)."""
    data, out = rows_file(tmp_path, ROWS)
    with fresh_teacher(monkeypatch) as fake:
        assert main(respond_args(fake, data, out, "--limit", "2", "--teacher-seed", "5")) == 0
        assert len(fake.prompts) == 2
        cfg = tmp_path / "c.yaml"
        cfg.write_text("limit: null\nteacher_seed: null\n")
        capsys.readouterr()
        assert main(respond_args(fake, data, out, "--config", str(cfg))) == 0, capsys.readouterr().err
        assert len(fake.prompts) == 2  # nothing more asked: the run's first 2 rows are its whole
        saved = yaml.safe_load((out / "config.yaml").read_text())
        assert (saved["limit"], saved["teacher_seed"]) == (2, 5)


def test_row_ids_count_from_one_as_the_messages_do_and_an_older_run_keeps_its_own(tmp_path, monkeypatch, capsys):
    """The first row was `row 0` (id r000000-0) while every message counted rows from 1 (`this run has
    answered row 3 already` of r000002): a new run's ids count from 1. A run made when they counted
    from 0 (no row_ids_from in its config.yaml) resumes with its own ids, asking no row twice."""
    from selfinstruct import respond as respond_module

    data, out = rows_file(tmp_path, ROWS)
    with FakeTeacher(reply=lambda n: f"Fresh answer {n}.", models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, data, out, "--limit", "3")) == 0
        kept = [KeptRecord.model_validate(o) for o in lines(out / "kept.jsonl")]
        assert sorted((r.id, r.provenance.previous.id) for r in kept) == [
            ("r000001-0", "row 1"), ("r000002-0", "row 2"), ("r000003-0", "row 3")]
        capsys.readouterr()
        assert main(respond_args(fake, data, out, "--limit", "2")) == 2
        assert "this run has answered row 3 already" in capsys.readouterr().err  # r000003-0, "row 3"
        assert yaml.safe_load((out / "config.yaml").read_text())["row_ids_from"] == 1

        # An older run, as that version made it: ids from 0, and no row_ids_from saved.
        old = tmp_path / "old"
        with monkeypatch.context() as m:
            m.setattr(respond_module, "row_ids_from", lambda out: 0)
            assert main(respond_args(fake, data, old, "--limit", "2")) == 0
        cfg = yaml.safe_load((old / "config.yaml").read_text())
        del cfg["row_ids_from"]
        (old / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        asked = len(fake.prompts)
        assert main(respond_args(fake, data, old, "--limit", "4")) == 0
        assert len(fake.prompts) == asked + 2  # rows 3 and 4 only
    kept = [KeptRecord.model_validate(o) for o in lines(old / "kept.jsonl")]
    assert sorted((r.id, r.provenance.previous.id) for r in kept) == [
        ("r000000-0", "row 0"), ("r000001-0", "row 1"), ("r000002-0", "row 2"), ("r000003-0", "row 3")]
    assert yaml.safe_load((old / "config.yaml").read_text())["row_ids_from"] == 0


def test_questions_alone_are_answered_as_chats_or_alpaca_rows(tmp_path, monkeypatch, capsys):
    """Prompts to answer, in the shape chat datasets hold them (a user turn and no reply yet), were
    refused ("only a single user/assistant exchange fits alpaca (... has no reply)"), while an Alpaca row
    without an output was answered, and export said of both "answer it first". A conversation still
    multi-turn is refused as before."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": ROWS[0]["instruction"]}]},
        {"conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": ROWS[2]["instruction"]}]},
        {"instruction": ROWS[3]["instruction"]},
    ]) + "\n")
    with fresh_teacher(monkeypatch) as fake:
        assert main(respond_args(fake, data, tmp_path / "a")) == 0
        assert sorted(fake.prompts) == sorted(ROWS[i]["instruction"] for i in (0, 2, 3))
        kept = [KeptRecord.model_validate(o) for o in lines(tmp_path / "a" / "kept.jsonl")]
        assert sorted(r.provenance.previous.output for r in kept) == ["", "", ""]
        capsys.readouterr()
        chat = tmp_path / "chat.jsonl"
        chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi there."},
                                                 {"role": "assistant", "content": "Hello."},
                                                 {"role": "user", "content": "Tell me a joke."}]}) + "\n")
        assert main(respond_args(fake, chat, tmp_path / "b")) == 2
        assert "chat.jsonl:1: only a single user/assistant exchange" in capsys.readouterr().err
        assert not (tmp_path / "b").exists()


def test_an_answer_that_goes_on_past_its_turn_is_rejected_for_the_template_token(tmp_path, monkeypatch):
    """A server that does not stop at the end-of-turn token: respond kept the answer with
    '<|im_end|>\\n<|im_start|>assistant' and the next turn in it."""
    data, out = rows_file(tmp_path, ROWS[:2])
    replies = ["A lantern glows.<|im_end|>\n<|im_start|>assistant\nAnything else?", "Grass and flowers grow there."]
    with FakeTeacher(reply=lambda n: replies[n], models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, data, out, "--concurrency", "1")) == 0
    kept, rejected = (lines(out / name) for name in ("kept.jsonl", "rejected.jsonl"))
    assert [r["instances"][0]["output"] for r in kept] == [replies[1]]
    assert [(r["id"], r["stage"], r["reason"]) for r in rejected] == [
        ("r000001-0", "filter", "template_token: the output holds chat-template text '<|im_end|>' "
                                "(the teacher wrote past its turn)")]


def test_a_reasoning_models_thinking_is_taken_off_its_answer_and_a_tag_inside_it_rejected(tmp_path, monkeypatch):
    """A reasoning teacher served without a reasoning parser: its '<think>...</think>' was kept in the answer,
    then every such answer was rejected. The block that opens a reply is taken off, as vLLM's parser would
    (an R1 template's thinking, opened in the prompt, ends at a lone '</think>'); a tag inside an answer
    still rejects it."""
    rows = [{"instruction": f"Describe thing {i}.", "input": "", "output": ""} for i in range(3)]
    data, out = rows_file(tmp_path, rows)
    replies = ["<think>\nOkay, the user wants a lantern described.\n</think>\n\nA lantern glows.",
               "Okay, grass.\n</think>\n\nGrass grows there.", "The sea is wide. <think>Or is it?</think>"]
    with FakeTeacher(reply=lambda n: replies[n], models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, data, out, "--concurrency", "1")) == 0
    kept, rejected = (lines(out / name) for name in ("kept.jsonl", "rejected.jsonl"))
    assert [r["instances"][0]["output"] for r in kept] == ["A lantern glows.", "Grass grows there."]
    assert [(r["id"], r["reason"].split(" (")[0]) for r in rejected] == [
        ("r000003-0", "thinking: the output holds the teacher's '<think>'")]


def test_a_row_or_an_answer_holding_an_invisible_character_is_rejected_the_row_unasked(tmp_path, monkeypatch):
    """A bidi override or a zero-width space inside a row's instruction or input, or in the answer, was
    kept: the text shows otherwise than it is. A row holding one is rejected before it is asked (an answer
    to it is rejected for the row's own text), and an answer holding one is rejected; one at an end of the
    input is looked past, as the colon check looks past it."""
    rows = [{"instruction": "Describe the lantern in two sentences.", "input": "", "output": "old"},
            {"instruction": "Translate the sentence into French.", "input": "Good\u200b day", "output": "old"},
            {"instruction": "Summarize the \u202egnirps paragraph.", "input": "", "output": "old"},
            {"instruction": "Translate the phrase into French.", "input": "Good night\u2060", "output": "old"}]
    data, out = rows_file(tmp_path, rows)
    answers = ["A lantern glows.", "Bonne nuit, \u2067mes amis\u2069."]
    with FakeTeacher(reply=lambda n: answers[n] if n < 2 else f"An answer, number {n}.", models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, data, out, "--concurrency", "1")) == 0
        assert fake.prompts == [user_text(r["instruction"], r["input"]) for r in (rows[0], rows[3])]
    kept, = [KeptRecord.model_validate(o) for o in lines(out / "kept.jsonl")]
    assert kept.id == "r000001-0"
    rejected = [Rejected.model_validate(o) for o in lines(out / "rejected.jsonl")]
    assert [(r.id, r.reason.split(" at ")[0], r.provenance.response_id != "") for r in sorted(rejected, key=lambda r: r.id)] == [
        ("r000002-0", "invisible_characters: the input holds U+200B (zero width space, which shows nothing)", False),
        ("r000003-0", "invisible_characters: the instruction holds U+202E (right-to-left override, a bidi control: "
                      "the text shows in another order than it is)", False),
        ("r000004-0", "invisible_characters: the output holds U+2067 (right-to-left isolate, a bidi control: "
                      "the text shows in another order than it is)", True)]


def test_a_server_that_never_gives_a_usable_reply_is_one_line_with_few_rows(tmp_path, monkeypatch, capsys):
    """Three rows at one retry each are six junk replies, under the twelve that stop a run: respond
    ended rc 1 with the stats table and no line saying the server gives nothing usable (as evolve did)."""
    data, out = rows_file(tmp_path, ROWS[:3])
    with NoChoicesTeacher(models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(respond_args(fake, data, out, "--max-retries", "1")) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1, captured.err
    assert err[0].startswith(f"selfinstruct respond: error: the teacher at {fake.base_url} gives no usable reply "
                             "(unusable): "), err[0]
    assert "none usable, the last: the reply has no choices" in err[0]
    assert len(lines(out / "errors.jsonl")) == 3 and json.loads((out / "stats.json").read_text())["sessions"] == 1
