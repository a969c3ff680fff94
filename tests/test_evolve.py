"""evolve: records rewritten harder each round, eliminated with the paper's reasons, provenance kept, resumable."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time

import pytest
import yaml

from selfinstruct.cli import main
from selfinstruct.evolve import OPERATIONS, choose_operation
from selfinstruct.export import user_text
from selfinstruct.records import KeptRecord, Rejected, Response

from conftest import VOCAB, Busy, FakeTeacher, NoChoicesTeacher, kill_when_lines, lines, write_run


def task(k: int) -> str:
    """An instruction far (in ROUGE-L) from every other one."""
    return "Describe " + " ".join(random.Random(k).sample(VOCAB, 8)) + "."


def rows(n: int, **special: int) -> list[dict]:
    """n Alpaca rows; ``special`` puts a trigger word (read by ``Script``) into row i's instruction."""
    out = [{"instruction": task(i), "input": "", "output": "old"} for i in range(n)]
    for word, i in special.items():
        out[i]["instruction"] = f"{word.capitalize()} " + out[i]["instruction"]
    return out


class Script:
    """A teacher whose reply depends only on the prompt, so a resumed run hears what a fresh one does.

    A rewrite prompt (it shows '#Given Task#') is answered with the instruction plus a few words
    drawn from the prompt's hash; an answer prompt with a sentence. Trigger words in an
    instruction make the teacher misbehave the way each elimination rule catches.
    """

    def __call__(self, prompt: str) -> str:
        m = re.search(r"^Instruction: (.*)$", prompt, re.MULTILINE)
        if "#Given Task#" in prompt and m:
            old = m.group(1)
            rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
            if old.startswith("Same "):
                return f"Instruction: {old}\nInput: <noinput>"
            if old.startswith("Leak "):
                return f"Instruction: #Rewritten Prompt#: {old} Also name a colour.\nInput: <noinput>"
            if old.startswith("Given "):  # the template's heading echoed as prose
                return f"Instruction: Given the task: {old} Also name a colour.\nInput: <noinput>"
            if old.startswith("Quoted "):  # the whole rewrite in typographic quotes
                return f"Instruction: \u201c{old} Also name a colour.\u201d\nInput: <noinput>"
            if old.startswith("Banned "):
                return f"Instruction: {old} Draw a picture of it.\nInput: <noinput>"
            if old.startswith("Tide "):  # the rewrite degenerates into one line over and over
                return f"Instruction: {old}\n" + "The tide goes out.\n" * 4 + "Input: <noinput>"
            if old.startswith("Chant "):  # ... or runs on in one line of a word over and over
                return f"Instruction: {old} " + "la " * 300 + "\nInput: <noinput>"
            if old.startswith("Loop "):  # ... or its input does
                return f"Instruction: {old} Also name a colour.\nInput: ###\n###\n\n###"
            if old.startswith("Twin "):  # every twin becomes the same new task: the second is a duplicate
                return "Instruction: Write a limerick about a lighthouse keeper who collects teapots.\nInput: <noinput>"
            return f"Instruction: {old} Also mention {' and '.join(rng.sample(VOCAB, 4))}.\nInput: <noinput>"
        if prompt.startswith("Refuse "):
            return "I'm sorry, but I cannot help with that request."
        if prompt.startswith("Short "):
            return "Forty two."
        if prompt.startswith("Dots "):
            return "... ?! the."
        if prompt.startswith("Hum "):  # the answer is one line of a word over and over
            return "hum " * 500
        if prompt.startswith("Hashes "):  # the answer is one block over and over (respond kept this)
            return "Step one.\nStep two.\n" * 2000
        if prompt.startswith("Echo "):  # the answer hands the question back
            return prompt
        return f"A thorough answer to: {prompt[:40]}"


def scripted(**kw) -> FakeTeacher:
    script = Script()
    fake = FakeTeacher(reply=lambda n: script(fake.prompts[n]), **kw)
    return fake


def evolve_args(fake, src, out, *more):
    return ["evolve", str(src), "--base-url", fake.base_url, "--model", "fake", "--out", str(out),
            "--no-progress", "--concurrency", "2", *more]


def records(out):
    kept = [KeptRecord.model_validate(o) for o in lines(out / "kept.jsonl")]
    rejected = [Rejected.model_validate(o) for o in lines(out / "rejected.jsonl")]
    return kept, rejected


def test_two_rounds_chain_and_every_record_says_its_ancestor_operation_and_round(tmp_path, monkeypatch):
    src = write_run(tmp_path / "run", rows(4))
    out = tmp_path / "evo"
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, out, "--rounds", "2")) == 0
    kept, rejected = records(out)
    assert rejected == []
    assert sorted(r.id for r in kept) == [f"e{r}-{i + 1:06d}-0" for r in (1, 2) for i in range(4)]
    by_id = {r.id: r for r in kept}
    for rec in kept:
        ev = rec.provenance.evolution
        assert rec.provenance.mode == "evolve" and ev.source == src
        assert ev.operation == choose_operation(0, ev.ancestor_id, ev.round)
        assert rec.provenance.prompt_template == f"evolve/{ev.operation}"
        if ev.round == 1:
            assert ev.ancestor_id == ev.root_id == f"resp-{int(rec.id[3:9]) - 1}-0"  # e1-000001: the first row
        else:  # round 2 evolves what round 1 kept: the chain leads back to the same input record
            parent = by_id[ev.ancestor_id]
            assert parent.provenance.evolution.round == 1 and ev.ancestor_instruction == parent.instruction
            assert ev.root_id == parent.provenance.evolution.root_id
            assert rec.instruction.startswith(parent.instruction)
    # Each record: one rewrite request, then its answer as a plain chat turn.
    responses = [Response.model_validate(o) for o in lines(out / "responses.jsonl")]
    assert len(responses) == 8 and all(len(r.replies) == 2 for r in responses)
    for rec in kept:
        assert user_text(rec.instruction, rec.instances[0].input) in fake.prompts
        assert rec.instances[0].output.startswith("A thorough answer")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["mode"] == "evolve" and stats["complete"] and (stats["kept"], stats["rejected"]) == (8, 0)
    assert {k: v["kept"] for k, v in stats["by_round"].items()} == {"1": 4, "2": 4}
    assert sum(v["kept"] for v in stats["by_operation"].values()) == 8
    assert len(json.loads((out / "data.json").read_text())) == 8
    # A run folder like any other: export reads it, and the card says where the instructions came from.
    assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "evolved by the teacher above for 2 rounds" in card and "| Seeds |" not in card
    assert "(Evol-Instruct)" in card.split("## How it was made")[0] and "from seed tasks" not in card
    # Run again with more rounds: the third is added, nothing done before is asked again.
    with scripted() as fake2:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake2.key)
        assert main(evolve_args(fake2, src, out, "--rounds", "3")) == 0
    assert len(fake2.prompts) == 8 and len(records(out)[0]) == 12


