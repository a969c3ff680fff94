"""generate's resume, against a scripted OpenAI-compatible server on 127.0.0.1 (quick, no model).

What a resume may change and what it refuses: --num may grow, never below what the run kept;
a small growth sends only the prompts its few tasks need; and the run's mode is the one its
logged replies were made in, whatever an edited config.yaml says.
"""

from __future__ import annotations

import json

import pytest

from conftest import FakeTeacher, diverse_tasks, fake_args, lines, one_error_line, run_generate, snapshot, verify_run


def refused_unchanged(fake: FakeTeacher, out, args: list, ends_with: str):
    """The resume ``args`` refused: rc 2, one line ending with ``ends_with``, the folder as it was and
    nothing asked of the teacher."""
    before, sent = snapshot(out), len(fake.bodies)
    r = run_generate(*args, key=fake.key, timeout=120)
    assert r.returncode == 2, r.stderr.decode()[-2000:]
    assert one_error_line(r.stderr).endswith(ends_with), one_error_line(r.stderr)
    assert snapshot(out) == before and len(fake.bodies) == sent
    return r


def test_a_resume_with_num_below_what_was_kept_is_refused_and_changes_nothing(tmp_path):
    """--num 6 kept 6: the same command with --num 2 would leave config.yaml saying 2 while
    kept.jsonl and stats.json hold 6. Refused, as respond's --limit and evolve's --rounds are."""
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 6), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        sent = len(fake.bodies)
        refused_unchanged(fake, out, fake_args(fake, out, 2),
            "--num 2: this run has kept 6 tasks already; --num may grow on resume, not shrink: give --num 6 or more")
        # Given in a --config file, the file and its key are named.
        (tmp_path / "c.yaml").write_text("num: 5\n")
        args = fake_args(fake, out, 6)
        del args[args.index("--num"):args.index("--num") + 2]
        r = run_generate(*args, "--config", str(tmp_path / "c.yaml"), key=fake.key, timeout=120)
        assert r.returncode == 2
        assert one_error_line(r.stderr).endswith(f"{tmp_path / 'c.yaml'}: num: 5, but this run has kept 6 tasks "
                                                 "already; num may grow on resume, not shrink: give num: 6 or more")
        # The run's own --num resumes: nothing left to do.
        r = run_generate(*fake_args(fake, out, 6), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert len(fake.bodies) == sent
    assert lines(out / "kept.jsonl") and verify_run(out, 6)["kept"] == 6


def test_a_changed_option_is_refused_naming_where_the_user_gave_it(tmp_path):
    """A resume whose option differs from the run's named the run's config.yaml, which the user never
    edited, for a value from their --config file or a flag: the line names the --config file and its
    key, or the flag (a flag over the file's key is the flag's), and says to leave it out."""
    out = tmp_path / "run"
    mine = tmp_path / "my.yaml"
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 2), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        for text, field, was, now in (("temperature: 0.2\n", "temperature", 0.7, 0.2),
                                      ("mode: self-instruct\n", "mode", "'alpaca'", "'self-instruct'"),
                                      ("teacher: embedded\n", "teacher", "'openai'", "'embedded'")):
            mine.write_text(text)
            refused_unchanged(fake, out, [*fake_args(fake, out, 3), "--config", str(mine)],
                f"{mine}: field '{field}': this run was made with {was}, not {now}; use a new --out folder, "
                f"or leave {field} out of this file to resume with the run's own")
        mine.write_text("temperature: 0.2\nseed: 4\n")
        refused_unchanged(fake, out, [*fake_args(fake, out, 3, "--temperature", "0.3", "--seed", "0"), "--config",
                                      str(mine)],
            "--temperature: this run was made with 0.7, not 0.3; use a new --out folder, or leave --temperature "
            "out to resume with the run's own")
        # The corrected command resumes.
        r = run_generate(*fake_args(fake, out, 3), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 3)


