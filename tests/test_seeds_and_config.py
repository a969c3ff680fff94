"""Seeds load in both formats; bad seeds and bad config stop with one line and exit code 2."""

import json
import subprocess
import sys

import pytest
from rouge_score import rouge_scorer

from selfinstruct.cli import main
from selfinstruct.config import UserError
from selfinstruct.filters import check_instruction
from selfinstruct.prompts import bundled_dir
from selfinstruct.seeds import load_seeds

from conftest import FakeTeacher, fake_args, lines, one_error_line, run_generate, verify_run, write_run

GOOD = {"id": "t1", "name": "n", "instruction": "Name a red fruit please.", "instances": [{"input": "", "output": "Apple"}],
        "is_classification": False}


def write_lines(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def test_bundled_seed_set():
    seeds = load_seeds([bundled_dir("seeds") / "seed_tasks.jsonl"])
    assert len(seeds) >= 150
    share = sum(s.is_classification for s in seeds) / len(seeds)
    assert 0.10 <= share <= 0.20
    # Every seed would pass our own filters, and no two are near-duplicates.
    assert all(check_instruction(s.instruction) is True for s in seeds)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    worst = max(scorer.score(a.instruction, b.instruction)["rougeL"].fmeasure
                for i, a in enumerate(seeds) for b in seeds[i + 1:])
    assert worst <= 0.7


def test_alpaca_formats(tmp_path):
    rows = [{"instruction": "Add two and three.", "input": "", "output": "5"},
            {"instruction": "Reverse the word.", "input": "stone", "output": "enots"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    write_lines(tmp_path / "b.jsonl", rows)
    for name in ("a.json", "b.jsonl"):
        seeds = load_seeds([tmp_path / name])
        assert [s.instruction for s in seeds] == ["Add two and three.", "Reverse the word."]
        assert seeds[1].instances[0].input == "stone"
    with pytest.raises(UserError, match="given twice"):
        load_seeds([tmp_path / "a.json", tmp_path / "a.json"])


def test_alpaca_files_with_one_name_in_two_folders_do_not_collide(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.json").write_text(json.dumps([{"instruction": f"Say {name} twice.", "output": name * 2}]))
    seeds = load_seeds([tmp_path / "a" / "data.json", tmp_path / "b" / "data.json"])
    assert [s.instruction for s in seeds] == ["Say a twice.", "Say b twice."]
    assert len({s.id for s in seeds}) == 2


BAD_ALPACA = [
    ('[{"instruction": "Add two and three.", "output": "5"},\n {"instruction": "Name a colour."}]',
     "bad.json:2: item 1: field 'output': missing"),
    ('[{"instruction": "Add two and three.", "output": "5"},\n\n {"instruction": "", "output": "x"}]',
     "bad.json:3: item 1: field 'instruction': is empty"),
    ('[{"instruction": "Add two and three.", "output": "5"},\n {"instruction": "Hi there you.", "output": 7}]',
     "bad.json:2: item 1: field 'output': must be a string"),
    ('[{"instruction": "Add two and three.", "output": "5"},\n {"instruction": "x", "output": "y", "extra": 1}]',
     "bad.json:2: item 1: field 'extra': unknown field"),
    ('[{"instruction": "Add two and three.", "output": "5"}\n {"instruction": "x", "output": "y"}]',
     "bad.json:2: not valid JSON"),
    ('[{"instruction": "Add two and three.", "output": "5"}]\n]', "bad.json:2: not valid JSON"),
    ('[{"instruction": "Add two and three.", "output": "5"},\n 3]', "bad.json:2: item 1: expected a JSON object"),
]


@pytest.mark.parametrize("text,message", BAD_ALPACA)
def test_bad_alpaca_seeds_name_the_line_and_field(tmp_path, capsys, text, message):
    (tmp_path / "bad.json").write_text(text)
    out = tmp_path / "run"
    assert main(["generate", "--seeds", str(tmp_path / "bad.json"), "--out", str(out), "--num", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_a_seed_file_holding_no_task_is_named_alone_or_beside_others(tmp_path, capsys):
    """``[]`` said "no seed tasks given" without naming the file, and beside another file it was
    taken silently: a file given and holding nothing is a mistake either way."""
    (tmp_path / "none.json").write_text("[]\n")
    good = write_lines(tmp_path / "good.jsonl", [GOOD])
    for seeds in ([tmp_path / "none.json"], [good, tmp_path / "none.json"]):
        assert main(["generate", "--seeds", *map(str, seeds), "--out", str(tmp_path / "run"), "--num", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{tmp_path / 'none.json'}: holds no seed tasks" in err, err
    assert not (tmp_path / "run").exists()


BAD = [
    (['{"id": "t1", "instruction": '], "bad.jsonl:1: not complete JSON: the line is cut short (it ends before its JSON does)"),
    ([GOOD, {k: v for k, v in GOOD.items() if k != "instances"} | {"id": "t2"}], "bad.jsonl:2: field 'instances': missing"),
    ([GOOD | {"instruction": "   "}], "bad.jsonl:1: field 'instruction': is empty"),
    ([GOOD, GOOD], "bad.jsonl:2: field 'id': duplicate id 't1' (first at "),
    ([GOOD | {"is_classification": "maybe"}], "bad.jsonl:1: field 'is_classification'"),
    ([GOOD | {"instances": [{"input": "", "output": 3}]}], "bad.jsonl:1: field 'instances.0.output'"),
    ([GOOD | {"colour": "red"}], "bad.jsonl:1: field 'colour': unknown field"),
    ([GOOD, {"name": "b", "is_classification": False}], "bad.jsonl:2: field 'id': missing (and 2 more)\n"),
    # The shared wording (config.format_validation_error), as every other record's error says it.
    ([GOOD | {"instances": [{"output": "x", "note": "y"}], "is_classification": "maybe"}],
     "bad.jsonl:1: field 'instances.0.note': unknown field (and 1 more)\n"),
    ([], "bad.jsonl: seed file is empty"),
]


@pytest.mark.parametrize("lines,message", BAD)
def test_bad_seeds_one_line_exit_2(tmp_path, capsys, lines, message):
    seeds = write_lines(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "run"
    code = main(["generate", "--seeds", str(seeds), "--out", str(out), "--num", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err
    assert not out.exists()  # stopped before anything was made, teacher included


def test_yaml_config_layers(tmp_path):
    from selfinstruct.config import resolve
    from selfinstruct.generate import GenerateOptions, add_arguments
    import argparse

    cfg = tmp_path / "c.yaml"
    cfg.write_text("num: 7\ntemperature: 0.2\nout: from_yaml\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    opts = resolve(GenerateOptions, p.parse_args(["--config", str(cfg), "--num", "9"]))
    assert (opts.num, opts.temperature, opts.out, opts.top_p) == (9, 0.2, "from_yaml", 0.95)


@pytest.mark.parametrize("command", ["generate", "pipeline", "serve"])
def test_vllm_flags_pass_through_after_a_double_dash(tmp_path, command):
    import argparse
    import importlib

    from selfinstruct.cli import COMMANDS
    from selfinstruct.config import resolve

    module = importlib.import_module(COMMANDS[command][0])
    model = {"generate": "GenerateOptions", "pipeline": "GenerateOptions", "serve": "ServeOptions"}[command]
    model = getattr(importlib.import_module("selfinstruct.servers" if command == "serve" else "selfinstruct.generate"), model)
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    assert "PydanticUndefined" not in p.format_help()
    args = p.parse_args(["--out", "o", "--model", "m", "--", "--max-model-len", "4096", "--enforce-eager"]
                        if command != "serve" else ["--model", "m", "--", "--max-model-len", "4096", "--enforce-eager"])
    assert resolve(model, args).vllm_args == ["--max-model-len", "4096", "--enforce-eager"]
    # Without '--', a YAML file's flags are not overridden by an empty list.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("vllm_args: ['--dtype', 'float32']\n")
    args = p.parse_args(["--config", str(cfg), "--model", "m"] + (["--out", "o"] if command != "serve" else []))
    assert resolve(model, args).vllm_args == ["--dtype", "float32"]


@pytest.mark.parametrize(
    "yaml_text,message",
    [
        ("num: 5\ncolour: red\n", "c.yaml: field 'colour': unknown option"),
        ("num: many\n", "c.yaml: field 'num': Input should be a valid integer"),
        ("threshold: 1.5\n", "c.yaml: field 'threshold'"),
        ("num: [1,\n", "c.yaml:"),
        ("- a\n- b\n", "c.yaml: config must be a mapping"),
        ("client_processes: true\n", "c.yaml: field 'client_processes': expected a number, not true"),  # not 1
        ("threshold: false\n", "c.yaml: field 'threshold': expected a number, not false"),
        ("num: 2\nseed: 1\nnum: 3\n", "c.yaml:3: not valid YAML (key 'num' given twice)"),  # not a silent 3
        # The flag's spelling: said what to write instead.
        ("tasks-per-request: 3\n", "c.yaml: field 'tasks-per-request': unknown option (write tasks_per_request)"),
        # YAML reads 1e3 as text: 'unable to parse string as an integer' of what reads as a number
        ("concurrency: 1e3\n", "c.yaml: field 'concurrency': '1e3' is text to YAML; write 1000"),
        # and 010 as octal: it was a silent 8
        ("num: 010\n", "c.yaml:1: not valid YAML (010 has a leading zero, which YAML reads as octal: write 10)"),
        ("seed: 1\nnum: -007\n", "c.yaml:2: not valid YAML (-007 has a leading zero, which YAML reads as octal: write -7)"),
        # and 1:20 as base 60: it was a silent 80
        ("num: 1:20\n", "c.yaml:1: not valid YAML (1:20 is a base-60 number to YAML (80); write the number you mean"),
        # and `stop: ###` as a key with no value and a comment: the run went on with no stop sequence
        ("num: 5\nstop: ###\n", "c.yaml:2: '###' after a space is a comment to YAML, so this value is empty: to mean "
                                 "'###', quote it (\"###\"); for no value, write null"),
        ("stop:\n  - \"\\n\\n\"\n  - #END\n", "c.yaml:3: '#END' after a space is a comment to YAML"),
    ],
)
def test_bad_config_one_line_exit_2(tmp_path, capsys, yaml_text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    code = main(["generate", "--config", str(cfg), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()


def test_a_comment_after_an_empty_value_is_still_a_comment(tmp_path):
    """Only a '#' with no space after it, right after the colon, is taken as a value meant: a note
    after a key left empty (`stop:  # none`) stays YAML's comment, and the key the default."""
    from selfinstruct.config import load_yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text("stop:  # none yet\nseed: 3  #1 of 5\nmodel: '#m'\n")
    assert load_yaml(cfg) == {"stop": None, "seed": 3, "model": "#m"}


def test_a_key_given_twice_is_refused_in_nested_mappings_but_a_merge_may_override(tmp_path):
    from selfinstruct.config import UserError, load_yaml

    cfg = tmp_path / "p.yaml"
    cfg.write_text("generate:\n  num: 2\ntune:\n  epochs: 1\n  epochs: 2\n")
    with pytest.raises(UserError, match=r"p\.yaml:5: not valid YAML \(key 'epochs' given twice\)"):
        load_yaml(cfg)
    cfg.write_text("base: &b {num: 2, seed: 1}\ngenerate:\n  <<: *b\n  num: 3\n")
    assert load_yaml(cfg)["generate"] == {"num": 3, "seed": 1}


def test_a_yaml_bool_for_a_number_is_refused_unless_a_flag_overrides_it(tmp_path):
    """``threshold: false`` is refused (YAML would make it 0); with --threshold given, the
    file's value is not used, so it is not refused either, as in pipeline's sections."""
    import argparse

    from selfinstruct.config import add_flags, resolve
    from selfinstruct.generate import GenerateOptions

    cfg = tmp_path / "c.yaml"
    cfg.write_text("threshold: false\n")
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_flags(p, GenerateOptions)
    with pytest.raises(UserError, match="field 'threshold': expected a number, not false"):
        resolve(GenerateOptions, p.parse_args(["--config", str(cfg), "--out", "o"]))
    assert resolve(GenerateOptions, p.parse_args(["--config", str(cfg), "--out", "o", "--threshold", "0.6"])).threshold == 0.6


@pytest.mark.parametrize("command", ["generate", "pipeline"])
def test_a_bad_value_is_named_where_it_was_given_the_file_or_the_flag(tmp_path, capsys, command):
    """With a YAML file and flags, the line names the one that gave the bad value: a flag as
    typed (--num), a file's value by file and field; nothing is made either way."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("generate:\n  num: 0\n" if command == "pipeline" else "num: 0\n")
    field = "generate.num" if command == "pipeline" else "num"
    base = [command, "--config", str(cfg), "--out", str(tmp_path / "r")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{cfg}: field '{field}': Input should be greater than or equal to 1" in err, err
    cfg.write_text("generate:\n  num: 2\n" if command == "pipeline" else "num: 2\n")
    assert main([*base, "--num", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: --num: Input should be greater than or equal to 1" in err, err
    assert str(cfg) not in err  # the file holds a good value: it is not to blame
    assert not (tmp_path / "r").exists()


def test_bad_flag_values(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "r"), "--num", "0"]) == 2
    assert "error: --num: Input should be greater than or equal to 1\n" in capsys.readouterr().err  # the flag, as typed
    assert main(["generate", "--out", str(tmp_path / "r"), "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "--base-url needs --model" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # checked before the folder is made


@pytest.mark.parametrize("command,flags,message", [
    ("generate", ["--timeout", "inf"], "--timeout: Input should be a finite number"),  # was a traceback
    ("generate", ["--temperature", "inf"], "--temperature: Input should be a finite number"),  # every prompt failed
    ("generate", ["--repeat-penalty", "nan"], "--repeat-penalty: Input should be a finite number"),
    ("respond", ["--timeout", "inf"], "--timeout: Input should be a finite number"),
    ("evolve", ["--temperature", "inf"], "--temperature: Input should be a finite number"),
    ("serve", ["--ready-timeout", "-5"], "--ready-timeout: Input should be greater than 0"),  # 'not ready after -5 s'
    # these said 'Input should be less than 1' (or 'less than or equal to 1', 'greater than 0') of a nan
    ("dedup", ["--threshold", "nan"], "--threshold: Input should be a finite number"),
    ("decontaminate", ["--against", "b.jsonl", "--threshold", "nan"], "--threshold: Input should be a finite number"),
    ("pipeline", ["--tune-epochs", "nan"], "--tune-epochs: Input should be a finite number"),
    ("audit", ["--timeout-s", "nan"], "--timeout-s: Input should be a finite number"),
], ids=["generate-timeout", "generate-temperature", "generate-nan", "respond", "evolve", "serve", "dedup", "decontaminate",
        "pipeline", "audit"])
def test_an_infinite_or_negative_number_is_one_line_before_any_teacher(tmp_path, capsys, command, flags, message):
    args = ({"serve": ["--model", "m", "--vllm-bin", str(tmp_path / "no-vllm")], "audit": [str(tmp_path / "src")],
             "generate": ["--out", str(tmp_path / "r")], "pipeline": ["--out", str(tmp_path / "r")]}.get(command)
            or [str(tmp_path / "src"), "--out", str(tmp_path / "r")])
    teacher = ([] if command in ("serve", "dedup", "decontaminate", "pipeline", "audit")
               else ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"])
    assert main([command, *args, *teacher, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"selfinstruct {command}: error: {message}" in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["generate", "respond"])
def test_a_first_run_stopped_by_a_wrong_model_takes_the_corrected_command(tmp_path, monkeypatch, capsys, command):
    """The preflight refuses a model the server does not serve before the folder is written (it
    leaves none), so the corrected command starts it afresh instead of being refused as a changed
    resume. Once it holds replies, a changed --model is refused as before."""
    source = tmp_path / "data.json"
    source.write_text(json.dumps([{"instruction": f"Name a red fruit, number {i}.", "input": "", "output": "Apple."}
                                  for i in range(3)]))
    out = tmp_path / "run"
    lead = ["generate", "--num", "2", "--tasks-per-request", "2"] if command == "generate" else ["respond", str(source)]
    with FakeTeacher() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        args = [*lead, "--base-url", fake.base_url, "--out", str(out), "--no-progress", "--concurrency", "1"]
        assert main([*args, "--model", "typo"]) == 2
        assert "does not serve model 'typo'" in capsys.readouterr().err and not out.exists()
        assert main([*args, "--model", "fake"]) == 0
        assert len(lines(out / "kept.jsonl")) >= 2 and "model: fake" in (out / "config.yaml").read_text()
        assert main([*args, "--model", "typo"]) == 2
        assert "this run was made with 'fake', not 'typo'" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["http://127.0.0.1:PORT/v1", "http://[::1/v1", "localhost:8000/v1", "127.0.0.1:8000/v1",
                                 "ftp://127.0.0.1:8000/v1"])
def test_a_base_url_that_does_not_parse_is_one_line_before_any_folder(tmp_path, capsys, url):
    """The HTTP client raised a traceback for these, after generate had made the run folder;
    one without http:// was 'cannot be reached', as if the server were down."""
    source = tmp_path / "data.json"
    source.write_text(json.dumps([{"instruction": "Name a red fruit.", "input": "", "output": "Apple."}]))
    for command in (["generate", "--num", "1", "--out", str(tmp_path / "g")],
                    ["generate", "--num", "1", "--out", str(tmp_path / "g"), "--base-url", "http://127.0.0.1:8000/v1"],
                    ["respond", str(source), "--out", str(tmp_path / "r")],
                    ["evolve", str(source), "--out", str(tmp_path / "e")],
                    ["audit", str(source), "--judge"]):
        assert main([*command, "--base-url", url, "--model", "m"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: --base-url: {url!r} is not a valid URL" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


@pytest.mark.parametrize("url, said", [
    ("http://alice:hunter2@127.0.0.1:8000/v1", "holds a user name or password"),
    ("https://hunter2@gpu1:8000/v1", "holds a user name or password"),
    ("http://127.0.0.1:8000/v1?key=hunter2", "--base-url: 'http://127.0.0.1:8000/v1?***' has a query string or fragment"),
    ("http://127.0.0.1:8000/v1#hunter2", "--base-url: 'http://127.0.0.1:8000/v1#***' has a query string or fragment"),
    ("http://127.0.0.1:8000/v1?", "--base-url: 'http://127.0.0.1:8000/v1?***' has a query string or fragment"),
    ("http://127.0.0.1:8000/v1#", "--base-url: 'http://127.0.0.1:8000/v1#***' has a query string or fragment"),
], ids=["user-password", "password", "query", "fragment", "bare-query", "bare-fragment"])
def test_a_base_url_holding_a_secret_is_one_line_and_the_secret_goes_nowhere(tmp_path, capsys, url, said):
    """user:password@ in --base-url cannot work (the HTTP client refuses it beside the key's
    Authorization header: the preflight said 'not a model list (ValueError)'), and the password was
    saved in config.yaml and stats.json. A query string (a ?key= with it) passed the URL check, was
    saved the same way, then failed the preflight oddly: the client appends /models after it; so did a
    bare '?' or '#', which urlsplit reads as no query. All are refused first, in every command that
    takes --base-url, the secret not even printed."""
    source = tmp_path / "data.json"
    source.write_text(json.dumps([{"instruction": "Name a red fruit.", "input": "", "output": "Apple."}]))
    for command in (["generate", "--num", "1", "--out", str(tmp_path / "g")],
                    ["respond", str(source), "--out", str(tmp_path / "r")],
                    ["evolve", str(source), "--out", str(tmp_path / "e")],
                    ["audit", str(source), "--judge"]):
        assert main([*command, "--base-url", url, "--model", "m"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err and "--api-key" in err, err
        assert "hunter2" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


def test_out_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "stuff.txt").write_text("mine")
    assert main(["generate", "--out", str(tmp_path), "--num", "1"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert (tmp_path / "stuff.txt").read_text() == "mine"


def test_help_is_instant_and_imports_nothing_heavy():
    code = (
        "import sys, time; t=time.time(); from selfinstruct.cli import main\n"
        "try: main(['--help'])\nexcept SystemExit: pass\n"
        "heavy=[m for m in ('torch','transformers','trl','vllm','xllamacpp','openai','datasets') if m in sys.modules]\n"
        "print(heavy, time.time()-t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy, seconds = out.rsplit("\n", 2)[-2].rsplit(" ", 1)
    assert heavy.endswith("[]") and float(seconds) < 2.0


def test_jsonl_readers_split_lines_at_newline_only(tmp_path):
    """A raw U+2028/U+0085 inside a JSON string (json.dumps(ensure_ascii=False) writes them) is not a line break."""
    from selfinstruct import dedup, export

    row = {"instruction": "Join these two\u2028lines into one sentence.", "input": "a\x85b", "output": "ab"}
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\r\n" + json.dumps(row, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert [s.instruction for s in load_seeds([path])] == [row["instruction"]] * 2
    assert [r["instruction"] for r in export.read_records(path)] == [row["instruction"]] * 2
    assert [r["instruction"] for r in export.load_pairs(path)] == [row["instruction"]] * 2
    assert len(dedup.read_records(path)) == 2


def test_a_resume_from_another_folder_never_builds_its_pool_from_other_seeds(tmp_path):
    """config.yaml keeps --seeds as given, so a relative path is read from where the command
    runs. A resume from elsewhere that finds another file of that name, or none, is refused
    with one line naming the run's own seed files, and nothing is written; --seeds with those
    files, however spelled, resumes. The bundled seeds are not held to the hash."""
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    first.mkdir(), elsewhere.mkdir()
    rows = [json.loads(line) for line in (bundled_dir("seeds") / "seed_tasks.jsonl").read_text().splitlines()[:20]]
    (first / "my.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (elsewhere / "my.jsonl").write_text(json.dumps(rows[0]) + "\n")  # the same name, other tasks
    run = first / "run"
    with FakeTeacher() as fake:
        r = run_generate("--seeds", "my.jsonl", *fake_args(fake, run, 2), key=fake.key, cwd=first, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        assert json.loads((run / "seeds.json").read_text())["files"] == [str((first / "my.jsonl").resolve())]
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        r = run_generate(*fake_args(fake, run, 4), key=fake.key, cwd=elsewhere, timeout=120)
        line = one_error_line(r.stderr)
        assert "my.jsonl: not the seed tasks this run began with" in line and str(first / "my.jsonl") in line
        (elsewhere / "my.jsonl").unlink()
        r = run_generate(*fake_args(fake, run, 4), key=fake.key, cwd=elsewhere, timeout=120)
        assert "seed file not found" in one_error_line(r.stderr) and str(first / "my.jsonl") in r.stderr.decode()
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
        r = run_generate("--seeds", "../first/my.jsonl", *fake_args(fake, run, 4), key=fake.key, cwd=elsewhere,
                         timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        verify_run(run, 4)
        # The bundled seeds are the version's own: a resume after an upgrade that changed them
        # (here: the hash the run recorded) takes them, as it takes the version's other defaults.
        bundled = tmp_path / "bundled"
        assert run_generate(*fake_args(fake, bundled, 2), key=fake.key, timeout=120).returncode == 0
        began = json.loads((bundled / "seeds.json").read_text())
        (bundled / "seeds.json").write_text(json.dumps({**began, "sha256": "0" * 64}))
        r = run_generate(*fake_args(fake, bundled, 4), key=fake.key, cwd=elsewhere, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    verify_run(bundled, 4)


WHY_WORDS = "(no instruction could pass: one needs more than min and at most max words)"


@pytest.mark.parametrize("flags,yaml_text,message", [
    # The index refused it with a ValueError: a traceback, after the folder was made and the teacher asked.
    (["--nearest-floor", "0.9"], "", "error: --nearest-floor 0.9 must be at most --threshold (default 0.7) (else"),
    (["--threshold", "0.5"], "nearest_floor: 0.6\n", "c.yaml: nearest_floor: 0.6 must be at most --threshold 0.5 (else"),
    # Each option is named as the command gave it: the file's keys were told as flags (--threshold, --max-words).
    ([], "nearest_floor: 0.6\nthreshold: 0.5\n", "c.yaml: nearest_floor: 0.6 must be at most threshold: 0.5 (else"),
    ([], "nearest_floor: 0.8\n", "c.yaml: nearest_floor: 0.8 must be at most threshold (default 0.7) (else"),
    # No instruction has more than 5 words and at most 5: every prompt's tasks were rejected.
    (["--min-words", "5", "--max-words", "5"], "", f"error: --max-words 5 must be above --min-words 5 {WHY_WORDS}"),
    (["--max-words", "2"], "", f"error: --max-words 2 must be above --min-words (default 3) {WHY_WORDS}"),
    # --max-words left at its default: the --min-words given is the one to change, not a flag never typed.
    (["--min-words", "200"], "", f"error: --min-words 200 must be below --max-words (default 150) {WHY_WORDS}"),
    ([], "max_words: 3\nmin_words: 5\n", f"c.yaml: max_words: 3 must be above min_words: 5 {WHY_WORDS}"),
    ([], "min_words: 200\n", f"c.yaml: min_words: 200 must be below max_words (default 150) {WHY_WORDS}"),
    (["--min-words", "5"], "max_words: 3\n", f"c.yaml: max_words: 3 must be above --min-words 5 {WHY_WORDS}"),
    (["--max-words", "3"], "min_words: 5\n", f"c.yaml: --max-words 3 must be above min_words: 5 {WHY_WORDS}"),
], ids=["floor-flag", "floor-flag-yaml", "floor-yaml", "floor-yaml-default", "words-equal", "words-default-min",
        "words-default-max", "words-yaml", "words-yaml-default-max", "words-yaml-flag", "words-flag-yaml"])
def test_options_that_contradict_each_other_are_one_line_before_any_folder(tmp_path, capsys, flags, yaml_text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    assert main(["generate", "--config", str(cfg), "--out", str(tmp_path / "r"), "--base-url", "http://127.0.0.1:9/v1",
                 "--model", "m", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("second", ["same", "dotted", "absolute"])
def test_a_seed_file_given_twice_is_named_as_such(tmp_path, monkeypatch, capsys, second):
    """It was 'a.json:1: item 0: field 'id': duplicate id 'a_0' (first at a.json:1: item 0)': an
    id the user never wrote, said to clash with itself."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Add two and three.", "output": "5"}]))
    again = {"same": "a.json", "dotted": "./a.json", "absolute": str(tmp_path / "a.json")}[second]
    said = "a.json given twice" if second == "same" else f"{again} is a.json again"
    assert main(["generate", "--seeds", "a.json", again, "--out", "run", "--num", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: --seeds: {said}; give each seed file once" in err, err
    assert not (tmp_path / "run").exists()


def test_a_resume_whose_own_seed_file_broke_is_not_told_to_go_to_another_folder(tmp_path, monkeypatch, capsys):
    """A seed error on resume said where the run's seeds were, and to 'resume from the folder it
    began in': right for a relative --seeds read from elsewhere, misleading for the run's own
    file, edited since. The file is named with its line, and nothing is written."""
    seeds = write_lines(tmp_path / "my.jsonl", [GOOD])
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        assert main(["generate", "--seeds", str(seeds), *fake_args(fake, out, 2)]) == 0
        seeds.write_text(json.dumps(GOOD) + "\n{broken\n")
        capsys.readouterr()
        assert main(["generate", "--seeds", str(seeds), *fake_args(fake, out, 3)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{seeds}:2: not valid JSON" in err and "began in" not in err, err
        seeds.write_text(json.dumps(GOOD | {"instruction": "Name a green fruit please."}) + "\n")
        assert main(["generate", "--seeds", str(seeds), *fake_args(fake, out, 3)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not the seed tasks this run began with (they were edited since it began with " \
        "their 1 task: put them back to resume" in err and "began in" not in err, err


def test_a_self_instruct_seed_takes_null_where_a_field_may_be_left_out(tmp_path):
    """A file written from a dataset holds null for a missing string (datasets' to_json does). An
    Alpaca row took a null input as empty, a self-instruct task refused it ('Input should be a
    valid string'); a null name, is_classification or instance input is now what leaving it out
    gives, and a null where a value is needed is still refused."""
    row = GOOD | {"name": None, "is_classification": None, "instances": [{"input": None, "output": "Apple"}]}
    (task,) = load_seeds([write_lines(tmp_path / "nulls.jsonl", [row])])
    assert (task.name, task.is_classification, task.instances[0].input) == ("", False, "")
    for bad in (GOOD | {"instruction": None}, GOOD | {"instances": [{"input": "", "output": None}]}):
        with pytest.raises(UserError, match="nulls.jsonl:1: field '(instruction|instances.0.output)'"):
            load_seeds([write_lines(tmp_path / "nulls.jsonl", [bad])])


@pytest.mark.parametrize("command", ["respond", "evolve", "audit", "filter", "dedup", "decontaminate", "tune", "serve",
                                     "pipeline"])
def test_every_commands_config_given_twice_is_one_line(tmp_path, capsys, command):
    """Each command's --config is the same action as generate's: argparse kept the last file."""
    (tmp_path / "a.yaml").write_text("{}\n")
    (tmp_path / "b.yaml").write_text("{}\n")
    assert main([command, "--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"selfinstruct {command}: error: --config given twice" in err, err


def test_config_given_twice_is_one_line_not_the_last_file_alone(tmp_path, capsys):
    """argparse kept the last --config: 'base.yaml' was silently unused, where the user meant
    one file layered over the other."""
    (tmp_path / "base.yaml").write_text("num: 7\n")
    (tmp_path / "exp.yaml").write_text("temperature: 0.2\n")
    assert main(["generate", "--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "exp.yaml"),
                 "--out", str(tmp_path / "r"), "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: --config given twice" in err, err
    assert not (tmp_path / "r").exists()


def test_a_json_lists_items_are_named_by_the_line_they_start_on():
    """json_list_items counts newlines on from the item before (it counted from the start of the
    file for every item: a 52,000-row Alpaca list took minutes); each item's line stays the one
    its first character is on, whatever the layout between items."""
    import random

    from selfinstruct.datafiles import json_list_items

    rng = random.Random(7)
    rows = [{"instruction": f"Task {i}\nwith a newline inside", "n": i} for i in range(300)]
    gaps = [rng.choice(["", " ", "\n", "\r\n", "\n\n  ", "\t"]) for _ in range(len(rows) + 1)]
    text = "[" + "".join(g + json.dumps(r, indent=rng.choice([None, 2])) + ("," if i < len(rows) - 1 else "")
                         for i, (g, r) in enumerate(zip(gaps, rows))) + gaps[-1] + "]"
    got = list(json_list_items(text))
    assert [obj for _, obj in got] == rows
    starts, at = [], 0
    for r, g in zip(rows, gaps):
        at = text.index('{', at + 1 if starts else 0)
        starts.append(text.count("\n", 0, at) + 1)
    assert [line for line, _ in got] == starts


@pytest.mark.parametrize("how", ["flag", "yaml"])
def test_a_tilde_in_a_path_is_the_users_home_in_flags_and_yaml(tmp_path, monkeypatch, capsys, how):
    """bash leaves `--out=~/x` alone (no tilde after `=`) and YAML never expands one: every
    command made a folder named `~` in the current one."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    (home / "d.json").write_text(json.dumps([{"instruction": "Name a colour.", "input": "", "output": "Red."}]))
    (home / "bench.jsonl").write_text(json.dumps({"question": "What is the capital of France?"}) + "\n")
    if how == "flag":
        dedup = ["dedup", "~/d.json", "--out=~/dd"]
        decon = ["decontaminate", "~/d.json", "--against=~/bench.jsonl", "--out=~/dc"]
    else:
        (cwd / "dd.yaml").write_text("out: ~/dd\n")
        (cwd / "dc.yaml").write_text("against: [~/bench.jsonl]\nout: ~/dc\n")
        dedup = ["dedup", "~/d.json", "--config", "dd.yaml"]
        decon = ["decontaminate", "~/d.json", "--config", "dc.yaml"]
    assert main(dedup) == 0, capsys.readouterr().err
    assert main(decon) == 0, capsys.readouterr().err
    assert main(["export", "~/dd/kept.jsonl", "--out=~/e.jsonl", "--format", "jsonl"]) == 0, capsys.readouterr().err
    assert not (cwd / "~").exists()
    assert (home / "dd" / "kept.jsonl").is_file() and (home / "dc" / "kept.jsonl").is_file()
    assert (home / "e.jsonl").is_file()


@pytest.mark.parametrize("argv, yaml_text, said", [
    (["generate", "--out", ""], None, "--out: is empty; give a file or folder name"),
    (["generate", "--out", "  "], None, "--out: is empty"),
    (["generate", "--config", "c.yaml"], "out: ''\n", "c.yaml: field 'out': is empty; give a file or folder name"),
    (["generate", "--out", "r", "--seeds", "d.json", ""], None, "--seeds (item 2): is empty"),
    (["generate", "--config", "c.yaml", "--out", "r"], "seeds: [d.json, ' ']\n", "c.yaml: field 'seeds' (item 2): is empty"),
    (["generate", "--config", "", "--out", "r"], None, "--config: is empty"),
    (["serve", "--model", "m", "--log-dir", ""], None, "--log-dir: is empty"),
    (["serve", "--config", "c.yaml", "--model", "m"], "log_dir: ''\n", "c.yaml: field 'log_dir': is empty"),
    (["audit", "d.json", "--html", ""], None, "--html: is empty"),
    (["audit", "d.json", "--config", "c.yaml"], "html: ''\n", "c.yaml: field 'html': is empty"),
    (["audit", ""], None, "RUN_OR_FILE: is empty"),
    (["dedup", "", "--out", "o"], None, "RUN_OR_FILE: is empty"),
    (["export", "d.json", "--out", "e.json", "--card", "--license", ""], None,
     "--license: is empty; give a Hub license id, or leave it out for 'other'"),
    (["export", "d.json", "--out", "e.json", "--card", "--name", " "], None,
     "--name: is empty; give the card's title, or leave it out for none"),
    (["pipeline", "--config", "c.yaml", "--skip-tune"], "generate: {out: ''}\n", "c.yaml: field 'generate.out': is empty"),
    (["pipeline", "--config", "c.yaml", "--out", "r", "--skip-tune"], "audit: {html: ''}\n",
     "c.yaml: field 'audit.html': is empty"),
], ids=["out", "out-spaces", "out-yaml", "seeds-item", "seeds-yaml-item", "config", "log-dir", "log-dir-yaml",
        "html", "html-yaml", "positional", "positional-dedup", "license", "name", "pipeline-generate",
        "pipeline-audit"])
def test_an_empty_path_or_license_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, yaml_text, said):
    """'' was taken as the current folder (generate --out '' wrote the run there, serve --log-dir ''
    its vllm.log) or as not given (--config '' and audit --html '' did nothing, rc 0), and export's
    --license '' wrote 'license: other'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "Name a red fruit.", "input": "", "output": "Apple."}]))
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
    before = sorted(p.name for p in tmp_path.iterdir())
    # A teacher that is not there: a path taken as the current folder fails on it, not in minutes of the embedded one.
    teacher = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"] if argv[0] in ("generate", "pipeline") else []
    assert main([*argv, *teacher]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {said}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_file_value_a_flag_overrides_is_not_refused_for_being_empty(tmp_path, monkeypatch, capsys):
    """As a YAML bool for a number: the flag's value is the one used, so the file's is not the user's mistake."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("out: ''\nbase_url: http://127.0.0.1:9/v1\nmodel: m\n")
    assert main(["generate", "--config", "c.yaml", "--out", "r", "--max-retries", "0"]) == 2
    assert "cannot be reached" in capsys.readouterr().err  # past the options, to the (absent) teacher


def test_every_option_that_names_a_file_or_folder_has_its_tilde_expanded():
    """PATH_OPTIONS lists them by name: a new one must be added there or its `~` is taken literally."""
    import argparse
    import importlib
    import re

    from selfinstruct.cli import COMMANDS
    from selfinstruct.config import PATH_OPTIONS

    # named beside a file or folder in their help, but no path: words, a prefix, a key, a flag, a count
    not_paths = {"blacklist", "magpie_prefix", "api_key", "judge", "card", "rouge_sample", "heldout"}
    missed = []
    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser()
        (getattr(module, f"add_arguments_{name}", None) or module.add_arguments)(parser)
        for action in parser._actions:
            words = f"{action.help or ''} {action.metavar if isinstance(action.metavar, str) else ''}"
            if (re.search(r"\b(files?|folders?|executable|RUN_OR_FILE|\w*_DIR)\b|to this path", words)
                    and action.dest not in PATH_OPTIONS | not_paths):
                missed.append(f"{name} {action.dest}: {words[:60]}")
    assert not missed, missed


@pytest.mark.parametrize("argv, said", [
    (["generate", "--tasks-per-request", "1.5"], "argument --tasks-per-request: invalid int value: '1.5'"),
    # float notation of a whole number is told its digits, as a YAML file's is
    (["generate", "--num", "1e6"], "argument --num: invalid int value: '1e6'; write 1000000 (see"),
    (["tune", "r", "--lora-r", "1e400"], "argument --lora-r: invalid int value: '1e400'; write it in digits (see"),
    (["try", "adapter", "--heldout", "5e1"], "argument --heldout: invalid int value: '5e1'; write 50 (see"),
    (["export"], "the following arguments are required: RUN_OR_FILE, --out"),
    (["dedup", "d.json", "--out", "o", "--method", "nope"], "argument --method: invalid choice: 'nope'"),
    (["try", "adapter", "--bogus"], "unrecognized arguments: --bogus"),
    (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
])
def test_a_flag_argparse_refuses_is_one_line_not_the_usage(argv, said, capsys):
    """argparse printed the whole usage before its error (38 lines for generate, the error last);
    every other mistake is one line, and so is this one, pointing at --help."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and said in lines[0], lines
    prog = "selfinstruct" if argv[0] == "bogus" else f"selfinstruct {argv[0]}"
    assert lines[0].startswith(f"{prog}: error: ") and lines[0].endswith(f"(see {prog} --help)")


@pytest.mark.parametrize("command,args", [("generate", []), ("respond", ["src.json"]), ("evolve", ["src.json"]),
                                          ("audit", ["src.json"])])
@pytest.mark.parametrize("yaml_text,message", [
    # Python reads no integer of over 4,300 digits: a ValueError traceback through yaml.
    ("num: 3\nconcurrency: " + "9" * 5000 + "\n", "c.yaml:2: not valid YAML (an integer of 5,000 characters"),
    # yaml reads 0x with 5,000 hex digits whole, but Python prints no such number: an option with no
    # upper bound took it, and saving config.yaml was a traceback, past the new run folder.
    ("num: 0x" + "f" * 5000 + "\n", "c.yaml:1: not valid YAML (an integer of 5,002 characters"),
    # yaml reads nesting by recursion: a RecursionError traceback.
    ("num: " + "[" * 3000 + "]" * 3000 + "\n", "c.yaml:1: not valid YAML (nested too deeply to read"),
    # A control character YAML allows in no file (a NUL, a terminal's ESC pasted in): yaml's reader
    # refuses the whole text before parsing it, outside the parse's own errors: a ReaderError traceback.
    ("num: 3\nseed: 1\x00\n", "c.yaml:2: not valid YAML (a control character, U+0000, at column 8"),
    ("num: 3 # \x1b[31mred\n", "c.yaml:1: not valid YAML (a control character, U+001B, at column 10"),
])
def test_a_config_too_big_or_too_deep_to_read_is_one_line(tmp_path, capsys, monkeypatch, command, args,
                                                          yaml_text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml_text)
    code = main([command, *args, "--config", "c.yaml", *(["--out", "run"] if command != "audit" else [])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("saved", ["num: 3\nconcurrency: " + "9" * 5000 + "\n", "num: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n"])
def test_a_resume_whose_saved_config_is_too_big_or_too_deep_is_one_line(tmp_path, capsys, saved):
    from selfinstruct.datafiles import mark_run_folder

    run = tmp_path / "run"
    run.mkdir()
    mark_run_folder(run)
    (run / "config.yaml").write_text(saved)
    code = main(["generate", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{run / 'config.yaml'}:" in err and "not valid YAML" in err, err
    assert (run / "config.yaml").read_text() == saved  # nothing written over it


@pytest.mark.parametrize("given", ["flag", "config"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_generate_concurrency_below_1_is_one_line_in_our_words(tmp_path, capsys, given, value):
    """generate --concurrency 0 said pydantic's 'Input should be greater than or equal to 1'; it says
    respond's line, naming the flag or the file's field, and no folder is made."""
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"concurrency: {value}\n")
    more = [f"--concurrency={value}"] if given == "flag" else ["--config", str(cfg)]
    assert main(["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out), *more]) == 2
    where = "--concurrency" if given == "flag" else f"{cfg}: field 'concurrency'"
    assert capsys.readouterr().err == (
        f"selfinstruct generate: error: {where}: at least 1 request in flight per server, not {value}: "
        "with none, no request would ever be sent\n")
    assert not out.exists()


@pytest.mark.parametrize("command,args", [("generate", []), ("respond", ["src.json"]), ("evolve", ["src.json"]),
                                          ("audit", ["src.json", "--judge"])])
def test_a_config_number_too_long_to_read_is_said_in_our_words(tmp_path, capsys, monkeypatch, command, args):
    """A quoted one was pydantic's 'Unable to parse input string as an integer, exceeded maximum size'."""
    yaml_text = "max_tokens: '" + "9" * 5000 + "'\n"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml_text)
    code = main([command, *args, "--config", "c.yaml", *(["--out", "run"] if command != "audit" else [])])
    field = yaml_text.split(":")[0]
    assert code == 2 and capsys.readouterr().err == (
        f"selfinstruct {command}: error: c.yaml: field '{field}': a number too long to read (over 4,300 digits)\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["structured", "teacher", "model"])
@pytest.mark.parametrize("given", ["flags", "config"])
def test_generate_names_a_config_files_value_by_its_key_not_a_flag(tmp_path, capsys, monkeypatch, case, given):
    """A check made after the flags and the --config file are merged named every value as a flag:
    'structured: true' and 'tasks_per_request: 20' in c.yaml were refused as '--structured with
    --tasks-per-request 20', flags the user never typed. The file's values are named by the file and
    their keys (as respond's limit and evolve's rounds are); a flag is still named as the flag."""
    from selfinstruct import servers

    def started(*args, **kwargs):
        raise AssertionError("a teacher was started")

    monkeypatch.setattr(servers, "embedded_teacher", started)
    monkeypatch.setattr(servers, "vllm_replicas", started)
    server = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    options, flags, keyed = {
        "structured": ({"structured": True, "tasks_per_request": 20}, ["--structured", "--tasks-per-request", "20", *server],
                       "structured: true with tasks_per_request: 20 and --max-tokens 1024 leaves each instruction at "
                       "most 20 characters; raise --max-tokens to 2334, or lower tasks_per_request to 8"),
        "teacher": ({"teacher": "vllm", "base_url": "http://127.0.0.1:9/v1", "model": "m"}, ["--teacher", "vllm", *server],
                    "teacher: vllm starts its own teacher, so base_url does not apply; give base_url alone (or with "
                    "teacher: openai) to use that server"),
        "model": ({"model": "Qwen/Q"}, ["--model", "Qwen/Q"],
                  "model: 'Qwen/Q' names the model of a --base-url server or of --teacher vllm; the embedded teacher "
                  "serves its own (--teacher-model FILE.gguf for another): give --base-url (or --teacher vllm), or "
                  "leave model out"),
    }[case]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items()))
    more = (["--config", str(cfg)] + (server if case == "structured" else [])) if given == "config" else flags
    out = tmp_path / "out"
    assert main(["generate", *more, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    if given == "config":
        assert err == f"selfinstruct generate: error: {cfg}: {keyed}\n"
    else:  # the same line in flags' words
        assert err.count("\n") == 1 and f": {cfg}:" not in err and (
            "--structured with --tasks-per-request 20 and --max-tokens 1024" in err
            or "--teacher vllm starts its own teacher, so --base-url does not apply" in err
            or "--model 'Qwen/Q' names the model" in err and "leave --model out" in err), err
    assert not out.exists()


def test_an_option_too_long_to_print_is_said_in_our_words():
    """An int too long to print (given through the Python API, as yaml now refuses one) was Python's
    'Exceeds the limit (4300 digits) for integer string conversion; use sys.set_int_max_str_digits()
    to increase the limit', advice for a programmer, in our validator's line."""
    from pydantic import ValidationError

    from selfinstruct.config import format_validation_error
    from selfinstruct.generate import GenerateOptions

    with pytest.raises(ValidationError) as e:
        GenerateOptions.model_validate({"out": "r", "concurrency": int("f" * 5000, 16)})
    assert format_validation_error(e.value, "c.yaml") == "c.yaml: field 'concurrency': a number too long to read (over 4,300 digits)"


@pytest.mark.parametrize("yaml_text,flags,keyed,flagged", [
    ("mode: self-instruct\nlead_word: true\n", ["--mode", "self-instruct", "--lead-word"],
     "lead_word applies to mode: alpaca only, not self-instruct; leave it out",
     "--lead-word applies to --mode alpaca only, not self-instruct; leave it out"),
    ("mode: magpie\ntasks_per_request: 3\n", ["--mode", "magpie", "--tasks-per-request", "3"],
     "tasks_per_request does nothing in mode: magpie (each request is one query",
     "--tasks-per-request does nothing in --mode magpie (each request is one query"),
    ("structured: true\ncontinue_output: true\n", ["--structured", "--continue-output"],
     "continue_output applies to text replies, not structured: true; leave it out",
     "--continue-output applies to text replies, not --structured; leave it out"),
    ("mode: magpie\nstructured: true\n", ["--mode", "magpie", "--structured"],
     "structured: true does not apply to mode: magpie (its query and answer are free text)",
     "--structured does not apply to --mode magpie (its query and answer are free text)"),
    ("mode: magpie\nprompts: p\n", ["--mode", "magpie", "--prompts", "p"],
     "prompts does not apply to mode: magpie (the teacher writes its query", "--prompts does not apply to --mode magpie"),
    ("lead_word: true\n", ["--lead-word"],
     "lead_word starts each instruction through --prefill or --structured", "--lead-word starts each instruction"),
    ("teacher_model: x.gguf\n", ["--teacher-model", "x.gguf"],
     "teacher_model applies to --teacher embedded (no --base-url), not this run's teacher (openai); leave it out",
     "--teacher-model applies to --teacher embedded (no --base-url), not this run's teacher (openai); leave it out"),
    ("vllm_args: [--enforce-eager]\n", ["--", "--enforce-eager"],
     "vllm_args (flags for 'vllm serve') apply to --teacher vllm, not this run's teacher (openai); leave them out",
     "flags after '--' go to 'vllm serve', for --teacher vllm, not this run's teacher (openai); leave them out"),
])
@pytest.mark.parametrize("given", ["flags", "config"])
def test_generate_names_an_unused_option_from_a_config_file_by_its_key(tmp_path, capsys, yaml_text, flags, keyed,
                                                                        flagged, given):
    """An option the run would not use was named as its flag when the --config file gave it
    ('--lead-word applies to --mode alpaca only', flags never typed): it is the file and its key."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    out = tmp_path / "out"
    server = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out), "--no-progress"]
    argv = ["generate", *server, *(["--config", str(cfg)] if given == "config" else flags)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not out.exists(), err
    said = f"{cfg}: {keyed}" if given == "config" else flagged
    assert err.startswith(f"selfinstruct generate: error: {said}"), err


@pytest.mark.parametrize("argv", [
    ["generate", "--out", "run", "--num", "1" * 5000],  # argparse: Python reads no int of over 4,300 digits
    ["generate", "--out", "run", "--temperature", "x" + "1" * 5000],  # argparse: not a float
    ["dedup", "d.json", "--out", "o", "--threshold", "0." + "x" * 5000],
    ["respond", "d.json", "--out", "o", "--timeout", "1" * 3000 + "x"],
    ["generate", "--out", "run", "--concurrency", "9" * 4000],  # argparse took it; our own line quoted it
    ["generate", "--out", "run", "--min-words", "9" * 4000],
    ["generate", "--out", "run", "--bogus-" + "x" * 5000, "1"],  # argparse: unrecognized arguments
])
def test_a_flags_very_long_number_is_cut_in_its_line(argv, capsys, tmp_path, monkeypatch):
    """A 5,000-digit --num was echoed whole (a screenful): the line shows its start and its end, and says
    how long it is."""
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and len(err) < 500 and " characters)..." in err, err[:600]
    assert argv[-2][:40] in err  # the flag is still named (a 5,000-character one by its start)
    assert not (tmp_path / "run").exists()


def test_a_num_past_any_run_is_one_line_before_the_folder(tmp_path, capsys):
    """A --num of 309 digits or more was an OverflowError traceback (the request budget divides it as a
    float), after the run folder was made: it is refused in one line, and nothing is made."""
    out = tmp_path / "run"
    assert main(["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out),
                 "--num", "9" * 400]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("selfinstruct generate: error: --num: ") and "1000000000000" in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["generate", "--out", "zz", "xxx"],
    ["respond", "data.json", "--out", "zz", "xxx"],
    ["serve", "--model", "m", "xxx"],
    ["pipeline", "--out", "zz", "xxx"],
])
def test_a_stray_word_is_an_unrecognized_argument_not_a_teachers_flag(argv, capsys, tmp_path, monkeypatch):
    """`generate --out zz xxx` was told "flags after '--' go to 'vllm serve' ... leave them out", with no
    `--` typed: the word had filled the `-- FLAGS` positional. It is an unrecognized argument now; the
    flags after a real `--` still go through (the last case)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "unrecognized arguments: xxx" in err, err
    assert not (tmp_path / "zz").exists()


def test_flags_after_a_double_dash_still_reach_the_teacher(monkeypatch):
    """The stray-word check leaves the real passthrough alone: `-- --max-model-len 4096` is vllm_args."""
    from selfinstruct import generate

    seen = {}
    monkeypatch.setattr(generate, "run", lambda args: seen.update(vllm_args=args.vllm_args) or 0)
    assert main(["generate", "--out", "zz", "--", "--max-model-len", "4096"]) == 0
    assert seen["vllm_args"] == ["--max-model-len", "4096"]


@pytest.mark.parametrize("command", ["export", "audit"])
def test_a_records_key_its_model_does_not_have_is_an_unknown_field(tmp_path, capsys, command):
    """A run's record whose instance holds a key Instance forbids was 'field 'instances.0.score':
    unknown option', the word for a --config key; a record's key is a field, as a seed file's is."""
    from conftest import write_run

    run = tmp_path / "run"
    write_run(run, [{"instruction": "Name a red fruit.", "input": "", "output": "Apple."}])
    kept = run / "kept.jsonl"
    kept.write_text(kept.read_text().replace('"output":"Apple."', '"output":"Apple.","score":3'))
    more = ["--out", str(tmp_path / "x.json")] if command == "export" else []
    assert main([command, str(run), *more]) == 2
    assert capsys.readouterr().err == f"selfinstruct {command}: error: {kept}:1: field 'instances.0.score': unknown field\n"


@pytest.mark.parametrize("kind, task, message", [
    ("alpaca", {"instruction": "Add two and three.", "output": 5}, "field 'output': must be a string, got int"),
    ("self-instruct", GOOD | {"instances": [{"input": "", "output": 5}]},
     "field 'instances.0.output': must be a string, got int"),
    ("alpaca", {"instruction": ["Add", "two"], "output": "5"}, "field 'instruction': must be a string, got list"),
    ("self-instruct", GOOD | {"instruction": ["Add", "two"]}, "field 'instruction': must be a string, got list"),
    ("self-instruct", GOOD | {"id": 7, "is_classification": "maybe"},
     "field 'id': must be a string, got int (and 1 more)"),
], ids=["alpaca-output", "self-instruct-output", "alpaca-instruction", "self-instruct-instruction", "self-instruct-id"])
def test_a_seed_value_that_is_not_a_string_is_said_alike_in_both_formats(tmp_path, capsys, kind, task, message):
    """An Alpaca row said 'must be a string, got int' and a self-instruct task pydantic's 'Input should
    be a valid string' for the same mistake: both say the first now, with the field and the type."""
    seeds = write_lines(tmp_path / "bad.jsonl", [task])
    out = tmp_path / "run"
    assert main(["generate", "--seeds", str(seeds), "--out", str(out), "--num", "1"]) == 2
    assert capsys.readouterr().err == f"selfinstruct generate: error: {seeds}:1: {message}\n"
    assert not out.exists()


def test_an_alpaca_seed_row_with_many_problems_says_the_first_and_how_many_more(tmp_path, capsys):
    """An Alpaca seed row with five problems said only the first ("field 'x': unknown field"), while a
    self-instruct task says "(and N more)" through the shared formatter: a user fixed one and met the
    next refusal. Both count them now; a row with one problem reads as before."""
    seeds = write_lines(tmp_path / "bad.jsonl", [{"instruction": None, "input": 3, "output": [], "x": 1, "y": 2}])
    out = tmp_path / "run"
    assert main(["generate", "--seeds", str(seeds), "--out", str(out), "--num", "1"]) == 2
    assert capsys.readouterr().err == f"selfinstruct generate: error: {seeds}:1: field 'x': unknown field (and 4 more)\n"
    seeds = write_lines(tmp_path / "one.jsonl", [{"instruction": "Add two and three.", "output": 5}])
    assert main(["generate", "--seeds", str(seeds), "--out", str(out), "--num", "1"]) == 2
    assert capsys.readouterr().err == f"selfinstruct generate: error: {seeds}:1: field 'output': must be a string, got int\n"
    assert not out.exists()


def test_a_config_key_set_to_null_is_the_default_and_not_given(tmp_path, capsys):
    """`num: null` is `num` left out (it was refused as 'not a valid integer', and a null option
    counted as given); a required option's null is still refused, naming the file."""
    from selfinstruct.config import resolve
    from selfinstruct.generate import GenerateOptions, add_arguments
    import argparse

    cfg = tmp_path / "c.yaml"
    cfg.write_text("num: null\nteacher_seed: null\nout: r\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    opts = resolve(GenerateOptions, p.parse_args(["--config", str(cfg)]))
    assert (opts.num, opts.teacher_seed, opts.model_fields_set) == (100, None, {"out"})
    cfg.write_text("out: null\n")
    assert main(["generate", "--config", str(cfg)]) == 2
    # Said as what out is for, not pydantic's "Input should be a valid string".
    assert capsys.readouterr().err == (f"selfinstruct generate: error: {cfg}: field 'out': needs a folder: the run "
                                       "folder to make, or one to resume (not null)\n")


@pytest.mark.parametrize("command,args,key", [("decontaminate", ["data.json", "--out", "o"], "against"),
                                              ("generate", ["--out", "o"], "seeds")])
def test_a_config_list_of_paths_written_as_one_string_names_its_key(tmp_path, capsys, monkeypatch, command, args, key):
    """`against: a.jsonl b.jsonl` (as the flag takes them) is one path to YAML: it said
    'a.jsonl b.jsonl: no such file or folder', naming no key. One line naming the file and the key,
    and how to write a list; a path with a space that exists is still taken as one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.json").write_text('[{"instruction": "Name a colour.", "input": "", "output": "Red."}]')
    (tmp_path / "c.yaml").write_text(f"{key}: a.jsonl b.jsonl\n")
    assert main([command, *args, "--config", "c.yaml"]) == 2
    assert capsys.readouterr().err == (f"selfinstruct {command}: error: c.yaml: field '{key}': 'a.jsonl b.jsonl' is one "
                                       f"path, and there is no such file or folder; for several, write a YAML list: "
                                       f"{key}: [a.jsonl, b.jsonl]\n")
    assert not (tmp_path / "o").exists()
    if command == "decontaminate":  # a file whose name holds a space is one path, as written
        (tmp_path / "a.jsonl b.jsonl").write_text('{"instruction": "Name a colour.", "input": "", "output": "Red."}\n')
        assert main([command, *args, "--config", "c.yaml"]) == 0


@pytest.mark.parametrize("command,args", [("generate", []), ("dedup", ["data.jsonl"]), ("tune", ["data.jsonl"])])
def test_a_config_files_unknown_key_is_named_before_a_flags_bad_value(tmp_path, capsys, monkeypatch, command, args):
    """The one line named the flag's error, with the misspelt key in the file hidden as '(and 1 more)'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("colour: red\n")
    bad = {"generate": ["--num", "0"], "dedup": ["--threshold", "2"], "tune": ["--max-steps", "0"]}[command]
    assert main([command, *args, "--config", "c.yaml", *bad, "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "c.yaml: field 'colour': unknown option (and 1 more)" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("line,key", [("temprature: 0.2\n", "temprature"), ("limt: 1\n", "limt")])
def test_respond_refuses_an_unknown_key_in_its_runs_config_yaml_as_generate_does(tmp_path, monkeypatch, capsys, line, key):
    """generate refused a key of its run's config.yaml that is no option; respond (and evolve, which
    shares the code: ``take_the_runs_own``) ignored it, and went on as if the misspelt option were
    taken. One line naming the file and the key, before any request; its own 'mode' key is no problem."""
    from conftest import FakeTeacher, write_run

    rows = [{"instruction": f"Describe the {w} in two sentences for a young reader.", "input": "", "output": f"Old {w}."}
            for w in ("lantern", "meadow")]
    run, out = write_run(tmp_path / "run", rows), tmp_path / "a"
    with FakeTeacher(reply=lambda n: f"A fresh answer, number {n}.", models=("big-model",)) as fake:
        monkeypatch.setenv("SELFINSTRUCT_API_KEY", fake.key)
        args = ["respond", str(run), "--base-url", fake.base_url, "--model", "big-model", "--out", str(out), "--no-progress"]
        assert main(args) == 0
        saved = out / "config.yaml"
        assert "mode: respond" in saved.read_text()
        assert main(args) == 0  # resumed as it is
        saved.write_text(saved.read_text() + line)
        capsys.readouterr()
        sent = len(fake.prompts)
        assert main(args) == 2
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert len(fake.prompts) == sent
    assert len(err) == 1 and err[0].endswith(
        f"{saved}: field '{key}': unknown option (edited by hand, or saved by a newer version of selfinstruct?); "
        "remove it to resume, or resume with the version that made the run")


_TEACHER_BOUNDS = [("generate", o) for o in ("max_tokens", "max_retries", "teacher_threads", "teacher_parallel",
                                             "teacher_replicas", "tasks_per_request", "instances_per_task")] + [
    (c, o) for c in ("respond", "evolve") for o in ("max_tokens", "max_retries", "teacher_threads", "teacher_parallel")
] + [("audit", "max_tokens"), ("audit", "max_retries")] + [
    ("generate", o) for o in ("nearest", "seed_examples", "machine_examples")]


@pytest.mark.parametrize("command, option", _TEACHER_BOUNDS)
@pytest.mark.parametrize("given", ["flag", "config"])
def test_a_count_past_any_real_use_is_one_line_before_any_folder_or_teacher(tmp_path, capsys, monkeypatch, command,
                                                                            option, given):
    """Counts a typo makes huge (10**20) had no upper bound: --max-tokens 10**20 reached the embedded teacher as
    -2147483648, refused in every request until --max-requests; --teacher-threads 10**20 was an OverflowError
    traceback; --max-retries 10**20 would overflow the backoff, hours into a run against a server that is down;
    --tasks-per-request 10**20 was asked of the teacher. Each is one line naming the option, and nothing is made;
    the bound itself is taken."""
    from selfinstruct import audit, evolve, generate, respond

    model = {"generate": generate.GenerateOptions, "respond": respond.RespondOptions,
             "evolve": evolve.EvolveOptions, "audit": audit.AuditOptions}[command]
    bound = model.model_fields[option].metadata[-1].le
    assert 16 < bound < 2**31  # far past any real use, below what a server or a C int takes
    monkeypatch.chdir(tmp_path)
    src = write_run(tmp_path / "src", [{"instruction": "Name a colour.", "input": "", "output": "Blue."}])
    (tmp_path / "c.yaml").write_text(f"{option}: {10**20}\n")
    more = [f"--{option.replace('_', '-')}", str(10**20)] if given == "flag" else ["--config", "c.yaml"]
    server = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    argv = {"generate": ["generate", *server, "--out", "run"], "respond": ["respond", src, *server, "--out", "run"],
            "evolve": ["evolve", src, *server, "--out", "run"], "audit": ["audit", src, "--judge", *server]}[command]
    assert main([*argv, *more]) == 2
    where = f"--{option.replace('_', '-')}" if given == "flag" else f"c.yaml: field '{option}'"
    assert capsys.readouterr().err == (
        f"selfinstruct {command}: error: {where}: Input should be less than or equal to {bound}\n")
    assert not (tmp_path / "run").exists() and not (tmp_path / "src" / "judgements.jsonl").exists()
    required = {"generate": {"out": "r"}, "audit": {}}.get(command, {"source": "s", "out": "r"})
    assert getattr(model.model_validate({**required, option: bound}), option) == bound


@pytest.mark.parametrize("command", ["generate", "respond"])
@pytest.mark.parametrize("value", ["inf", "1e300", "101"])
def test_a_temperature_no_server_takes_is_one_line_before_any_folder(tmp_path, capsys, monkeypatch, command, value):
    """--temperature 1e300 (or 101) went out in every request, and a server that caps it (OpenAI's API: 2) refused
    each until --max-requests; inf was refused already (not finite). One line, nothing made."""
    monkeypatch.chdir(tmp_path)
    src = write_run(tmp_path / "src", [{"instruction": "Name a colour.", "input": "", "output": "Blue."}])
    server = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    argv = {"generate": ["generate", *server, "--out", "run"], "respond": ["respond", src, *server, "--out", "run"]}
    assert main([*argv[command], "--temperature", value]) == 2
    said = "a finite number" if value == "inf" else "less than or equal to 100"
    assert capsys.readouterr().err == f"selfinstruct {command}: error: --temperature: Input should be {said}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, code", [
    (["audit", "."], 0),
    (["export", ".", "--format", "jsonl", "--out", "../o.jsonl"], 0),
    (["dedup", ".", "--out", "../dd"], 0),
    (["decontaminate", "../d.jsonl", "--against", ".", "--out", "../dc"], 0),
    (["tune", ".", "--out", "../t", "--model", "../no-such-model"], 2),
])
def test_a_dataset_folder_given_as_dot_is_read_as_that_folder(tmp_path, monkeypatch, capsys, argv, code):
    """In a saved dataset's folder (an `export --format hf`), `audit .` and every other command that reads
    one was a traceback, "PosixPath('.') has an empty name": a file beside the input (its judgements, a
    tune's default --out) is named after it, and '.' has no name."""
    rows = [{"instruction": f"Name a {w} thing that people keep at home.", "input": "", "output": f"A {w} lamp."}
            for w in ("red", "green", "blue")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    assert main(["export", "d.jsonl", "--format", "hf", "--out", "hf"]) == 0
    monkeypatch.chdir(tmp_path / "hf")
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    if code:
        assert err.count("\n") == 1 and "no-such-model" in err, err
