"""One command from seeds to a tuned adapter, on the real embedded teacher and the offline student."""

import html
import json

import pytest

from conftest import FakeTeacher, fake_args, snapshot
from selfinstruct.cli import main


@pytest.mark.slow
def test_pipeline_seeds_to_adapter(tmp_path, capsys):
    out = tmp_path / "all"
    code = main([
        "pipeline", "--num", "3", "--out", str(out), "--seed", "4", "--no-progress", "--max-requests", "200",  # the embedded defaults "--tune-model", "smollm2", "--tune-max-steps", "2",
    ])
    assert code == 0, capsys.readouterr().err[-2000:]
    kept = (out / "kept.jsonl").read_text().splitlines()
    assert len(kept) == 3
    report = (out / "report.html").read_text()
    assert "<img" in report and html.escape(json.loads(kept[0])["instruction"][:20], quote=True) in report
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists()
    assert any(adapter.glob("adapter_model.*"))


def test_pipeline_checks_tune_options_before_generating(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("generate:\n  num: 2\ntune:\n  lora_rank_typo: 8\n")
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "field 'tune.lora_rank_typo': unknown option" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    cfg.write_text("generat:\n  num: 2\n")
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "unknown section" in capsys.readouterr().err


@pytest.mark.parametrize("yaml_text,flags,message", [
    ("tune: {bogus: 1}\n", [], "p.yaml: field 'tune.bogus': unknown option"),
    ("tune: {epochs: -5}\n", [], "p.yaml: field 'tune.epochs': Input should be greater than 0"),
    ("tune: {seed: -1}\n", [], "p.yaml: field 'tune.seed': Input should be greater than or equal to 0"),
    ("tune: {full: true, lora_r: 8}\n", [], "p.yaml: field 'tune.lora_r' applies to LoRA only"),
    ("", ["--tune-model", "/nonexistent"], "--tune-model does nothing with --skip-tune"),
    ("", ["--tune-epochs", "2"], "--tune-epochs does nothing with --skip-tune"),
    ("", ["--tune-max-steps", "2"], "--tune-max-steps does nothing with --skip-tune"),
    ("", ["--tune-full"], "--tune-full does nothing with --skip-tune"),
], ids=["unknown-key", "bad-value", "bad-seed", "lora-with-full", "tune-model", "tune-epochs", "tune-max-steps", "tune-full"])
def test_pipeline_skip_tune_still_checks_the_tune_section_and_refuses_tune_flags(tmp_path, capsys, yaml_text, flags,
                                                                                message):
    """With --skip-tune the tune: section was not read at all (a typo generated, audited and exited 0)
    and the --tune-* flags were silently unused; without it the same file was refused before generating."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml_text)
    # A teacher that is not there: were the check late, the run would fail on it instead.
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"), "--skip-tune", *flags,
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("yaml_text, flags, message", [
    ("", ["--tune-max-steps", str(10**20)], "--tune-max-steps: Input should be less than or equal to 100000000"),
    ("", ["--tune-epochs", "1e20"], "--tune-epochs: Input should be less than or equal to 100000000"),
    ("tune: {lora_r: 100000000000000000000}\n", [], "p.yaml: field 'tune.lora_r': Input should be less than or equal to 65536"),
    ("tune: {model: MODEL, max_length: 4096}\n", [], "p.yaml: field 'tune.max_length': 4096 is past the context of "
     "MODEL (2,048 tokens, its config's max_position_embeddings); give at most 2048"),
], ids=["max-steps", "epochs", "tune-section", "past-the-context"])
def test_pipeline_a_tune_count_past_its_bound_is_one_line_naming_it_as_given(tmp_path, capsys, yaml_text, flags, message):
    """--tune-max-steps 10**20 passed the pipeline's own check and was refused by tune's as --max-steps, a
    flag the pipeline has not; a tune: section's count is tune's, named as its key."""
    model = tmp_path / "model"  # a config is all the check reads: no weight, no tokenizer
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml_text.replace("MODEL", str(model)))
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"), *flags,
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.replace("MODEL", str(model)) in err, err
    assert not (tmp_path / "run").exists()


def test_pipeline_skip_tune_takes_a_valid_tune_section_it_does_not_use(tmp_path, capsys):
    """A file shared between runs keeps its tune: section; with --skip-tune a valid one is taken,
    its model not looked for (no tune reads it), and --no-tune-full (turned off) too."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text("tune: {model: /nonexistent, epochs: 2}\n")
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        code = main(["pipeline", "--config", str(cfg), *fake_args(fake, out, 2), f"--api-key={fake.key}",
                     "--skip-tune", "--no-tune-full"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (out / "report.html").is_file() and not (out / "adapter").exists()


def test_pipeline_refuses_lora_options_with_a_full_tune_before_generating(tmp_path, capsys):
    """A full tune would ignore LoRA's options: one line before the generation, not a silent tune."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text("tune:\n  full: true\n  lora_r: 8\n")
    # A teacher that is not there: were the check late, the run would fail on it instead.
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"),
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    # Named as the pipeline takes them (it has no --lora-r or --full flag): the file's fields, or --tune-full.
    assert err.count("\n") == 1 and f"{cfg}: field 'tune.lora_r' applies to LoRA only, and tune.full tunes" in err, err
    assert not (tmp_path / "run").exists()
    cfg.write_text("tune:\n  lora_r: 8\n")
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"), "--tune-full",
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'tune.lora_r' applies to LoRA only, and --tune-full tunes" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_pipeline_checks_the_adapter_folder_before_generating(tmp_path, capsys, full):
    """RUN/adapter holding a user's file, or an earlier tune of the other kind, is refused
    before the generation (hours), not when the tune step comes to save."""
    from selfinstruct.sft import KIND_MARKERS

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / KIND_MARKERS[not full][1]).write_text("{}")  # an earlier tune of the other kind
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"tune:\n  full: {str(full).lower()}\n")
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    # A teacher that is not there: were the check late, the run would fail on it instead.
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"),
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{adapter}: holds" in err, err
    # A new --out would start a new run: the line says to clear RUN/adapter instead.
    assert err.rstrip().endswith(f": move or delete what {adapter} holds (the tune saves there; a new --out "
                                 "would start a new run)") and "choose" not in err, err
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before


def test_pipeline_refuses_a_bare_heldout_file_in_its_adapter_folder_with_its_own_advice(tmp_path, capsys):
    """A bare heldout.jsonl (export writes one too) does not make RUN/adapter a tune's folder
    (datafiles.is_tune_folder): the user's README.md beside it is refused, not written over."""
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    for name in ("heldout.jsonl", "README.md"):
        (adapter / name).write_text("mine\n")
    assert main(["pipeline", "--out", str(tmp_path / "run"), "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                 "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert err == (f"selfinstruct pipeline: error: {adapter}: holds files a tune did not write (README.md, "
                   "heldout.jsonl); a tune writes its model card (README.md), config and tokenizer files there: move or delete what "
                   f"{adapter} holds (the tune saves there; a new --out would start a new run)\n"), err
    assert (adapter / "README.md").read_text() == "mine\n"


@pytest.mark.parametrize("yaml_text,message", [
    ("generate: {num: 5, bogus: 1}\n", "p.yaml: field 'generate.bogus': unknown option"),
    ("audit: {sample: -1}\n", "p.yaml: field 'audit.sample': Input should be greater than or equal to 0"),
    ("generate: {client_processes: true}\n", "p.yaml: field 'generate.client_processes': expected a number, not true"),
    ("audit: {judge: true}\n", "p.yaml: field 'audit.judge': the pipeline runs no judge; judge the run afterwards"),
    ("audit: {base_url: 'http://127.0.0.1:8000/v1'}\n", "p.yaml: field 'audit.base_url': the pipeline runs no judge"),
    ("audit: {html: RUN/kept.jsonl}\n", "field 'audit.html': RUN/kept.jsonl is the run's own kept.jsonl"),
    ("audit: {html: RUN}\n", "field 'audit.html': RUN is the run folder; give a file name"),
    ("audit: {html: nowhere/r.html}\n", "p.yaml: field 'audit.html': nowhere/r.html: cannot write (nowhere: no such folder)"),
], ids=["generate-unknown", "audit-bad-value", "bool-for-number", "judge", "judge-url", "html-into-the-run",
        "html-is-the-run", "html-in-a-missing-folder"])
def test_pipeline_config_errors_name_the_section_before_generating(tmp_path, capsys, yaml_text, message):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml_text.replace("RUN", str(tmp_path / "run")))
    # A teacher that is not there: were the check late, the run would fail on it instead.
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"), "--skip-tune",
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.replace("RUN", str(tmp_path / "run")) in err, err
    assert not (tmp_path / "run").exists()


def test_pipeline_takes_an_empty_section_and_writes_the_report_where_audit_html_says(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"generate:\naudit:\n  html: {tmp_path / 'y.html'}\n  judge: false\ntune:\n")
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        code = main(["pipeline", "--config", str(cfg), *fake_args(fake, out, 2), f"--api-key={fake.key}", "--skip-tune"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "y.html").read_text() == (out / "report.html").read_text()
    # the run records no kept record's nearest (its floor is the threshold): the audit computes them
    assert "id='similarity'" in (out / "report.html").read_text()


def test_pipeline_audit_html_in_the_run_folder_it_makes_and_not_its_adapter_folder(tmp_path, capsys):
    """audit.html inside the run folder is taken on a first run (the generation makes the
    folder), and the folder the tune saves into is refused before generating: written as a
    file, it would stop the tune hours later."""
    out = tmp_path / "run"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"audit:\n  html: {out / 'adapter'}\n")
    assert main(["pipeline", "--config", str(cfg), "--out", str(out),
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"field 'audit.html': {out / 'adapter'} is the folder the tune saves into" in err, err
    assert not out.exists()
    cfg.write_text(f"audit:\n  html: {out / 'copy.html'}\n")
    with FakeTeacher() as fake:
        code = main(["pipeline", "--config", str(cfg), *fake_args(fake, out, 2), f"--api-key={fake.key}", "--skip-tune"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (out / "copy.html").read_text() == (out / "report.html").read_text()


@pytest.mark.parametrize("where,model,message", [
    ("yaml", "SEEDS/student", "p.yaml: field 'tune.model': SEEDS/student: no such model folder"),
    ("yaml", "./no-such-student", "p.yaml: field 'tune.model': ./no-such-student: no such model folder"),
    ("flag", "../no/such/student", "--tune-model: ../no/such/student: no such model folder"),
    ("yaml", "SEEDS", "p.yaml: field 'tune.model': SEEDS: not a model folder (no config.json)"),
], ids=["absolute", "dot-slash", "flag", "folder-without-config"])
def test_pipeline_refuses_a_local_tune_model_that_is_not_there_before_generating(tmp_path, capsys, where, model,
                                                                                  message):
    model = model.replace("SEEDS", str(tmp_path))
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"tune: {{model: '{model}'}}\n" if where == "yaml" else "tune: {epochs: 1}\n")
    flags = ["--tune-model", model] if where == "flag" else []
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"), *flags,
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.replace("SEEDS", str(tmp_path)) in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model", ["folder", "smollm2"])
def test_pipeline_refuses_a_target_module_typo_before_generating(tmp_path, capsys, monkeypatch, model):
    """tune.target_modules is checked on the model built from its config alone (no weight read, and
    smollm2 not converted: its GGUF's metadata), not hours later when the tune step loads it."""
    flags = []
    if model == "folder":
        from transformers import LlamaConfig

        student = tmp_path / "student"  # a config and no weights: the check must not need them
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2).save_pretrained(student)
        flags = ["--tune-model", str(student)]
    monkeypatch.setenv("SELFINSTRUCT_CACHE", str(tmp_path / "cache"))  # smollm2 never converted here
    cfg = tmp_path / "p.yaml"
    cfg.write_text("tune:\n  target_modules: [q_proj, v_prj]\n")
    # A teacher that is not there: were the check late, the run would fail on it instead.
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"), *flags,
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{cfg}: field 'tune.target_modules': no layer LoRA can adapt is named 'v_prj'" in err
    assert "v_proj" in err.split("linear layers are")[1], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache" / "students").exists()
    cfg.write_text("tune:\n  target_modules: [q_proj, v_proj]\n")  # the right names pass, on to the teacher
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"), *flags,
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    assert "the teacher at http://127.0.0.1:9/v1 cannot be reached" in capsys.readouterr().err


def test_pipeline_help_says_where_the_embedded_teacher_differs_as_generate_help_does():
    import argparse

    from selfinstruct import generate, pipeline

    helps = {}
    for name, module in (("generate", generate), ("pipeline", pipeline)):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        helps[name] = {a.dest: a.help for a in parser._actions}
    for dest in ("tasks_per_request", "max_tokens", "stop", "lead_word", "continue_output", "dry_multiplier"):
        assert "(embedded teacher: " in helps["pipeline"][dest]  # the pipeline's generate step applies them
        assert helps["pipeline"][dest] == helps["generate"][dest]
    assert "generate:, audit: and tune: sections" in helps["pipeline"]["config"]
    assert "tune_model" in helps["pipeline"]


@pytest.mark.parametrize("skip", [[], ["--skip-tune"]], ids=["tune", "skip-tune"])
@pytest.mark.parametrize("what", ["config", "template", "tune-model"])
def test_pipeline_audit_html_never_overwrites_what_the_run_reads(tmp_path, capsys, what, skip):
    """audit.html naming the --config file itself, a --prompts template or a file of the local tune
    model is refused before generating, as a seed file is: it was replaced by the report, and the
    model's config.json written over stopped the tune (and broke the folder for good)."""
    from transformers import LlamaConfig

    prompts = tmp_path / "my prompts"
    prompts.mkdir()
    (prompts / "alpaca.txt").write_text("$examples\n")  # read by the run only: the check comes first
    student = tmp_path / "student"
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(student)
    cfg = tmp_path / "p.yaml"
    html = {"config": cfg, "template": prompts / "alpaca.txt", "tune-model": student / "config.json"}[what]
    cfg.write_text(f"generate: {{prompts: '{prompts}'}}\naudit: {{html: '{html}'}}\ntune: {{model: '{student}'}}\n")
    before = {p: p.read_bytes() for p in (cfg, prompts / "alpaca.txt", student / "config.json")}
    # A teacher that is not there: were the check late, the run would fail on it instead.
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"), *skip,
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{cfg}: field 'audit.html': {html}:" in err, err
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "run").exists()


def test_pipeline_try_it_line_pastes_into_a_shell_when_the_folder_has_a_space(tmp_path, capsys, monkeypatch):
    """The closing 'try it:' command named 'my run/adapter' unquoted (and rich wrapped it at the terminal's
    width), so pasted it tried 'my' with instructions 'run/adapter' and the rest."""
    import shlex

    from selfinstruct import sft

    monkeypatch.setattr(sft, "tune", lambda *a, **k: None)  # the tune itself is tune's tests' business
    monkeypatch.setenv("COLUMNS", "40")
    out = tmp_path / "my run"
    with FakeTeacher() as fake:
        code = main(["pipeline", *fake_args(fake, out, 2), f"--api-key={fake.key}", "--tune-full"])
    assert code == 0, capsys.readouterr().err[-2000:]
    (line,) = [s for s in capsys.readouterr().out.splitlines() if "try it: " in s]
    argv = shlex.split(line.split("try it: ", 1)[1])
    assert argv[:3] == ["selfinstruct", "try", str(out / "adapter")] and len(argv) == 4, line


def test_pipeline_judge_hint_quotes_a_run_folder_with_a_space(tmp_path, capsys):
    import shlex

    cfg = tmp_path / "p.yaml"
    cfg.write_text("audit: {judge: true}\n")
    out = tmp_path / "my run"
    assert main(["pipeline", "--config", str(cfg), "--out", str(out), "--skip-tune",
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert f"judge the run afterwards with selfinstruct audit {shlex.quote(str(out))} --judge" in err, err


@pytest.mark.parametrize("yaml_text,flags,said", [
    # generate's later checks: they named flags this command never typed (the file was not passed on),
    # then the section's keys as if at the file's top (structured: true): named in their section.
    ("generate:\n  mode: magpie\n  structured: true\n", [],
     "p.yaml: generate.structured: true does not apply to generate.mode: magpie (its query and answer are free text)"),
    ("generate:\n  mode: magpie\n", ["--structured"],
     "p.yaml: --structured does not apply to generate.mode: magpie (its query and answer are free text)"),
    ("generate:\n  teacher: vllm\n  base_url: http://127.0.0.1:9/v1\n", [],
     "p.yaml: generate.teacher: vllm starts its own teacher, so generate.base_url does not apply"),
    # ...and the checks of two options together, in the options' validation.
    ("generate:\n  max_words: 3\n  min_words: 5\n", [],
     "p.yaml: generate.max_words: 3 must be above generate.min_words: 5 (no instruction"),
    ("generate:\n  nearest_floor: 0.8\n", ["--threshold", "0.5"],
     "p.yaml: generate.nearest_floor: 0.8 must be at most --threshold 0.5"),
    ("", ["--mode", "magpie", "--structured"], "error: --structured does not apply to --mode magpie"),
], ids=["file", "file-and-flag", "file-teacher", "file-words", "file-floor-and-flag", "flags"])
def test_pipeline_names_its_files_generate_options_by_the_file_and_key(tmp_path, capsys, yaml_text, flags, said):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml_text)
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"), "--skip-tune", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err, err
    assert not (tmp_path / "run").exists()


WHY_WORDS = "(no instruction could pass: one needs more than min and at most max words)"
URL = "base_url: 'http://127.0.0.1:9/v1', model: m"


@pytest.mark.parametrize("keys,said", [
    ("{temperature: abc}", "field 'generate.temperature': Input should be a valid number, unable to parse string as a number"),
    ("{temprature: 0.5}", "field 'generate.temprature': unknown option"),
    ("{temperature: -1}", "field 'generate.temperature': Input should be greater than or equal to 0"),
    ("{min_words: 200, max_words: 100}", f"generate.max_words: 100 must be above generate.min_words: 200 {WHY_WORDS}"),
    ("{min_words: 200}", f"generate.min_words: 200 must be below generate.max_words (default 150) {WHY_WORDS}"),
    (f"{{client_processes: 8, concurrency: 2, {URL}}}",
     "generate.client_processes: 8 must be at most generate.concurrency: 2 (the requests in flight per server, on "
     "1 server: 6 senders would never have a request to send)"),
    ("{mode: magpie, structured: true}",
     "generate.structured: true does not apply to generate.mode: magpie (its query and answer are free text)"),
    ("{base_url: 'http://127.0.0.1:9/v1'}", "generate.base_url needs generate.model (the model name the server serves)"),
    ("{model: m}", "generate.model: 'm' names the model of a --base-url server or of --teacher vllm; the embedded "
     "teacher serves its own (--teacher-model FILE.gguf for another): give --base-url (or --teacher vllm), or leave "
     "generate.model out"),
    ("{teacher: embedded, vllm_args: [--x]}", "generate.vllm_args (flags for 'vllm serve') apply to --teacher vllm, "
     "not this run's teacher (embedded); leave them out"),
    ("{seed_examples: 0}", "generate.seed_examples: 0 with generate.machine_examples (default 0) shows no example in "
     "any prompt, so the teacher has none to follow (a template without $examples is refused for that); give at "
     "least one of either"),
    (f"{{lead_word: true, prefill: false, {URL}}}",
     "generate.lead_word starts each instruction through --prefill or --structured, and this run has neither "
     "(generate.prefill: false was given): give --prefill instead if the server continues an assistant message "
     "(llama.cpp, vLLM do), or --structured"),
], ids=["bad-type", "unknown-key", "out-of-range", "pair", "pair-with-a-default", "pair-senders", "magpie-structured",
        "teacher-lacks-model", "model-for-embedded", "vllm-args", "no-examples", "lead-word-without-prefill"])
def test_pipeline_names_a_generate_value_by_its_section_and_a_config_file_by_its_key(tmp_path, capsys, keys, said):
    """A pipeline file's generate: value was named as if at the file's top (p.yaml: max_words: 100 must be
    above min_words: 200), where the file has no such key: each line names it in its section now. The same
    keys at the top of a `generate --config` file are named as they always were, without one."""
    pipe, flat = tmp_path / "p.yaml", tmp_path / "c.yaml"
    pipe.write_text(f"generate: {keys}\n")
    flat.write_text(f"{keys}\n")  # a flow mapping: the same keys at the top
    assert main(["pipeline", "--config", str(pipe), "--out", str(tmp_path / "run"), "--skip-tune"]) == 2
    assert capsys.readouterr().err == f"selfinstruct pipeline: error: {pipe}: {said}\n"
    assert main(["generate", "--config", str(flat), "--out", str(tmp_path / "run")]) == 2
    unchanged = said.replace("generate.", "")
    assert capsys.readouterr().err == f"selfinstruct generate: error: {flat}: {unchanged}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("yaml_text,said", [
    ("audit: {sample: abc}\n", "field 'audit.sample': Input should be a valid integer, unable to parse string as an integer"),
    ("tune: {epochs: abc}\n", "field 'tune.epochs': Input should be a valid number, unable to parse string as a number"),
    ("audit: {bogus: 1}\n", "field 'audit.bogus': unknown option"),
    ("tune: {epochs: 0}\n", "field 'tune.epochs': Input should be greater than 0"),
    ("tune: {full: true, lora_alpha: 8}\n",
     "field 'tune.lora_alpha' applies to LoRA only, and tune.full tunes every weight: drop one of them"),
], ids=["audit-bad-type", "tune-bad-type", "audit-unknown-key", "tune-out-of-range", "tune-pair"])
def test_pipeline_names_an_audit_or_tune_value_by_its_section(tmp_path, capsys, yaml_text, said):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml_text)
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"), "--skip-tune"]) == 2
    assert capsys.readouterr().err == f"selfinstruct pipeline: error: {cfg}: {said}\n"
    assert not (tmp_path / "run").exists()


def test_pipeline_refuses_a_changed_generate_value_on_resume_naming_its_section(tmp_path, capsys):
    """The resume's refusal said `p.yaml: field 'temperature'`, a key the file does not have at its top,
    and to leave `temperature` out of it. `generate --config` on the same run says it as before."""
    pipe, flat, out = tmp_path / "p.yaml", tmp_path / "c.yaml", tmp_path / "run"
    with FakeTeacher() as fake:
        pipe.write_text("generate: {temperature: 0.7}\n")
        args = [*fake_args(fake, out, 2), f"--api-key={fake.key}"]
        assert main(["pipeline", "--config", str(pipe), *args, "--skip-tune"]) == 0, capsys.readouterr().err[-2000:]
        capsys.readouterr()
        before = snapshot(out)
        pipe.write_text("generate: {temperature: 0.9}\n")
        assert main(["pipeline", "--config", str(pipe), *args, "--skip-tune"]) == 2
        assert capsys.readouterr().err == (
            f"selfinstruct pipeline: error: {pipe}: field 'generate.temperature': this run was made with 0.7, not 0.9; "
            "use a new --out folder, or leave generate.temperature out of this file to resume with the run's own\n")
        flat.write_text("temperature: 0.9\n")
        assert main(["generate", "--config", str(flat), *args]) == 2
        assert capsys.readouterr().err == (
            f"selfinstruct generate: error: {flat}: field 'temperature': this run was made with 0.7, not 0.9; "
            "use a new --out folder, or leave temperature out of this file to resume with the run's own\n")
        at = args.index("--num")  # a num below what the run kept, from the file
        pipe.write_text("generate: {temperature: 0.7, num: 1}\n")
        assert main(["pipeline", "--config", str(pipe), *args[:at], *args[at + 2:], "--skip-tune"]) == 2
        assert capsys.readouterr().err == (
            f"selfinstruct pipeline: error: {pipe}: generate.num: 1, but this run has kept 2 tasks already; "
            "generate.num may grow on resume, not shrink: give generate.num: 2 or more\n")
    assert snapshot(out) == before


@pytest.mark.parametrize("yaml_text,flags,earlier,said", [
    ("tune: {lr: 0.001}\n", [], {"lr": 0.0001}, "P: field 'tune.lr' differs from the tune that made CK (0.0001 there, 0.001 now)"),
    ("", ["--tune-epochs", "2"], {"epochs": 1.0}, "--tune-epochs differs from the tune that made CK (1.0 there, 2.0 now)"),
], ids=["section", "flag"])
def test_pipeline_refuses_checkpoints_of_another_tune_naming_the_tune_section(tmp_path, capsys, monkeypatch, yaml_text,
                                                                              flags, earlier, said):
    """The tune's own resume check (``sft.resume_point``) on checkpoints made with another value, told
    how the pipeline names its options: the file's tune: section and key, or the --tune-* flag."""
    from selfinstruct import sft

    def tune(run_dir, adapter, opts, console=None, name=None, advice=None):  # checkpoints of another tune, then the check
        identity = sft.tune_identity(opts, False, [], [])
        (adapter / "checkpoints" / "checkpoint-1").mkdir(parents=True)
        was = {**identity, "options": {**identity["options"], **earlier}}
        (adapter / "checkpoints" / sft.IDENTITY_FILE).write_text(json.dumps(was))
        sft.resume_point(adapter, identity, name, None, advice is None)  # as tune() calls it

    monkeypatch.setattr(sft, "tune", tune)
    cfg, out = tmp_path / "p.yaml", tmp_path / "run"
    cfg.write_text(yaml_text)
    with FakeTeacher() as fake:
        assert main(["pipeline", "--config", str(cfg), *fake_args(fake, out, 2), f"--api-key={fake.key}",
                     "--tune-full", *flags]) == 2
    err = capsys.readouterr().err  # the generation's summary, then the line
    said = said.replace("P:", f"{cfg}:").replace("CK", str(out / "adapter" / "checkpoints"))
    # Not "or choose another --out": the pipeline's would start a new run (its adapter_advice says so).
    assert err.splitlines()[-1] == (f"selfinstruct pipeline: error: {said}: run the same command on the same data to "
                                    f"resume that tune, or delete {out / 'adapter' / 'checkpoints'} to tune afresh"), err


def test_pipeline_holds_the_run_lock_through_its_audit_and_tune(tmp_path, capsys, monkeypatch):
    """generate released the run's lock when it returned, so a second generate could grow the run while the
    pipeline audited and tuned it: the report and the adapter then described rows the run no longer held."""
    import subprocess
    import sys

    from selfinstruct import sft
    from selfinstruct.datafiles import LOCK

    out = tmp_path / "run"
    probe = ("import fcntl, sys\nfd = open(sys.argv[1], 'a')\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n")
    seen = {}

    def tune(run_dir, adapter, *a, **k):  # another process tries the lock, as a second generate would
        seen["rc"] = subprocess.run([sys.executable, "-c", probe, str(out / LOCK)]).returncode
        seen["holder"] = (out / LOCK).read_text()

    monkeypatch.setattr(sft, "tune", tune)
    with FakeTeacher() as fake:
        code = main(["pipeline", *fake_args(fake, out, 2), f"--api-key={fake.key}", "--tune-full"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert seen["rc"] == 3 and "selfinstruct pipeline" in seen["holder"], seen
    # and released at the end
    assert subprocess.run([sys.executable, "-c", probe, str(out / LOCK)]).returncode == 0


def test_pipeline_rerun_without_num_keeps_the_runs_own_and_exits_0(tmp_path, capsys):
    """A resume without --num keeps the run's own (generate's rule), but the pipeline compared what was
    kept with the default 100 and exited 1 on a finished run of 3."""
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        first = fake_args(fake, out, 3)
        assert main(["pipeline", *first, f"--api-key={fake.key}", "--skip-tune"]) == 0, capsys.readouterr().err[-2000:]
        sent = len(fake.bodies)
        at = first.index("--num")
        again = first[:at] + first[at + 2:]
        assert main(["pipeline", *again, f"--api-key={fake.key}", "--skip-tune"]) == 0, capsys.readouterr().err[-2000:]
        assert len(fake.bodies) == sent  # nothing more asked
    assert len((out / "kept.jsonl").read_text().splitlines()) == 3


def test_pipeline_checks_a_pair_of_options_against_the_resumed_runs_own(tmp_path, capsys):
    """The generate: section's `min_words: 200` in a run made with `max_words: 300` was refused as
    "must be below max_words (default 150)" before the run's own was taken: the wrong reason. The
    pair waits for the run's own values, and the change is refused as one."""
    cfg, out = tmp_path / "p.yaml", tmp_path / "run"
    with FakeTeacher() as fake:
        cfg.write_text("generate:\n  max_words: 300\n")
        args = ["pipeline", "--config", str(cfg), *fake_args(fake, out, 2), f"--api-key={fake.key}", "--skip-tune"]
        assert main(args) == 0, capsys.readouterr().err[-2000:]
        capsys.readouterr()
        before = snapshot(out)
        cfg.write_text("generate:\n  min_words: 200\n")
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "'generate.min_words': this run was made with 3, not 200" in err, err
        cfg.write_text("generate:\n  min_words: 400\n")
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "p.yaml: generate.min_words: 400 must be below the run's max_words (300)" in err, err
    assert snapshot(out) == before


def test_pipeline_refuses_tune_bf16_without_a_gpu_for_it_before_generating(tmp_path, capsys, monkeypatch):
    """tune.bf16: true on a machine without bf16 was refused by the tune step, after the generation and
    the audit (hours), as `--bf16`, a flag the pipeline has not: one line naming the file's key, first."""
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: False)
    cfg = tmp_path / "p.yaml"
    cfg.write_text("tune: {bf16: true}\n")
    # A teacher that is not there: were the check late, the run would fail on it instead.
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"),
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert err == (f"selfinstruct pipeline: error: {cfg}: field 'tune.bf16': this machine has no GPU (or TPU) that "
                   "supports bf16; leave it out\n"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("yaml_text,key", [("1: a\nfoo: b\n", "1"), ("true: 1\ngenrate: {}\n", "True"),
                                           ("~: 1\nfoo: 2\n", "None")], ids=["int", "bool", "null"])
def test_pipeline_names_an_unknown_section_whatever_the_type_of_its_key(tmp_path, capsys, yaml_text, key):
    """Two unknown top-level keys, one of them not text (`1:`, `true:`, `~:`), were a TypeError traceback:
    sorting them to name the first compared a number with a string."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml_text)
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"), "--skip-tune"]) == 2
    err = capsys.readouterr().err
    assert err == f"selfinstruct pipeline: error: {cfg}: field '{key}': unknown section (use generate:, audit:, tune:)\n", err


@pytest.mark.parametrize("config", [False, True])
def test_pipeline_without_out_says_where_to_give_it(tmp_path, capsys, monkeypatch, config):
    """pipeline without --out said "--out: Field required", pydantic's words; generate says where to give it."""
    monkeypatch.chdir(tmp_path)
    argv = ["pipeline", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--skip-tune"]
    if config:
        (tmp_path / "p.yaml").write_text("generate: {num: 3}\n")
        argv += ["--config", "p.yaml"]
    assert main(argv) == 2
    where = "p.yaml" if config else "a --config file"
    assert capsys.readouterr().err == ("selfinstruct pipeline: error: --out is required: give it as a flag, or as out: "
                                       f"in the generate: section of {where}\n")
    assert list(tmp_path.iterdir()) == ([tmp_path / "p.yaml"] if config else [])


def test_pipeline_refuses_a_folder_where_its_report_goes_before_resuming(tmp_path, capsys):
    """RUN/report.html a folder (or a device) was found when the audit came to write it, after the
    generation: one line naming it, and what to do, before any teacher is asked."""
    out = tmp_path / "run"
    with FakeTeacher() as fake:
        args = [*fake_args(fake, out, 2), f"--api-key={fake.key}", "--skip-tune"]
        assert main(["pipeline", *args]) == 0, capsys.readouterr().err[-2000:]
        capsys.readouterr()
        (out / "report.html").unlink()
        (out / "report.html").mkdir()
        (out / "report.html" / "mine.txt").write_text("mine\n")
        before, sent = snapshot(out), len(fake.bodies)
        at = args.index("--num")
        args[at + 1] = "4"  # a resume that would ask the teacher for more
        assert main(["pipeline", *args]) == 2
        err = capsys.readouterr().err
        assert len(fake.bodies) == sent
    assert err == (f"selfinstruct pipeline: error: {out / 'report.html'}: is a folder, where the audit writes its "
                   "report: move or delete it\n"), err
    assert snapshot(out) == before


def test_pipeline_refuses_an_empty_target_modules_and_a_file_where_the_adapter_goes(tmp_path, capsys):
    """`tune: {target_modules: []}` was taken as not given (PEFT's choice) and trained; a file at RUN/adapter
    was "exists and is not a folder", with no word of what to do. Both before any teacher is asked."""
    cfg, out = tmp_path / "p.yaml", tmp_path / "run"
    cfg.write_text("tune: {target_modules: []}\n")
    teacher = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0", "--out", str(out)]
    assert main(["pipeline", "--config", str(cfg), *teacher]) == 2
    assert capsys.readouterr().err == (f"selfinstruct pipeline: error: {cfg}: field 'tune.target_modules': is an empty "
                                       "list: leave it out for PEFT's choice, or name the modules (all-linear for every "
                                       "linear layer)\n")
    out.mkdir()
    (out / "adapter").write_text("x")
    assert main(["pipeline", *teacher]) == 2
    assert capsys.readouterr().err == (f"selfinstruct pipeline: error: {out / 'adapter'}: exists and is a file, not a "
                                       f"folder: move or delete what {out / 'adapter'} holds (the tune saves there; a new "
                                       "--out would start a new run)\n")
    assert (out / "adapter").read_text() == "x"