def test_a_pair_of_options_is_checked_against_the_values_the_resumed_run_will_use(tmp_path):
    """A pair (--min-words below --max-words, --nearest-floor at most --threshold) was checked
    against the default of the option left out before the run's own was taken: `min_words: 200`
    in a `--max-words 300` run was refused as "must be below max_words (default 150)", the wrong
    reason. Checked against the run's own, it is refused for what it is: a changed option."""
    out, mine = tmp_path / "run", tmp_path / "my.yaml"
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 2, "--max-words", "300", "--threshold", "0.9"), key=fake.key,
                         timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        mine.write_text("min_words: 200\n")
        refused_unchanged(fake, out, [*fake_args(fake, out, 3), "--config", str(mine)],
            f"{mine}: field 'min_words': this run was made with 3, not 200; use a new --out folder, or leave "
            "min_words out of this file to resume with the run's own")
        refused_unchanged(fake, out, fake_args(fake, out, 3, "--nearest-floor", "0.8"),
            "--nearest-floor: this run was made without nearest_floor, not with 0.8; use a new --out folder, or leave "
            "--nearest-floor out to resume with the run's own")
        # A pair the run's own value contradicts is still refused, naming the run's.
        refused_unchanged(fake, out, fake_args(fake, out, 3, "--min-words", "400"),
            "--min-words 400 must be below the run's max_words (300) (no instruction could pass: one needs more "
            "than min and at most max words)")
        # A new run has no values of its own: the default is the one it would use.
        r = run_generate(*fake_args(fake, tmp_path / "new", 2), "--config", str(mine), key=fake.key, timeout=120)
        assert r.returncode == 2 and one_error_line(r.stderr).endswith(
            f"{mine}: min_words: 200 must be below max_words (default 150) (no instruction could pass: one needs "
            "more than min and at most max words)"), one_error_line(r.stderr)
        assert not (tmp_path / "new").exists()
        r = run_generate(*fake_args(fake, out, 3), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 3)


