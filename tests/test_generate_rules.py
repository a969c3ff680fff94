"""The loop's rules, against a scripted OpenAI-compatible server on 127.0.0.1 (quick, no model).

Each test scripts the teacher's replies so that one rule decides the outcome: a duplicate
found before any follow-up request is a dedup rejection, a follow-up that fails every retry
rejects only its own instruction, and ``--structured`` asks for JSON the way vLLM wants it.
The real teacher runs the same loop in test_generate.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import GENERATE, FakeTeacher, diverse_tasks, fake_args, lines, run_generate, snapshot, verify_run

from selfinstruct.prompts import bundled_dir
from selfinstruct.seeds import load_seeds

SEED = load_seeds([bundled_dir("seeds") / "seed_tasks.jsonl"])[0].instruction
NEW = ["Name three rivers that flow through more than four countries.",
       "Suggest a title for a blog post about repairing old bicycles at home.",
       "Explain why the sky looks red at sunset to a ten year old."]


def self_instruct_teacher(fail_classify_of: str | None = None) -> FakeTeacher:
    """Replies by the kind of prompt: a task list (a seed copied, plus NEW), Yes/No, instances."""

    def reply(n: int) -> str:
        prompt = fake.prompts[n]
        if prompt.startswith("Invent new tasks"):
            first = int(prompt.split("numbered from Task ")[1].split()[0])
            items = [SEED] + NEW  # the seed is a verbatim copy: a duplicate before any follow-up
            return "\n".join(f"Task {first + i}: {t}" for i, t in enumerate(items))
        if "Is this a classification task?" in prompt:
            return "No"
        return "Example 1\nInput: <noinput>\nOutput: The Danube, the Rhine and the Nile.\n"

    def on_request(n: int) -> None:
        prompt = fake.prompts[n]
        if fail_classify_of and "Is this a classification task?" in prompt and fail_classify_of in prompt:
            raise ConnectionResetError("scripted failure")  # the handler dies: the client sees a dropped connection

    fake = FakeTeacher(reply=reply, on_request=on_request)
    return fake


def test_a_duplicate_found_before_follow_ups_is_rejected_as_a_duplicate(tmp_path):
    out = tmp_path / "run"
    with self_instruct_teacher() as fake:
        r = run_generate(*fake_args(fake, out, 3, "--mode", "self-instruct", "--tasks-per-request", "4"),
                         key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 3)
    rejected = lines(out / "rejected.jsonl")
    copies = [o for o in rejected if o["instruction"] == SEED]
    assert copies and all(o["stage"] == "dedup" and o["reason"].startswith("duplicate:") for o in copies)
    assert all(o["nearest"][0]["rouge_l"] == 1.0 for o in copies)
    # No follow-up request was spent on the copy.
    assert not any(SEED in p for p in fake.prompts if not p.startswith("Invent new tasks"))


@pytest.mark.parametrize("case", ["copy-kept", "copy-without-examples", "copy-over-quota"])
def test_an_instruction_repeated_in_one_reply_gets_follow_ups_only_if_its_copy_gave_none(tmp_path, case):
    """Both copies of an instruction a reply gives twice were asked for classification and
    instances, and the second was then rejected as the first's duplicate: two requests spent on a
    rejection. Now they are asked only when the first copy's examples are unusable (it is
    rejected, and the second may be kept); the second is recorded with the same reason as before,
    and still as the first's duplicate when the first was not kept (the run's --num reached): there,
    a second reply, with the run's keep rate known, has follow-ups asked for 1.5 times the one task
    wanted, so its copy is asked beside another instruction (a first reply asks for the one alone)."""
    out = tmp_path / "run"
    repeated = NEW[0].rstrip(".") + "!"  # ROUGE-L 1.0: the same words
    tasks = [NEW[1], NEW[0], repeated] if case == "copy-over-quota" else [NEW[0], repeated, NEW[1]]

    def reply(n: int) -> str:
        prompt = fake.prompts[n]
        if prompt.startswith("Invent new tasks"):
            first = int(prompt.split("numbered from Task ")[1].split()[0])
            if case == "copy-over-quota" and n == 0:  # one task kept first, for a keep rate
                return f"Task {first}: {NEW[2]}"
            return "\n".join(f"Task {first + i}: {t}" for i, t in enumerate(tasks))
        if "Is this a classification task?" in prompt:
            return "No"
        if case == "copy-without-examples" and NEW[0] in prompt:
            return "Example 1\nInput: <noinput>\nOutput:\n"  # no output: the copy has no usable instance
        return "Example 1\nInput: <noinput>\nOutput: The Danube, the Rhine and the Nile.\n"

    fake = FakeTeacher(reply=reply)
    num = 2
    with fake:
        r = run_generate(*fake_args(fake, out, num, "--mode", "self-instruct", "--tasks-per-request", "3"),
                         key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, num)
    kept = [o["instruction"] for o in lines(out / "kept.jsonl")]
    rejected = {o["instruction"]: o for o in lines(out / "rejected.jsonl")}
    follow_ups = [p for p in fake.prompts if not p.startswith("Invent new tasks")]
    if case == "copy-without-examples":
        assert sum(repeated in p for p in follow_ups) == 2  # classification and instances, as for any instruction
        assert kept == [repeated, NEW[1]]
        assert rejected[NEW[0]]["stage"] == "filter"
        return
    assert not any(repeated in p for p in follow_ups)
    copy = "r000001-1" if case == "copy-over-quota" else "r000000-0"
    assert kept == ([NEW[2], NEW[1]] if case == "copy-over-quota" else [NEW[0], NEW[1]])
    assert rejected[repeated]["stage"] == "dedup"
    assert rejected[repeated]["reason"].startswith(f"duplicate: ROUGE-L 1.000 > 0.7 with {copy} ")
    assert rejected[repeated]["nearest"][0]["id"] == copy


@pytest.mark.parametrize("num", [1, 2])
def test_a_small_num_asks_follow_ups_for_no_more_instructions_than_it_wants(tmp_path, num):
    """--mode self-instruct --num 1 asked follow-ups for 2 instructions (1.5 times the one task
    wanted, rounded up): both usable, the second was rejected as quota after two teacher calls. A
    --num one reply can fill asks for what it wants until a keep rate is known: 1 + 2 * num requests."""
    out = tmp_path / "run"
    with self_instruct_teacher() as fake:
        r = run_generate(*fake_args(fake, out, num, "--mode", "self-instruct", "--tasks-per-request", "4"),
                         key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    stats = verify_run(out, num)
    asked = bodies_by_purpose(fake)
    assert (len(asked["tasks"]), len(asked["classify"]), len(asked["instances"])) == (1, num, num)
    assert len(fake.bodies) == 1 + 2 * num
    assert [o["instruction"] for o in lines(out / "kept.jsonl")] == NEW[:num]
    assert stats["rejected_by_stage"].get("quota", 0) == 3 - num  # NEW's others, asked nothing for


@pytest.mark.parametrize("where", ["flag", "yaml"])
def test_a_concurrency_past_what_a_server_batches_is_one_line_before_anything_starts(tmp_path, capsys, where):
    """--concurrency had no upper bound: 1000000 started 50,000 units at once for --num 2000
    (2.4 GB), and a unit for every request --num allows up to the million. At most 4096 per server."""
    from selfinstruct.cli import main
    from selfinstruct.generate import MAX_CONCURRENCY, default_concurrency

    out = tmp_path / "run"
    if where == "yaml":
        (tmp_path / "c.yaml").write_text("concurrency: 1000000\n")
        given = ["--config", str(tmp_path / "c.yaml")]
    else:
        given = ["--concurrency", "1000000"]
    assert main(["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out), *given]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "concurrency" in err and "at most 4096 requests in flight per server, not 1000000" in err
    assert not out.exists()
    assert main(["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out),
                 "--concurrency", str(MAX_CONCURRENCY + 1)]) == 2
    # vLLM's own default follows its batch, and stops at the bound too.
    assert default_concurrency("vllm", ["--max-num-seqs", "8192"]) == MAX_CONCURRENCY


def test_a_reply_with_windows_line_endings_keeps_its_multi_line_output(tmp_path):
    """CR LF is a line break, not a control character that rejects the task."""
    out = tmp_path / "run"

    def reply(n: int) -> str:
        prompt = fake.prompts[n]
        if prompt.startswith("Invent new tasks"):
            return f"Task 9: {NEW[0]}\r\nTask 10: {NEW[1]}\r\n"
        if "Is this a classification task?" in prompt:
            return "No\r\n"
        return "Example 1\r\nInput: <noinput>\r\nOutput: First line.\r\nSecond line.\r\n"

    fake = FakeTeacher(reply=reply)
    with fake:
        r = run_generate(*fake_args(fake, out, 2, "--mode", "self-instruct"), key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 2)
    kept = lines(out / "kept.jsonl")
    assert [o["instruction"] for o in kept] == NEW[:2]
    assert all(o["instances"] == [{"input": "", "output": "First line.\nSecond line."}] for o in kept)


def test_a_follow_up_that_fails_every_retry_rejects_only_its_instruction(tmp_path):
    out = tmp_path / "run"
    with self_instruct_teacher(fail_classify_of=NEW[1]) as fake:
        # --num 2 above --tasks-per-request 1: follow-ups for 1.5 times it, NEW's three in the one reply
        r = run_generate(*fake_args(fake, out, 2, "--mode", "self-instruct", "--tasks-per-request", "1",
                                    "--max-retries", "1"), key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    stats = verify_run(out, 2)  # every candidate of the unit is accounted for, the failed one too
    kept = {o["instruction"] for o in lines(out / "kept.jsonl")}
    assert kept == {NEW[0], NEW[2]}
    failed = [o for o in lines(out / "rejected.jsonl") if o["instruction"] == NEW[1]]
    assert len(failed) == 1 and failed[0]["stage"] == "teacher"
    assert failed[0]["reason"].startswith("teacher_error: ") and "connection" in failed[0]["reason"]
    assert stats["faults"]["connection"] == 2  # the first try and its one retry
    assert stats["rejected_by_stage"]["teacher"] == 1
    # Replies are those the teacher gave: not the failed:N marker the unit logs in their place.
    assert any(r["purpose"].startswith("failed:") for o in lines(out / "responses.jsonl") for r in o["replies"])
    assert stats["replies"] == len(fake.prompts) - 2


def test_structured_asks_for_a_json_schema_and_parses_json(tmp_path):
    out = tmp_path / "run"

    def reply(n: int) -> str:
        return json.dumps({"tasks": [{"instruction": f"{NEW[i]}", "input": "", "output": f"Answer {i}."}
                                     for i in range(3)]})

    with FakeTeacher(reply=reply) as fake:
        r = run_generate(*fake_args(fake, out, 3, "--structured"), key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 3)
    body = fake.bodies[0]
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["properties"]["tasks"]["type"] == "array"
    assert "guided_json" not in body and "guided_json" not in json.dumps(body.get("extra_body", {}))
    assert {o["instruction"] for o in lines(out / "kept.jsonl")} == set(NEW)
    # The schema is bounded, so grammar-constrained decoding cannot run to max_tokens.
    tasks = fmt["json_schema"]["schema"]["properties"]["tasks"]
    assert tasks["maxItems"] == 2  # --tasks-per-request 2 (fake_args)
    item = fmt["json_schema"]["schema"]["$defs"]["TaskJSON"]["properties"]
    assert all(0 < item[k]["maxLength"] < 3 * 1024 for k in ("instruction", "input", "output"))


def test_a_degenerate_reply_is_cut_and_its_repeats_rejected_once(tmp_path):
    """The tasks before the repeating are kept; the repeats are one rejection, 'degenerate'."""
    out = tmp_path / "run"
    looping = "\n".join(["Your role is to make a task fun."] * 40)

    def reply(n: int) -> str:
        return f"###\nInstruction: {NEW[n]}\nInput: <noinput>\nOutput: An answer.\n###\n" + looping

    with FakeTeacher(reply=reply) as fake:
        r = run_generate(*fake_args(fake, out, 2, "--prefill"), key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    stats = verify_run(out, 2)
    assert {o["instruction"] for o in lines(out / "kept.jsonl")} == set(NEW[:2])
    bad = [o for o in lines(out / "rejected.jsonl") if o["reason"].startswith("degenerate:")]
    assert len(bad) == 2 and all(o["stage"] == "parse" for o in bad)
    assert all(o["raw"].count("fun.") == 39 for o in bad)  # the first copy stays with the reply
    assert stats["rejected_by_reason"] == {"degenerate": 2}


def test_a_task_repeating_one_kept_earlier_in_its_own_reply_is_a_duplicate_of_it(tmp_path):
    """The pool's answer does not hold the reply's own tasks: those are scored as they are kept,
    and the score is rouge_score's."""
    from rouge_score import rouge_scorer

    out = tmp_path / "run"
    near = NEW[0].replace("three", "four")  # one word apart: ROUGE-L 0.9 with NEW[0]
    tasks = [NEW[0], near, NEW[1]]

    def reply(n: int) -> str:
        return "".join(f"###\nInstruction: {t}\nInput: <noinput>\nOutput: An answer {i}.\n" for i, t in enumerate(tasks))

    with FakeTeacher(reply=reply) as fake:
        r = run_generate(*fake_args(fake, out, 2, "--tasks-per-request", "3", "--nearest", "2"), key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 2)
    assert [o["instruction"] for o in lines(out / "kept.jsonl")] == [NEW[0], NEW[1]]
    (dup,) = [o for o in lines(out / "rejected.jsonl") if o["stage"] == "dedup"]
    want = rouge_scorer.RougeScorer(["rougeL"]).score(NEW[0], near)["rougeL"].fmeasure
    assert dup["instruction"] == near and dup["reason"].startswith(f"duplicate: ROUGE-L {want:.3f} > 0.7 with r000000-0")
    assert dup["nearest"][0] == {"id": "r000000-0", "instruction": NEW[0], "rouge_l": round(want, 6)}