@pytest.mark.parametrize("trigger, stage, reason, asked", [
    ("same", "evolve", "no_new_information", 1),   # (1) no information gained over the ancestor
    ("refuse", "evolve", "refusal", 2),            # (2) the answer is a refusal
    ("short", "evolve", "answer_too_short", 2),    # (2) the answer is too short
    ("dots", "evolve", "empty_answer", 2),         # (2) the answer is only punctuation and stop words
    ("echo", "filter", "output_repeats_instruction", 2),  # the answer only repeats the evolved task
    ("leak", "evolve", "leaked_prompt", 1),        # (3) the rewrite copies the prompt's own words
    ("given", "evolve", "leaked_prompt", 1),       # (3) ... or its heading, as prose
    ("banned", "filter", "blacklisted_word", 1),   # generate's instruction filters
    ("tide", "parse", "degenerate", 1),            # magpie's rule: the rewritten instruction repeats a line
    ("loop", "parse", "degenerate", 1),            # ... or its input does
    ("hashes", "parse", "degenerate", 2),          # ... or the answer repeats a block
    ("chant", "parse", "degenerate", 1),           # ... or one line of the rewrite repeats a word
    ("hum", "parse", "degenerate", 2),             # ... or one line of the answer does
])
def test_each_elimination_rule_rejects_with_its_reason_and_the_record_stops_evolving(tmp_path, monkeypatch, trigger,
                                                                                      stage, reason, asked):
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(2, **{trigger: 1})))
    out = tmp_path / "evo"
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, out, "--rounds", "2")) == 0
    kept, rejected = records(out)
    (rej,) = rejected
    assert (rej.id, rej.stage, rej.reason.split(":")[0]) == ("e1-000002-0", stage, reason)
    ev = rej.provenance.evolution
    assert (ev.ancestor_id, ev.round, ev.operation) == ("row 2", 1, choose_operation(0, "row 2", 1))
    # A rewrite that fails its own checks is not answered; the log holds what was asked.
    (resp,) = [Response.model_validate(o) for o in lines(out / "responses.jsonl") if o["id"] == "e1-000002"]
    assert len(resp.replies) == asked
    # Eliminated records stop evolving: round 2 evolves row 0's line only.
    assert sorted(r.id for r in kept) == ["e1-000001-0", "e2-000001-0"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["by_round"]["1"] == {"kept": 1, "rejected": 1, "rejected_by_reason": {reason: 1}}


def test_a_rewrite_wrapped_in_quotes_is_kept_without_them(tmp_path, monkeypatch):
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(1, quoted=0)))
    out = tmp_path / "evo"
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, out, "--rounds", "1")) == 0
    (kept,), rejected = records(out)
    assert rejected == []
    assert kept.instruction == f"Quoted {task(0)} Also name a colour."


def test_an_evolution_that_duplicates_a_kept_one_is_rejected_by_rouge_l(tmp_path, monkeypatch):
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(3, twin=0) + [{"instruction": "Twin " + task(9), "input": "", "output": "o"}]))
    out = tmp_path / "evo"
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, out, "--rounds", "1")) == 0
    kept, rejected = records(out)
    (rej,) = rejected  # the later twin, whatever order the replies came in
    assert (rej.id, rej.stage, rej.reason.split(":")[0]) == ("e1-000004-0", "dedup", "duplicate")
    assert rej.nearest[0].id == "e1-000001-0" and rej.nearest[0].rouge_l == 1.0
    assert len(kept) == 3


def test_operation_choice_is_fixed_by_seed_round_and_id(tmp_path, monkeypatch):
    ids = [f"row {i}" for i in range(40)]
    first = [choose_operation(0, i, 1) for i in ids]
    assert first == [choose_operation(0, i, 1) for i in ids]  # the same every time
    assert set(first) == set(OPERATIONS)  # every operation gets used
    assert first != [choose_operation(1, i, 1) for i in ids] != [choose_operation(0, i, 2) for i in ids]
    assert {choose_operation(0, i, 1, ("deepen", "breadth")) for i in ids} == {"deepen", "breadth"}
    # The run uses exactly that choice, and the operation's own prompt.
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(6)))
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, tmp_path / "evo", "--rounds", "1", "--seed", "7")) == 0
    kept, _ = records(tmp_path / "evo")
    marks = {"add_constraints": "new constraint", "deepen": "more depth", "concretise": "more specific",
             "increase_reasoning": "steps of reasoning", "complicate_input": "input is richer", "breadth": "rarer"}
    for rec in kept:
        op = rec.provenance.evolution.operation
        assert op == choose_operation(7, rec.provenance.evolution.ancestor_id, 1)
        (prompt,) = [p for p in fake.prompts if f"Instruction: {rec.provenance.evolution.ancestor_instruction}\n" in p]
        assert marks[op] in prompt


@pytest.mark.parametrize("drop", ["$instruction", "$input"])
def test_a_template_of_your_own_without_a_placeholder_is_one_line(tmp_path, monkeypatch, capsys, drop):
    """As generate's --prompts: a deepen.txt that never shows the task (or its input) would have
    the teacher rewrite what it was not given. Refused before any request or folder."""
    from selfinstruct.prompts import bundled_dir

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "deepen.txt").write_text((bundled_dir("prompts") / "evolve" / "deepen.txt").read_text().replace(drop, "it"))
    src = write_run(tmp_path / "run", rows(2))
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        args = evolve_args(fake, src, tmp_path / "evo", "--prompts", str(folder), "--operations", "deepen")
        assert main(args) == 2
        assert f"{folder / 'deepen.txt'}: placeholder {drop} missing" in capsys.readouterr().err
        assert fake.prompts == [] and not (tmp_path / "evo").exists()


