"""What a user meets in the modes other than alpaca: self-instruct with --structured, and the
teacher replies that each mode must reject with a reason. Scripted teachers on 127.0.0.1.
"""

from __future__ import annotations

import json
import random

import pytest

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


# Three instructions of one reply, each a repeat of the one before (ROUGE-L 0.8, then 0.88) and the
# third not of the first (0.667): ROUGE-L is not transitive. DOUBLE's third repeats both (0.88, 0.923).
RIVERS = ["Name three rivers that flow through more than four countries of Europe.",
          "Name three rivers that flow through more than four large cities of Asia."]
CHAIN = [*RIVERS, "Name three long rivers that flow through four large cities of Asia."]
DOUBLE = [*RIVERS, "Name three rivers that flow through more than four large countries of Asia."]
OTHERS = ["Suggest a title for a blog post about repairing old bicycles at home.",
          "Explain why the sky looks red at sunset to a ten year old.",
          "Write a short poem about a lighthouse keeper and the ships he guides home."]


def repeats_teacher(units: list[list[str]], unusable: str | None = None) -> FakeTeacher:
    """Self-instruct replies: the k-th instructions prompt gets ``units[k]`` (the last one after
    that), "No" to each classification, and one instance; none with an output for ``unusable``."""
    def reply(n: int) -> str:
        prompt = fake.prompts[n]
        if prompt.startswith("Invent new tasks"):
            k = sum(p.startswith("Invent new tasks") for p in fake.prompts[:n])
            first = int(prompt.split("numbered from Task ")[1].split()[0])
            return "\n".join(f"Task {first + i}: {t}" for i, t in enumerate(units[min(k, len(units) - 1)]))
        if "Is this a classification task?" in prompt:
            return "No"
        if unusable and unusable in prompt:
            return "Example 1\nInput: <noinput>\nOutput:\n"
        return "Example 1\nInput: <noinput>\nOutput: The Danube, the Rhine and the Nile.\n"

    fake = FakeTeacher(reply=reply)
    return fake


@pytest.mark.parametrize("case", ["third-repeats-second", "third-repeats-both", "first-kept"])
def test_a_third_copy_in_one_reply_is_checked_against_every_earlier_one(tmp_path, case):
    """A third copy was checked against the first alone: when the first's examples were unusable,
    the second was asked and kept, and a third that repeats it was asked too, then rejected as
    its duplicate (two requests spent on a rejection). Now the third is checked against each
    earlier copy in turn and takes the examples of the first that gave usable ones. When that is
    the first, the second is its duplicate and never kept, so a third that repeats only the
    second is asked and may be kept, as the pool decides."""
    tasks = DOUBLE if case == "third-repeats-both" else CHAIN
    out = tmp_path / "run"
    num = 2 if case == "first-kept" else 1
    with repeats_teacher([tasks], unusable=None if case == "first-kept" else tasks[0]) as fake:
        r = run_generate(*fake_args(fake, out, num, "--mode", "self-instruct", "--tasks-per-request", "3"),
                         key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, num)
    kept = [o["instruction"] for o in lines(out / "kept.jsonl")]
    rejected = {o["instruction"]: o for o in lines(out / "rejected.jsonl")}
    follow_ups = [p for p in fake.prompts if not p.startswith("Invent new tasks")]
    markers = {r["purpose"]: r["text"].split()[0] for r in lines(out / "responses.jsonl")[0]["replies"]
               if r["purpose"].startswith("repeat:")}
    if case == "first-kept":
        assert markers == {"repeat:1": "0"}
        assert sum(tasks[2] in p for p in follow_ups) == 2  # classification and instances
        assert kept == [tasks[0], tasks[2]]
        return
    assert len(follow_ups) == 4 and not any(tasks[2] in p for p in follow_ups)  # the first two's
    assert markers == {"repeat:2": "1"}
    assert kept == [tasks[1]]
    assert rejected[tasks[0]]["stage"] == "filter"
    assert rejected[tasks[2]]["stage"] == "dedup"
    assert rejected[tasks[2]]["reason"].startswith("duplicate: ROUGE-L ")
    assert " > 0.7 with r000000-1 " in rejected[tasks[2]]["reason"]
    assert rejected[tasks[2]]["nearest"][0]["id"] == "r000000-1"