def test_an_alpaca_instruction_is_kept_on_one_line(tmp_path):
    """As self-instruct and Alpaca kept theirs: line breaks and runs of spaces become one space."""
    reply = "###\nInstruction: Name three  rivers\nthat flow through more than four countries.\nInput: <noinput>\nOutput: The Danube.\n"
    with FakeTeacher(reply=lambda n: reply) as fake:
        r = run_generate(*fake_args(fake, tmp_path / "run", 1, "--tasks-per-request", "1"), key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert [o["instruction"] for o in lines(tmp_path / "run" / "kept.jsonl")] == [NEW[0]]


def test_repeat_penalty_goes_in_the_body_under_both_servers_names(tmp_path):
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, tmp_path / "a", 1), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        plain = fake.bodies[-1]
        r = run_generate(*fake_args(fake, tmp_path / "b", 1, "--repeat-penalty", "1.2"), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        penalised = fake.bodies[-1]
    # --base-url gets the 7B+ defaults: nothing a hosted API would refuse.
    assert "repeat_penalty" not in plain and "repetition_penalty" not in plain
    assert penalised["repeat_penalty"] == penalised["repetition_penalty"] == 1.2
    assert lines(tmp_path / "b" / "kept.jsonl")[0]["provenance"]["sampling"]["repeat_penalty"] == 1.2


def test_the_embedded_teacher_gets_its_defaults_and_given_options_win(tmp_path):
    """The table fills only what the user did not give (a flag or a YAML key), and config.yaml
    holds the resolved values, so a resume with the same command compares equal."""
    import argparse

    import yaml

    from selfinstruct.config import resolve, save_config
    from selfinstruct.generate import (EMBEDDED_ALPACA_DEFAULTS, EMBEDDED_DEFAULTS, EMBEDDED_STRUCTURED_DEFAULTS,
                                       GenerateOptions, add_arguments, teacher_defaults)

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("max_tokens: 700\nstructured: false\n")
    args = parser.parse_args(["--out", "r", "--config", str(run_yaml), "--tasks-per-request", "5"])
    cfg = teacher_defaults(resolve(GenerateOptions, args), "embedded")
    assert (cfg.max_tokens, cfg.structured, cfg.tasks_per_request) == (700, False, 5)  # given: kept
    assert (cfg.seed_examples, cfg.stop) == (EMBEDDED_DEFAULTS["seed_examples"], EMBEDDED_ALPACA_DEFAULTS["stop"])
    # The same command resolves the same way, and what is saved is the resolved values.
    again = teacher_defaults(resolve(GenerateOptions, args), "embedded")
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved == again.model_dump(mode="json") and saved["seed_examples"] == EMBEDDED_DEFAULTS["seed_examples"]
    # Other teachers keep the field defaults (a 7B+ model).
    plain = teacher_defaults(resolve(GenerateOptions, parser.parse_args(["--out", "r"])), "vllm")
    assert (plain.tasks_per_request, plain.max_tokens, plain.structured, plain.repeat_penalty) == (5, 1024, False, None)
    # --help says where the embedded teacher differs.
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["tasks_per_request"].endswith(f"(default: 5) (embedded teacher: {EMBEDDED_DEFAULTS['tasks_per_request']})")
    assert helps["dry_multiplier"].endswith(f"(embedded teacher: {EMBEDDED_STRUCTURED_DEFAULTS['dry_multiplier']} with --structured)")
    assert helps["max_tokens"].endswith(f"(embedded teacher: {EMBEDDED_DEFAULTS['max_tokens']}; "
                                        f"{EMBEDDED_STRUCTURED_DEFAULTS['max_tokens']} with --structured)")


def test_progress_bar_and_summary_table_say_what_stats_say(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        args = [a for a in fake_args(fake, out, 4) if a != "--no-progress"]
        env = {**os.environ, "SELFINSTRUCT_API_KEY": fake.key, "COLUMNS": "160"}
        r = subprocess.run([*GENERATE, *args], env=env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    stats = verify_run(out, 4)
    err = r.stderr.decode()
    # The bar's last state (a non-terminal gets it once, at the end) ...
    bar = next(line for line in err.splitlines() if line.startswith("kept") and "tok/s" in line)
    assert "4/4" in bar and f"rejected {stats['rejected']} " in bar and f"prompts {stats['responses']} " in bar
    # ... and the summary table, row by row.
    rows = {" ".join(c.strip() for c in line.strip("│┃ ").split("│")[:1]): line.split("│")[-2].strip()
            for line in err.splitlines() if line.count("│") == 3}
    assert rows["kept"] == "4" and rows["rejected"] == str(stats["rejected"])
    assert rows["prompts answered"] == str(stats["responses"])
    assert rows["tokens in / out"] == f"{stats['prompt_tokens']} / {stats['completion_tokens']}"


def test_lead_word_starts_the_prefill_and_a_reply_without_output_is_continued(tmp_path):
    """--lead-word: each prefill ends with the first word of a seed; --continue-output: a reply that
    stops after its input is asked to go on from 'Output:' with the same prompt, and the task is kept."""
    import random as _random

    from conftest import VOCAB

    seed_words = {s.instruction.split()[0] for s in load_seeds([bundled_dir("seeds") / "seed_tasks.jsonl"])}

    def reply(n: int) -> str:
        prefill = fake.bodies[n]["messages"][-1]["content"]
        if prefill.endswith("Output:"):
            return f" The answer to request {n}."
        words = _random.Random(n).sample(VOCAB, 9)
        return f" {' '.join(words)}.\nInput: <noinput>\n\n"  # stops before any output

    def run(out, *flags):
        return run_generate(*fake_args(fake, out, 2, "--prefill", "--tasks-per-request", "1", "--lead-word", *flags),
                            key=fake.key, timeout=120)

    with FakeTeacher(reply=reply) as fake:
        r = run(tmp_path / "run", "--continue-output")
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        bodies = list(fake.bodies)
        stats = verify_run(tmp_path / "run", 2)
        assert stats["responses"] == 2 and len(bodies) == 4  # two requests per prompt
        for first, then in zip(bodies[::2], bodies[1::2]):
            lead = first["messages"][-1]["content"]
            assert lead.startswith("###\nInstruction: ") and lead.split()[-1] in seed_words
            assert then["messages"][0] == first["messages"][0]  # the same prompt: llama.cpp reads it from its cache
            assert then["messages"][-1]["content"].startswith(lead) and then["messages"][-1]["content"].endswith(
                "\nInput: <noinput>\nOutput:")
        kept = lines(tmp_path / "run" / "kept.jsonl")
        assert [k["instances"][0]["output"] for k in kept] == ["The answer to request 1.", "The answer to request 3."]
        assert all(k["instruction"].split()[0] in seed_words for k in kept)
        # Both requests' tokens are counted (the fake counts a reply's words).
        assert stats["completion_tokens"] == sum(len(reply(n).split()) for n in range(4))
        # Without --continue-output the same replies are rejected as missing_output, one request each.
        fake.bodies.clear(), fake.prompts.clear()
        run(tmp_path / "plain", "--no-continue-output", "--max-requests", "2")
        assert len(fake.bodies) == 2
        assert {o["reason"].split(":")[0] for o in lines(tmp_path / "plain" / "rejected.jsonl")} == {"missing_output"}


def test_structured_lead_word_goes_in_the_schema_as_a_pattern(tmp_path):
    """A grammar-constrained reply cannot be prefilled: the instruction's pattern starts with the lead word."""
    import re

    seed_words = {s.instruction.split()[0] for s in load_seeds([bundled_dir("seeds") / "seed_tasks.jsonl"])}

    def reply(n: int) -> str:
        pattern = fake.bodies[n]["response_format"]["json_schema"]["schema"]["$defs"]["TaskJSON"]["properties"][
            "instruction"]["pattern"]
        lead = pattern[1:].split()[0]
        return json.dumps({"tasks": [{"instruction": f"{lead} {NEW[n]}", "input": "", "output": f"Answer {n}."}]})

    with FakeTeacher(reply=reply) as fake:
        r = run_generate(*fake_args(fake, tmp_path / "run", 2, "--structured", "--tasks-per-request", "1",
                                    "--lead-word"), key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(tmp_path / "run", 2)
    for body in fake.bodies:
        props = body["response_format"]["json_schema"]["schema"]["$defs"]["TaskJSON"]["properties"]
        lead = props["instruction"]["pattern"][1:].split()[0]
        assert lead in seed_words and f'with the word "{lead}"' in body["messages"][0]["content"]
        # What the pattern allows fits the schema's own bound, and a reply of the plain format does not match.
        assert re.fullmatch(props["instruction"]["pattern"], f"{lead} " + "x" * (props["instruction"]["maxLength"] - len(lead) - 1))
        assert not re.fullmatch(props["instruction"]["pattern"], f"### Instruction: {lead} do it")
        # The examples are shown as the JSON asked for, not as ### blocks the model would copy into its strings.
        prompt = body["messages"][0]["content"]
        shown = [json.loads(line) for line in prompt.splitlines() if line.startswith('{"instruction"')]
        assert len(shown) == 6 + 2 and all(set(s) == {"instruction", "input", "output"} for s in shown)
        assert "###" not in prompt and '{"tasks": [...]}' in prompt
    assert all(k["instruction"].split()[0] in seed_words for k in lines(tmp_path / "run" / "kept.jsonl"))


WORDS = "write a short poem about the sea list three rivers in europe explain why sky is red".split()


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_replies_decided_together_are_decided_as_one_at_a_time(data):
    """The loop decides the replies found done at one wait together (one index query per group,
    each candidate also scored against what its group kept before it): every line written,
    the pool and the quota are as when each reply is decided alone, in the same order."""
    from selfinstruct import generate
    from selfinstruct.generate import GenerateOptions, Pool, Processor
    from selfinstruct.records import Reply, Response

    words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=9).map(" ".join)

    def reply(i: int) -> Response:
        tasks = data.draw(st.lists(words, min_size=0, max_size=6))
        text = "".join(f"###\nInstruction: {t}\nInput: <noinput>\nOutput: An answer.\n" for t in tasks)
        return Response(id=f"r{i:03d}", index=i, mode="alpaca", prompt_hash="h", example_ids=[], created_at="t",
                        elapsed_s=0.0, replies=[Reply(purpose="tasks", text=text)])

    replies = [reply(i) for i in range(data.draw(st.integers(1, 12)))]
    if data.draw(st.booleans()):  # the same reply logged twice
        replies.insert(data.draw(st.integers(0, len(replies))), replies[data.draw(st.integers(0, len(replies) - 1))])
    cfg = GenerateOptions(out="unused", num=data.draw(st.integers(1, 40)), min_words=1, tasks_per_request=6,
                          nearest=data.draw(st.integers(0, 3)), nearest_floor=data.draw(st.sampled_from([None, 0.3, 0.5])))
    seeds = [("s0", "write a poem about the sea", "", "A poem."), ("s1", "list three rivers in europe", "", "Rhine.")]

    def decide(chunks, holds=None) -> tuple[list, list]:
        proc = Processor(cfg, Pool(seeds, cfg.threshold, cfg.nearest_floor), "m", "http://x", {})
        if holds is None:
            out = [lines for chunk in chunks for lines in proc.process_many(chunk)]
        else:  # as the loop calls it: groups held back between calls, then all decided
            pairs = [pair for chunk, hold in zip(chunks, holds) for pair in proc.feed(chunk, hold=hold)]
            pairs += proc.feed([])
            assert [r.id for r, _ in pairs] == [r.id for chunk in chunks for r in chunk]  # each reply once, in order
            out = [lines for _, lines in pairs]
        return ([[(f, [x.model_dump_json() for x in xs]) for f, xs in lines] for lines in out], proc.pool.machine,
                len(proc.pool.index))

    alone = decide([[r] for r in replies])
    cuts = sorted(data.draw(st.sets(st.integers(1, len(replies)), max_size=3)) | {len(replies)})
    chunks = [replies[a:b] for a, b in zip([0, *cuts], cuts)]
    holds = data.draw(st.none() | st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    with mock.patch.object(generate, "GROUP", data.draw(st.integers(1, 40))):
        together = decide(chunks, holds)
    assert together == alone


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), threshold=st.sampled_from([0.5, 0.7, 0.9]), nearest=st.integers(0, 3),
       floor=st.sampled_from([None, 0.3]), group=st.sampled_from([1, 3, 128]), hold=st.booleans())
def test_the_loops_decisions_are_the_full_scans(seed, threshold, nearest, floor, group, hold):
    """The loop's index (each group looked up once, rejected candidates' tokens kept out of
    the pool, adds by ids or by tokens, merges and rebuilds every few texts) decides every
    candidate and lists every neighbour as the full scan of every kept text does: the same
    lines, with near copies, new tokens, and tasks over the compiled LCS's 512 tokens and
    over the indexed length. Each group's pass runs on another thread while the group ahead
    is decided and added (the merges and rebuilds among it), and with ``hold`` groups wait
    between calls, as in the loop."""
    import random

    from selfinstruct import generate, rouge
    from selfinstruct.generate import GenerateOptions, Pool, Processor
    from selfinstruct.records import Reply, Response

    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(rng.randint(2, 20))]
    made: list[str] = []

    def task() -> str:
        if made and rng.random() < 0.5:  # a near copy of an earlier one, perhaps with a new token
            words = rng.choice(made).split()
            words[rng.randrange(len(words))] = rng.choice([*vocab, "new1", "new2"])
            return " ".join(words)
        return " ".join(rng.choices(vocab, k=rng.choice([3, 5, 8, 12, 530, 4100])))

    def reply(i: int) -> Response:
        tasks = [task() for _ in range(rng.randint(0, 5))]
        made.extend(tasks)
        text = "".join(f"###\nInstruction: {t}\nInput: <noinput>\nOutput: An answer.\n" for t in tasks)
        return Response(id=f"r{i:03d}", index=i, mode="alpaca", prompt_hash="h", example_ids=[], created_at="t",
                        elapsed_s=0.0, replies=[Reply(purpose="tasks", text=text)])

    seeds = [(f"s{k}", task(), "", "A.") for k in range(rng.randint(1, 4))]
    replies = [reply(i) for i in range(rng.randint(1, 10))]
    cfg = GenerateOptions(out="unused", num=1000, min_words=1, max_words=5000, tasks_per_request=5,
                          threshold=threshold, nearest=nearest, nearest_floor=floor)

    def decide(index) -> list:
        with mock.patch.object(rouge, "RougeLIndex", index), mock.patch.object(generate, "GROUP", group), \
                mock.patch.object(rouge, "_POSTINGS_PER_PART", 1):  # every pass on the other thread
            proc = Processor(cfg, Pool(seeds, cfg.threshold, cfg.nearest_floor), "m", "http://x", {})
            pairs = [pair for r in range(0, len(replies), 3) for pair in proc.feed(replies[r : r + 3], hold=hold)]
            pairs += proc.feed([])
        assert [r.id for r, _ in pairs] == [r.id for r in replies]
        return [[(f, [x.model_dump_json() for x in xs]) for f, xs in lines] for _, lines in pairs]

    class Small(rouge.RougeLIndex):  # merges and rebuilds within a few texts, its pass on two threads
        rebuild_at, merge_min = 4, 2

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "threads": 2})

    assert decide(Small) == decide(rouge.FullScanIndex)


