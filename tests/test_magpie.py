"""Magpie mode: the teacher writes the user's query after its chat template's opening of a user
turn, then answers it. Scripted servers check where the pre-query comes from, the errors a user
can meet, a whole run's invariants and a resume after SIGKILL; one small run uses the real
embedded teacher. Also here: a --prompts folder needs only the chosen mode's files.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time

import pytest
from conftest import GENERATE, VERBS, VOCAB, FakeTeacher, fake_args, kill_when_lines, lines, one_error_line, run_generate, verify_run

from selfinstruct.modes.magpie import pre_query_of, read_query
from selfinstruct.prompts import bundled_dir

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# SmolLM2's own template (as its GGUF carries it): a default system prompt when none is given.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 3's: bos_token first, headers around the role, content trimmed.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# DeepSeek's (V3, R1), cut down: full-width tokens, and no end-of-turn token after the user's words.
DEEPSEEK = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{'<｜User｜>' + message['content']}}"
            "{% elif message['role'] == 'assistant' %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}")

TEMPLATES = {
    "chatml": (CHATML, "<|im_start|>user\n", "<|im_end|>"),
    "default-system-prompt": (SMOLLM2, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                                       "Hugging Face<|im_end|>\n<|im_start|>user\n", "<|im_end|>"),
    "llama3": (LLAMA3, "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
}


def query(n: int) -> str:
    """The n-th scripted query: mostly fresh questions, and every kind of query to reject."""
    rng = random.Random(n)
    bad = {2: "", 5: "<|im_start|>assistant\n", 8: "user", 11: query(1) if n == 11 else ""}
    if n in bad:
        return bad[n]
    return f"{rng.choice(VERBS)} {' '.join(rng.sample(VOCAB, 9))}?"


def magpie_teacher(**kw) -> FakeTeacher:
    return FakeTeacher(reply=lambda n: f"Here is a short answer, number {n}.", raw_reply=query, **kw)


def magpie_args(fake: FakeTeacher, out, num: int, *more: str) -> list[str]:
    return [*fake_args(fake, out, num, mode="magpie"), *more]


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_pre_query_is_the_templates_opening_of_a_user_turn(name):
    template, pre, end = TEMPLATES[name]
    assert pre_query_of(template, "<|im_end|>") == (pre, end)


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_run_sends_the_pre_query_served_at_props_and_stops_at_the_end_of_turn(tmp_path, name):
    template, pre, end = TEMPLATES[name]
    with magpie_teacher(chat_template=template) as fake:
        r = run_generate(*magpie_args(fake, tmp_path / "run", 2), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert fake.raw_prompts and set(fake.raw_prompts) == {pre}
        raw = [b for b in fake.bodies if "prompt" in b]
        assert raw[0]["stop"][0] == end and "\n\n\n" in raw[0]["stop"]
        # Each query that could be kept was answered through chat, the query as the user's message.
        assert fake.prompts == [query(0), query(1)]
    kept = lines(tmp_path / "run" / "kept.jsonl")
    assert [k["instruction"] for k in kept] == [query(0), query(1)]
    assert kept[0]["provenance"]["prompt_template"] == pre and kept[0]["provenance"]["mode"] == "magpie"
    import hashlib

    assert kept[0]["provenance"]["prompt_hash"] == hashlib.sha256(pre.encode()).hexdigest()


def test_deepseeks_full_width_tokens_end_a_query_and_are_never_kept(tmp_path):
    """DeepSeek writes <｜Assistant｜> and <｜end▁of▁sentence｜> with full-width bars: they were
    neither stop strings nor cut from a query, and landed in the data."""
    queries = ["<｜Assistant｜>", "Describe the amber anchor and the apple arch?<｜end▁of▁sentence｜>",
               "Explain the cabin and the cactus candle?<｜Assistant｜>Sure, here it is."]
    with FakeTeacher(reply=lambda n: f"Answer {n}.", raw_reply=lambda n: queries[n % 3], chat_template=DEEPSEEK) as fake:
        r = run_generate(*magpie_args(fake, tmp_path / "run", 2, "--concurrency", "1"), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert set(fake.raw_prompts) == {"<｜User｜>"}
        stop = next(b for b in fake.bodies if "prompt" in b)["stop"]
        assert {"<｜end▁of▁sentence｜>", "<｜Assistant｜>", "<｜User｜>"} <= set(stop)
    assert [k["instruction"] for k in lines(tmp_path / "run" / "kept.jsonl")] == [q.split("<")[0] for q in queries[1:]]
    assert [o["reason"].split(":")[0] for o in lines(tmp_path / "run" / "rejected.jsonl")] == ["template_only"]


def test_the_template_comes_from_a_server_that_answers_when_the_first_is_down(tmp_path):
    """Several --base-url servers, the first down: the others run the job (it is put aside), so
    the chat template is asked of each in turn, not only of the first."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    template, pre, _ = TEMPLATES["chatml"]
    with magpie_teacher(chat_template=template) as fake:
        args = magpie_args(fake, tmp_path / "run", 2)
        args[1:2] = [dead, fake.base_url]
        r = run_generate(*args, key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert fake.raw_prompts and set(fake.raw_prompts) == {pre}
    assert len(lines(tmp_path / "run" / "kept.jsonl")) == 2


@pytest.mark.parametrize("typed, sent", [
    (r"<|user|>\n", "<|user|>\n"),
    # '\\n' in a shell's single quotes: a backslash, then n (it was a backslash and a newline)
    (r"USER\\n", "USER\\n"),
    (r"USER\\\n", "USER\\\n"),
    (r"C:\temp\n", "C:\\temp\n"),
], ids=["newline", "escaped-backslash", "backslash-then-newline", "other-backslash"])
def test_magpie_prefix_wins_over_the_template(tmp_path, typed, sent):
    with magpie_teacher(chat_template=CHATML) as fake:
        r = run_generate(*magpie_args(fake, tmp_path / "run", 1, "--magpie-prefix", typed), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert set(fake.raw_prompts) == {sent}


def test_a_local_model_folders_tokenizer_config_gives_the_template(tmp_path):
    """vLLM serves no /props: a --model given as a folder is read as transformers reads it."""
    model = tmp_path / "SmolLM2"
    model.mkdir()
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3, "eos_token": {"content": "<|eot_id|>"}}))
    with magpie_teacher(models=(str(model),)) as fake:
        args = magpie_args(fake, tmp_path / "run", 1)
        args[args.index("fake")] = str(model)
        r = run_generate(*args, key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert set(fake.raw_prompts) == {TEMPLATES["llama3"][1]}


@pytest.mark.parametrize("config, jinja, want", [
    ([], None, "tokenizer_config.json: not a JSON object (list)"),
    ({"chat_template": [1, 2]}, None, "tokenizer_config.json: chat_template is a list, but not of"),
    ({"chat_template": 7}, None, "tokenizer_config.json: chat_template must be a string or a list of named templates, not int"),
    ({"chat_template": "{{ 1/0 }}"}, None, "tokenizer_config.json: the chat template does not render (ZeroDivisionError"),
    ({"chat_template": "{% for i in range(10**9) %}{% endfor %}"}, None,
     "tokenizer_config.json: the chat template does not render (OverflowError"),
    ({}, b"{{ messages \xff }}", "chat_template.jinja: cannot be read as UTF-8 text"),
    ({"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]}, None, None),
])
def test_a_broken_chat_template_in_a_model_folder_is_one_line_naming_the_file(tmp_path, config, jinja, want):
    """The folder's files are the user's: whatever is wrong in them (a list of named templates is
    the real Hugging Face format, and is read) is a UserError naming the file, never a traceback."""
    from selfinstruct.config import UserError
    from selfinstruct.generate import GenerateOptions
    from selfinstruct.modes.magpie import find_pre_query

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_bytes(jinja)
    cfg = GenerateOptions(out=str(tmp_path / "run"), mode="magpie", model=str(tmp_path))
    if want is None:
        assert find_pre_query(cfg).text == "<|im_start|>user\n"
    else:
        with pytest.raises(UserError, match=re.escape(want)):
            find_pre_query(cfg)


def test_a_resume_whose_chat_template_gives_another_pre_query_is_refused(tmp_path):
    """config.yaml holds no pre-query when it comes from the chat template: the run's logged
    queries say which one they were asked with, and a resume that would ask with another is one
    line naming both, changing nothing. --magpie-prefix with the run's own resumes it."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    out = tmp_path / "run"
    with magpie_teacher(models=(str(model),)) as fake:
        def generate(num: int, *more: str):
            args = magpie_args(fake, out, num, *more)
            args[args.index("fake")] = str(model)
            return run_generate(*args, key=fake.key, timeout=120)

        r = generate(2)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3}))
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".selfinstruct-lock"}
        r = generate(4)
        assert r.returncode == 2
        assert one_error_line(r.stderr).endswith(
            f"responses.jsonl: this run's queries were asked after the pre-query '<|im_start|>user\\n', not "
            f"'<|start_header_id|>user<|end_header_id|>\\n\\n' (from {model / 'tokenizer_config.json'}); "
            "use a new --out folder, or --magpie-prefix with the run's to resume")
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".selfinstruct-lock"} == before
        r = generate(4, "--magpie-prefix", r"<|user|>\n")  # the flag is compared the same way
        assert r.returncode == 2 and "not '<|user|>\\n' (from --magpie-prefix)" in one_error_line(r.stderr)
        r = generate(4, "--magpie-prefix", r"<|im_start|>user\n")
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 4)
    assert {k["provenance"]["prompt_template"] for k in lines(out / "kept.jsonl")} == {"<|im_start|>user\n"}


def test_no_chat_template_anywhere_is_one_line_saying_to_pass_magpie_prefix(tmp_path):
    with magpie_teacher() as fake:  # no /props, and --model is not a folder
        r = run_generate(*magpie_args(fake, tmp_path / "run", 1), key=fake.key, timeout=120)
    assert r.returncode == 2
    assert "pass --magpie-prefix" in one_error_line(r.stderr)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_a_wrong_api_key_is_named_not_a_missing_chat_template(tmp_path):
    # llama.cpp asks for the key at /props too: a 401 there is the key, and --magpie-prefix
    # (what the line used to suggest) would only meet the same 401 at the first request.
    with magpie_teacher(chat_template=CHATML) as fake:
        r = run_generate(*magpie_args(fake, tmp_path / "run", 1), key="not-the-key", timeout=120)
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert f"the teacher at {fake.base_url} refused the request (http_401" in line
    assert line.endswith("the API key is wrong (--api-key, SELFINSTRUCT_API_KEY or OPENAI_API_KEY)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("template", [None, CHATML])
def test_the_embedded_teacher_is_asked_for_its_template_before_the_run_folder_is_made(tmp_path, monkeypatch, capsys,
                                                                                        template):
    """A --teacher-model GGUF may carry no chat template: that is one line, and no run folder
    is left behind to delete before the rerun with --magpie-prefix. (The embedded teacher is a
    scripted server here; test_the_embedded_teacher_writes_queries_and_answers runs the real one.)"""
    import contextlib
    import types

    from selfinstruct import servers
    from selfinstruct.cli import main

    @contextlib.contextmanager
    def embedded(*args, **kwargs):
        with magpie_teacher(chat_template=template) as fake:
            yield types.SimpleNamespace(base_url=fake.base_url, api_key=fake.key, model="fake")

    monkeypatch.setattr(servers, "embedded_teacher", embedded)
    out = tmp_path / "run"
    code = main(["generate", "--mode", "magpie", "--num", "2", "--out", str(out), "--no-progress"])
    if template is None:
        assert code == 2 and "pass --magpie-prefix" in capsys.readouterr().err
        assert not out.exists()
    else:
        assert code == 0
        verify_run(out, 2)


def test_magpie_into_an_alpaca_run_says_the_mode_first(tmp_path):
    """--out naming a run made in another mode is refused on the mode, as any resume would be,
    before the pre-query is looked for: this teacher serves no chat template, which would be
    said instead (and told to pass --magpie-prefix, which could not help)."""
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        assert run_generate(*fake_args(fake, out, 2), key=fake.key, timeout=120).returncode == 0
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        r = run_generate(*magpie_args(fake, out, 4), key=fake.key, timeout=120)
    assert r.returncode == 2
    assert one_error_line(r.stderr).endswith("--mode: this run was made with 'alpaca', not 'magpie'; use a new --out "
                                             "folder, or leave --mode out to resume with the run's own")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    verify_run(out, 2)


def test_a_server_without_v1_completions_is_one_clear_line(tmp_path):
    with FakeTeacher(chat_template=CHATML) as fake:  # raw_reply None: 404 on /v1/completions
        r = run_generate(*magpie_args(fake, tmp_path / "run", 1), key=fake.key, timeout=120)
    assert r.returncode == 2
    assert one_error_line(r.stderr).endswith(
        f"the teacher at {fake.base_url} has no /v1/completions endpoint, which --mode magpie needs")


def test_structured_is_refused_in_magpie_mode(tmp_path):
    with magpie_teacher(chat_template=CHATML) as fake:
        r = run_generate(*magpie_args(fake, tmp_path / "run", 1, "--structured"), key=fake.key, timeout=120)
    assert r.returncode == 2 and "--structured does not apply to --mode magpie" in one_error_line(r.stderr)


def test_prompts_are_refused_in_magpie_mode(tmp_path):
    """magpie renders no template: a --prompts folder would be silently unused, so it is an error."""
    with magpie_teacher(chat_template=CHATML) as fake:
        r = run_generate(*magpie_args(fake, tmp_path / "run", 1, "--prompts", str(tmp_path)), key=fake.key, timeout=120)
    assert r.returncode == 2 and "--prompts does not apply to --mode magpie" in one_error_line(r.stderr)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


@pytest.mark.parametrize("text, finish, want", [
    ("  What is the capital of Peru?\n", "stop", ("What is the capital of Peru?", None)),
    ("Tell me a joke.<|im_end|>\n<|im_start|>assistant\nNo.", "stop", ("Tell me a joke.", None)),
    ("", "stop", ("", "empty_query")),
    ("\n\n", "length", ("", "empty_query")),
    ("<|im_start|>assistant\n", "stop", ("", "template_only")),
    ("assistant", "stop", ("", "template_only")),
    ("What is the capital of Peru?<eos>", "stop", ("What is the capital of Peru?", None)),
    ("What is 2 + 2?<｜Assistant｜>4<｜end▁of▁sentence｜>", "stop", ("What is 2 + 2?", None)),
    ("<｜User｜>", "stop", ("", "template_only")),
    ("How do I bake bread?\nASSISTANT: Mix flour and water.", "stop", ("How do I bake bread?", None)),
    ("Assistant: Sure!", "stop", ("", "template_only")),
    ("Summarise this chat:\nUser: hi\nAssistants: are they useful?", "stop",
     ("Summarise this chat:\nUser: hi\nAssistants: are they useful?", None)),
    ("Write a poem about the sea and", "length", ("Write a poem about the sea and", "truncated")),
    ("Why?\nWhy?\nWhy?\nWhy?", "length", ("Why?\nWhy?\nWhy?\nWhy?", "degenerate")),
])
def test_read_query(text, finish, want):
    got, why = read_query(text, finish)
    assert (got, why and why.split(":")[0]) == want


def test_a_scripted_run_keeps_rejects_with_reasons_and_passes_every_invariant(tmp_path):
    out = tmp_path / "run"
    with magpie_teacher(chat_template=SMOLLM2) as fake:
        r = run_generate(*magpie_args(fake, out, 12), key=fake.key, timeout=300)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    stats = verify_run(out, 12)
    assert stats["mode"] == "magpie"
    reasons = {o["reason"].split(":")[0] for o in lines(out / "rejected.jsonl")}
    assert {"empty_query", "template_only", "duplicate"} <= reasons
    kept = lines(out / "kept.jsonl")
    assert all(k["instances"][0]["output"].startswith("Here is a short answer") for k in kept)
    assert json.load(open(out / "data.json"))[0]["input"] == ""
    # A query rejected before its answer costs no chat request: 4 bad queries of the first 16.
    assert len(fake.prompts) == stats["responses"] - len(lines(out / "rejected.jsonl"))


def test_a_query_keeps_its_lines_as_the_teacher_answered_it(tmp_path):
    """The answer was written for the query with its paragraphs and code block: the record keeps
    them (the other modes put an instruction on one line)."""
    asked = "Fix the bug in this Python function so that it returns the sum:\n```python\ndef add(a, b):\n    return a - b\n```"
    # The filters still read a query on one line: a phrase they look for may span a line break.
    refusal = "Tell me what you think as an\nAI about the weather today."
    queries = [refusal, asked]
    with FakeTeacher(reply=lambda n: "Change `-` to `+`.", raw_reply=lambda n: f"  {queries[n % 2]}\n",
                     chat_template=CHATML) as fake:
        r = run_generate(*magpie_args(fake, tmp_path / "run", 1, "--concurrency", "1"), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert fake.prompts == [asked]
    (kept,) = lines(tmp_path / "run" / "kept.jsonl")
    assert kept["instruction"] == asked
    assert json.load(open(tmp_path / "run" / "data.json"))[0]["instruction"] == asked
    assert [(o["instruction"], o["reason"].split(":")[0]) for o in lines(tmp_path / "run" / "rejected.jsonl")] \
        == [(refusal, "refusal")]


def test_a_resume_takes_another_seed_in_magpie_mode_only(tmp_path):
    """--seed picks the examples a prompt shows; magpie's pre-query shows none, so a resume with
    another --seed changes nothing and was refused ('field 'seed''). Other modes still refuse it."""
    out = tmp_path / "run"
    with magpie_teacher(chat_template=CHATML) as fake:
        assert run_generate(*magpie_args(fake, out, 2), key=fake.key, timeout=120).returncode == 0
        r = run_generate(*magpie_args(fake, out, 4, "--seed", "5"), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 4)
    assert "seed: 5" in (out / "config.yaml").read_text().splitlines()
    with FakeTeacher() as fake:
        assert run_generate(*fake_args(fake, tmp_path / "alpaca", 1), key=fake.key, timeout=120).returncode == 0
        r = run_generate(*fake_args(fake, tmp_path / "alpaca", 2), "--seed", "5", key=fake.key, timeout=120)
    assert r.returncode == 2 and "--seed: this run was made with 0, not 5" in one_error_line(r.stderr)


def test_kill_9_and_resume_lose_and_repeat_nothing(tmp_path):
    """SIGKILL the run as its log grows (not after fixed delays: a quiet machine finishes first), resume, check every invariant."""
    out = tmp_path / "run"
    acknowledged: set[str] = set()
    num = 30

    def note_acknowledged():
        if (out / "kept.jsonl").exists():
            raw = (out / "kept.jsonl").read_bytes()
            acknowledged.update(json.loads(l)["id"] for l in raw[: raw.rfind(b"\n") + 1].decode().splitlines())

    with magpie_teacher(chat_template=CHATML, on_request=lambda n: time.sleep(0.02)) as fake:
        cmd = [*GENERATE, *magpie_args(fake, out, num), "--concurrency", "4"]
        env = {**os.environ, "SELFINSTRUCT_API_KEY": fake.key}
        kills = kill_when_lines(cmd, env, out / "responses.jsonl", (3, 10, 18), after=note_acknowledged)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert kills >= 2, "the run finished before it could be killed twice; slow the server down"
    verify_run(out, num)
    assert acknowledged <= {o["id"] for o in lines(out / "kept.jsonl")}


def test_a_prompts_folder_needs_only_the_chosen_modes_files(tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "alpaca.txt").write_text((bundled_dir("prompts") / "alpaca.txt").read_text())
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, tmp_path / "run", 2), "--prompts", str(prompts), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        verify_run(tmp_path / "run", 2)
        # self-instruct mode names what it needs, and only that.
        r = run_generate(*fake_args(fake, tmp_path / "run2", 2), "--mode", "self-instruct", "--prompts", str(prompts),
                         key=fake.key, timeout=120)
    line = one_error_line(r.stderr)
    assert "self_instruct_instructions.txt: prompt template missing (--mode self-instruct needs" in line
    assert "alpaca.txt" not in line


@pytest.mark.slow
def test_the_embedded_teacher_writes_queries_and_answers(tmp_path):
    """One small real run: the pre-query from llama.cpp's /props, SmolLM2-135M writing both sides."""
    from selfinstruct.cli import main

    out = tmp_path / "run"
    t0 = time.time()
    code = main(["generate", "--mode", "magpie", "--num", "3", "--out", str(out), "--seed", "1", "--no-progress",
                 "--max-tokens", "256", "--max-requests", "40"])
    wall = time.time() - t0
    stats = json.loads((out / "stats.json").read_text())
    print(f"\nmagpie, embedded SmolLM2-135M: {stats['kept']} kept, {stats['rejected']} rejected "
          f"{stats['rejected_by_reason']}, {stats['responses']} units, {wall:.0f} s")
    for k in lines(out / "kept.jsonl"):
        print("KEPT", json.dumps(k["instruction"])[:200], "->", json.dumps(k["instances"][0]["output"])[:200])
    for k in lines(out / "rejected.jsonl")[:8]:
        print("REJECTED", k["reason"][:80], json.dumps(k["raw"])[:160])
    assert code == 0
    verify_run(out, 3)
    assert lines(out / "kept.jsonl")[0]["provenance"]["prompt_template"].endswith("<|im_start|>user\n")


def magpie_decision(query_text: str, answer_text: str):
    """What magpie makes of one logged query and answer: the candidate's error, else the filters' reason (None: kept)."""
    from selfinstruct import filters
    from selfinstruct.modes import magpie
    from selfinstruct.records import Reply, Response

    resp = Response(id="r000000", index=0, mode="magpie", prompt_hash="h", example_ids=[], created_at="", elapsed_s=0,
                    replies=[Reply(purpose="query", text=query_text, finish_reason="stop"),
                             Reply(purpose="answer", text=answer_text, finish_reason="stop")])
    (cand,) = magpie.candidates(resp, None)
    return cand["error"] or filters.clean_instances(cand["instances"])[1]


@pytest.mark.parametrize("answer, reason", [
    ("###", "placeholder_output"), ("###\n", "placeholder_output"), ("# # #", "placeholder_output"),
    ("#", None), ("==", None), ("?", None),
])
def test_an_answer_of_only_the_alpaca_separator_is_rejected_and_one_mark_is_kept(answer, reason):
    why = magpie_decision("Which character starts a comment in Python code?", answer)
    assert (why and why.split(":")[0]) == reason, why


@pytest.mark.parametrize("query, answer, reason", [
    ("Write the letter a many times on one line for me.", "a " * 100_000, "degenerate"),
    ("Is the sky blue on a clear summer day at noon?", "The answer is yes. " * 300, "degenerate"),
    ("Why " + "why " * 300 + "is it so?", "Because.", "degenerate"),
    ("List the numbers from 1 to 500 on one line.", ", ".join(map(str, range(1, 501))), None),
])
def test_one_long_line_repeating_a_short_unit_is_degenerate(query, answer, reason):
    why = magpie_decision(query, answer)
    assert (why and why.split(":")[0]) == reason, why


@pytest.mark.parametrize("query", ["", "\u200b", " \u200b\ufeff\u2060 ", "\u3164"])
def test_a_query_of_only_invisible_characters_is_an_empty_query(query):
    assert read_query(query, "stop")[1] == "empty_query: the teacher wrote no query"


def test_a_query_of_markup_after_invisible_characters_is_still_template_only():
    assert read_query("\u200b<|im_start|>assistant\n", "stop")[1].startswith("template_only")


def test_an_answer_of_only_zero_width_characters_is_empty():
    assert magpie_decision("Which character starts a comment in Python code?", "\u200b\u200b\ufeff") == \
        "empty_output: the output is empty"


def test_a_query_or_an_answer_holding_an_invisible_character_is_rejected_and_the_query_not_answered(tmp_path):
    """A bidi override inside a query, or a zero-width space inside its answer, was kept. A query holding one
    is rejected before its answer is asked for (as any query that fails the filters), an answer holding one
    is rejected."""
    hidden = "Which planet is \u202ethe largest one in our solar system?"
    queries = [hidden, "Name the longest river in South America, please.", "What is the boiling point of water at sea level?"]
    answers = ["The Amazon\u200b River.", "It is 100 degrees Celsius."]
    with FakeTeacher(reply=lambda n: answers[n % 2], raw_reply=lambda n: queries[n % 3] if n < 3 else query(n),
                     chat_template=CHATML) as fake:
        r = run_generate(*magpie_args(fake, tmp_path / "run", 1, "--concurrency", "1"), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert fake.prompts == queries[1:]
    assert [(o["instruction"], o["reason"].split(" (")[0]) for o in lines(tmp_path / "run" / "rejected.jsonl")] == [
        (hidden, "invisible_characters: the instruction holds U+202E"),
        (queries[1], "invisible_characters: the output holds U+200B")]
    (kept,) = lines(tmp_path / "run" / "kept.jsonl")
    assert kept["instruction"] == queries[2]


def test_a_query_that_repeats_the_pre_querys_system_prompt_is_rejected_unanswered(tmp_path):
    """A small model given SmolLM2's pre-query may write its default system prompt back as the user's
    query: that is the template's text, not a user's, and was kept (with a paid-for answer)."""
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    queries = [f"  {system}.\n", system.upper(), "Describe the amber lighthouse on the granite cliff?"]
    out = tmp_path / "run"
    with FakeTeacher(reply=lambda n: "Here is a short answer.", raw_reply=lambda n: queries[min(n, 2)],
                     chat_template=SMOLLM2) as fake:
        r = run_generate(*magpie_args(fake, out, 1, "--concurrency", "1"), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert fake.prompts == [queries[2]]  # the echoes were not answered
    verify_run(out, 1)
    rejected = lines(out / "rejected.jsonl")
    assert [(o["stage"], o["reason"].split(":")[0]) for o in rejected] == [("parse", "prompt_echo")] * 2
    assert "system prompt" in rejected[0]["reason"]