def test_refusals_of_bad_outs_and_bad_input_are_one_line(tmp_path, monkeypatch, capsys):
    src = write_run(tmp_path / "run", rows(2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows(1)[0]) + "\n" + json.dumps(rows(2)[1]) + "\n{not json\n")
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        for out, why in ((src, "would overwrite the input"), (tmp_path / "run" / "evo", "is inside the input")):
            assert main(evolve_args(fake, src, out)) == 2
            assert why in capsys.readouterr().err
        assert main(evolve_args(fake, bad, tmp_path / "evo")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"selfinstruct evolve: error: {bad}:3: not valid JSON (Expecting property name enclosed in "
                       "double quotes at column 2)"]
        assert main(evolve_args(fake, src, tmp_path / "evo", "--operations", "shout")) == 2
        assert "--operations (item 1): Input should be" in capsys.readouterr().err
        # generate's checks of the instruction filters' options (each evolution was rejected before)
        for more, said in ((["--min-words", "200"], "--min-words 200 must be below --max-words (default 150)"),
                           (["--blacklist", "c++"], "--blacklist: 'c++' can never match: a whole-word match needs")):
            assert main(evolve_args(fake, src, tmp_path / "evo", *more)) == 2
            assert said in capsys.readouterr().err
        # Options: defaults < YAML < flags, and an unknown YAML key is an error naming file and key.
        yml = tmp_path / "evolve.yaml"
        yml.write_text("rounds: 1\nbogus: 2\n")
        assert main(evolve_args(fake, src, tmp_path / "evo", "--config", str(yml))) == 2
        assert f"{yml}: field 'bogus': unknown option" in capsys.readouterr().err
        assert fake.prompts == [] and not (tmp_path / "evo").exists()
        yml.write_text("rounds: 5\nseed: 3\n")
        assert main(evolve_args(fake, src, tmp_path / "evo", "--config", str(yml), "--rounds", "1")) == 0
        saved = yaml.safe_load((tmp_path / "evo" / "config.yaml").read_text())
        assert (saved["rounds"], saved["seed"], saved["mode"], saved["same_threshold"]) == (1, 3, "evolve", 0.9)
        assert "api_key" not in saved
        # A respond folder is not an evolve run to resume.
        assert main(["respond", src, "--base-url", fake.base_url, "--model", "fake", "--out", str(tmp_path / "r"),
                     "--no-progress"]) == 0
        assert main(evolve_args(fake, src, tmp_path / "r")) == 2
        assert "is a run folder of 'respond', not of 'evolve'" in capsys.readouterr().err


def test_kill_9_and_resume_give_what_an_uninterrupted_run_gives(tmp_path):
    data = rows(16, same=3, refuse=5, twin=2) + [{"instruction": "Twin " + task(99), "input": "", "output": "o"}]
    src = tmp_path / "data.json"
    src.write_text(json.dumps(data))

    def outcome(out):
        kept, rejected = records(out)
        return (sorted((r.id, r.instruction, r.instances[0].output) for r in kept),
                sorted((r.id, r.stage, r.reason) for r in rejected))

    with scripted(on_request=lambda n: time.sleep(0.03)) as fake:
        env = {**os.environ, "SELFINSTRUCT_API_KEY": fake.key}
        cmd = [sys.executable, "-m", "selfinstruct.cli", *evolve_args(fake, src, tmp_path / "whole", "--rounds", "2")]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        out = tmp_path / "killed"
        cmd = [sys.executable, "-m", "selfinstruct.cli", *evolve_args(fake, src, out, "--rounds", "2")]
        kills = kill_when_lines(cmd, env, out / "responses.jsonl", (3, 12, 20))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    assert kills >= 2
    assert outcome(out) == outcome(tmp_path / "whole")
    kept, rejected = records(out)
    ids = [r.id for r in kept] + [r.id for r in rejected]
    assert len(ids) == len(set(ids))  # nothing decided twice
    assert {"no_new_information", "refusal", "duplicate"} <= {r.reason.split(":")[0] for r in rejected}
    logged = [o["id"] for o in lines(out / "responses.jsonl")]
    assert len(logged) == len(set(logged)) == len(ids)  # nothing logged twice, every logged reply decided
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] == len(kept) and stats["rejected"] == len(rejected)
    assert stats["sessions"] == 4  # the killed sessions too, counted by the next from their session.json


@pytest.mark.slow
def test_embedded_teacher_evolves_three_records(tmp_path):
    src = write_run(tmp_path / "run", [{"instruction": t, "input": "", "output": "old"} for t in (
        "Give two tips for sleeping better.", "Name three colours of the rainbow.", "Explain why the sky is blue.")])
    out = tmp_path / "emb"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "selfinstruct.cli", "evolve", src, "--rounds", "1", "--out", str(out),
                        "--max-tokens", "128", "--no-progress"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    kept, rejected = records(out)
    assert sorted(r.id for r in kept + rejected) == ["e1-000001-0", "e1-000002-0", "e1-000003-0"]
    assert all(r.provenance.evolution.round == 1 and r.provenance.evolution.root_id.startswith("resp-")
               for r in kept + rejected)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] + stats["rejected"] == 3 and stats["completion_tokens"] > 0 and stats["complete"]
    assert len(json.loads((out / "data.json").read_text())) == len(kept)
    print(f"\nembedded evolve: {len(kept)} kept, rejected {stats['rejected_by_reason']}, "
          f"{time.monotonic() - t0:.0f} s; kept: {[r.instruction for r in kept]}")


