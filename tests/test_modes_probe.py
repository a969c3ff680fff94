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