def test_a_resume_leaving_out_num_keeps_the_runs_own(tmp_path):
    """Left out, --num is the run's own, as respond's --limit is: a --num 5 run resumed with only
    --timeout 20 asked for more tasks (the default 100) and config.yaml said 100. A config.yaml
    edited below what the run kept is refused, naming the file."""
    import yaml

    out = tmp_path / "run"
    with FakeTeacher() as fake:
        args = fake_args(fake, out, 5)
        r = run_generate(*args, key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        sent = len(fake.bodies)
        del args[args.index("--num"):args.index("--num") + 2]
        r = run_generate(*args, "--timeout", "20", key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert len(fake.bodies) == sent
        saved = yaml.safe_load((out / "config.yaml").read_text())
        assert saved["num"] == 5 and saved["timeout"] == 20
        # Given, it grows.
        r = run_generate(*args, "--num", "7", key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert len(fake.bodies) > sent
        verify_run(out, 7)
        (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("num: 7", "num: 3"))
        before = snapshot(out)
        r = run_generate(*args, key=fake.key, timeout=120)
    assert r.returncode == 2
    assert one_error_line(r.stderr).endswith(
        f"{out / 'config.yaml'}: field num: 3, but this run has kept 7 tasks already (edited by hand?); "
        "give --num 7 or more")
    assert snapshot(out) == before


def test_a_small_growth_of_num_sends_only_the_prompts_its_tasks_need(tmp_path):
    """A run of --num 10 resumed with --num 11 needs one task: it sent --concurrency prompts
    (8) for it, and rejected their other tasks as quota. From the run's own yield (2 tasks a
    reply here), one prompt covers it."""
    out = tmp_path / "run"
    with FakeTeacher() as fake:  # 2 tasks a reply, every one kept
        r = run_generate(*fake_args(fake, out, 10, "--concurrency", "8"), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        sent = len(fake.bodies)
        r = run_generate(*fake_args(fake, out, 11, "--concurrency", "8"), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert len(fake.bodies) - sent == 1
    verify_run(out, 11)


def test_a_run_that_ended_in_quota_rejections_counts_them_in_its_yield(tmp_path):
    """--num 1 with 3 prompts out (the prior's, 2 tasks a prompt): one reply keeps a task, the
    two on their way back are rejected as quota (tasks the teacher did give). Resumed with --num 2,
    the yield counts them (6 tasks in 3 replies), not only the one kept (1 in 3, which would send
    every slot again)."""
    import time

    with FakeTeacher(on_request=lambda n: time.sleep(0.1) if 0 < n < 4 else None) as fake:
        out = tmp_path / "run"
        r = run_generate(*fake_args(fake, out, 1, "--concurrency", "4"), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert len(fake.bodies) == 3 and verify_run(out, 1)["rejected_by_stage"]["quota"] == 5
        r = run_generate(*fake_args(fake, out, 2, "--concurrency", "4"), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert len(fake.bodies) == 4
    verify_run(out, 2)


def test_replies_that_come_back_short_are_followed_by_more_prompts_until_num(tmp_path):
    """The end of a run limits its prompts by the yield so far; when the replies give less (every
    task a duplicate of a seed here, for a while), it sends more, and never stalls short of --num."""
    from selfinstruct.prompts import bundled_dir
    from selfinstruct.seeds import load_seeds

    seed = load_seeds([bundled_dir("seeds") / "seed_tasks.jsonl"])[0].instruction
    copy = f"###\nInstruction: {seed}\nInput: <noinput>\nOutput: As the seed says.\n" * 2
    with FakeTeacher(reply=lambda n: copy if 5 <= n < 12 else diverse_tasks(n)) as fake:
        out = tmp_path / "run"
        r = run_generate(*fake_args(fake, out, 10), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert len(fake.bodies) == 5
        r = run_generate(*fake_args(fake, out, 13, "--concurrency", "4"), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    stats = verify_run(out, 13)
    assert stats["rejected_by_stage"]["dedup"] == 14  # the 7 short replies were all sent, and more after them


@pytest.mark.parametrize("mode,sent", [("alpaca", 3), ("magpie", 6)])
def test_a_small_num_sends_a_handful_of_prompts_not_every_slot(tmp_path, mode, sent):
    """--num 1 --concurrency 64 filled every slot before any reply was back: 64 teacher calls for
    one task. Before the run has a yield, the prior's prompts go out: 1.5 times what the tasks a
    prompt asks for (2 here; magpie's one query) cover at a keep rate of a quarter."""
    import random

    from conftest import VOCAB

    out = tmp_path / "run"
    prefix = ["--magpie-prefix", "<|im_start|>user\\n"] if mode == "magpie" else []
    with FakeTeacher(raw_reply=lambda n: f"Describe {' '.join(random.Random(n).sample(VOCAB, 9))}?") as fake:
        r = run_generate(*fake_args(fake, out, 1, "--concurrency", "64", *prefix, mode=mode), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert len(fake.raw_prompts if mode == "magpie" else fake.prompts) == sent  # the prompts that ask for tasks
    verify_run(out, 1)


def test_replies_with_no_task_are_followed_by_more_prompts_until_a_small_num(tmp_path):
    """A teacher whose first 20 replies hold no task: the prior's 3 prompts come back empty, and
    each empty one lowers the yield, so more are sent (never a free slot with nothing in flight)
    until the run keeps its one task."""
    with FakeTeacher(reply=lambda n: "I cannot help with that." if n < 20 else diverse_tasks(n)) as fake:
        out = tmp_path / "run"
        r = run_generate(*fake_args(fake, out, 1, "--concurrency", "64"), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert 20 < len(fake.bodies) <= 64
    verify_run(out, 1)


def test_a_big_num_fills_every_slot_at_once(tmp_path):
    """--num 100000: the prior's prompts are past --concurrency, so every slot is sent at once:
    each request is held until the 16th arrives, which it does before any reply (5 s to spare)."""
    import threading

    all_in, waited = threading.Event(), []

    def hold(n: int) -> None:
        if n == 15:
            all_in.set()
        waited.append(all_in.wait(timeout=5))

    with FakeTeacher(on_request=hold) as fake:
        r = run_generate(*fake_args(fake, tmp_path / "run", 100000, "--concurrency", "16", "--max-requests", "16"),
                         key=fake.key, timeout=120)
        assert r.returncode == 1, r.stderr.decode()[-2000:]  # stopped by --max-requests
    assert len(fake.bodies) == 16 and waited == [True] * 16


@pytest.mark.parametrize("mode", ["self-instruct", "magpie"])
@pytest.mark.parametrize("given", [None, "edited", "alpaca"])
def test_a_mode_edited_in_config_yaml_is_refused_by_the_logged_replies_mode(tmp_path, mode, given):
    """config.yaml's mode edited by hand in an alpaca run: the resume took it unchecked, sent
    another mode's prompts into the run, and its card named that mode. Each logged reply records
    its mode: the first one's is compared, and the resume refused before any request, --mode
    left out, given as the edited file says, or given as the run's own (config.yaml named, not
    the flag, as what is wrong)."""
    flag = {None: [], "edited": ["--mode", mode], "alpaca": ["--mode", "alpaca"]}[given]
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 2), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        saved = out / "config.yaml"
        saved.write_text(saved.read_text().replace("mode: alpaca\n", f"mode: {mode}\n"))
        refused_unchanged(fake, out, [*fake_args(fake, out, 3), *flag],
            f"{out / 'responses.jsonl'}: this run's replies were made in mode 'alpaca', but {saved} says '{mode}' "
            f"(edited since?); put 'mode: alpaca' back in it{' and give --mode alpaca' if given == 'edited' else ''} to resume, "
            "or use a new --out folder")
        assert not fake.raw_prompts


@pytest.mark.parametrize("edit,key,said", [
    (lambda s: s.update(wall_time_s=float("nan")), "wall_time_s", "must be seconds (a finite number, 0 or more), not NaN"),
    (lambda s: s.update(sessions=-3), "sessions", "must be a count (a whole number, 0 or more), not -3"),
    (lambda s: s.update(faults={"timeout": -1}), "faults.timeout", "must be a count (a whole number, 0 or more), not -1"),
    (lambda s: next(iter(s["servers"].values())).update(requests=float("inf")), "servers.{url}.requests",
     "must be a count (a whole number, 0 or more), not Infinity"),
])
def test_a_hand_edited_stats_json_with_nan_or_a_negative_count_is_one_line(tmp_path, edit, key, said):
    """stats.json's wall time, sessions, faults and per-server counts are carried over, each session
    adding its own: a NaN or -3 edited in was taken and written back. Refused as other damage to it is,
    before any request, the folder unchanged."""
    import json

    out = tmp_path / "run"
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 2), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        stats = json.loads((out / "stats.json").read_text())
        edit(stats)
        (out / "stats.json").write_text(json.dumps(stats))
        refused_unchanged(fake, out, fake_args(fake, out, 3),
            f"{out / 'stats.json'}: field '{key.format(url=fake.base_url)}': {said}; delete it and run again: the counts "
            "are rebuilt from the run's files")
        (out / "stats.json").unlink()  # as the line says: the counts are rebuilt
        r = run_generate(*fake_args(fake, out, 3), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(out, 3)


@pytest.mark.parametrize("line,key", [("temprature: 0.2\n", "temprature"), ("tasks-per-request: 1\n", "tasks-per-request")])
def test_an_unknown_key_in_the_runs_config_yaml_is_one_line_on_resume(tmp_path, line, key):
    """A --config file's unknown key is refused, but one edited into the run's own config.yaml was
    ignored on resume: the run went on as if the misspelt option were taken. One line naming the
    file and the key, before any request, the folder unchanged."""
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 2), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        saved = out / "config.yaml"
        saved.write_text(saved.read_text() + line)
        refused_unchanged(fake, out, fake_args(fake, out, 3),
            f"{saved}: field '{key}': unknown option (edited by hand, or saved by a newer version of selfinstruct?); "
            "remove it to resume, or resume with the version that made the run")


def test_a_resume_without_seeds_json_is_refused_unless_the_run_began_before_it(tmp_path):
    """seeds.json records the seed tasks a run began with; deleted, a resume took edited seed files
    silently (with it in place they are refused). Refused in one line, nothing written. A run begun
    before seeds.json was kept logs its replies without their count: it resumes and gets one."""
    import json

    seeds = tmp_path / "my.jsonl"
    rows = [{"id": f"s{i}", "instruction": f"Describe the {w} in a sentence.", "instances": [{"input": "", "output": w}]}
            for i, w in enumerate(("river", "garden", "lantern"))]
    seeds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        args = ["--seeds", str(seeds), *fake_args(fake, out, 2)]
        r = run_generate(*args, key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        began = (out / "seeds.json").read_bytes()
        (out / "seeds.json").unlink()
        seeds.write_text(json.dumps(rows[0]) + "\n")  # edited since
        refused_unchanged(fake, out, args,
            f"{out / 'seeds.json'}: missing, so the seed tasks this run began with cannot be compared (deleted?); "
            "restore it to resume, or use a new --out folder")
        # Restored, the edited seeds are refused as ever.
        (out / "seeds.json").write_bytes(began)
        r = run_generate(*args, key=fake.key, timeout=120)
        assert "not the seed tasks this run began with" in one_error_line(r.stderr)
        # A run begun before seeds.json: its replies carry no count. It resumes, and gets its seeds.json.
        (out / "seeds.json").unlink()
        logged = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
        (out / "responses.jsonl").write_text("".join(json.dumps({k: v for k, v in o.items() if k != "candidates"}) + "\n"
                                                     for o in logged))
        r = run_generate(*args, key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert json.loads((out / "seeds.json").read_text())["tasks"] == 1


@pytest.mark.parametrize("edit, field, what", [({}, "sha256", "missing"),
                                               ({"tasks": "3"}, "tasks", 'must be a count, not "3"'),
                                               ({"files": None}, "files", "must be a list of paths, not null")])
def test_a_seeds_json_edited_down_is_refused_not_taken_as_no_record(tmp_path, edit, field, what):
    """seeds.json edited down to {} was read as no record: the resume compared nothing, took
    edited seed files and wrote their hash over the run's. Refused in one line naming the file and
    the field, nothing written or asked."""
    import json

    seeds = tmp_path / "my.jsonl"
    rows = [{"id": f"s{i}", "instruction": f"Describe the {w} in a sentence.", "instances": [{"input": "", "output": w}]}
            for i, w in enumerate(("river", "garden", "lantern"))]
    seeds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        args = ["--seeds", str(seeds), *fake_args(fake, out, 2)]
        r = run_generate(*args, key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        began = json.loads((out / "seeds.json").read_text())
        (out / "seeds.json").write_text(json.dumps(edit if edit == {} else {**began, **edit}))
        seeds.write_text(json.dumps(rows[0]) + "\n")  # edited since
        refused_unchanged(fake, out, fake_args(fake, out, 3, "--seeds", str(seeds)),
            f"{out / 'seeds.json'}: field '{field}': {what}, so the seed tasks this run began with cannot be "
            "compared (edited?); restore it to resume, or use a new --out folder")


@pytest.mark.parametrize("damage", ["deleted", "older copy"])
def test_a_log_missing_replies_that_were_decided_is_refused_and_changes_nothing(tmp_path, damage):
    """responses.jsonl deleted (or an older, shorter copy put back): the resume numbered its replies
    from r000000 again, those ids were already in kept.jsonl, so the new replies' tasks were passed
    over as decided (neither kept nor rejected) and old records named another reply. Refused in one
    line naming the files and the first such id, before any request."""
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 6), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        log = out / "responses.jsonl"
        if damage == "deleted":
            log.unlink()
            first = "r000000-0"
        else:
            log.write_text(log.read_text().splitlines(keepends=True)[0])
            first = "r000001-0"
        refused_unchanged(fake, out, fake_args(fake, out, 12),
        f"{out / 'kept.jsonl'}: record {first} decides reply {first[:-2]}, which {log} does not log (deleted, or an "
        "older copy put back?); restore the log to resume, or use a new --out folder")


@pytest.mark.parametrize("decided", [True, False], ids=["an editor dropped the newline", "a kill before the newline"])
def test_a_whole_last_log_line_without_its_newline_is_that_reply(tmp_path, decided):
    """The log's last line without its final newline, whole and valid, is the reply: an editor
    drops the newline (its candidates decided), or a kill stops the write between the line and its
    newline (its decisions come after, so none are written). It was cut as a partial line and its
    id reused, the new reply's candidates passed over as decided. Now the newline is added (the next
    line does not glue onto it) and the run goes on exactly once."""
    import json

    out = tmp_path / "run"
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 4), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        log = out / "responses.jsonl"
        original = json.loads(log.read_text().splitlines()[-1])
        last = original["id"]
        log.write_bytes(log.read_bytes().rstrip(b"\n"))
        if not decided:  # as a kill leaves it: none of its candidates written
            for name in ("kept.jsonl", "rejected.jsonl"):
                kept = [l for l in (out / name).read_text().splitlines(keepends=True)
                        if not json.loads(l)["id"].startswith(last + "-")]
                (out / name).write_text("".join(kept))
        r = run_generate(*fake_args(fake, out, 8), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    logged = lines(log)
    ids = [o["id"] for o in logged]
    assert ids.count(last) == 1 and len(ids) == len(set(ids))
    # The reply itself, not a new one numbered as it (whose tasks were passed over as decided).
    assert next(o for o in logged if o["id"] == last) == original
    verify_run(out, 8)


@pytest.mark.parametrize("newline", [True, False], ids=["with its newline", "without it"])
@pytest.mark.parametrize("edit", ["count", "instruction"])
def test_a_last_log_line_without_its_newline_is_checked_to_read_as_decided(tmp_path, edit, newline):
    """The resume keeps a whole last log line without its newline as the reply it is, and the replay
    parses it again; but the check that a reply parsed again reads as it was decided (its count of
    candidates, the instruction at a decided one) passed it over, so an edited or differently parsed
    last reply went on to name decided ids for other instructions. It is refused as any line is."""
    import json

    from selfinstruct.generate import _said

    out = tmp_path / "run"
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 4), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        log = out / "responses.jsonl"
        rows = log.read_text().splitlines()
        last = json.loads(rows[-1])
        first = lines(out / "kept.jsonl")[-2]  # the last reply's candidate 0, which stays decided
        assert first["id"] == last["id"] + "-0"
        if edit == "count":
            last["candidates"] = 3
            why = f"reply {last['id']} was logged with 3 candidates and reads as 2 now"
        else:
            last["replies"][0]["text"] = last["replies"][0]["text"].replace(first["instruction"], "Name a red fruit.")
            why = (f"reply {last['id']}'s candidate 0 ({first['id']}) reads 'Name a red fruit.' now, but kept.jsonl "
                   f"decided it as {_said(first['instruction'])}")  # cut short as the line says it
        rows[-1] = json.dumps(last)
        log.write_text("\n".join(rows) + "\n" * newline)
        # Its candidate 1 undecided (a kill between its lines): the replay would parse the reply again.
        (out / "kept.jsonl").write_text("".join(json.dumps(o) + "\n" for o in lines(out / "kept.jsonl")[:-1]))
        refused_unchanged(fake, out, fake_args(fake, out, 4),
            f"{log}:{len(rows)}: {why}; it is parsed otherwise than when it was decided (another version of "
            "selfinstruct, or a config.yaml edited by hand), so a decided id would name another instruction: "
            "finish the run with the version that made it, or start a new --out folder")


@pytest.mark.parametrize("newline", [True, False], ids=["with its newline", "without it"])
def test_a_last_log_line_without_its_newline_has_its_self_instruct_markers_checked(tmp_path, newline):
    """A self-instruct marker edited by hand ('repeat:1' with a ROUGE-L under --threshold) is refused
    with its line; on a last line without its newline it was taken by one resume (the repair then
    added the newline) and refused by the next. Refused at once either way, nothing written."""
    import json

    river = "Name three rivers that flow through more than four countries."
    tasks = [river, river.rstrip(".") + "!", "Suggest a title for a blog post about repairing old bicycles."]

    def reply(n: int) -> str:
        prompt = fake.prompts[n]
        if prompt.startswith("Invent new tasks"):
            first = int(prompt.split("numbered from Task ")[1].split()[0])
            return "\n".join(f"Task {first + i}: {t}" for i, t in enumerate(tasks))
        if "Is this a classification task?" in prompt:
            return "No"
        return "Example 1\nInput: <noinput>\nOutput: The Danube, the Rhine and the Nile.\n"

    out = tmp_path / "run"
    args = ["--mode", "self-instruct", "--tasks-per-request", "3"]
    with FakeTeacher(reply=reply) as fake:
        r = run_generate(*fake_args(fake, out, 2, *args), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        log = out / "responses.jsonl"
        (last,) = lines(log)
        marker = next(r for r in last["replies"] if r["purpose"] == "repeat:1")
        assert marker["text"] == "0 1.0"  # as the run wrote it
        marker["text"] = "0 0.5"
        log.write_text(json.dumps(last) + "\n" * newline)
        before, sent = snapshot(out), len(fake.bodies)
        r = run_generate(*fake_args(fake, out, 2, *args), key=fake.key, timeout=120)
        assert r.returncode == 2, r.stderr.decode()[-2000:]
        assert snapshot(out) == before and len(fake.bodies) == sent
    error = one_error_line(r.stderr)
    assert f"{log}:1: field 'replies': " in error
    assert "'repeat:1' gives ROUGE-L 0.5, not above the run's --threshold 0.7" in error, error


def test_a_partial_errors_jsonl_line_is_cut_before_the_next_failure_is_logged(tmp_path):
    """errors.jsonl is appended as the other files are, but a resume repaired only those: a line a
    kill cut was left, the session's next failed prompt glued onto it, and that line, neither record
    valid JSON, stopped every later resume. It is cut off as the others' are."""
    import json

    out = tmp_path / "run"
    failed = []

    def too_long(prompt):  # the session's first prompt fails, as vLLM answers one past its context (400)
        if not failed:
            failed.append(prompt)
            return "This model's maximum context length is 8 tokens."
        return None

    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 2), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    with (out / "errors.jsonl").open("ab") as f:
        f.write(b'{"index": 99, "kind": "tim')  # cut by a kill
    with FakeTeacher(refuse=too_long) as fake:
        r = run_generate(*fake_args(fake, out, 4, "--max-retries", "0"), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert failed
        errors = lines(out / "errors.jsonl")  # every line whole JSON
        assert [e["index"] for e in errors] != [] and 99 not in [e["index"] for e in errors]
        r = run_generate(*fake_args(fake, out, 5), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert json.loads((out / "stats.json").read_text())["failed_units"] >= 1


@pytest.mark.parametrize("where", ["middle", "last"])
def test_a_reply_logged_twice_is_refused_not_counted_twice(tmp_path, where):
    """A line of responses.jsonl copied in again (`cat backup >> responses.jsonl`) was taken on resume, and
    stats.json counted that reply twice in responses and replies; a kept record twice is refused, and so
    is this, naming the file and the reply, the folder unchanged."""
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        r = run_generate(*fake_args(fake, out, 3), key=fake.key, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        log = out / "responses.jsonl"
        rows = log.read_text().splitlines(keepends=True)
        assert len(rows) >= 2
        copy = rows[0] if where == "last" else rows[-1]
        rows = [*rows, copy] if where == "last" else [rows[0], copy, *rows[1:]]
        log.write_text("".join(rows))
        refused_unchanged(fake, out, fake_args(fake, out, 6),
                          f"{log}: reply {json.loads(copy)['id']} appears twice")


def test_an_impossible_usage_already_in_the_log_is_not_summed_on_resume(tmp_path):
    """A reply logged before usage was checked (a proxy's 10**30 tokens) is counted as the teacher now
    counts one: no usage. stats.json summed it as it was on every later resume."""
    with FakeTeacher() as fake:
        out = tmp_path / "run"
        assert run_generate(*fake_args(fake, out, 2), key=fake.key).returncode == 0
        log = out / "responses.jsonl"
        rows = lines(log)
        honest = sum(r["usage"]["completion_tokens"] for o in rows for r in o["replies"])
        first = rows[0]["replies"][0]["usage"]["completion_tokens"]
        rows[0]["replies"][0]["usage"]["completion_tokens"] = 10**30
        log.write_text("".join(json.dumps(o) + "\n" for o in rows))
        assert run_generate(*fake_args(fake, out, 4), key=fake.key).returncode == 0
    stats = json.loads((out / "stats.json").read_text())
    after = sum(r["usage"]["completion_tokens"] for o in lines(log)[len(rows):] for r in o["replies"])
    assert stats["completion_tokens"] == honest - first + after
    assert all(s["completion_tokens"] < 10**8 for s in stats["servers"].values())
    prompts = sum(r["usage"]["prompt_tokens"] for o in lines(log) for r in o["replies"])
    assert stats["prompt_tokens"] == prompts - rows[0]["replies"][0]["usage"]["prompt_tokens"]  # neither count is trusted


def test_a_seeds_json_whose_templates_are_edited_away_is_refused(tmp_path):
    """seeds.json keeps each --prompts template's hash for the resume to compare. Edited to something
    else than names and hashes, it was taken as a run begun before they were kept: this session's
    templates (edited since) were written over it, unchecked. Refused in one line, nothing asked."""
    from selfinstruct.prompts import bundled_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    template = (bundled_dir("prompts") / "alpaca.txt").read_text()
    (mine / "alpaca.txt").write_text(template)
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        assert run_generate("--prompts", str(mine), *fake_args(fake, out, 2), key=fake.key).returncode == 0
        began = json.loads((out / "seeds.json").read_text())
        assert isinstance(began["templates"], dict)
        (out / "seeds.json").write_text(json.dumps({**began, "templates": "x"}))
        (mine / "alpaca.txt").write_text(template.replace("Invent $num new tasks.", "Invent $num new cooking tasks."))
        refused_unchanged(fake, out, ["--prompts", str(mine), *fake_args(fake, out, 3)],
            f"{out / 'seeds.json'}: field 'templates': must be each prompt template's name and hash, not \"x\", so "
            "the --prompts this run began with cannot be compared (edited?); restore it to resume, or use a new --out "
            "folder")