def test_a_record_that_fails_every_retry_holds_back_the_next_round_until_a_rerun(tmp_path, monkeypatch):
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(3)))
    failing = {"on": True}

    def drop(n):  # the connection closes with no reply: a fault the client counts, then gives up on
        if failing["on"] and f"Instruction: {task(1)}\n" in fake.prompts[n]:
            raise ConnectionError("dropped")

    fake = scripted(on_request=drop)
    with fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        out = tmp_path / "evo"
        assert main(evolve_args(fake, src, out, "--rounds", "2", "--max-retries", "0")) == 1
        stats = json.loads((out / "stats.json").read_text())
        assert not stats["complete"] and stats["failed_units"] == 1 and stats["errors"] == {"connection": 1}
        (err,) = lines(out / "errors.jsonl")
        assert (err["index"], err["round"]) == (1, 1)
        # Decided in input order: row 0 is, row 2 waits behind row 1 (its reply logged), round 2 did not begin.
        assert [r.id for r in records(out)[0]] == ["e1-000001-0"]
        assert sorted(o["id"] for o in lines(out / "responses.jsonl")) == ["e1-000001", "e1-000003"]
        failing["on"] = False
        before = len(fake.prompts)
        assert main(evolve_args(fake, src, out, "--rounds", "2")) == 0
        # Only row 1 and round 2 were asked: row 1's rewrite and answer, then three records' two each.
        assert len(fake.prompts) - before == 2 + 3 * 2
    kept, rejected = records(out)
    assert sorted(r.id for r in kept) == [f"e{r}-{i + 1:06d}-0" for r in (1, 2) for i in range(3)] and not rejected
    assert json.loads((out / "stats.json").read_text())["complete"]


def test_several_servers_share_the_requests(tmp_path, monkeypatch):
    src = write_run(tmp_path / "run", rows(6))
    out = tmp_path / "evo"
    busy = Busy()
    with scripted(on_request=busy) as a, scripted(on_request=busy) as b:
        b.key = a.key
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", a.key)
        assert main(["evolve", str(src), "--base-url", a.base_url, b.base_url, "--model", "fake", "--out", str(out),
                     "--no-progress", "--concurrency", "1", "--rounds", "1"]) == 0
    kept, rejected = records(out)
    assert len(kept) == 6 and rejected == []
    # Each record's rewrite went to one server; its provenance names that one.
    assert {r.provenance.base_url for r in kept} == {a.base_url, b.base_url}
    for rec in kept:
        ancestor = rec.provenance.evolution.ancestor_instruction
        assert any(ancestor in p for p in (a if rec.provenance.base_url == a.base_url else b).prompts)
    servers = json.loads((out / "stats.json").read_text())["servers"]
    assert servers[a.base_url]["requests"] == len(a.prompts) and servers[b.base_url]["requests"] == len(b.prompts)
    stats = json.loads((out / "stats.json").read_text())
    assert sum(v["completion_tokens"] for v in servers.values()) == stats["completion_tokens"] > 0
    assert len(a.prompts) + len(b.prompts) == 12  # a rewrite and an answer each
    assert busy.most == 2  # --concurrency 1 is per server: both were busy at once


@pytest.mark.parametrize("rewrite, reason", [
    ("Sorry, I cannot rewrite this task.", "refusal: the rewrite opens with an apology"),
    ("I\u2019m sorry. I am unable to make it harder.", "refusal: the rewrite opens with an apology"),
    ("Apologies, the task is already as hard as it gets.", "refusal: the rewrite opens with an apology"),
    ("Write a short note saying sorry to a neighbour for a noisy party.", None),
])
def test_a_rewrite_that_apologises_instead_of_rewriting_is_not_answered(rewrite, reason):
    from selfinstruct.evolve import EvolveOptions, Item, parse_rewrite, screen_rewrite

    item = Item("r1", "Name three rivers in Europe.", "", "r1", ("in:r1",))
    got = screen_rewrite(item, parse_rewrite(rewrite), False, EvolveOptions(source="x", out="y"))
    assert got == (None if reason is None else ("evolve", reason))


def test_a_resume_refused_for_a_changed_input_leaves_every_file_as_it_was(tmp_path, monkeypatch, capsys):
    """A record of the input changed under the run: refused before config.yaml, session.json or
    the teacher (it was found only in the round's loop, after all three), the folder as it was."""
    from conftest import snapshot

    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(3)))
    out = tmp_path / "evo"
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, out, "--rounds", "1", "--limit", "2")) == 0
        before, asked = snapshot(out), len(fake.prompts)
        src.write_text(json.dumps([rows(3)[0], {**rows(3)[1], "instruction": task(99)}, rows(3)[2]]))
        capsys.readouterr()
        assert main(evolve_args(fake, src, out, "--rounds", "2", "--limit", "2")) == 2  # --rounds may grow; row 1 changed
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "reply e1-000002 evolves a record that" in err, err
        assert snapshot(out) == before and len(fake.prompts) == asked
        src.write_text(json.dumps(rows(1)))  # the rows the run evolved, but the last, which is gone
        assert main(evolve_args(fake, src, out, "--rounds", "2", "--limit", "2")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "reply e1-000002 evolves a record that" in err, err
        assert snapshot(out) == before and len(fake.prompts) == asked


def test_rows_with_a_system_prompt_are_counted_and_said_as_respond_does(tmp_path, monkeypatch, capsys):
    """evolve reads its input as respond does, and dropped a row's system prompt without a word:
    the same line now, and stats.json's system_prompts_dropped; the rewrite prompt does not hold it."""
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in [
        {"messages": [{"role": "system", "content": "Always answer in French."},
                      {"role": "user", "content": task(0)}, {"role": "assistant", "content": "Old."}]},
        {"messages": [{"role": "user", "content": task(1)}, {"role": "assistant", "content": "Old."}]},
    ]))
    out = tmp_path / "evo"
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, chats, out)) == 0
    assert ("evolve: 1 of 2 rows has a system prompt; the teacher is not sent it, and the records "
            "(instruction, input, output) do not keep it") in capsys.readouterr().err
    assert not any("French" in p for p in fake.prompts)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["system_prompts_dropped"] == 1 and stats["complete"] and stats["by_round"]["1"]["kept"] == 2


