"""What a user meets in the modes other than alpaca: self-instruct with --structured, and the
teacher replies that each mode must reject with a reason. Scripted teachers on 127.0.0.1.
"""

from __future__ import annotations

import json
import random

from conftest import VERBS, VOCAB, FakeTeacher, fake_args, lines, run_generate, verify_run


def structured_self_instruct_reply(fake: FakeTeacher):
    """Replies as a teacher that follows the self-instruct templates word for word in JSON: each
    instruction numbered "Task N:" as the template asks, <noinput> where the input-first template
    asks for it, and a field label echoed into a value, as small teachers do."""
    def reply(n: int) -> str:
        prompt = fake.prompts[n]
        if "Is this a classification task" in prompt:
            return json.dumps({"is_classification": False})
        if "Example 1" in prompt:  # the input-first instances template
            return json.dumps({"instances": [{"input": "<noinput>", "output": "A short answer."},
                                             {"input": "Input: two and three", "output": "Output: five"}]})
        rng = random.Random(n)
        return json.dumps({"instructions": [f"Task {9 + i}: {rng.choice(VERBS)} {' '.join(rng.sample(VOCAB, 9))}."
                                            for i in range(2)]})
    return reply


def test_structured_self_instruct_keeps_the_task_not_the_templates_layout(tmp_path):
    fake = FakeTeacher()
    fake.reply = structured_self_instruct_reply(fake)
    out = tmp_path / "run"
    with fake:
        r = run_generate(*fake_args(fake, out, 4, "--mode", "self-instruct", "--structured"), key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 4)
    for rec in lines(out / "kept.jsonl"):
        assert rec["instruction"].split()[0] in VERBS, rec["instruction"]  # not "Task 9:"
        assert [(i["input"], i["output"]) for i in rec["instances"]] == [("", "A short answer."),
                                                                        ("two and three", "five")]
    assert {"input": "", "output": "A short answer."}.items() <= json.loads((out / "data.json").read_text())[0].items()


def test_structured_classification_instances_are_asked_label_first(tmp_path):
    # A grammar-constrained reply writes the schema's fields in order: self-instruct writes a
    # classification task's label before its input, so its schema must put output first.
    fake = FakeTeacher()
    base = structured_self_instruct_reply(fake)

    def reply(n: int) -> str:
        prompt = fake.prompts[n]
        if "Is this a classification task" in prompt:
            return json.dumps({"is_classification": "Rank" in prompt})
        if "Class label:" in prompt:  # the output-first instances template
            return json.dumps({"instances": [{"output": "Positive", "input": "I love it."},
                                             {"output": "Negative", "input": "I hate it."}]})
        return base(n)

    fake.reply = reply
    out = tmp_path / "run"
    with fake:
        r = run_generate(*fake_args(fake, out, 6, "--mode", "self-instruct", "--structured"), key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]

    def fields(body):
        (item,) = body["response_format"]["json_schema"]["schema"]["$defs"].values()
        return list(item["properties"])

    asked = [(p, b) for p, b in zip(fake.prompts, fake.bodies) if "Write up to" in p]
    assert {fields(b)[0] for p, b in asked} == {"input", "output"}  # both kinds were asked for
    for prompt, body in asked:
        assert fields(body) == (["output", "input"] if "Class label:" in prompt else ["input", "output"])
    kept = lines(out / "kept.jsonl")
    assert any(k["is_classification"] for k in kept) and not all(k["is_classification"] for k in kept)
    labeled = next(k for k in kept if k["is_classification"])
    assert [(i["input"], i["output"]) for i in labeled["instances"]] == [("I love it.", "Positive"), ("I hate it.", "Negative")]


# Replies no teacher should give, each of which the run must reject with a reason, never crash on.
MALFORMED = ["", "   \n\t \n", "Task 1: Describe the", '{"tasks": [1, 2]}', "\ufffd\ufffd \x1b[31m\x00 Describe",
             "Sure!\n" * 50_000]
NO_ANSWER = ["", "   \n\t \n", "\ufffd\ufffd \x1b[31m\x00 Describe", "Sure!\n" * 50_000]
REASONS = {"no_task_found", "too_short", "control_characters", "no_instances", "empty_query", "empty_output",
           "degenerate", "duplicate", "too_long"}


def test_malformed_replies_are_each_rejected_with_a_reason(tmp_path):
    # Self-instruct: every other instructions reply is malformed, and so is every follow-up.
    # Magpie: every other query is malformed, and so is every answer.
    def good(n: int) -> str:
        rng = random.Random(n)
        return f"Task 9: {rng.choice(VERBS)} {' '.join(rng.sample(VOCAB, 9))}."

    def chat(n: int) -> str:
        prompt = fake.prompts[n]
        if "Invent new tasks" in prompt and n % 2 == 0:
            return good(n)
        if "Invent new tasks" in prompt or "Write up to" in prompt or "Is this" in prompt:
            return MALFORMED[n % len(MALFORMED)]
        return NO_ANSWER[n % len(NO_ANSWER)]  # a magpie answer: any text is one, but these

    fake = FakeTeacher(reply=chat, raw_reply=lambda n: good(n)[8:] if n % 2 else MALFORMED[n // 2 % len(MALFORMED)],
                       chat_template="{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    with fake:
        for mode in ("self-instruct", "magpie"):
            out = tmp_path / mode
            r = run_generate(*fake_args(fake, out, 1, "--max-requests", "12", mode=mode), key=fake.key, timeout=120)
            assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr.decode()[-2000:]
            assert b"stopped after 12 prompts (--max-requests 12) with 0 of 1 kept" in r.stderr + r.stdout
            stats = json.loads((out / "stats.json").read_text())
            assert stats["kept"] == 0 and stats["rejected"] == stats["candidates"] >= 12
            assert set(stats["rejected_by_reason"]) <= REASONS, stats["rejected_by_reason"]
            assert all(rej["reason"] and rej["stage"] for rej in lines(out / "rejected.jsonl"))