def test_a_resume_takes_the_runs_own_value_for_every_option_left_out(tmp_path):
    """Rerunning the command resumes even where a default changed since the run began (a newer
    version, the embedded teacher's table): config.yaml stands in for every option not given.
    One given with another value is still refused, naming the field."""
    import yaml

    out = tmp_path / "run"
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 2), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        # As an older version would have saved it: defaults that differ from today's.
        saved = yaml.safe_load((out / "config.yaml").read_text())
        assert (saved["min_words"], saved["nearest"]) == (3, 3)
        saved.update(min_words=2, nearest=1)
        (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        r = run_generate(*fake_args(fake, out, 3), key=fake.key, timeout=120)  # the same command, --num grown
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        verify_run(out, 3)
        again = yaml.safe_load((out / "config.yaml").read_text())
        assert (again["min_words"], again["nearest"], again["num"]) == (2, 1, 3)
        assert len(lines(out / "kept.jsonl")[-1]["nearest"]) <= 1  # the new record was made with the run's options
        before = (out / "config.yaml").read_bytes()
        r = run_generate(*fake_args(fake, out, 4, "--min-words", "3"), key=fake.key, timeout=120)
    assert r.returncode == 2
    assert "--min-words: this run was made with 2, not 3" in r.stderr.decode()
    assert (out / "config.yaml").read_bytes() == before


def test_the_embedded_teachers_stops_end_alpaca_tasks_only():
    """'###' ends an Alpaca-format task; in the other modes it would cut a heading in an answer."""
    from selfinstruct.generate import EMBEDDED_ALPACA_DEFAULTS, GenerateOptions, teacher_defaults

    got = {mode: teacher_defaults(GenerateOptions(out="r", mode=mode), "embedded").stop
           for mode in ("alpaca", "self-instruct", "magpie")}
    assert got == {"alpaca": EMBEDDED_ALPACA_DEFAULTS["stop"], "self-instruct": [], "magpie": []}
    assert teacher_defaults(GenerateOptions(out="r", mode="magpie", stop=["END"]), "embedded").stop == ["END"]


def test_replies_on_their_way_back_when_the_quota_is_reached_are_logged(tmp_path):
    """Four prompts out (--num 2: the prior's 6, at most --concurrency), the first reply reaches
    --num with its two tasks, the other three come back 0.1 s later: they cost the teacher, so
    they are logged (their tasks rejected as quota) and counted, not dropped with the prompts still out."""
    import time

    with FakeTeacher(on_request=lambda n: time.sleep(0.1) if n else None) as fake:
        r = run_generate(*fake_args(fake, tmp_path / "run", 2, "--concurrency", "4"), key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    stats = verify_run(tmp_path / "run", 2)
    responses = lines(tmp_path / "run" / "responses.jsonl")
    assert len(fake.bodies) == 4 and len(responses) == 4
    assert stats["completion_tokens"] == sum(r["usage"]["completion_tokens"] for o in responses for r in o["replies"])
    assert stats["rejected_by_stage"].get("quota", 0) == 6


@pytest.mark.parametrize("teacher", ["embedded", "vllm"])
def test_a_teacher_that_starts_its_own_server_with_base_url_is_one_line(tmp_path, monkeypatch, capsys, teacher):
    """--teacher embedded or vllm with --base-url names two teachers: one would make the data
    and config.yaml would name the other. Refused before anything starts or a folder is made."""
    from selfinstruct import servers
    from selfinstruct.cli import main

    def started(*args, **kwargs):
        raise AssertionError("a teacher was started")

    monkeypatch.setattr(servers, "embedded_teacher", started)
    monkeypatch.setattr(servers, "vllm_replicas", started)
    out = tmp_path / "run"
    code = main(["generate", "--mode", "magpie", "--teacher", teacher, "--base-url", "http://127.0.0.1:1/v1",
                 "--model", "M", "--num", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"--teacher {teacher} starts its own teacher, so --base-url does not apply" in err
    assert not out.exists()


@pytest.mark.parametrize("how", ["flag", "yaml-empty-list"])
def test_a_model_without_a_server_is_one_line_not_the_embedded_teacher(tmp_path, monkeypatch, capsys, how):
    """--model with no --base-url (or YAML's ``base_url: []``) named a server's model, yet the
    embedded SmolLM2-135M made the data and --model went unused: refused before anything starts."""
    from selfinstruct import servers
    from selfinstruct.cli import main

    def started(*args, **kwargs):
        raise AssertionError("a teacher was started")

    monkeypatch.setattr(servers, "embedded_teacher", started)
    out = tmp_path / "run"
    if how == "flag":
        argv = ["--model", "Qwen/Qwen2.5-7B-Instruct"]
    else:
        (tmp_path / "run.yaml").write_text("base_url: []\nmodel: Qwen/Qwen2.5-7B-Instruct\n")
        argv = ["--config", str(tmp_path / "run.yaml")]
    code = main(["generate", *argv, "--num", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    said = "--model 'Qwen/Qwen2.5-7B-Instruct'" if how == "flag" else f"{tmp_path / 'run.yaml'}: model: 'Qwen/Qwen2.5-7B-Instruct'"
    assert f"{said} names the model of a --base-url server" in err
    assert not out.exists()


def test_a_corrected_first_command_names_its_own_teacher(tmp_path, capsys):
    """The --teacher given is not contradicted by the --base-url the run folder saved (nor
    --base-url by a saved --teacher): a first command that made nothing takes the corrected
    command, and a run that made something is refused on 'teacher', as any changed option."""
    import yaml

    from selfinstruct.cli import main
    from selfinstruct.config import UserError
    from selfinstruct.generate import GenerateOptions, as_the_run_was

    out = tmp_path / "run"
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 1, "--max-requests", "1"), key=fake.key, timeout=120)
    assert r.returncode == 0 and yaml.safe_load((out / "config.yaml").read_text())["base_url"] == [fake.base_url]
    assert main(["generate", "--teacher", "embedded", "--num", "2", "--out", str(out), "--no-progress"]) == 2
    assert "--teacher: this run was made with 'openai', not 'embedded'" in capsys.readouterr().err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**saved, "teacher": "vllm", "base_url": []}))
    with pytest.raises(UserError, match="--base-url: this run was made with teacher 'vllm', not 'openai'"):
        as_the_run_was(GenerateOptions(out=str(out), base_url=["http://127.0.0.1:2/v1"]))
    for name in ("responses.jsonl", "kept.jsonl", "rejected.jsonl"):  # as a first command that made nothing
        (out / name).write_text("")
    cfg = as_the_run_was(GenerateOptions(out=str(out), teacher="embedded"))
    assert (cfg.teacher, cfg.base_url) == ("embedded", [])
    cfg = as_the_run_was(GenerateOptions(out=str(out), base_url=["http://127.0.0.1:2/v1"]))
    assert (cfg.teacher, cfg.base_url) == (None, ["http://127.0.0.1:2/v1"])


def test_a_resume_parses_again_only_the_logged_replies_with_a_candidate_undecided():
    """Each reply is logged with how many candidates it gave. A resume replays the whole log, and
    passes over a reply whose candidates are all decided without parsing it (most of a long
    run's log, and a parser changed since would read it otherwise); a reply cut by a kill
    between its rejected and kept lines, or logged before counts were, is parsed as before."""
    from selfinstruct import generate
    from selfinstruct.generate import GenerateOptions, Pool, Processor
    from selfinstruct.records import Reply, Response

    cfg = GenerateOptions(out="unused", num=1000, min_words=1, tasks_per_request=3)
    seeds = [("s0", "write a poem about the sea", "", "A poem.")]
    topics = [["list three rivers", "x", "name a blue fruit"], ["sum two numbers", "explain why sky is red", "y"],
              ["sort a list of words", "z", "translate hello to french"]]
    replies = [Response(id=f"r{i:03d}", index=i, mode="alpaca", prompt_hash="h", example_ids=[], created_at="t",
                        elapsed_s=0.0, replies=[Reply(purpose="tasks", text="".join(
                            f"###\nInstruction: {t}\nInput: <noinput>\nOutput: An answer.\n" for t in tasks))])
               for i, tasks in enumerate(topics)]
    first = Processor(cfg, Pool(seeds, cfg.threshold), "m", "http://x", {}).process_many(replies)
    assert [r.candidates for r in replies] == [3, 3, 3]
    logged = [Response.model_validate_json(r.model_dump_json()) for r in replies]  # as the resume reads them
    kept_last = {rec.id for rec in first[2][1][1]}
    assert kept_last == {"r002-0", "r002-2"}
    done = {rec.id for lines in first for _, recs in lines for rec in recs} - kept_last  # killed before them

    def resume(log: list[Response]) -> tuple[list[str], list]:
        parsed, real = [], generate.candidates_of
        with mock.patch.object(generate, "candidates_of", lambda resp, c: parsed.append(resp.id) or real(resp, c)):
            proc = Processor(cfg, Pool(seeds, cfg.threshold), "m", "http://x", {})
            proc.done = set(done)
            out = proc.process_many(log)
        return parsed, [[(f, sorted(rec.id for rec in recs)) for f, recs in lines] for lines in out]

    parsed, out = resume(logged)
    assert parsed == ["r002"]
    assert out == [[("rejected.jsonl", []), ("kept.jsonl", [])]] * 2 + [[("rejected.jsonl", []),
                                                                          ("kept.jsonl", ["r002-0", "r002-2"])]]
    older = [Response.model_validate({**json.loads(r.model_dump_json()), "candidates": None}) for r in replies]
    assert resume(older) == (["r000", "r001", "r002"], out)


@pytest.mark.parametrize("flags,message", [
    # --base-url turns the prefill off, and the lead word goes through it: the flag did nothing.
    (["--lead-word"], "--lead-word starts each instruction through --prefill or --structured, and this run has neither"),
    (["--mode", "self-instruct", "--lead-word", "--prefill"], "--lead-word applies to --mode alpaca only, not self-instruct"),
    (["--mode", "self-instruct", "--continue-output"], "--continue-output applies to --mode alpaca only, not self-instruct"),
    (["--mode", "self-instruct", "--prefill"], "--prefill applies to --mode alpaca only, not self-instruct"),
    (["--instances-per-task", "3"], "--instances-per-task applies to --mode self-instruct only, not alpaca"),
    (["--followup-sampling", "run"], "--followup-sampling applies to --mode self-instruct only, not alpaca"),
    (["--structured", "--continue-output"], "--continue-output applies to text replies, not --structured"),
    (["--structured", "--prefill"], "--prefill applies to text replies, not --structured"),
    (["--magpie-prefix", "<|im_start|>user\\n"], "--magpie-prefix applies to --mode magpie only, not alpaca"),
    # Taken as not given: the chat template was looked for, and its absence said "pass --magpie-prefix".
    (["--mode", "magpie", "--magpie-prefix", ""], "--magpie-prefix: is empty; give the text that opens a user turn"),
    # Magpie asks for one query from the pre-query alone: no examples shown, one task a request.
    (["--mode", "magpie", "--tasks-per-request", "5"], "--tasks-per-request does nothing in --mode magpie"),
    (["--mode", "magpie", "--seed-examples", "3"], "--seed-examples does nothing in --mode magpie"),
    (["--mode", "magpie", "--machine-examples", "0"], "--machine-examples does nothing in --mode magpie"),
    # No example in any prompt, what a template without $examples is refused for; self-instruct shows the same counts.
    (["--seed-examples", "0", "--machine-examples", "0"], "--seed-examples 0 with --machine-examples 0 shows no "
                                                          "example in any prompt"),
    (["--mode", "self-instruct", "--machine-examples", "0", "--seed-examples", "0"],
     "--seed-examples 0 with --machine-examples 0 shows no example in any prompt"),
], ids=["lead-no-prefill", "lead", "continue", "prefill", "instances", "followup-sampling", "continue-structured", "prefill-structured",
        "magpie-prefix", "magpie-prefix-empty", "magpie-tasks", "magpie-seed-examples", "magpie-machine-examples",
        "no-examples", "no-examples-self-instruct"])
def test_an_option_that_would_do_nothing_is_one_line_before_any_folder(tmp_path, capsys, flags, message):
    """Each of these was taken and silently unused: the run made data without what was asked for."""
    from selfinstruct.cli import main

    out = tmp_path / "run"
    assert main(["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"selfinstruct generate: error: {message}" in err, err
    assert not out.exists()


def test_an_out_that_is_a_link_to_nothing_is_one_line_naming_the_link(tmp_path, capsys):
    """`--out outputs/current`, a link to a run since deleted: it said `cannot create the run folder
    (File exists)`, of a path that ls does not show. Named as export names such an --out, nothing made."""
    from selfinstruct.cli import main

    out = tmp_path / "current"
    out.symlink_to(tmp_path / "run-5")
    assert main(["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"selfinstruct generate: error: {out}: is a symbolic link to {tmp_path / 'run-5'}, "
                                       "which is not there; give an --out that is (or the link's target made first)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current"] and out.is_symlink()


def test_no_examples_is_named_as_given_the_file_its_key_and_the_embedded_teachers_default(tmp_path, capsys):
    """The embedded teacher shows no generated task by default (machine_examples 0): --seed-examples 0
    alone left every prompt bare. Each count is named as the command gave it, or as left out."""
    from selfinstruct.cli import main

    out, config = tmp_path / "run", tmp_path / "c.yaml"
    config.write_text("seed_examples: 0\n")
    for flags, said in [(["--seed-examples", "0"], "--seed-examples 0 with --machine-examples (default 0)"),
                        (["--config", str(config)], f"{config}: seed_examples: 0 with machine_examples (default 0)"),
                        (["--config", str(config), "--machine-examples", "0", "--base-url", "http://127.0.0.1:9/v1",
                          "--model", "m"], f"{config}: seed_examples: 0 with --machine-examples 0")]:
        assert main(["generate", "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: {said} shows no example in any prompt" in err, err
    assert not out.exists()
    # One example of either is enough: past the options, to the (absent) teacher.
    assert main(["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out),
                 "--seed-examples", "0", "--machine-examples", "1"]) == 2
    assert "cannot be reached" in capsys.readouterr().err


LEAD_WORD = "starts each instruction through --prefill or --structured, and this run has neither"


@pytest.mark.parametrize("teacher, yaml_text, flags, said", [
    ([], None, ["--lead-word", "--no-prefill"],
     f"--lead-word {LEAD_WORD} (--no-prefill was given): leave --no-prefill out, or give --structured"),
    (["--base-url", "http://127.0.0.1:9/v1", "--model", "m"], None, ["--lead-word", "--no-prefill"],
     f"--lead-word {LEAD_WORD} (--no-prefill was given): give --prefill instead if the server continues an assistant "
     "message (llama.cpp, vLLM do), or --structured"),
    ([], "lead_word: true\nprefill: false\n", [],
     f"c.yaml: lead_word {LEAD_WORD} (prefill: false was given): leave prefill: false out, or give --structured"),
    ([], "prefill: false\n", ["--lead-word"],
     f"c.yaml: --lead-word {LEAD_WORD} (prefill: false was given): leave prefill: false out, or give --structured"),
], ids=["embedded-flag", "base-url-flag", "embedded-file", "file-and-flag"])
def test_lead_word_with_the_prefill_turned_off_says_who_turned_it_off(tmp_path, capsys, teacher, yaml_text, flags, said):
    """--lead-word --no-prefill was told "--prefill is off for --base-url": a default the user had
    overridden, and with the embedded teacher no --base-url at all. It names what was given."""
    from selfinstruct.cli import main

    config = tmp_path / "c.yaml"
    if yaml_text:
        config.write_text(yaml_text)
    out = tmp_path / "run"
    argv = ["generate", *teacher, "--out", str(out), *(["--config", str(config)] if yaml_text else []), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err == f"selfinstruct generate: error: {said.replace('c.yaml', str(config))}\n", err
    assert not out.exists()


def test_options_left_at_their_defaults_or_turned_off_are_not_refused_in_any_mode(tmp_path, capsys):
    """The embedded teacher's table turns --lead-word and --continue-output on in every mode, and
    config.yaml saves them; only an option this command gives is held to its mode."""
    from selfinstruct.cli import main

    out = tmp_path / "run"
    assert main(["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out),
                 "--mode", "self-instruct", "--no-lead-word", "--no-continue-output", "--no-prefill"]) == 2
    assert "cannot be reached" in capsys.readouterr().err  # past the options, to the teacher


def test_a_resume_with_an_edited_template_of_your_own_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """config.yaml keeps --prompts as a path, so an edited alpaca.txt, or a folder of that name
    read from elsewhere, went on silently: the run's prompts changed halfway, each record
    keeping a hash no template of the run has. Refused with one line, as other seeds are;
    the template put back resumes."""
    from selfinstruct.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    template = (bundled_dir("prompts") / "alpaca.txt").read_text()
    (mine / "alpaca.txt").write_text(template)
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        def args(num: int) -> list[str]:
            return ["generate", "--prompts", str(mine), *fake_args(fake, out, num)]

        assert main(args(2)) == 0
        def files() -> dict:  # the lock file says who holds the folder now: not the run's
            return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".selfinstruct-lock"}

        before = files()
        (mine / "alpaca.txt").write_text(template.replace("Invent $num new tasks.", "Invent $num new cooking tasks."))
        capsys.readouterr()
        assert main(args(4)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{mine / 'alpaca.txt'}: not the template this run's prompts were made with" in err, err
        assert files() == before
        (mine / "alpaca.txt").write_text(template)
        assert main(args(4)) == 0
    verify_run(out, 4)


def test_an_empty_stop_string_is_none_not_a_stop_at_the_first_token(tmp_path):
    """--stop '' was sent as a stop string: llama.cpp (the embedded teacher) stopped every reply
    after one token, so nothing was ever kept. It now gives no stop strings, the way to turn
    off the embedded teacher's own ('###', '\\nInstruction') from a command line."""
    import argparse

    from selfinstruct.config import resolve
    from selfinstruct.generate import GenerateOptions, add_arguments, teacher_defaults

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert teacher_defaults(resolve(GenerateOptions, p.parse_args(["--out", "o", "--stop", ""])), "embedded").stop == []
    assert resolve(GenerateOptions, p.parse_args(["--out", "o", "--stop", "", "\n\n"])).stop == ["\n\n"]
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, tmp_path / "run", 2, "--stop", ""), key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert all(not body.get("stop") for body in fake.bodies)


@pytest.mark.parametrize("flags,message", [
    (["--teacher-model", "{tmp}/missing.gguf"], "{tmp}/missing.gguf: teacher model file not found"),
    (["--teacher", "vllm", "--vllm-bin", "{tmp}/vllm", "--model", "{tmp}/missing"], "{tmp}/missing: model folder not found"),
    (["--teacher", "vllm", "--vllm-bin", "{tmp}/vllm", "--model", "./missing.gguf"], "./missing.gguf: model file not found"),
    (["--teacher", "vllm", "--vllm-bin", "{tmp}/nowhere", "--model", "Qwen/Qwen2.5-7B-Instruct"],
     "{tmp}/nowhere: not an executable vllm"),
    # models/qwen is made below: a relative folder with one slash, read as a hub id before
    (["--teacher", "vllm", "--vllm-bin", "{tmp}/vllm", "--model", "models/qwen"], "models/qwen: not a model folder (no config.json)"),
    (["--teacher-model", "models/qwen"], "models/qwen: a folder, not a GGUF file"),
], ids=["teacher-model", "vllm-folder", "vllm-gguf", "vllm-bin", "vllm-one-slash-folder", "teacher-model-folder"])
@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
def test_a_teacher_file_that_is_not_there_is_one_line_before_the_folder_is_touched(tmp_path, monkeypatch, capsys,
                                                                                  flags, message, resume):
    """A missing --teacher-model, --vllm-bin, or local --model for vLLM was found only when the
    teacher started: the new run folder was left behind (config.yaml, stats.json), and a resumed
    one had its config.yaml rewritten. Now refused before either."""
    from selfinstruct.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "qwen").mkdir(parents=True)
    (tmp_path / "vllm").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "vllm").chmod(0o755)
    out = tmp_path / "run"
    argv = [f.format(tmp=tmp_path) for f in flags]
    if resume:  # the run was made with these options; the file has gone since
        import yaml

        with FakeTeacher() as fake:
            monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
            assert main(["generate", *fake_args(fake, out, 1)]) == 0
        saved = yaml.safe_load((out / "config.yaml").read_text())
        given = {argv[i][2:].replace("-", "_"): argv[i + 1] for i in range(0, len(argv), 2)}
        (out / "config.yaml").write_text(yaml.safe_dump({**saved, "base_url": [], "model": None, **given}))

        def files() -> dict:  # the lock file says who holds the folder now: not the run's
            return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".selfinstruct-lock"}

        before = files()
        capsys.readouterr()
    assert main(["generate", *argv, "--num", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
    if resume:
        assert files() == before
    else:
        assert not out.exists()


@pytest.mark.parametrize("name", ["self_instruct_classify.txt", "self_instruct_instances_input_first.txt",
                                  "self_instruct_instances_output_first.txt", "self_instruct_instructions.txt"])
def test_a_resume_with_an_edited_self_instruct_template_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys, name):
    """Only the template whose hash each reply logs was checked on resume: an edited
    classification or instances template of a --prompts folder resumed silently, and the run's
    follow-up prompts changed halfway. seeds.json now keeps every template's hash."""
    import random

    from conftest import VOCAB
    from selfinstruct.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    for path in bundled_dir("prompts").glob("self_instruct_*.txt"):
        (mine / path.name).write_text(path.read_text())
    original = (mine / name).read_text()

    def reply(n: int) -> str:
        prompt = fake.prompts[n]
        if prompt.startswith("Invent new tasks"):
            first = int(prompt.split("numbered from Task ")[1].split()[0])
            rng = random.Random(n)
            return "\n".join(f"Task {first + i}: Describe {' '.join(rng.sample(VOCAB, 8))}." for i in range(2))
        if "Is this a classification task?" in prompt:
            return "Yes" if n % 4 == 1 else "No"  # both instances templates are used
        return "Example 1\nInput: <noinput>\nOutput: A short answer.\n" if "Input" in prompt.split("Task:")[0] \
            else "Class label: Yes\nInput: A short text.\n"

    out = tmp_path / "run"
    with FakeTeacher(reply=reply) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)

        def args(num: int) -> list[str]:
            return ["generate", "--mode", "self-instruct", "--prompts", str(mine), *fake_args(fake, out, num)]

        assert main(args(2)) == 0

        def files() -> dict:  # the lock file says who holds the folder now: not the run's
            return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".selfinstruct-lock"}

        before = files()
        (mine / name).write_text(original + "\nBe brief.\n")
        capsys.readouterr()
        assert main(args(4)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{mine / name}: not the template this run's prompts were made with" in err, err
        assert files() == before
        (mine / name).write_text(original)
        assert main(args(4)) == 0
    verify_run(out, 4)
    kept = json.loads((out / "seeds.json").read_text())["templates"]
    assert sorted(kept) == sorted(p.name for p in mine.iterdir())


@pytest.mark.parametrize("mode,option,n,field", [
    ("alpaca", "--tasks-per-request", 20, "instruction"),
    ("self-instruct", "--tasks-per-request", 60, "instructions"),
    ("self-instruct", "--instances-per-task", 20, "input"),
])
def test_structured_with_too_many_items_for_max_tokens_is_one_line_naming_what_to_change(tmp_path, capsys, mode,
                                                                                      option, n, field):
    """--structured shares --max-tokens among the list's items, each string a maxLength: 20 tasks
    at the default 1,024 tokens left each instruction 20 characters, so nearly every task was
    rejected as truncated. Refused before a run begins, with the values that would do; the
    values the line gives pass, one step short of them does not."""
    import re

    from selfinstruct.cli import main

    runs = iter(range(10))

    def run(*flags: str) -> str:  # each in a new folder: a folder's first command saves what it left out
        out = tmp_path / f"run{next(runs)}"
        assert main(["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out),
                     "--mode", mode, "--structured", *flags]) == 2
        return capsys.readouterr().err

    err = run(option, str(n))
    assert err.count("\n") == 1 and not (tmp_path / "run0").exists(), err
    said = re.search(rf"--structured with {option} {n} and --max-tokens 1024 leaves each {field} at most (\d+) "
                     rf"characters; raise --max-tokens to (\d+), or lower {option} to (\d+)", err)
    assert said, err
    assert int(said[1]) < 60
    tokens, most = int(said[2]), int(said[3])
    assert "cannot be reached" in run(option, str(n), "--max-tokens", str(tokens))  # past the options
    assert "leaves each" in run(option, str(n), "--max-tokens", str(tokens - 1))
    assert "cannot be reached" in run(option, str(most))
    assert "leaves each" in run(option, str(most + 1))


def test_a_run_made_with_a_structured_list_that_long_resumes_with_it(tmp_path, monkeypatch):
    """The check is for a run that begins: a run made with such options (before the check) cannot
    change --max-tokens or --tasks-per-request on resume, so it goes on with them."""
    import yaml

    from selfinstruct.cli import main

    short = ["Name two red fruit.", "List two old cars."]  # within the 20 characters 20 tasks leave

    def reply(n: int) -> str:
        return json.dumps({"tasks": [{"instruction": short[n % 2], "input": "", "output": "An answer."}]})

    out = tmp_path / "run"
    with FakeTeacher(reply=reply) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        args = ["generate", "--base-url", fake.base_url, "--model", "fake", "--out", str(out), "--structured",
                "--concurrency", "1", "--no-progress"]
        assert main([*args, "--num", "1"]) == 0
        saved = yaml.safe_load((out / "config.yaml").read_text())
        (out / "config.yaml").write_text(yaml.safe_dump({**saved, "tasks_per_request": 20}))
        assert main([*args, "--num", "2"]) == 0
    assert fake.bodies[-1]["response_format"]["json_schema"]["schema"]["properties"]["tasks"]["maxItems"] == 20


def test_a_count_of_one_in_generates_lines_is_said_in_the_singular(tmp_path, monkeypatch, capsys):
    """'stopped after 1 prompts', 'began with their 1 tasks', '1 seed tasks from', '1 requests, 1 faults'."""
    from selfinstruct.cli import main
    from selfinstruct.progress import RunProgress

    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "my.jsonl").write_text(json.dumps(
            {"instruction": f"Write a short poem about the {where} river.", "input": "", "output": "A poem."}) + "\n")
    monkeypatch.chdir(tmp_path / "a")
    out = tmp_path / "run"
    with FakeTeacher(reply=lambda n: "nothing to parse") as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        args = ["generate", "--seeds", "my.jsonl", *fake_args(fake, out, 1, "--max-requests", "1")]
        assert main(args) == 1
        assert "stopped after 1 prompt (--max-requests 1) with 0 of 1 kept" in capsys.readouterr().err
        (tmp_path / "a" / "my.jsonl").write_text((tmp_path / "b" / "my.jsonl").read_text())
        assert main(args) == 2
        assert "(they were edited since it began with their 1 task: put them back" in capsys.readouterr().err
        monkeypatch.chdir(tmp_path / "b")
        assert main(args) == 2
        assert "(this run began with 1 seed task from " in capsys.readouterr().err
    stats = {"kept": 0, "rejected": 0, "rejected_by_reason": {}, "responses": 1, "failed_units": 0, "prompt_tokens": 1,
             "completion_tokens": 1, "wall_time_s": 1.0, "servers": {
                 u: {"requests": n, "faults": {"timeout": n}, "taken_out": 0} for u, n in (("http://a:1/v1", 1), ("http://b:1/v1", 2))}}
    RunProgress(1, enabled=False).summary(stats)
    err = capsys.readouterr().err
    assert "1 request, 1 fault" in err and "2 requests, 2 faults" in err, err


def test_a_resume_takes_the_runs_own_value_that_a_check_added_since_would_refuse(tmp_path, monkeypatch, capsys):
    """A run saved with 'c++' in its blacklist (before a word that cannot match whole was refused)
    could not be resumed: the saved value was refused, naming config.yaml, and no flag could
    change it. Left out, it is taken as the run decided with it; a flag still refuses it. A saved
    --max-words at or below --min-words is still refused: that run rejects every task."""
    import yaml

    from selfinstruct.cli import main
    from selfinstruct.datafiles import mark_run_folder
    from selfinstruct.generate import GenerateOptions, as_the_run_was

    out = tmp_path / "run"
    with FakeTeacher() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(["generate", *fake_args(fake, out, 1)]) == 0
        saved = yaml.safe_load((out / "config.yaml").read_text())
        (out / "config.yaml").write_text(yaml.safe_dump({**saved, "blacklist": ["image", "c++"]}, sort_keys=False))
        assert main(["generate", *fake_args(fake, out, 2)]) == 0
        assert yaml.safe_load((out / "config.yaml").read_text())["blacklist"] == ["image", "c++"]
        capsys.readouterr()
        assert main(["generate", *fake_args(fake, out, 3, "--blacklist", "image", "c++")]) == 2
        assert "--blacklist: 'c++' can never match" in capsys.readouterr().err
    # magpie: an empty --magpie-prefix was taken as none (the chat template read), and so it still is.
    # (A magpie run of its own: this one's replies were made in alpaca mode, which its mode must be.)
    magpie = tmp_path / "magpie"
    magpie.mkdir()
    mark_run_folder(magpie)
    (magpie / "config.yaml").write_text(yaml.safe_dump({**saved, "mode": "magpie", "magpie_prefix": ""}))
    assert as_the_run_was(GenerateOptions(out=str(magpie))).magpie_prefix == ""
    (out / "config.yaml").write_text(yaml.safe_dump({**saved, "max_words": 3}))
    assert main(["generate", "--out", str(out), "--base-url", fake.base_url, "--model", "fake"]) == 2
    # ...naming the run's own min_words, not a --min-words the command did not give
    assert "config.yaml: field 'max_words': must be above the run's min_words (3), got 3" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--teacher-model", "my.gguf"], "--teacher-model applies to --teacher embedded (no --base-url), not this run's teacher (openai)"),
    (["--teacher-threads", "3"], "--teacher-threads applies to --teacher embedded (no --base-url), not this run's teacher (openai)"),
    (["--teacher-parallel", "4"], "--teacher-parallel applies to --teacher embedded (no --base-url), not this run's teacher (openai)"),
    (["--vllm-bin", "vllm"], "--vllm-bin applies to --teacher vllm, not this run's teacher (openai)"),
    (["--teacher-replicas", "2"], "--teacher-replicas applies to --teacher vllm, not this run's teacher (openai)"),
    (["--", "--max-model-len", "2048"], "flags after '--' go to 'vllm serve', for --teacher vllm, not this run's teacher (openai)"),
], ids=["teacher-model", "threads", "parallel", "vllm-bin", "replicas", "vllm-args"])
def test_an_option_of_another_teacher_is_one_line_before_any_folder(tmp_path, capsys, flags, message):
    """--teacher-model with --base-url was taken and silently unused: the server made the data
    that the command said a GGUF of the user's would make. So were the others' options."""
    from selfinstruct.cli import main

    out = tmp_path / "run"
    assert main(["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"selfinstruct generate: error: {message}" in err, err
    assert not out.exists()
    # At its default it is not refused: a YAML file may hold the embedded teacher's settings.
    assert main(["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out),
                 "--teacher-parallel", "2", "--teacher-replicas", "1"]) == 2
    assert "cannot be reached" in capsys.readouterr().err


@pytest.mark.parametrize("spelled", ["~/mine", "./mine/", "absolute"])
def test_a_resume_takes_its_prompts_folder_however_it_is_spelled(tmp_path, monkeypatch, capsys, spelled):
    """config.yaml kept --prompts as given ('mine') and a resume compared the strings, so the same
    folder spelled `~/mine` (a home path since PATH_OPTIONS), ./mine/ or absolute was 'this run was
    made with ...'. seeds.json keeps each template's hash, which is what decides; an edited one is
    still refused."""
    from selfinstruct.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "alpaca.txt").write_text((bundled_dir("prompts") / "alpaca.txt").read_text())
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(["generate", "--prompts", "mine", *fake_args(fake, out, 2)]) == 0
        now = {"~/mine": "~/mine", "./mine/": "./mine/", "absolute": str(tmp_path / "mine")}[spelled]
        capsys.readouterr()
        assert main(["generate", "--prompts", now, *fake_args(fake, out, 4)]) == 0, capsys.readouterr().err
        (tmp_path / "mine" / "alpaca.txt").write_text((tmp_path / "mine" / "alpaca.txt").read_text() + "\nBe brief.\n")
        capsys.readouterr()
        assert main(["generate", "--prompts", "mine", *fake_args(fake, out, 6)]) == 2
        assert "not the template this run's prompts were made with" in capsys.readouterr().err
    verify_run(out, 4)


@pytest.mark.parametrize("name", ["rejected.jsonl", "errors.jsonl", "responses.jsonl", "kept.jsonl", "stats.json",
                                  "config.yaml"])
def test_a_run_file_that_is_a_fifo_is_one_line_on_resume(tmp_path, name):
    """A FIFO in place of a run file held the resume forever (its open waits for a writer), as
    respond's and evolve's did before 0259d9e: one line naming it, the folder untouched."""
    from conftest import one_error_line, snapshot

    out = tmp_path / "run"
    with FakeTeacher() as fake:
        assert run_generate(*fake_args(fake, out, 2), key=fake.key, timeout=120).returncode == 0
        (out / name).unlink()
        os.mkfifo(out / name)
        before, asked = snapshot(out), len(fake.prompts)
        # The timeout only turns the hang this guards against into a failure.
        r = run_generate(*fake_args(fake, out, 4), key=fake.key, timeout=60)
    assert r.returncode == 2
    assert one_error_line(r.stderr).endswith(f"{out / name}: is not a regular file (a FIFO, device or socket); "
                                             "selfinstruct reads and writes this file itself: move it out of the way")
    assert snapshot(out) == before and len(fake.prompts) == asked


class RefusesFirst(FakeTeacher):
    """A FakeTeacher that answers its first POST with a 400 (a prompt too long for its context)."""

    def _handler(self):
        fake, base = self, super()._handler()
        fake.refused = 0

        class Handler(base):
            def do_POST(self):
                with fake._lock:
                    refuse, fake.refused = fake.refused == 0, 1
                if not refuse:
                    return super().do_POST()
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send(400, {"error": {"message": "maximum context length", "type": "BadRequestError", "code": 400}})

        return Handler


def test_the_summary_table_says_its_faults_are_retried_or_not(tmp_path):
    """The table said 'faults retried 1' for a 400, which is never retried: the count is stats.json's
    faults, every failed attempt, so the line says so and names the kinds."""
    out = tmp_path / "run"
    with RefusesFirst() as fake:
        env = {**os.environ, "SELFINSTRUCT_API_KEY": fake.key, "COLUMNS": "160"}
        r = subprocess.run([*GENERATE, *fake_args(fake, out, 4)], env=env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["faults"] == {"http_400": 1} and stats["failed_units"] == 1
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in r.stderr.decode().splitlines() if line.count("│") == 3}
    assert "faults retried" not in rows
    assert rows["faults, retried or not"] == "1" and rows["http_400"] == "1"


def test_a_command_naming_another_teacher_takes_neither_the_runs_servers_nor_its_model(tmp_path):
    """As respond and evolve: the run's --model is its server's. A corrected first command that names
    the embedded teacher took the run's 'Qwen/Q', and config.yaml said the embedded teacher's data came
    from it; it takes nothing from a folder that made nothing (its --temperature 0.3 neither), and a
    command naming the same teacher still takes the run's own."""
    import yaml

    from selfinstruct.datafiles import mark_run_folder
    from selfinstruct.generate import GenerateOptions, as_the_run_was

    out = tmp_path / "run"
    out.mkdir()
    mark_run_folder(out)
    saved = GenerateOptions(out=str(out), base_url=["http://127.0.0.1:2/v1"], model="Qwen/Q", temperature=0.3)
    (out / "config.yaml").write_text(yaml.safe_dump(saved.model_dump(mode="json"), sort_keys=False))
    cfg = as_the_run_was(GenerateOptions(out=str(out), teacher="embedded"))
    assert (cfg.teacher, cfg.base_url, cfg.model, cfg.temperature) == ("embedded", [], None, 0.7)
    cfg = as_the_run_was(GenerateOptions(out=str(out), teacher="openai"))
    assert (cfg.base_url, cfg.model, cfg.temperature) == (["http://127.0.0.1:2/v1"], "Qwen/Q", 0.3)


WHY_WORDS = "(no instruction could pass: one needs more than min and at most max words)"
WHY_FLOOR = "(else a duplicate would not name what it duplicates)"


@pytest.mark.parametrize("given, yaml_text, said", [
    (["--max-words", "5"], None, f"--max-words 5 must be above the run's min_words (6) {WHY_WORDS}"),
    ([], "max_words: 5\n", f"c.yaml: max_words: 5 must be above the run's min_words (6) {WHY_WORDS}"),
    ([], "min_words: 120\n", f"c.yaml: min_words: 120 must be below the run's max_words (100) {WHY_WORDS}"),
    (["--min-words", "120"], None, f"--min-words 120 must be below the run's max_words (100) {WHY_WORDS}"),
    ([], "threshold: 0.3\n", f"c.yaml: the run's nearest_floor (0.5) must be at most threshold: 0.3 {WHY_FLOOR}"),
    (["--threshold", "0.3"], None, f"the run's nearest_floor (0.5) must be at most --threshold 0.3 {WHY_FLOOR}"),
    ("pipeline", "generate:\n  min_words: 120\n",
     f"c.yaml: generate.min_words: 120 must be below the run's max_words (100) {WHY_WORDS}"),
], ids=["flag", "config", "config-min-words", "flag-min-words", "config-threshold", "flag-threshold", "pipeline"])
def test_a_value_given_that_the_runs_own_contradicts_is_named_as_given(tmp_path, capsys, given, yaml_text, said):
    """A resume whose --max-words is not above the run's own --min-words named the run's config.yaml
    ('run/config.yaml: field 'max_words''), a value the user had not written there; one whose
    --config gave min_words: 120 above the run's max_words 100 was 'run/config.yaml: field 'max_words':
    must be above --min-words (120)', a flag never typed. Each is named as it was given: the flag,
    or the --config file (or a pipeline section) and its key, and the run's own as the run's."""
    import yaml

    from selfinstruct.cli import main
    from selfinstruct.datafiles import mark_run_folder
    from selfinstruct.generate import GenerateOptions

    out = tmp_path / "run"
    out.mkdir()
    mark_run_folder(out)
    saved = GenerateOptions(out=str(out), base_url=["http://127.0.0.1:2/v1"], model="m", min_words=6, max_words=100,
                            nearest_floor=0.5)
    (out / "config.yaml").write_text(yaml.safe_dump(saved.model_dump(mode="json"), sort_keys=False))
    before = (out / "config.yaml").read_text()
    config = tmp_path / "c.yaml"
    if given == "pipeline":
        config.write_text(yaml_text + f"  out: {out}\n")
        argv = ["pipeline", "--config", str(config), "--skip-tune"]
    else:
        if yaml_text:
            config.write_text(yaml_text)
        argv = ["generate", *given, *(["--config", str(config)] if yaml_text else []), "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    said = said.replace("c.yaml", str(config))
    assert err.count("\n") == 1 and f"error: {said}" in err, err
    assert (out / "config.yaml").read_text() == before


@pytest.mark.parametrize("parsed_now", ["fewer", "moved"])
def test_a_logged_reply_whose_candidates_moved_since_it_was_decided_is_refused_and_writes_nothing(
        tmp_path, monkeypatch, capsys, parsed_now):
    """A resume parses again a logged reply with a candidate undecided (a kill between its rejected
    and kept lines) and names its candidates by position. Parsed otherwise now (another version's
    parser, or an option that shapes it), an id already decided went to another instruction, and an
    instruction decided before was decided again under another id. Now the resume is refused in one
    line naming the reply's line of responses.jsonl, before anything is written; the same parser resumes."""
    from conftest import snapshot

    from selfinstruct import generate
    from selfinstruct.cli import main

    def reply(n: int) -> str:
        if n != 1:
            return diverse_tasks(n, 3)
        # The second reply's middle task is a seed's copy: rejected, so decided before the kill.
        return "".join(f"###\nInstruction: {t}\nInput: <noinput>\nOutput: An answer about it.\n" for t in (NEW[0], SEED, NEW[1]))

    out = tmp_path / "run"
    with FakeTeacher(reply=reply) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        args = ["generate", *fake_args(fake, out, 5, "--tasks-per-request", "3")]
        assert main(args) == 0
        assert [o["candidates"] for o in lines(out / "responses.jsonl")] == [3, 3]
        assert {o["id"] for o in lines(out / "rejected.jsonl")} == {"r000001-1"}
        # As a kill between the second reply's rejected and kept lines leaves the run.
        kept = (out / "kept.jsonl").read_text().splitlines(keepends=True)
        (out / "kept.jsonl").write_text("".join(l for l in kept if not l.startswith('{"id":"r000001-')))
        before = snapshot(out)
        real = generate.candidates_of

        def now(resp, cfg):
            cands = real(resp, cfg)
            return cands[:2] if parsed_now == "fewer" else cands[1:] + cands[:1]

        capsys.readouterr()
        with mock.patch.object(generate, "candidates_of", now):
            assert main(args) == 2
        err = capsys.readouterr().err
        said = ("reply r000001 was logged with 3 candidates and reads as 2 now; " if parsed_now == "fewer" else
                f"reply r000001's candidate 1 (r000001-1) reads {NEW[1][:57] + '...'!r} now, but rejected.jsonl "
                f"decided it as {SEED[:57] + '...'!r}; ")  # each cut short, on one line
        assert err.count("\n") == 1 and f"error: {out / 'responses.jsonl'}:2: {said}" in err, err
        assert "finish the run with the version that made it, or start a new --out folder" in err, err
        assert snapshot(out) == before and len(fake.prompts) == 2  # nothing written, no prompt sent
        assert main(args) == 0  # read as it was decided, the reply resumes
    verify_run(out, 5)
    assert {o["id"] for o in lines(out / "kept.jsonl")} >= {"r000001-0", "r000001-2"}


def test_a_corrected_command_naming_another_teacher_takes_none_of_the_old_teachers_defaults(tmp_path, monkeypatch):
    """A first command on the embedded teacher that made nothing, corrected to --base-url U --model M:
    the openai run went out with the embedded teacher's resolved defaults from config.yaml
    (tasks_per_request 1, max_tokens 200, seed_examples 2, lead_word, stop ###). In a folder that made
    nothing, a command naming another teacher takes nothing from it: it stands as it is. The reverse too."""
    import yaml

    from selfinstruct.cli import main
    from selfinstruct.datafiles import mark_run_folder
    from selfinstruct.generate import GenerateOptions, as_the_run_was, teacher_defaults

    out = tmp_path / "emb0"
    out.mkdir()
    mark_run_folder(out)
    embedded = teacher_defaults(GenerateOptions(out=str(out), num=2), "embedded").model_copy(update={"prefill": True})
    (out / "config.yaml").write_text(yaml.safe_dump(embedded.model_dump(mode="json"), sort_keys=False))
    (out / "responses.jsonl").write_text("")  # a first session that stopped before its first request
    defaults = GenerateOptions(out=str(out))
    with FakeTeacher() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(["generate", "--out", str(out), "--num", "1", "--base-url", fake.base_url, "--model", "fake",
                     "--concurrency", "1", "--no-progress"]) == 0
    body = fake.bodies[0]
    assert body["max_tokens"] == defaults.max_tokens and not body.get("stop")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert {k: saved[k] for k in ("tasks_per_request", "max_tokens", "seed_examples", "lead_word", "stop", "prefill")} == \
        {"tasks_per_request": 5, "max_tokens": 1024, "seed_examples": 6, "lead_word": False, "stop": [], "prefill": False}
    # The reverse: an openai run's folder that made nothing, corrected to --teacher embedded.
    other = tmp_path / "big0"
    other.mkdir()
    mark_run_folder(other)
    big = GenerateOptions(out=str(other), base_url=["http://127.0.0.1:2/v1"], model="m", tasks_per_request=5,
                          max_tokens=1024, seed_examples=6, lead_word=False, stop=[], prefill=False)
    (other / "config.yaml").write_text(yaml.safe_dump(big.model_dump(mode="json"), sort_keys=False))
    cfg = teacher_defaults(as_the_run_was(GenerateOptions(out=str(other), teacher="embedded")), "embedded")
    assert (cfg.base_url, cfg.model, cfg.tasks_per_request, cfg.max_tokens, cfg.seed_examples, cfg.lead_word) == \
        ([], None, 1, 200, 2, True)
    # Naming no teacher, or the run's own, is a resume: the run's own are taken.
    cfg = as_the_run_was(GenerateOptions(out=str(other), num=3))
    assert (cfg.base_url, cfg.model, cfg.tasks_per_request) == (["http://127.0.0.1:2/v1"], "m", 5)


@pytest.mark.parametrize("key, value", [("stop", "###"), ("seeds", "my_seeds.jsonl"), ("blacklist", "image")])
def test_one_string_for_a_list_option_in_a_config_file_is_that_one_item(tmp_path, key, value):
    """YAML's `stop: "###"` was refused ("Input should be a valid list") while `base_url: URL` took one
    server: a plain string is what the flag with one value gives, the same one-item list."""
    import argparse

    import yaml

    from selfinstruct.config import resolve
    from selfinstruct.generate import GenerateOptions, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({key: value}))
    from_file = resolve(GenerateOptions, parser.parse_args(["--out", "r", "--config", str(config)]))
    from_flag = resolve(GenerateOptions, parser.parse_args(["--out", "r", f"--{key}", value]))
    assert getattr(from_file, key) == getattr(from_flag, key) == [value]


def test_a_resume_that_leaves_out_vllm_bin_uses_the_runs_own(tmp_path, monkeypatch, capsys):
    """A `--teacher vllm --vllm-bin /x/vllm` run resumed without --vllm-bin looked for vllm on PATH
    (another version, or none: 'vLLM not found'), while its other teacher settings were the run's own.
    Left out, it is the run's own, as its --base-url servers are; a given one still changes it."""
    import contextlib
    import types

    import yaml

    from selfinstruct import servers
    from selfinstruct.cli import main

    monkeypatch.delenv("SELFINSTRUCT_VLLM_BIN", raising=False)
    bins = []
    for name in ("x", "y"):
        path = tmp_path / name / "vllm"
        path.parent.mkdir()
        path.write_text("#!/bin/sh\nexit 1\n")  # looked for (find_vllm_bin), never run
        path.chmod(0o755)
        bins.append(str(path))
    started = []
    with FakeTeacher(models=("m",)) as fake:
        @contextlib.contextmanager
        def replicas(model, n, vllm_bin=None, **kwargs):
            started.append(vllm_bin)
            yield [types.SimpleNamespace(base_url=fake.base_url, api_key=fake.key, model=model)] * n

        monkeypatch.setattr(servers, "vllm_replicas", replicas)
        out = tmp_path / "run"
        common = ["generate", "--out", str(out), "--no-progress"]
        assert main([*common, "--teacher", "vllm", "--model", "m", "--vllm-bin", bins[0], "--num", "1",
                     "--concurrency", "1", "--tasks-per-request", "2"]) == 0, capsys.readouterr().err
        assert main([*common, "--num", "2"]) == 0, capsys.readouterr().err
        assert started == [bins[0], bins[0]]
        assert main([*common, "--num", "3", "--vllm-bin", bins[1]]) == 0, capsys.readouterr().err
        assert started[-1] == bins[1] and yaml.safe_load((out / "config.yaml").read_text())["vllm_bin"] == bins[1]


SENDERS_IDLE = "(the requests in flight per server, on {servers}: {idle} would never have a request to send)"


@pytest.mark.parametrize("yaml_text, flags, said", [
    (None, ["--client-processes", "9", "--concurrency", "4"],
     "--client-processes 9 must be at most --concurrency 4 " + SENDERS_IDLE.format(servers="1 server", idle="5 senders")),
    ("client_processes: 9\nconcurrency: 4\n", [],
     "c.yaml: client_processes: 9 must be at most concurrency: 4 " + SENDERS_IDLE.format(servers="1 server",
                                                                                         idle="5 senders")),
    ("client_processes: 9\n", [],  # --concurrency left out: its default for a --base-url server, 8
     "c.yaml: client_processes: 9 must be at most concurrency (default 8) " + SENDERS_IDLE.format(servers="1 server",
                                                                                                 idle="1 sender")),
    (None, ["--client-processes", "9", "--concurrency", "4", "--base-url", "http://127.0.0.1:8/v1"],
     "--client-processes 9 must be at most 2 times --concurrency 4 " + SENDERS_IDLE.format(servers="2 servers",
                                                                                          idle="1 sender")),
], ids=["flags", "config", "config-default-concurrency", "two-servers"])
def test_more_senders_than_requests_in_flight_is_one_line_naming_both(tmp_path, capsys, yaml_text, flags, said):
    """--client-processes 9 --concurrency 4 ran 4 senders (no more requests are ever in flight) while
    config.yaml said 9: one line instead, each option as it was given, before any folder."""
    from selfinstruct.cli import main

    config, out = tmp_path / "c.yaml", tmp_path / "run"
    if yaml_text:
        config.write_text(yaml_text)
    argv = ["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out),
            *(["--config", str(config)] if yaml_text else []), *flags]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"selfinstruct generate: error: {said.replace('c.yaml', str(config))}\n"
    assert not out.exists()


def test_a_resume_with_more_senders_than_its_servers_take_is_refused_and_changes_nothing(tmp_path, monkeypatch,
                                                                                        capsys):
    """The run's own --base-url server (kept when left out) counts: --client-processes 2 at
    --concurrency 1 on its one server is refused, the folder as it was; 1 resumes."""
    from selfinstruct.cli import main

    out = tmp_path / "run"
    with FakeTeacher() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(["generate", *fake_args(fake, out, 1)]) == 0
        before = snapshot(out)
        capsys.readouterr()
        again = ["generate", "--out", str(out), "--num", "2", "--concurrency", "1", "--no-progress"]
        assert main([*again, "--client-processes", "2"]) == 2
        assert capsys.readouterr().err == ("selfinstruct generate: error: --client-processes 2 must be at most "
                                           "--concurrency 1 " + SENDERS_IDLE.format(servers="1 server", idle="1 sender")
                                           + "\n")
        assert snapshot(out) == before
        assert main([*again, "--client-processes", "1"]) == 0, capsys.readouterr().err
    verify_run(out, 2)


def test_replicas_that_leave_a_gpu_idle_say_so_at_start_up(tmp_path, monkeypatch, capsys):
    """--teacher vllm --teacher-replicas 2 on 3 GPUs gave each replica one and left the third idle
    without a word: one line on stderr as the replicas start. Faked GPU count; the 'vllm' started
    is a script that records the GPUs it was given and exits."""
    from selfinstruct import servers
    from selfinstruct.config import UserError

    assert servers.idle_gpus(2, None, 3) == ("vLLM: 2 replicas on 3 GPUs (nvidia-smi -L) get 1 each, so GPU 2 is left "
                                             "idle; a replica count that divides 3 uses them all")
    assert servers.idle_gpus(3, None, 8).startswith("vLLM: 3 replicas on 8 GPUs (nvidia-smi -L) get 2 each, so GPUs 6, 7 are")
    assert [servers.idle_gpus(n, None, g) for n, g in [(2, 4), (3, 3), (1, 3), (2, 0)]] == [None] * 4
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(servers, "_gpu_count", lambda: 3)
    seen = tmp_path / "gpus"
    vllm = tmp_path / "vllm"
    vllm.write_text(f"#!/bin/sh\necho \"$CUDA_VISIBLE_DEVICES\" >> {seen}\nexit 1\n")
    vllm.chmod(0o755)
    with pytest.raises(UserError, match="exited with code 1 before it was ready"):
        with servers.vllm_replicas("m", 2, vllm_bin=str(vllm), log_dir=tmp_path / "logs", ready_timeout=30):
            pass
    assert capsys.readouterr().err.splitlines()[0] == servers.idle_gpus(2, None, 3)
    # Each replica that got to run before the first one's exit stopped them all saw its own GPU, never GPU 2.
    assert seen.read_text().split() and set(seen.read_text().split()) <= {"0", "1"}


def test_a_vllm_server_that_sees_gpus_it_will_not_use_says_so_at_start_up(tmp_path, monkeypatch, capsys):
    """--teacher vllm on a machine with several GPUs and no parallel option ran vLLM on one GPU without
    a word. One line on stderr as it starts, naming both ways to use them; none with
    --tensor-parallel-size given. Faked GPU count; the 'vllm' started is a script that exits."""
    from selfinstruct import servers
    from selfinstruct.config import UserError

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(servers, "_gpu_count", lambda: 2)
    vllm = tmp_path / "vllm"
    vllm.write_text("#!/bin/sh\nexit 1\n")
    vllm.chmod(0o755)
    for args, line in (([], "vLLM: each server sees 2 GPUs (nvidia-smi -L) but uses one without a parallel option: give "
                            "--teacher-replicas 2 (a server per GPU), or '-- --tensor-parallel-size 2' (vLLM's own option)"),
                       (["--tensor-parallel-size", "2"], None)):
        with pytest.raises(UserError, match="exited with code 1 before it was ready"):
            with servers.vllm_replicas("m", 1, vllm_bin=str(vllm), log_dir=tmp_path / "logs", ready_timeout=30,
                                       extra_args=args):
                pass
        err = capsys.readouterr().err.splitlines()
        assert (err[0] if line else [e for e in err if "GPUs" in e]) == (line or [])


@pytest.mark.parametrize("name,kind", [("data.json", "folder"), ("data.json", "fifo"), ("seeds.json", "folder"),
                                       ("seeds.json", "fifo")])  # session.json: test_safety
def test_data_json_or_seeds_json_not_a_file_is_one_line_before_the_resume_asks(tmp_path, name, kind):
    """data.json made a folder was found only at the session's end, after its requests were spent and
    its records appended ('data.json: cannot write (Is a directory)'); seeds.json, read on resume, too."""
    from conftest import one_error_line, snapshot

    out = tmp_path / "run"
    with FakeTeacher() as fake:
        assert run_generate(*fake_args(fake, out, 2), key=fake.key, timeout=120).returncode == 0
        (out / name).unlink()
        (out / name).mkdir() if kind == "folder" else os.mkfifo(out / name)
        before, asked = snapshot(out), len(fake.prompts)
        r = run_generate(*fake_args(fake, out, 4), key=fake.key, timeout=60)
    said = "is a folder, not a file" if kind == "folder" else \
        "is not a regular file (a FIFO, device or socket); selfinstruct reads and writes this file itself: move it out of the way"
    assert r.returncode == 2
    assert one_error_line(r.stderr).endswith(f"{out / name}: {said}")
    assert snapshot(out) == before and len(fake.prompts) == asked


MUSIC = "Recommend five music albums for a long train journey across Europe."


def follow_up_teacher() -> FakeTeacher:
    """self_instruct_teacher's replies, with MUSIC among the new tasks (a word only Alpaca's blacklist has)."""

    def reply(n: int) -> str:
        prompt = fake.prompts[n]
        if prompt.startswith("Invent new tasks"):
            first = int(prompt.split("numbered from Task ")[1].split()[0])
            return "\n".join(f"Task {first + i}: {t}" for i, t in enumerate([MUSIC, *NEW]))
        if "Is this a classification task?" in prompt:
            return "No"
        return "Example 1\nInput: <noinput>\nOutput: The Danube, the Rhine and the Nile.\n"

    fake = FakeTeacher(reply=reply)
    return fake


def bodies_by_purpose(fake: FakeTeacher, since: int = 0) -> dict[str, list[dict]]:
    """The request bodies the fake was sent (from the ``since``-th on), by the kind of prompt:
    tasks, classify, instances."""
    out = {"tasks": [], "classify": [], "instances": []}
    for prompt, body in zip(fake.prompts[since:], fake.bodies[since:]):
        kind = ("tasks" if prompt.startswith("Invent new tasks") else
                "classify" if "Is this a classification task?" in prompt else "instances")
        out[kind].append(body)
    return out


def test_self_instruct_asks_its_follow_ups_greedily_as_the_original_and_records_it(tmp_path):
    """identify_clf_or_not.py and generate_instances.py asked with temperature 0 (and presence
    penalty 1.5 for instances); the classification and instances were sampled at the run's 0.7."""
    import yaml

    out = tmp_path / "run"
    with follow_up_teacher() as fake:
        r = run_generate(*fake_args(fake, out, 3, "--mode", "self-instruct", "--tasks-per-request", "4"),
                         key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 3)
    sent = bodies_by_purpose(fake)
    assert sent["tasks"] and sent["classify"] and sent["instances"]
    assert all((b["temperature"], b["top_p"], b["max_tokens"]) == (0.7, 0.95, 1024) and "presence_penalty" not in b
               for b in sent["tasks"])
    assert all(b["temperature"] == 0 and "top_p" not in b and b["max_tokens"] == 16 and "presence_penalty" not in b
               for b in sent["classify"])
    assert all(b["temperature"] == 0 and "top_p" not in b and b["max_tokens"] == 1024 and b["presence_penalty"] == 1.5
               for b in sent["instances"])
    assert yaml.safe_load((out / "config.yaml").read_text())["followup_sampling"] == "greedy"
    sampling = lines(out / "kept.jsonl")[0]["provenance"]["sampling"]
    assert (sampling["temperature"], sampling["classify"]["temperature"], sampling["classify"]["max_tokens"],
            sampling["instances"]["presence_penalty"], sampling["instances"]["top_p"]) == (0.7, 0.0, 16, 1.5, None)
    # The original's 13-word blacklist has no "music": Alpaca's would have rejected it.
    assert MUSIC in {o["instruction"] for o in lines(out / "kept.jsonl")}


def test_a_self_instruct_run_begun_before_greedy_follow_ups_resumes_as_it_was_made(tmp_path):
    """Its config.yaml has no followup_sampling and Alpaca's blacklist: a resume asks the follow-ups
    with the run's sampling and filters with its list, as its earlier sessions did; the option given
    with the other value is refused, naming the field."""
    import yaml

    from selfinstruct.filters import BLACKLIST

    out = tmp_path / "run"
    with follow_up_teacher() as fake:
        r = run_generate(*fake_args(fake, out, 1, "--mode", "self-instruct", "--tasks-per-request", "4"),
                         key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        saved = yaml.safe_load((out / "config.yaml").read_text())
        del saved["followup_sampling"]  # as a version before the option saved it
        saved["blacklist"] = list(BLACKLIST)
        (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        sent = len(fake.bodies)
        r = run_generate(*fake_args(fake, out, 4, "--mode", "self-instruct", "--tasks-per-request", "4"),
                         key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        verify_run(out, 4)
        asked = bodies_by_purpose(fake, since=sent)
        assert asked["classify"] and asked["instances"]
        assert all((b["temperature"], b["top_p"], b["max_tokens"]) == (0.7, 0.95, 1024) and "presence_penalty" not in b
                   for b in asked["classify"] + asked["instances"])
        again = yaml.safe_load((out / "config.yaml").read_text())
        assert (again["followup_sampling"], again["blacklist"]) == ("run", BLACKLIST)
        assert "classify" not in lines(out / "kept.jsonl")[-1]["provenance"]["sampling"]
        assert any(o["instruction"] == MUSIC and o["reason"] == "blacklisted_word: 'music'"
                   for o in lines(out / "rejected.jsonl"))
        before = snapshot(out)
        r = run_generate(*fake_args(fake, out, 5, "--mode", "self-instruct", "--tasks-per-request", "4",
                                    "--followup-sampling", "greedy"), key=fake.key, timeout=120)
    assert r.returncode == 2
    assert "--followup-sampling: this run was made with 'run', not 'greedy'" in r.stderr.decode()
    assert snapshot(out) == before


def test_each_mode_filters_with_its_originals_blacklist_unless_one_is_given():
    """Alpaca's 18 words in alpaca mode; self-instruct's 13 (no video, audio, music, flowchart,
    diagram) in self-instruct mode; --blacklist replaces either."""
    from selfinstruct.filters import BLACKLIST, SELF_INSTRUCT_BLACKLIST
    from selfinstruct.generate import GenerateOptions

    assert GenerateOptions(out="r").blacklist == BLACKLIST and "music" in BLACKLIST
    si = GenerateOptions(out="r", mode="self-instruct")
    assert si.blacklist == SELF_INSTRUCT_BLACKLIST == BLACKLIST[:13]
    assert "blacklist" not in si.model_fields_set  # a resume still takes the run's own saved list
    assert GenerateOptions(out="r", mode="self-instruct", blacklist=["video"]).blacklist == ["video"]
    assert GenerateOptions(out="r", mode="magpie").blacklist == BLACKLIST


@pytest.mark.parametrize("mode", ["alpaca", "magpie"])
def test_a_config_file_at_the_defaults_of_another_modes_options_is_taken(tmp_path, capsys, mode):
    """A run's config.yaml names every option, another mode's at their defaults (an alpaca run's holds
    instances_per_task: 2 and followup_sampling: greedy), and given as --config to a new run it was refused
    ('instances_per_task applies to mode: self-instruct only, not alpaca'). A file's option at its default
    is taken; one set otherwise, or a flag typed at the default, is still refused."""
    from selfinstruct.cli import main

    defaults = {"instances_per_task": 2, "followup_sampling": "greedy", "tasks_per_request": 5, "seed_examples": 6,
                "machine_examples": 2}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"mode": mode, "base_url": "http://127.0.0.1:9/v1", "model": "m", **defaults}))
    assert main(["generate", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    # Past the option checks: the preflight finds no server there (port 9), the first line a real run would see.
    assert err.count("\n") == 1 and "applies to" not in err and "does nothing" not in err and "127.0.0.1:9" in err, err
    cfg.write_text(json.dumps({"mode": mode, "base_url": "http://127.0.0.1:9/v1", "model": "m", **defaults,
                               "instances_per_task": 3}))
    assert main(["generate", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert f"{cfg}: instances_per_task applies to mode: self-instruct only, not {mode}" in capsys.readouterr().err


def test_a_reasoning_teachers_drafts_in_its_thinking_are_not_tasks(tmp_path):
    """A reasoning model served without a reasoning parser drafts tasks in its '<think>' block before the
    reply: each draft's 'Instruction:' was parsed as a task. The block is taken off as the parser would."""
    out = tmp_path / "run"
    draft = "<think>\nI could write:\nInstruction: Draft a plan for the weekend trip.\nOutput: Go north.\n</think>\n\n"
    with FakeTeacher(reply=lambda n: draft + diverse_tasks(n)) as fake:
        r = run_generate(*fake_args(fake, out, 4), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    decided = lines(out / "kept.jsonl") + lines(out / "rejected.jsonl")
    assert decided and not any("Draft a plan" in (r.get("instruction") or "") for r in decided)
    assert not any("<think>" in r["replies"][0]["text"] for r in lines(out / "responses.jsonl"))
    verify_run(out, 4)


def test_a_run_far_from_num_holds_groups_back_and_still_decides_every_candidate_once(tmp_path, monkeypatch):
    """Far from --num the loop holds a group back between replies (its pass runs meanwhile) and
    parts of groups wait for the next replies: the run still logs and decides every candidate of
    every reply once, as one pass over the log would, and kept.jsonl passes rouge_score's dedup."""
    from selfinstruct import generate
    from selfinstruct.cli import main
    from selfinstruct.records import Response

    holds, real = [], generate.Processor.feed

    def feed(self, resps, hold=False):
        holds.append((hold, self.held))
        return real(self, resps, hold)

    out = tmp_path / "run"
    with FakeTeacher(reply=lambda n: diverse_tasks(n // 3, k=5)) as fake:  # each reply's tasks three times
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        with mock.patch.object(generate.Processor, "feed", feed), mock.patch.object(generate, "GROUP", 7):
            assert main(["generate", *fake_args(fake, out, 100_000, "--tasks-per-request", "5", "--concurrency", "8",
                                                "--max-requests", "40")]) == 1  # short of --num
    assert any(hold for hold, _ in holds) and any(held for _, held in holds)  # held back, then decided
    assert holds[-1][0] is False  # the last call decides what was held
    responses = [Response.model_validate(o) for o in lines(out / "responses.jsonl")]
    assert len(responses) == 40
    ids = [o["id"] for o in lines(out / "kept.jsonl") + lines(out / "rejected.jsonl")]
    assert len(ids) == len(set(ids)) == sum(r.candidates for r in responses) == 200
    assert len(lines(out / "kept.jsonl")) < 100  # the repeats rejected as duplicates, across groups too
    assert set(ids) == {f"{r.id}-{n}" for r in responses for n in range(r.candidates)}
    # As a resume decides the same log from the start, with no group held: the same lines.
    cfg = generate.GenerateOptions(out="unused", num=100_000, tasks_per_request=5)
    seeds = load_seeds([bundled_dir("seeds") / "seed_tasks.jsonl"], compact=True)
    proc = generate.Processor(cfg, generate.Pool(seeds, cfg.threshold), "fake", fake.base_url, {})
    again = [rec.id for decided in proc.process_many(responses) for name, recs in decided for rec in recs
             if name == "kept.jsonl"]
    assert again == [o["id"] for o in lines(out / "kept.jsonl")]


def test_a_run_stopped_by_an_error_writes_the_replies_it_held_back(tmp_path, monkeypatch):
    """An error outside the deciding (here the progress bar's) stops a run that holds a group
    back: every reply the loop had taken is logged and decided before the run stops, as it would
    have been without the hold, and nothing is decided twice."""
    from selfinstruct import generate, progress
    from selfinstruct.cli import main

    taken, held, real_feed = [], [], generate.Processor.feed

    def feed(self, resps, hold=False):
        taken.extend(r.id for r in resps)
        out = real_feed(self, resps, hold)
        held.append(self.held)
        return out

    real_update = progress.RunProgress.update

    def update(self, *args, **kwargs):
        if held and held[-1]:  # after a take that held replies back
            raise RuntimeError("the bar broke")
        return real_update(self, *args, **kwargs)

    out = tmp_path / "run"
    with FakeTeacher(reply=lambda n: diverse_tasks(n // 3, k=5)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        with mock.patch.object(generate.Processor, "feed", feed), mock.patch.object(generate, "GROUP", 7), \
                mock.patch.object(progress.RunProgress, "update", update), pytest.raises(RuntimeError, match="bar broke"):
            main(["generate", *fake_args(fake, out, 100_000, "--tasks-per-request", "5", "--concurrency", "8")])
    assert held[-2] > 0 and held[-1] == 0  # replies were held when the error came, and decided after it
    responses = lines(out / "responses.jsonl")
    assert [o["id"] for o in responses] == taken  # every reply taken is logged, once, in order
    ids = [o["id"] for o in lines(out / "kept.jsonl") + lines(out / "rejected.jsonl")]
    assert len(ids) == len(set(ids)) and set(ids) == {f"{o['id']}-{n}" for o in responses for n in range(o["candidates"])}


def test_replies_held_back_are_written_when_the_teacher_slows_down(tmp_path, monkeypatch):
    """A burst of replies is held back while the loop is busy; when every request in flight then
    stalls, what was held is decided and written within a moment (generate._HOLD_S), not left
    unlogged until the teacher's next reply. (On a machine too loaded to see a burst, nothing is
    held and the count holds all the same.)"""
    import time

    from selfinstruct import generate
    from selfinstruct.cli import main

    out, seen, holds, real_feed = tmp_path / "run", {}, [], generate.Processor.feed

    def feed(self, resps, hold=False):
        holds.append(hold)
        return real_feed(self, resps, hold)

    def on_request(n: int) -> None:
        if n < 16:  # the first 16 come back in two bursts of 8 (each sent together, each 0.3 s)
            time.sleep(0.3)
            return
        if n == 23:  # then every request takes 3 s; all 8 in flight stalled: what the folder holds 1.5 s in
            time.sleep(1.5)
            seen["logged"] = len(lines(out / "responses.jsonl"))
        time.sleep(3.0)

    with FakeTeacher(reply=lambda n: diverse_tasks(n, k=5), on_request=on_request) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        with mock.patch.object(generate.Processor, "feed", feed), mock.patch.object(generate, "GROUP", 7):
            assert main(["generate", *fake_args(fake, out, 100_000, "--tasks-per-request", "5", "--concurrency", "8",
                                                "--max-requests", "24")]) == 1  # short of --num
    assert any(holds)
    assert seen["logged"] == 16


def test_the_collector_skips_the_pool_while_a_run_builds_and_decides_and_is_as_it_was_after(tmp_path, monkeypatch):
    """Python's cyclic garbage collector is off while the seeds load and the pool is built, and while
    a run decides (the resume's replay and the loop) what was built before is frozen out of its
    passes, the youngest pass at generate._GC_YOUNG. After the run, one that finished, one resumed
    and one stopped by an error, the collector is as it was."""
    import gc

    from selfinstruct import generate, progress, seeds
    from selfinstruct.cli import main

    as_it_was = (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count())
    building, deciding = [], []
    real_load, real_pool, real_feed = seeds.load_seeds, generate.Pool.__init__, generate.Processor.feed

    def load(*args, **kwargs):
        building.append(gc.isenabled())
        return real_load(*args, **kwargs)

    def pool(self, *args, **kwargs):
        building.append(gc.isenabled())
        return real_pool(self, *args, **kwargs)

    def feed(self, resps, hold=False):
        deciding.append((len(resps), gc.get_freeze_count() > as_it_was[2], gc.get_threshold()[0]))
        return real_feed(self, resps, hold)

    real_update = progress.RunProgress.update

    def bar_breaks(self, *args, **kwargs):
        if len(deciding) > third_began:  # in the loop, after its first take
            raise RuntimeError("the bar broke")
        return real_update(self, *args, **kwargs)

    out = tmp_path / "run"
    with FakeTeacher(reply=lambda n: diverse_tasks(n, k=2)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        with mock.patch.object(seeds, "load_seeds", load), mock.patch.object(generate.Pool, "__init__", pool), \
                mock.patch.object(generate.Processor, "feed", feed):
            assert main(["generate", *fake_args(fake, out, 6)]) == 0
            assert (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()) == as_it_was
            assert main(["generate", *fake_args(fake, out, 10)]) == 0  # resumed: its log replayed, then more
            assert (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()) == as_it_was
            third_began = len(deciding)
            with mock.patch.object(progress.RunProgress, "update", bar_breaks), pytest.raises(RuntimeError):
                main(["generate", *fake_args(fake, tmp_path / "other", 6)])
    assert (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()) == as_it_was
    assert len(building) == 6 and not any(building)  # three runs: each loaded its seeds, then built its pool
    assert len(deciding) > third_began  # the third run stopped in its loop
    assert any(n >= 2 for n, *_ in deciding[:third_began])  # the resume's replay: its logged replies in one call
    assert all(frozen and young == generate._GC_YOUNG for _, frozen, young in deciding), deciding