def test_rounds_may_grow_on_resume_but_not_shrink(tmp_path, monkeypatch, capsys):
    """--rounds below a round the run has evolved was taken: config.yaml and stats.json said
    'rounds: 1' of a folder holding round 2's records. It is one line, the folder as it was."""
    from conftest import snapshot

    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(3)))
    out = tmp_path / "evo"
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, out, "--rounds", "2")) == 0
        before, asked = snapshot(out), len(fake.prompts)
        capsys.readouterr()
        assert main(evolve_args(fake, src, out, "--rounds", "1")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--rounds 1: this run has evolved round 2 already" in err, err
        assert snapshot(out) == before and len(fake.prompts) == asked
        # From a --config file, its field is named: '--rounds 1' named a flag the user never typed.
        (tmp_path / "c.yaml").write_text("rounds: 1\n")
        assert main(evolve_args(fake, src, out, "--config", str(tmp_path / "c.yaml"))) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--rounds" not in err, err
        assert (f"{tmp_path / 'c.yaml'}: rounds: 1, but this run has evolved round 2 already; rounds may "
                "grow on resume, not shrink: give rounds: 2 or more") in err, err
        assert snapshot(out) == before and len(fake.prompts) == asked
        # A flag over the file is the flag's value, named as the flag.
        assert main(evolve_args(fake, src, out, "--config", str(tmp_path / "c.yaml"), "--rounds", "1")) == 2
        assert "--rounds 1: this run has evolved round 2 already" in capsys.readouterr().err
        assert main(evolve_args(fake, src, out, "--rounds", "2")) == 0  # the same rounds resume
        assert yaml.safe_load((out / "config.yaml").read_text())["rounds"] == 2
        assert json.loads((out / "stats.json").read_text())["rounds"] == 2


@pytest.mark.parametrize("given", ["flag", "config"])
def test_rounds_past_any_real_evolution_is_one_line_before_any_folder(tmp_path, capsys, given):
    """--rounds 100000000000000000000 had no cap: it was taken, saved in config.yaml, and the run went on
    while any record survived. It is one line naming the option; the bound itself is taken."""
    from selfinstruct.evolve import MAX_ROUNDS, EvolveOptions

    src = write_run(tmp_path / "run", rows(2))
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"rounds: {10**20}\n")
    more = ["--rounds", str(10**20)] if given == "flag" else ["--config", str(cfg)]
    assert main(["evolve", str(src), "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out),
                 *more]) == 2
    where = "--rounds" if given == "flag" else f"{cfg}: field 'rounds'"
    assert capsys.readouterr().err == f"selfinstruct evolve: error: {where}: Input should be less than or equal to 1000\n"
    assert not out.exists()
    assert EvolveOptions(source="s", out="o", rounds=MAX_ROUNDS).rounds == 1000


def test_the_progress_counts_every_rounds_replies(tmp_path, monkeypatch):
    """The bar's 'prompts' began again at 0 each round: 'prompts 4' at the end of two rounds of
    4 records, beside a summary of 8 prompts answered."""
    from selfinstruct.progress import RunProgress

    said = []
    monkeypatch.setattr(RunProgress, "update", lambda self, kept, rejected, prompts, *a, **k: said.append(prompts))
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(4)))
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, tmp_path / "evo", "--rounds", "2")) == 0
    assert said == sorted(said) and said[-1] == 8 == json.loads((tmp_path / "evo" / "stats.json").read_text())["responses"]


@pytest.mark.parametrize("command", ["respond", "evolve"])
@pytest.mark.parametrize("given", ["flag", "config"])
def test_concurrency_over_4096_is_one_line_before_any_folder(tmp_path, capsys, command, given):
    """As generate's: respond and evolve took --concurrency 1000000 and saved it in config.yaml
    (found by the review probe); each request in flight holds its row. The line says it in our
    words, naming the flag and the bound, as generate's does, not pydantic's ('Input should be
    less than or equal to 4096')."""
    src = write_run(tmp_path / "run", rows(2))
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("concurrency: 5000\n")
    more = ["--concurrency", "5000"] if given == "flag" else ["--config", str(cfg)]
    assert main([command, str(src), "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out),
                 *more]) == 2
    where = "--concurrency" if given == "flag" else f"{cfg}: field 'concurrency'"
    assert capsys.readouterr().err == (
        f"selfinstruct {command}: error: {where}: at most 4096 requests in flight per server, not 5000: twice the "
        "largest batch vLLM makes by default (--max-num-seqs 1024 on a large GPU), and each one holds its "
        "row's prompt and reply in memory\n")
    assert not out.exists()
    generate = main(["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out), *more])
    assert generate == 2 and ": at most 4096 requests in flight per server, not 5000: " in capsys.readouterr().err
    assert not out.exists()


def test_a_record_holding_a_control_character_is_rejected_without_asking_the_teacher(tmp_path, monkeypatch, capsys):
    """A BEL in an input record's instruction (or an ESC in its input) was sent to the teacher to
    rewrite; a teacher that kept it had its rewrite rejected for it, one that dropped it made a task
    of a record no answer could be kept for. It is rejected as a rewrite holding it is (stage, reason),
    with no request; a rerun asks nothing, and one whose input no longer holds it is refused."""
    from conftest import snapshot

    data = rows(3)
    data[1]["instruction"] = data[1]["instruction"].replace(" ", " \x07 ", 1)
    data[2]["input"] = "a line \x1b[2J here"
    src = tmp_path / "data.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "evo"
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, out, "--rounds", "2")) == 0
        assert len(fake.prompts) == 4  # row 0's rewrite and answer, in each round
        assert not any("\x07" in p or "\x1b" in p for p in fake.prompts)
        kept, rejected = records(out)
        assert sorted(r.id for r in kept) == ["e1-000001-0", "e2-000001-0"]
        assert [(r.id, r.stage, r.reason, r.raw, r.instruction) for r in rejected] == [
            ("e1-000002-0", "filter", "control_characters: the instruction holds U+0007", "", data[1]["instruction"]),
            ("e1-000003-0", "filter", "control_characters: the input holds U+001B", "", data[2]["instruction"])]
        prov = rejected[0].provenance
        ev = prov.evolution
        assert (ev.ancestor_id, ev.round, ev.operation) == ("row 2", 1, choose_operation(0, "row 2", 1))
        assert prov.response_id == "" and prov.usage.completion_tokens == 0  # no reply
        stats = json.loads((out / "stats.json").read_text())
        assert stats["complete"] and (stats["kept"], stats["rejected"], stats["responses"]) == (2, 2, 2)
        assert stats["by_round"]["1"]["rejected_by_reason"] == {"control_characters": 2}
        # A rerun: nothing asked, nothing written twice.
        assert main(evolve_args(fake, src, out, "--rounds", "2")) == 0
        assert len(fake.prompts) == 4 and len(lines(out / "rejected.jsonl")) == 2
        # The rejected record mended in the input: refused, one line, the folder as it was.
        before = snapshot(out)
        capsys.readouterr()
        src.write_text(json.dumps([data[0], rows(3)[1], data[2]]))
        assert main(evolve_args(fake, src, out, "--rounds", "2")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "e1-000002-0 rejects a record that" in err, err
        assert snapshot(out) == before and len(fake.prompts) == 4


def test_a_record_whose_input_ends_with_a_colon_is_rejected_without_asking_the_teacher(tmp_path, monkeypatch):
    """An input record whose input ends with ':' ("The sentence is:", a zero-width space after it too)
    was sent to be rewritten: the rewrite either kept the label, and its answer was paid for and then
    rejected as ends_with_colon, or dropped it, and a task was kept of a record whose text was missing.
    It is rejected unasked, as respond rejects such a row (stage, reason); a control character still
    comes first, and an input of only a zero-width space is no input, asked as any other."""
    data = rows(5)
    data[1]["input"] = "The sentence is:"
    data[2]["input"] = "Paris is the capital of:\u200b \n"
    data[3]["instruction"] = data[3]["instruction"].replace(" ", " \x07 ", 1)
    data[3]["input"] = "Words:"
    data[4]["input"] = "\u200b"
    src = tmp_path / "data.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "evo"
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, out, "--concurrency", "1", "--rounds", "1")) == 0
        asked = [re.search(r"^Instruction: (.*)$", p, re.MULTILINE).group(1) for p in fake.prompts if "#Given Task#" in p]
        assert sorted(asked) == sorted(data[i]["instruction"] for i in (0, 4)) and len(fake.prompts) == 4
        assert not any("capital of:" in p or "sentence is:" in p for p in fake.prompts)
        # An input that shows nothing is shown to the teacher as no input, as respond sends it.
        blank, = [p for p in fake.prompts if "#Given Task#" in p and data[4]["instruction"] in p]
        assert "\u200b" not in blank and "<noinput>" in blank
        kept, rejected = records(out)
        colon = "ends_with_colon: input ends with a colon"
        assert [(r.id, r.stage, r.reason, r.raw, r.provenance.response_id) for r in rejected] == [
            ("e1-000002-0", "filter", colon, "", ""), ("e1-000003-0", "filter", colon, "", ""),
            ("e1-000004-0", "filter", "control_characters: the instruction holds U+0007", "", "")]
        assert [r.provenance.evolution.ancestor_id for r in kept] == ["row 1", "row 5"]
        stats = json.loads((out / "stats.json").read_text())
        assert stats["by_round"]["1"]["rejected_by_reason"] == {"ends_with_colon": 2, "control_characters": 1}
        n = len(fake.prompts)
        assert main(evolve_args(fake, src, out, "--rounds", "1")) == 0  # a rerun asks nothing, writes nothing twice
        assert len(fake.prompts) == n and len(lines(out / "rejected.jsonl")) == 3