@pytest.fixture(scope="module")
def run_with_a_repeat(tmp_path_factory):
    """A finished self-instruct run whose second reply gives an instruction three times: responses.jsonl
    logs 'repeat:1' and 'repeat:2' marker replies there, each naming copy 0 and their ROUGE-L
    (0.88 and 0.8; copies 1 and 2 score 0.923)."""
    out = tmp_path_factory.mktemp("repeat") / "run"
    units = [OTHERS[:2], [RIVERS[0], DOUBLE[2], RIVERS[1]], [OTHERS[2]]]
    with repeats_teacher(units) as fake:
        r = run_generate(*fake_args(fake, out, 4, "--mode", "self-instruct", "--tasks-per-request", "3"),
                         key=fake.key, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return out, units


@pytest.mark.parametrize("field, edited, says", [
    ("text", "0", "reads '0', not '<"),  # cut short
    ("text", "", "reads '', not '<"),
    ("text", "zero 0.88", "reads 'zero 0.88', not '<"),
    ("text", "0 0.88 0.88", "reads '0 0.88 0.88', not '<"),
    ("text", "-1 0.88", "reads '-1 0.88', not '<"),  # was read as the reply's last instruction
    ("text", "1 0.88", "names instruction 1 as its earlier copy, which is not before 1"),  # itself
    ("text", "0 nan", "gives ROUGE-L 'nan', not a number from 0 to 1"),
    ("text", "0 1.5", "gives ROUGE-L '1.5', not a number from 0 to 1"),
    # Not a duplicate: the run writes a marker only for a copy scoring above --threshold (0.7), as the pool decides one.
    ("text", "0 0.3", "gives ROUGE-L 0.3, not above the run's --threshold 0.7"),
    ("text", "0 0.7", "gives ROUGE-L 0.7, not above the run's --threshold 0.7"),
    ("purpose", "repeat:one", "'repeat:one' names no instruction"),  # was read as no marker at all
    # Read as no marker too: candidates looks up f"repeat:{n}", which is never 'repeat:01' or past the reply.
    ("purpose", "repeat:01", "'repeat:01' is not written as the run writes it (repeat:1)"),
    ("purpose", "repeat:3", "'repeat:3' names instruction 3, past the reply's 3"),
    ("purpose", "repeat:7", "'repeat:7' names instruction 7, past the reply's 3"),
])
def test_an_edited_repeat_marker_is_one_line_naming_its_line_and_nothing_is_written(
        tmp_path, run_with_a_repeat, field, edited, says):
    """A resume re-reads a 'repeat:N' marker to decide instruction N. One edited by hand, cut or
    corrupted crashed it with a ValueError traceback (or named the wrong copy, or a ROUGE-L of
    nan, or took a score under --threshold as a duplicate): now it is one line naming
    responses.jsonl's line and what is wrong, rc 2, and no file changes. The run is as a kill
    left it: the repeat logged but not yet decided."""
    def edit(replies):
        marker = next(r for r in replies if r["purpose"] == "repeat:1")
        assert marker["text"].split()[0] == "0"  # as the run wrote it
        marker[field] = edited

    resume_with_edited_markers(tmp_path, run_with_a_repeat, edit, says)


@pytest.mark.parametrize("case, says", [
    # Copy 1 repeats copy 0 (its own marker): it had no follow-ups, so the run never names it.
    ("names-a-repeat", "'repeat:2' names instruction 1 as its earlier copy, which was itself a repeat ('repeat:1')"),
    ("names-a-copy-without-examples", "'repeat:1' names instruction 0 as its earlier copy, whose examples are not in the log"),
])
def test_a_marker_naming_a_copy_whose_examples_were_not_asked_is_refused(tmp_path, run_with_a_repeat, case, says):
    """The run names as a repeat's copy only one whose classification and instances replies gave
    usable instances. A hand-edited marker naming a copy that was itself a repeat, or one whose
    follow-ups are not in the log, was taken, and the rejection's reason named a copy whose
    examples were never asked: now it is refused in one line naming responses.jsonl's line."""
    def edit(replies):
        if case == "names-a-repeat":
            marker = next(r for r in replies if r["purpose"] == "repeat:2")
            assert marker["text"].split()[0] == "0"  # as the run wrote it
            marker["text"] = "1 0.9230769230769231"  # their ROUGE-L: only which copy is named is wrong
        else:
            replies[:] = [r for r in replies if r["purpose"] not in ("classify:0", "instances:0")]

    resume_with_edited_markers(tmp_path, run_with_a_repeat, edit, says)


def resume_with_edited_markers(tmp_path, run_with_a_repeat, edit, says):
    """Resume a copy of the run whose reply with markers ``edit`` changed (its repeats undecided):
    rc 2, one line naming that line of responses.jsonl and saying ``says``, no file changed."""
    import shutil

    from conftest import one_error_line, snapshot

    made, units = run_with_a_repeat
    out = tmp_path / "run"
    shutil.copytree(made, out)
    logged = (out / "responses.jsonl").read_text().splitlines(keepends=True)
    (line, resp), = [(i, o) for i, o in enumerate(map(json.loads, logged), 1)
                     if any(r["purpose"] == "repeat:1" for r in o["replies"])]
    edit(resp["replies"])
    logged[line - 1] = json.dumps(resp) + "\n"
    (out / "responses.jsonl").write_text("".join(logged))
    rejected = (out / "rejected.jsonl").read_text().splitlines(keepends=True)
    undecided = [l for l in rejected if json.loads(l)["id"] not in (f"{resp['id']}-1", f"{resp['id']}-2")]
    assert len(undecided) == len(rejected) - 2
    (out / "rejected.jsonl").write_text("".join(undecided))
    before = snapshot(out)
    with repeats_teacher(units) as fake:
        r = run_generate(*fake_args(fake, out, 4, "--mode", "self-instruct", "--tasks-per-request", "3"),
                         key=fake.key, timeout=120)
    assert r.returncode == 2 and b"Traceback" not in r.stderr, r.stderr.decode()[-2000:]
    error = one_error_line(r.stderr)
    assert f"responses.jsonl:{line}: field 'replies': " in error and says in error, error
    assert snapshot(out) == before


def requests_by_purpose(fake: FakeTeacher) -> dict[str, int]:
    """How many requests the fake was sent, by the self-instruct prompt they are: tasks, classify, instances."""
    kinds = ["tasks" if p.startswith("Invent new tasks") else "classify" if "Is this a classification task?" in p
             else "instances" for p in fake.prompts]
    return {kind: kinds.count(kind) for kind in ("tasks", "classify", "instances")}


def fresh_self_instruct_teacher(fail_classify: int = 0) -> FakeTeacher:
    """Five new instructions a tasks reply, far apart; 'No'; one instance. The first
    ``fail_classify`` classification requests are answered with nothing usable."""
    def reply(n: int) -> str:
        prompt = fake.prompts[n]
        if prompt.startswith("Invent new tasks"):
            first, rng = int(prompt.split("numbered from Task ")[1].split()[0]), random.Random(n)
            return "\n".join(f"Task {first + i}: {rng.choice(VERBS)} {' '.join(rng.sample(VOCAB, 9))}." for i in range(5))
        if "Is this a classification task?" in prompt:
            return "No"
        asked = sum("Is this a classification task?" in p for p in fake.prompts[:n])
        return "Output:" if asked <= fail_classify else "Example 1\nInput: <noinput>\nOutput: A short answer.\n"

    fake = FakeTeacher(reply=reply)
    return fake


def test_self_instruct_asks_follow_ups_only_for_the_instructions_num_still_wants(tmp_path):
    """--num 1 --concurrency 64: every unit in flight asked a classification and instances for
    each of its five instructions (53 requests for one task). Only those the run may still keep
    are asked now (a --num one reply can fill: the tasks wanted, until a keep rate is known; 1.5
    times them after); every other one is rejected as quota, with a reason."""
    out = tmp_path / "run"
    with fresh_self_instruct_teacher() as fake:
        args = ["--mode", "self-instruct", "--concurrency", "64", "--tasks-per-request", "5"]
        r = run_generate(*fake_args(fake, out, 1, *args), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert requests_by_purpose(fake) == {"tasks": 2, "classify": 1, "instances": 1}
        stats = verify_run(out, 1)  # every candidate of every reply is kept or rejected, once
        assert stats["rejected_by_stage"] == {"quota": 9} and stats["replies"] == 4  # the markers are no replies
        quota = [o for o in lines(out / "rejected.jsonl") if o["stage"] == "quota"]
        assert all(o["reason"].startswith("quota: ") and o["instruction"] for o in quota)
        # Resumed with --num 2: one unit (the yield counts the quota), one instruction asked.
        r = run_generate(*fake_args(fake, out, 2, *args), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert requests_by_purpose(fake) == {"tasks": 3, "classify": 2, "instances": 2}
    verify_run(out, 2)


def test_self_instruct_asks_more_follow_ups_when_those_asked_give_no_task(tmp_path):
    """The instances of the first instructions asked are unusable: the keep rate of those asked
    falls, so more are asked, and the run reaches --num instead of asking for none."""
    out = tmp_path / "run"
    with fresh_self_instruct_teacher(fail_classify=4) as fake:
        r = run_generate(*fake_args(fake, out, 2, "--mode", "self-instruct", "--tasks-per-request", "5"),
                         key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    stats = verify_run(out, 2)
    assert stats["rejected_by_stage"]["filter"] == 4 and stats["rejected_by_stage"]["quota"] >= 1


def _words(n: int, k: int = 9) -> str:
    rng = random.Random(n)
    return f"{rng.choice(VERBS)} {' '.join(rng.sample(VOCAB, k))}"


# llama.cpp writes U+FFFD for a character cut between two tokens: each mode rejects the instruction,
# input or output holding one, and keeps none (alpaca's kept instructions are shown to later prompts).
CUT, CUT_WORD = "\ufffd\ufffd", " caf\ufffd"


def fffd_teacher(mode: str) -> FakeTeacher:
    def alpaca(n: int) -> str:
        return "".join(f"###\nInstruction: {_words(4 * n + i)}{CUT_WORD if i == 0 else ''}.\n"
                       f"Input: {CUT if i == 1 else '<noinput>'}\n"
                       f"Output: {CUT if i == 2 else 'A short answer.'}\n" for i in range(4))

    def self_instruct(n: int) -> str:
        prompt = fake.prompts[n]
        if "Is this a classification task" in prompt:
            return "No"
        if "Invent new tasks" not in prompt:  # instances: the instruction says which field breaks
            inp = CUT if "inputbreaks" in prompt else "<noinput>"
            return f"Example 1\nInput: {inp}\nOutput: {CUT if 'outputbreaks' in prompt else 'A short answer.'}\n"
        first = int(prompt.split("numbered from Task ")[1].split()[0])
        tags = [CUT_WORD, " inputbreaks", " outputbreaks", ""]
        return "\n".join(f"Task {first + i}: {_words(4 * n + i)}{tag}." for i, tag in enumerate(tags))

    def answer(n: int) -> str:
        return CUT if "outputbreaks" in fake.prompts[n] else "A short answer."

    def query(n: int) -> str:
        return f"{_words(n)}{[CUT_WORD, ' outputbreaks', ''][n % 3]}?"

    if mode == "magpie":
        fake = FakeTeacher(reply=answer, raw_reply=query, chat_template=CHATML)
    else:
        fake = FakeTeacher(reply=alpaca if mode == "alpaca" else self_instruct)
    return fake


CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.mark.parametrize("mode", ["alpaca", "self-instruct", "magpie"])
def test_a_replacement_character_is_rejected_in_each_field_and_mode(tmp_path, mode):
    out = tmp_path / "run"
    with fffd_teacher(mode) as fake:
        r = run_generate(*fake_args(fake, out, 2, mode=mode), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 2)
    assert "\ufffd" not in (out / "kept.jsonl").read_text(encoding="utf-8")
    fields = {rej["reason"].split(" holds")[0] for rej in lines(out / "rejected.jsonl")
              if rej["reason"].startswith("replacement_character")}
    want = ["instruction", "output"] + (["input"] if mode != "magpie" else [])  # magpie's answer has no input
    assert fields == {f"replacement_character: the {f}" for f in want}


# A teacher whose server does not stop at its end-of-turn token writes the chat template's tokens as
# text and goes on with the next turn: each mode kept them in the instruction or the output.
LEAK = "<|im_end|>\n<|im_start|>assistant\nSure, here are more."


def leaking_teacher(mode: str) -> FakeTeacher:
    def alpaca(n: int) -> str:
        return (f"###\nInstruction: {_words(3 * n)}.\nInput: <noinput>\nOutput: A short answer.\n"
                f"###\nInstruction: {_words(3 * n + 1)}.<|im_end|>\nInput: <noinput>\nOutput: A short answer.\n"
                f"###\nInstruction: {_words(3 * n + 2)}.\nInput: <noinput>\nOutput: A short answer.{LEAK}")

    def self_instruct(n: int) -> str:
        prompt = fake.prompts[n]
        if "Is this a classification task" in prompt:
            return "No"
        if "Invent new tasks" not in prompt:
            return f"Example 1\nInput: <noinput>\nOutput: A short answer.{LEAK if 'leaky' in prompt else ''}\n"
        first = int(prompt.split("numbered from Task ")[1].split()[0])
        return (f"Task {first}: {_words(3 * n)}.\nTask {first + 1}: {_words(3 * n + 1)} leaky.\n"
                f"Task {first + 2}: {_words(3 * n + 2)}.{LEAK}")

    def answer(n: int) -> str:
        return f"A short answer.{LEAK if 'leaky' in fake.prompts[n] else ''}"

    if mode == "magpie":
        fake = FakeTeacher(reply=answer, raw_reply=lambda n: f"{_words(n)}{' leaky' if n % 2 else ''}?",
                           chat_template=CHATML)
    else:
        fake = FakeTeacher(reply=alpaca if mode == "alpaca" else self_instruct)
    return fake


@pytest.mark.parametrize("mode,fields", [("alpaca", {"instruction", "output"}), ("self-instruct", {"instruction", "output"}),
                                         ("magpie", {"output"})])
def test_a_chat_template_token_is_rejected_in_each_mode(tmp_path, mode, fields):
    out = tmp_path / "run"
    with leaking_teacher(mode) as fake:
        r = run_generate(*fake_args(fake, out, 2, mode=mode), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 2)
    kept = [(r["instruction"], r["instances"]) for r in lines(out / "kept.jsonl")]  # (magpie's provenance holds its pre-query)
    assert kept and "<|im_" not in json.dumps(kept)
    found = {rej["reason"].split(" holds")[0] for rej in lines(out / "rejected.jsonl")
             if rej["reason"].startswith("template_token")}
    assert found == {f"template_token: the {f}" for f in fields}


@pytest.mark.parametrize("finish, cut, want", [
    ("length", "Example 1\nInput: def add(a, b):\nOutput: Here is the fixed function, step by", "truncated"),
    ("length", "Example 1\nInput: def add(a, b):", "truncated"),
    ("stop", "Example 1\nInput: def add(a, b):", None),  # no output at all: the filters' no_instances, as before
])
def test_an_examples_reply_cut_before_its_first_example_is_whole_is_truncated(finish, cut, want):
    """A self-instruct instances reply cut at max_tokens inside its only example (a long code output) was
    rejected as ``no_instances: the task has no input/output example``, as if the teacher had written none,
    where raising --max-tokens is what helps (alpaca's reply cut before its first task is ``truncated`` too)."""
    from types import SimpleNamespace as S

    from selfinstruct.modes.self_instruct import candidates
    from selfinstruct.records import Reply, Response

    replies = [Reply(purpose="tasks", text="Task 9: Fix the bug in this Python function so that it adds.", finish_reason="stop"),
               Reply(purpose="classify:0", text="No", finish_reason="stop"),
               Reply(purpose="instances:0", text=cut, finish_reason=finish)]
    resp = Response(id="r000000", index=0, mode="self-instruct", prompt_hash="h", example_ids=["s1"], replies=replies,
                    created_at="2025-01-01T00:00:00Z", elapsed_s=0.1)
    (cand,) = candidates(resp, S(structured=False))
    assert cand["instances"] == []
    assert (cand["error"] or "").split(":")[0] == (want or "")
    if want:
        assert "max_tokens" in cand["error"]


def test_an_echoed_prompts_closing_line_is_not_kept_as_part_of_its_last_example(tmp_path):
    """A teacher that writes the prompt back before its tasks: the prompt's examples are duplicates of
    the seeds, but the line after the last one ("Write 2 new tasks, one per line, numbered from Task 8
    on ...") continued it, and that instruction, far enough from its seed, was kept."""
    out = tmp_path / "run"

    def reply(n: int) -> str:
        prompt = fake.prompts[n]
        if "Is this a classification task" in prompt:
            return "No"
        if "Write examples for the task" in prompt:
            return f"Example 1\nInput: <noinput>\nOutput: A short answer number {n}."
        rng = random.Random(n)
        return f"{prompt}\nTask 99: {rng.choice(VERBS)} {' '.join(rng.sample(VOCAB, 9))}."

    with FakeTeacher(reply=reply) as fake:
        r = run_generate(*fake_args(fake, out, 2, mode="self-instruct"), key=fake.key, timeout=300)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 2)
    assert not [k["instruction"] for k in lines(out / "kept.jsonl") if "new tasks" in k["instruction"]]
    leaked = [o for o in lines(out / "rejected.jsonl") if o["reason"].startswith("leaked_prompt")]
    assert leaked and all("numbered from Task" in o["instruction"] for o in leaked)