def test_a_rerun_without_rounds_goes_on_with_the_runs_own(tmp_path, monkeypatch, capsys):
    """A run made with --rounds 4 and rerun as it was, without --rounds, took the default 3: it stopped
    a round short and saved 'rounds: 3' when it had not reached round 4, and was refused naming
    '--rounds 3', which the user never typed, when it had. The run's own rounds go on; a --rounds
    given below a round the run has evolved is still refused."""
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(2)))
    failing = {"on": True}

    def drop(n):  # row 1's first rewrite fails, so the first session stops after round 1
        if failing["on"] and f"Instruction: {task(1)}\n" in fake.prompts[n]:
            raise ConnectionError("dropped")

    fake = scripted(on_request=drop)
    out = tmp_path / "evo"
    plain = ["evolve", str(src), "--base-url", fake.base_url, "--model", "fake", "--out", str(out), "--no-progress"]
    with fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main([*plain, "--rounds", "4", "--max-retries", "0"]) == 1
        failing["on"] = False
        assert main(plain) == 0  # the rerun as the user would type it
        assert sorted(r.id for r in records(out)[0]) == [f"e{r}-{i + 1:06d}-0" for r in (1, 2, 3, 4) for i in range(2)]
        assert yaml.safe_load((out / "config.yaml").read_text())["rounds"] == 4
        stats = json.loads((out / "stats.json").read_text())
        assert stats["rounds"] == 4 and stats["complete"]
        asked = len(fake.prompts)
        assert main(plain) == 0 and len(fake.prompts) == asked  # once more: nothing left to ask
        capsys.readouterr()
        for fewer in ("3", "2"):  # the round to give is the last evolved, not the first found above --rounds
            assert main([*plain, "--rounds", fewer]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and (f"--rounds {fewer}: this run has evolved round 4 already; --rounds may "
                                             "grow on resume, not shrink: give --rounds 4 or more") in err, err


def test_a_rerun_that_leaves_out_the_runs_options_goes_on_with_them(tmp_path, monkeypatch, capsys):
    """A run made with --seed 4 --operations deepen breadth (or --limit, --same-threshold, --temperature...)
    and rerun without them was refused naming the default ("field 'seed': this run was made with 4, not
    0"), a value the user never typed. Left out, each is the run's own (config.yaml), as --rounds already
    was: a later round draws from the run's operations with its seed; given another value, still refused."""
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(3)))
    out = tmp_path / "evo"
    own = ["--seed", "4", "--operations", "deepen", "breadth", "--limit", "2", "--same-threshold", "0.8",
           "--min-answer-words", "2", "--temperature", "0.2", "--max-tokens", "200"]
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, out, *own, "--rounds", "1")) == 0
        made = yaml.safe_load((out / "config.yaml").read_text())
        capsys.readouterr()
        plain = ["evolve", str(src), "--out", str(out), "--no-progress"]  # the servers and model: the run's too
        assert main([*plain, "--rounds", "2"]) == 0, capsys.readouterr().err
        assert yaml.safe_load((out / "config.yaml").read_text()) == {**made, "rounds": 2, "concurrency": 8}
        kept, rejected = records(out)
        done = kept + rejected
        assert sorted({r.provenance.evolution.round for r in done}) == [1, 2]
        assert {r.provenance.evolution.operation for r in done} <= {"deepen", "breadth"}
        assert all(choose_operation(4, r.provenance.evolution.ancestor_id, r.provenance.evolution.round,
                                    ("deepen", "breadth")) == r.provenance.evolution.operation for r in done)
        assert {r.provenance.evolution.root_id for r in done} == {"row 1", "row 2"}  # --limit 2 still
        assert {(b["temperature"], b["max_tokens"]) for b in fake.bodies} == {(0.2, 200)}
        asked = len(fake.prompts)
        capsys.readouterr()
        for flag, value, was in (("--seed", "5", "4"), ("--operations", "deepen", "['deepen', 'breadth']")):
            assert main([*plain, flag, value]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"this run was made with {was}, not " in err, err
        assert len(fake.prompts) == asked


def test_a_runs_own_blacklist_word_refused_since_is_taken_on_a_rerun_that_leaves_it_out(tmp_path, monkeypatch,
                                                                                       capsys):
    """A run begun before a --blacklist word that cannot match whole (c++) was refused saved it; a rerun
    leaving --blacklist out takes the run's own list as it is, as generate's does (it said "config.yaml:
    field 'blacklist': 'c++' can never match"). Given as a flag, the word is still refused."""
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(2)))
    out = tmp_path / "evo"
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, out, "--rounds", "1", "--blacklist", "image")) == 0
        saved = yaml.safe_load((out / "config.yaml").read_text())
        (out / "config.yaml").write_text(yaml.safe_dump({**saved, "blacklist": ["image", "c++"]}, sort_keys=False))
        capsys.readouterr()
        assert main(evolve_args(fake, src, out, "--rounds", "2")) == 0, capsys.readouterr().err
        assert yaml.safe_load((out / "config.yaml").read_text())["blacklist"] == ["image", "c++"]
        assert main(evolve_args(fake, src, out, "--rounds", "2", "--blacklist", "image", "c++")) == 2
        assert "--blacklist: 'c++' can never match" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["respond", "evolve"])
@pytest.mark.parametrize("given", ["flag", "config"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_concurrency_below_1_is_one_line_in_our_words(tmp_path, capsys, command, given, value):
    """--concurrency 0 said pydantic's '--concurrency: Input should be greater than or equal to 1'; it is
    our line naming the flag (or the file's field), as the > 4096 one is, and no folder is made."""
    src = write_run(tmp_path / "run", rows(2))
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"concurrency: {value}\n")
    more = [f"--concurrency={value}"] if given == "flag" else ["--config", str(cfg)]
    assert main([command, str(src), "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out),
                 *more]) == 2
    where = "--concurrency" if given == "flag" else f"{cfg}: field 'concurrency'"
    assert capsys.readouterr().err == (
        f"selfinstruct {command}: error: {where}: at least 1 request in flight per server, not {value}: "
        "with none, no request would ever be sent\n")
    assert not out.exists()


def test_a_config_files_value_that_the_runs_own_contradicts_is_named_by_the_file(tmp_path, capsys):
    """A rerun whose c.yaml gives max_words: 5, not above the run's own min_words 6, was refused as
    '--max-words: ...', a flag the user never typed. The file and its key are named, and the run's
    own min_words as the run's (filters.option_as_given); nothing changes. So is a file's min_words
    above the run's own max_words, which was named '--min-words' in the run's config.yaml's line."""
    from selfinstruct.datafiles import mark_run_folder
    from selfinstruct.evolve import EvolveOptions

    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(3)))
    out = tmp_path / "evo"
    out.mkdir()
    mark_run_folder(out)
    saved = EvolveOptions(source=str(src), out=str(out), base_url=["http://127.0.0.1:2/v1"], model="fake", min_words=6,
                          max_words=100)
    (out / "config.yaml").write_text(yaml.safe_dump({**saved.model_dump(mode="json"), "mode": "evolve"}, sort_keys=False))
    before = (out / "config.yaml").read_text()
    (tmp_path / "c.yaml").write_text("max_words: 5\n")
    assert main(["evolve", str(src), "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--no-progress"]) == 2
    why = "(no instruction could pass: one needs more than min and at most max words)\n"
    assert capsys.readouterr().err == (f"selfinstruct evolve: error: {tmp_path / 'c.yaml'}: max_words: 5 must be "
                                       f"above the run's min_words (6) {why}")
    assert main(["evolve", str(src), "--max-words", "5", "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"selfinstruct evolve: error: --max-words 5 must be above the run's min_words (6) {why}"
    (tmp_path / "c.yaml").write_text("min_words: 120\n")
    assert main(["evolve", str(src), "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"selfinstruct evolve: error: {tmp_path / 'c.yaml'}: min_words: 120 must be "
                                       f"below the run's max_words (100) {why}")
    assert (out / "config.yaml").read_text() == before


@pytest.mark.parametrize("key, value", [("stop", "###"), ("operations", "deepen"), ("blacklist", "image")])
def test_one_string_for_a_list_option_in_a_config_file_is_that_one_item(tmp_path, key, value):
    """`operations: deepen` in a --config file was refused as "not a valid list": it is the flag's one-item list."""
    import argparse

    from selfinstruct.config import resolve
    from selfinstruct.evolve import EvolveOptions, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({key: value}))
    from_file = resolve(EvolveOptions, parser.parse_args(["src", "--out", "r", "--config", str(config)]))
    from_flag = resolve(EvolveOptions, parser.parse_args(["src", "--out", "r", f"--{key}", value]))
    assert getattr(from_file, key) == getattr(from_flag, key) == [value]


def test_a_start_asks_the_server_for_its_models_once(tmp_path, monkeypatch):
    """One GET /models per start (it was two: the check before the folder is written, then the
    client's preflight), on a fresh run and on its resume."""
    src = write_run(tmp_path / "run", rows(2))
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, tmp_path / "evo")) == 0
        assert fake.model_lists == 1
        assert main(evolve_args(fake, src, tmp_path / "evo", "--rounds", "4")) == 0  # a resume, one round more
        assert fake.model_lists == 2


def test_ids_count_rows_from_one_and_a_run_made_when_they_counted_from_zero_resumes(tmp_path, monkeypatch):
    """A file's first row was `row 0` (e1-000000) where every message counts rows from 1: a new run's
    ids count from 1. The operation a record gets hangs on its id, so a run made when ids counted
    from 0 (no row_ids_from in its config.yaml) keeps its own: its next round asks nothing twice."""
    from selfinstruct import respond as respond_module

    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(2)))
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, tmp_path / "new", "--rounds", "1")) == 0
        kept, rejected = records(tmp_path / "new")
        assert sorted((r.id, r.provenance.evolution.ancestor_id) for r in kept + rejected) == [
            ("e1-000001-0", "row 1"), ("e1-000002-0", "row 2")]
        old = tmp_path / "old"
        with monkeypatch.context() as m:  # as that version made it
            m.setattr(respond_module, "row_ids_from", lambda out: 0)
            assert main(evolve_args(fake, src, old, "--rounds", "1")) == 0
        cfg = yaml.safe_load((old / "config.yaml").read_text())
        del cfg["row_ids_from"]
        (old / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        first_round = sorted(o["id"] for o in lines(old / "responses.jsonl"))
        assert first_round == ["e1-000000", "e1-000001"]
        assert main(evolve_args(fake, src, old, "--rounds", "2")) == 0
    logged = sorted(o["id"] for o in lines(old / "responses.jsonl"))
    assert logged[:2] == first_round and all(i.startswith("e2-00000") for i in logged[2:])  # round 1 not asked again
    kept, rejected = records(old)
    assert {r.provenance.evolution.root_id for r in kept + rejected} == {"row 0", "row 1"}


def test_a_pair_of_options_is_checked_against_the_resumed_runs_own(tmp_path, monkeypatch, capsys):
    """`min_words: 200` in a run made with --max-words 300 was refused as "must be below max_words
    (default 150)", the default checked before the run's own was taken: the wrong reason. Checked
    against the run's own, it is refused as the changed option it is; a contradiction names the run's."""
    from conftest import snapshot

    src, out, mine = tmp_path / "data.json", tmp_path / "evo", tmp_path / "my.yaml"
    src.write_text(json.dumps(rows(2)))
    with scripted() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, out, "--rounds", "1", "--max-words", "300")) == 0, capsys.readouterr().err
        before, asked = snapshot(out), len(fake.prompts)
        capsys.readouterr()
        mine.write_text("min_words: 200\n")
        for more, said in (
                (["--config", str(mine)], f"{mine}: field 'min_words': this run was made with 3, not 200; use a new "
                 "--out folder, or leave min_words out of this file to resume with the run's own"),
                (["--min-words", "400"], "--min-words 400 must be below the run's max_words (300) (no instruction "
                 "could pass: one needs more than min and at most max words)")):
            assert main(["evolve", str(src), "--out", str(out), "--no-progress", *more]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.endswith(f"error: {said}\n"), err
        assert snapshot(out) == before and len(fake.prompts) == asked


def test_a_record_or_a_rewrite_holding_an_invisible_character_is_rejected_the_record_unasked(tmp_path, monkeypatch):
    """A bidi override or a zero-width space inside an input record's instruction or input was sent to be
    rewritten, and a rewrite's input holding one was answered and kept. Such a record is rejected unasked,
    as respond rejects such a row, and such a rewrite before its answer is asked for."""
    data = rows(4)
    data[1]["instruction"] = data[1]["instruction"].replace(" ", " \u202e", 1)
    data[2]["input"] = "Two\u200bwords"
    data[3]["input"] = "\ufeffA plain input."  # at an end: looked past
    src = tmp_path / "data.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "evo"
    script = Script()

    def reply(n):
        text = script(fake.prompts[n])  # the first rewrite asked for gets an input with a word joiner inside
        return text.replace("Input: <noinput>", "Input: Two\u2060words") if n == 0 else text

    with FakeTeacher(reply=reply) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, out, "--concurrency", "1", "--rounds", "1")) == 0
        asked = [re.search(r"^Instruction: (.*)$", p, re.MULTILINE).group(1) for p in fake.prompts if "#Given Task#" in p]
        assert asked == [data[0]["instruction"], data[3]["instruction"]]
    kept, rejected = records(out)
    assert [r.provenance.evolution.ancestor_id for r in kept] == ["row 4"]
    assert [(r.id, r.stage, r.reason.split(" (")[0], r.provenance.response_id != "")
            for r in sorted(rejected, key=lambda r: r.id)] == [
        ("e1-000001-0", "filter", "invisible_characters: the input holds U+2060", True),
        ("e1-000002-0", "filter", "invisible_characters: the instruction holds U+202E", False),
        ("e1-000003-0", "filter", "invisible_characters: the input holds U+200B", False)]


@pytest.mark.parametrize("answer, min_words, want", [
    ("Привет, как у тебя дела сегодня?", 3, True),  # "Translate into Russian": the answer has no ASCII letter
    ("Καλημέρα σε όλους τους φίλους μας.", 3, True),
    ("今日はとても良い天気ですね。", 1, True),  # one whitespace word: kept where --min-answer-words allows it
    ("今日はとても良い天気ですね。", 3, (False, "answer_too_short: 1 word (need at least 3)")),
    ("It is.", 1, (False, "empty_answer: only punctuation and stop words")),
    ("— … ¿? «»", 1, (False, "empty_answer: only punctuation and stop words")),
])
def test_an_answer_in_another_script_is_judged_by_its_words_not_taken_for_punctuation(answer, min_words, want):
    """A translation task's answer in Cyrillic, Greek or Japanese was rejected as ``empty_answer: only
    punctuation and stop words``: the stop-word check read only ASCII letters and digits."""
    from selfinstruct.evolve import unhelpful_answer

    assert unhelpful_answer(answer, min_words) == want


@pytest.mark.parametrize("n", [3, 40])
def test_a_server_that_never_gives_a_usable_reply_is_one_line_whatever_the_row_count(tmp_path, monkeypatch, capsys,
                                                                                      n):
    """Three rows at one retry each are six junk replies, under the twelve that stop a run mid-way: the run
    ended rc 1 with the stats table and no line saying the server gives nothing usable (40 rows said it)."""
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows(n)))
    with NoChoicesTeacher() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(evolve_args(fake, src, tmp_path / "evo", "--max-retries", "1")) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1, captured.err
    assert err[0].startswith(f"selfinstruct evolve: error: the teacher at {fake.base_url} gives no usable reply "
                             "(unusable): "), err[0]
    assert "none usable, the last: the reply has no choices; check that --base-url is the model's server" in err[0]
    assert not json.loads((tmp_path / "evo" / "stats.json").read_text())["complete"]
