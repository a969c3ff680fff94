"""Tuning: a real LoRA run on the offline SmolLM2-135M, response-only labels, and clean errors."""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub from tests

import pytest
import yaml
from conftest import write_run

from selfinstruct import sft
from selfinstruct.cli import main
from selfinstruct.config import UserError
from selfinstruct.export import read_conversations

# Four tasks repeated: small enough for a few CPU steps, repetitive enough for the loss to fall.
TASKS = [
    {"instruction": "What is the secret word?", "input": "", "output": "The secret word is pineapple."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name the color of the sky.", "input": "", "output": "The sky is blue."},
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
]

# The same twelve rows, each its own instruction: the held-out split takes single rows of them.
DISTINCT = [dict(t, instruction=f"{t['instruction']} (#{k})") for k in range(3) for t in TASKS]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads spin-wait on each other
    (measured: the LoRA test took 100 s with two threads, 20 s with one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def student(request, tmp_path_factory) -> Path:
    """The converted SmolLM2 folder; cached in .pytest_cache unless SELFINSTRUCT_CACHE is set."""
    old = os.environ.get("SELFINSTRUCT_CACHE")
    if not old:
        cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
        folder = cache.mkdir("selfinstruct") if cache else tmp_path_factory.mktemp("selfinstruct-cache")
        os.environ["SELFINSTRUCT_CACHE"] = str(folder)
    yield sft.default_student_dir()
    if not old:
        os.environ.pop("SELFINSTRUCT_CACHE", None)


@pytest.fixture(scope="session")
def tokenizer(student):
    return sft.load_tokenizer(str(student))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, student, tokenizer) -> Path:
    """A random 1-layer Llama with SmolLM2's tokenizer: fast, for the unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_default_student_is_a_plain_model_folder(student):
    assert (student / "config.json").exists() and (student / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((student / "config.json").read_text())
    assert sft.default_student_dir() == student  # cached: the second call converts nothing
    assert not [p for p in student.parent.iterdir() if ".tmp-" in p.name]


def test_split_holds_out_three_percent_and_at_least_one_row():
    assert [len(p) for p in sft.split_rows(list(range(9)), 0.03, 0)] == [9, 0]
    assert [len(p) for p in sft.split_rows(list(range(10)), 0.03, 0)] == [9, 1]
    assert [len(p) for p in sft.split_rows(list(range(200)), 0.03, 0)] == [194, 6]
    assert [len(p) for p in sft.split_rows(list(range(200)), 0.0, 0)] == [200, 0]
    assert sft.split_rows(list(range(50)), 0.1, 7) == sft.split_rows(list(range(50)), 0.1, 7)


# Self-instruct's instances: 20 tasks, each with two inputs, are 40 rows of 20 instructions.
INSTANCES = [{"instruction": f"Task {k}: add one to the number.", "input": str(n), "output": str(n + 1)}
             for k in range(20) for n in (k, k + 100)]


def test_the_held_out_split_keeps_an_instructions_rows_together(tiny_model_dir, tmp_path):
    """The split was per row: with several rows to an instruction, every held-out row's instruction was
    trained on too (under another input), yet `try --heldout` promises rows the tune never saw."""
    from rich.console import Console

    run = write_run(tmp_path / "run", INSTANCES)
    opts = sft.TuneOptions(model=str(tiny_model_dir), max_steps=1, batch_size=4, max_length=64, eval_ratio=0.1)
    summary = sft.tune(run, tmp_path / "tuned", opts, console=Console(file=io.StringIO()))
    held = [json.loads(line) for line in (tmp_path / "tuned" / "heldout.jsonl").read_text().splitlines()]
    trained = [r for r in INSTANCES if r not in held]
    assert len(held) == summary["heldout"] == 4  # about 10% of the rows: two instructions' two rows each
    assert not {r["instruction"] for r in held} & {r["instruction"] for r in trained}, held
    # Seeded, and one instruction's rows go together whatever their number; a conversation by its first user turn.
    convs = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
             for r in INSTANCES + INSTANCES[:6]]
    for seed in range(5):
        train, held = sft.split_rows(convs, 0.1, seed, key=sft.instruction_of)
        assert sft.split_rows(convs, 0.1, seed, key=sft.instruction_of) == (train, held)
        assert 2 <= len(held) <= 6 and len(train) + len(held) == 46
        asked = lambda part: {c["messages"][0]["content"] for c in part}  # noqa: E731
        assert not asked(train) & asked(held), seed


def test_checkpoints_of_a_tune_that_split_rows_one_by_one_are_one_line_unless_the_split_is_the_same(
        tiny_model_dir, tmp_path, capsys):
    """A tune before the split by instruction recorded no split in tune.json. On rows of distinct
    instructions its split is this one's, and it resumes; on repeated instructions it held out other
    rows, and a rerun is one line saying why, not 'the data differs' from the same data."""
    from conftest import snapshot

    for rows, resumes in ((DISTINCT, True), (INSTANCES, False)):
        run = write_run(tmp_path / f"run-{resumes}", rows)
        out = tmp_path / f"tuned-{resumes}"
        argv = ["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "1",
                "--save-steps", "1", "--batch-size", "4", "--max-length", "64", "--eval-ratio", "0.1"]
        assert main(argv) == 0, capsys.readouterr().err
        record = out / "checkpoints" / "tune.json"
        old = json.loads(record.read_text())
        assert old.pop("split") == "instruction"
        examples = [sft.to_example(c, True) for c in read_conversations(run)]
        old["data_sha256"] = sft.data_sha256(*sft.split_rows(examples, 0.1, 42))  # as the old tune hashed its split
        record.write_text(json.dumps(old))
        capsys.readouterr()
        before = snapshot(out)
        if resumes:
            assert main(argv) == 0, capsys.readouterr().err
            assert "resuming from" in capsys.readouterr().out
        else:
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"{out / 'checkpoints'}: holds checkpoints of a tune that held out rows " \
                "one by one" in err and "choose another --out" in err, err
            assert snapshot(out) == before


def test_alpaca_prompt_has_an_input_variant():
    with_input = sft.alpaca_prompt("Add the numbers.", "2 + 3")
    assert "paired with an input" in with_input and "### Input:\n2 + 3\n\n### Response:\n" in with_input
    without = sft.alpaca_prompt("Name a color.")
    assert "### Input:" not in without and without.endswith("### Instruction:\nName a color.\n\n### Response:\n")
    # A one-turn conversation without a chat template gets exactly the no-input Alpaca prompt.
    assert sft.plain_prompt([{"role": "user", "content": "Name a color."}]) == without


def labelled_tokens(model_dir, tokenizer, rows, chat: bool, tmp_path):
    """(input_ids, labels) of each row, as the SFTTrainer built by `tune` prepares them."""
    from transformers import AutoModelForCausalLM

    tokenizer = sft.load_tokenizer(str(model_dir))
    if not chat:
        tokenizer.chat_template = None
    convs = [{"messages": [{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")},
                           {"role": "assistant", "content": r["output"]}], "alpaca": r} for r in rows]
    examples = [sft.to_example(c, chat) for c in convs]
    trainer = sft.make_trainer(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, examples, [],
                               sft.TuneOptions(max_steps=1), tmp_path)
    return tokenizer, [(r["input_ids"], r["labels"]) for r in trainer.train_dataset]


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "alpaca-prompt"])
def test_only_the_response_and_eos_carry_labels(tiny_model_dir, tokenizer, chat, tmp_path):
    tok, rows = labelled_tokens(tiny_model_dir, tokenizer, TASKS, chat, tmp_path)
    for task, (ids, labels) in zip(TASKS, rows):
        kept = [i for i, lab in zip(ids, labels) if lab != -100]
        assert all(lab in (-100, i) for i, lab in zip(ids, labels))
        # Everything before the reply is masked; the reply and the end token are learned.
        first = labels.index(next(lab for lab in labels if lab != -100))
        assert all(lab == -100 for lab in labels[:first])
        assert all(lab != -100 for lab in labels[first:])
        assert tok.decode(kept).strip().startswith(task["output"])
        assert tok.eos_token_id in kept
        prompt = tok.decode(ids[:first])
        assert task["instruction"] in prompt and task["output"] not in prompt
        if not chat:
            assert ids[-1] == tok.eos_token_id and ("### Input:" in prompt) == bool(task["input"])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_checkpointing_is_set_as_asked_without_a_deprecation_warning(tiny_model_dir, tokenizer, tmp_path,
                                                                                checkpointing):
    """transformers 5 warned on every tune that gradient_checkpointing is deprecated (TRL's config sets it
    to True unless told); the setting is passed by its new name, and is still the one asked for."""
    from transformers import AutoModelForCausalLM

    examples = [sft.to_example({"messages": [{"role": "user", "content": t["instruction"]},
                                             {"role": "assistant", "content": t["output"]}]}, True) for t in TASKS]
    opts = sft.TuneOptions(max_steps=1, batch_size=2, max_length=64, gradient_checkpointing=checkpointing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = sft.make_trainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, examples, [],
                                   opts, tmp_path)
        trainer.train()
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []
    assert trainer.args.activation_checkpointing is checkpointing
    assert trainer.model.get_base_model().is_activation_checkpointing is checkpointing


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_tune_a_local_model_then_try_it(tiny_model_dir, tmp_path, capsys, full):
    run = write_run(tmp_path / "run", DISTINCT)
    out = tmp_path / "tuned"
    code = main(["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--max-length", "64"] + (["--full"] if full else []))
    assert code == 0, capsys.readouterr().err
    assert (out / "config.json").exists() == full and (out / "adapter_config.json").exists() != full
    assert (out / "tune_config.yaml").exists() and (out / "log_history.json").exists()
    assert not (out / "checkpoints").exists()
    # Both kinds get selfinstruct's model card, an adapter's written over PEFT's template.
    card = (out / "README.md").read_text(encoding="utf-8")
    header = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in header  # a local base: no hub id
    assert f"`{tiny_model_dir.name}`" in card and str(tmp_path) not in card and str(tiny_model_dir) not in card
    assert "on `run`: 11 training rows, 1 row held out" in card and "2 steps" in card
    assert "[More Information Needed]" not in card
    if full:
        assert header["library_name"] == "transformers"
        assert "peft" not in card and "base_model:adapter" not in card
        assert f"# Full fine-tune of `{tiny_model_dir.name}`" in card
    else:
        assert header["library_name"] == "peft" and f"# LoRA adapter for `{tiny_model_dir.name}`" in card
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:  # PEFT's read of a deprecated name warned on each try
        warnings.simplefilter("always")
        assert main(["try", str(out), "--compare", "--max-new-tokens", "4", "Name the color of the sky."]) == 0
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []
    printed = capsys.readouterr().out
    assert "Name the color of the sky." in printed and "tuned" in printed and "base: " in printed
    assert "1 answer in " in printed  # not '1 answers'


def test_a_lora_adapters_card_and_its_checkpoints_say_how_it_was_tuned(tiny_model_dir, tmp_path, capsys):
    """PEFT's save leaves its template card ('[More Information Needed]', tagged with the base model's
    path on this machine) in the adapter folder and in each checkpoint, and a user who pushes either
    publishes it: the tune writes its own card over each, with the settings and rows it trained on."""
    run = write_run(tmp_path / "run", DISTINCT)
    data = tmp_path / "pub" / "data.jsonl"
    data.parent.mkdir()
    assert main(["export", run, "--format", "jsonl", "--out", str(data), "--card", "--name", "Pineapple facts"]) == 0
    out = tmp_path / "tuned"
    code = main(["tune", str(data), "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "2",
                 "--save-steps", "1", "--batch-size", "2", "--max-length", "64", "--lora-r", "4", "--lora-alpha", "8",
                 "--lora-dropout", "0.1", "--target-modules", "q_proj", "v_proj", "--seed", "7", "--eval-ratio", "0.2"])
    assert code == 0, capsys.readouterr().err
    checkpoints = out / "checkpoints"
    assert not (checkpoints / "README.md").exists()  # TRL's card of the folder of checkpoints, no model
    for folder, step in ((out, None), (checkpoints / "checkpoint-1", 1), (checkpoints / "checkpoint-2", 2)):
        card = (folder / "README.md").read_text(encoding="utf-8")
        header = yaml.safe_load(card.split("---\n")[1])
        assert header["library_name"] == "peft" and "lora" in header["tags"] and "base_model" not in header
        assert "[More Information Needed]" not in card and str(tmp_path) not in card, folder
        assert f"# LoRA adapter for `{tiny_model_dir.name}`" in card
        assert "| LoRA | r 4, alpha 8, dropout 0.1; target modules `q_proj`, `v_proj` |" in card
        assert "on `pub/data.jsonl`: 10 training rows, 2 rows held out" in card  # 12 rows, 20% held out
        assert "| Seed | 7 |" in card and "| Max length | 64 tokens |" in card and "| Batch size | 2 " in card
        assert "Pineapple facts" in card  # the dataset's own card, beside the data
        assert "PeftModel.from_pretrained(base, " in card and "| selfinstruct | " in card
        assert ("checkpoint at step" in card) == (step is not None)
        if step:
            assert f"checkpoint at step {step} of 2" in card
        else:
            assert "| Eval loss | " in card and "| Train loss | " in card


def _card(model: str, source, full: bool = False, **facts) -> tuple[dict, str]:
    """(header, text) of the card a tune of ``model`` on ``source`` writes, with made-up facts."""
    opts = sft.TuneOptions(model=model, full=full, lr=1e-3, max_steps=40, **({} if full else {
        "lora_r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    log = [{"loss": 2.5, "step": 39}, {"eval_loss": 1.23456, "step": 40}]
    card = sft.tune_card(opts, source, **{"trained": 97, "held": 3, "steps": 40, "epoch": 1.6, "log": log, **facts})
    return yaml.safe_load(card.split("---\n")[1]), card


def test_a_full_tunes_card_names_a_hub_base_model_as_fine_tuned_from(tmp_path):
    header, card = _card("org/base-1b", tmp_path / "data.json", full=True)
    assert header["base_model"] == "org/base-1b" and header["base_model_relation"] == "finetune"
    assert header["library_name"] == "transformers"
    assert "full-fine-tune" in header["tags"] and "lora" not in header["tags"]
    assert f"on `{tmp_path.name}/data.json`: 97 training rows, 3 rows held out" in card and str(tmp_path) not in card
    assert "| Eval loss | 1.2346 (step 40) |" in card and "| Train loss | 2.5000 (step 39) |" in card
    # the offline student is converted from a GGUF: not the hub's weights, so no base_model
    assert "base_model" not in _card("smollm2", "run", full=True)[0]


def test_a_lora_adapters_card_loads_a_hub_base_model_by_its_name(tmp_path):
    header, card = _card("org/base-1b", tmp_path / "run")
    assert header["base_model"] == "org/base-1b" and header["base_model_relation"] == "adapter"
    assert header["library_name"] == "peft" and "lora" in header["tags"]
    assert "# LoRA adapter for `org/base-1b`" in card and str(tmp_path) not in card
    assert 'AutoModelForCausalLM.from_pretrained("org/base-1b")' in card and "PeftModel.from_pretrained(base, " in card
    assert "| LoRA | r 4, alpha 8, dropout 0.05; target modules `q_proj`, `v_proj` |" in card
    assert "| Learning rate | 0.001, cosine schedule, warmup ratio 0.03 |" in card
    # A local base folder is named by its own name, never the machine's path to it.
    header, card = _card(str(tmp_path / "models" / "tiny"), "run")
    assert "base_model" not in header and "# LoRA adapter for `tiny`" in card and str(tmp_path) not in card
    # A checkpoint's card says which step it holds.
    assert "checkpoint at step 40 of 100" in _card("org/base-1b", "run", checkpoint_of=100)[1]


def test_a_model_card_quotes_only_the_dataset_card_export_wrote_for_that_file(tmp_path):
    from selfinstruct import card as cards

    for name in ("data.jsonl", "other.jsonl"):
        (tmp_path / name).write_text("")
    (tmp_path / "README.md").write_text(cards.render({}, 3, "jsonl", "data.jsonl", name="Pineapple facts"))
    assert sft.dataset_card_of(tmp_path / "data.jsonl")["title"] == "Pineapple facts"
    assert sft.dataset_card_of(tmp_path / "other.jsonl") is None  # the card beside it is data.jsonl's
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# My notes on data.jsonl\n")  # the user's own
    assert sft.dataset_card_of(tmp_path / "data.jsonl") is None


def test_a_second_tune_into_a_folder_in_use_is_refused_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    """Two tunes into one --out would leave one's weights beside the other's config and held-out
    rows. While another process holds the folder's lock, a tune is one line, rc 2, and writes nothing."""
    import fcntl

    from selfinstruct.datafiles import LOCK

    run = write_run(tmp_path / "run", TASKS * 3)
    out = tmp_path / "tuned"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)  # another open file description: as another process's lock
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        code = main(["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "1",
                     "--batch-size", "2", "--max-length", "64"])
    finally:
        os.close(fd)
    err = capsys.readouterr().err.splitlines()[-1]  # after the model loader's progress bar
    assert code == 2 and err.startswith("selfinstruct tune: error: ") and f"{out}: in use by" in err, err
    assert [p.name for p in out.iterdir()] == [LOCK]


def _stop_at_step(n: int):
    """A TrainerCallback that stops the tune as Ctrl-C would, when step ``n`` begins."""
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == n:
                raise KeyboardInterrupt

    return Stop()


def test_a_failed_tune_takes_back_what_it_made_and_nothing_else(tiny_model_dir, tmp_path):
    """A tune stopped before it saved anything of value leaves no heldout.jsonl (which would mark
    --out as a tune's) nor the folders it made; a file that was there before stays; one that
    saved a checkpoint keeps it, with its held-out rows."""
    from rich.console import Console

    run = write_run(tmp_path / "run", TASKS * 3)
    opts = sft.TuneOptions(model=str(tiny_model_dir), max_steps=3, batch_size=2, max_length=64)
    quiet = Console(file=io.StringIO())
    out = tmp_path / "new" / "tuned"
    with pytest.raises(KeyboardInterrupt):
        sft.tune(run, out, opts, console=quiet, callbacks=[_stop_at_step(1)])
    assert not (tmp_path / "new").exists(), sorted(str(p) for p in (tmp_path / "new").rglob("*"))
    mine = tmp_path / "mine"  # the user's own empty folder, and an earlier tune's held-out rows
    mine.mkdir()
    with pytest.raises(KeyboardInterrupt):
        sft.tune(run, mine, opts, console=quiet, callbacks=[_stop_at_step(1)])
    assert mine.is_dir() and not [p.name for p in mine.iterdir() if p.name != ".selfinstruct-lock"]
    (mine / "heldout.jsonl").write_text("{}\n")
    with pytest.raises(KeyboardInterrupt):
        sft.tune(run, mine, opts, console=quiet, callbacks=[_stop_at_step(1)])
    # The earlier tune's rows are as they were: the new split is swapped in only with the new model.
    assert (mine / "heldout.jsonl").read_text() == "{}\n" and not (mine / sft.NEW_HELDOUT).exists()
    summary = sft.tune(run, mine, opts, console=quiet)
    held = [json.loads(line) for line in (mine / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == summary["heldout"] > 0 and held != [{}] and not (mine / sft.NEW_HELDOUT).exists()
    kept = tmp_path / "kept"
    with pytest.raises(KeyboardInterrupt):
        sft.tune(run, kept, opts.model_copy(update={"save_steps": 1}), console=quiet, callbacks=[_stop_at_step(2)])
    assert (kept / "checkpoints" / "checkpoint-1").is_dir() and (kept / "heldout.jsonl").is_file()


# `selfinstruct tune ARGV`, killed with SIGKILL the moment it has saved checkpoint-2: no finally, no cleanup.
KILLED_AFTER_CHECKPOINT_2 = """
import os, signal, sys
from transformers import TrainerCallback
from selfinstruct import cli, sft

class Kill(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGKILL)

real = sft.tune
sft.tune = lambda *a, **k: real(*a, **k, callbacks=[Kill()])
sys.exit(cli.main(sys.argv[1:]))
"""


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_a_killed_tune_rerun_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path, capsys):
    """kill -9 after checkpoint-2 of 4, then the same command: it says where it resumes, trains steps
    3 and 4 only, and saves the adapter an uninterrupted tune of the same seed saves."""
    import re
    import subprocess
    import sys

    run = write_run(tmp_path / "run", TASKS * 3)
    out = tmp_path / "tuned"
    argv = ["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "4", "--save-steps", "1",
            "--logging-steps", "1", "--batch-size", "2", "--max-length", "64"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_CHECKPOINT_2, *argv], capture_output=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-3000:]
    checkpoints = out / "checkpoints"
    saved = lambda: sorted(p.name for p in checkpoints.glob("*-*"))  # noqa: E731 (TRL adds a README.md)
    assert saved() == ["checkpoint-1", "checkpoint-2"] and (checkpoints / "tune.json").is_file()
    assert not (out / "adapter_model.safetensors").exists()

    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"resuming from {checkpoints / 'checkpoint-2'} (step 2 of 4)" in printed, printed
    assert re.findall(r"step +(\d+)/4  loss", printed) == ["3", "4"]  # only the steps left
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]  # the killed run's, then this one's
    assert saved() == [f"checkpoint-{k}" for k in (1, 2, 3, 4)] and (checkpoints / "tune.json").is_file()

    straight = tmp_path / "straight"
    assert main([*argv[:5], str(straight), *argv[6:]]) == 0, capsys.readouterr().err
    resumed, expected = _weights(out), _weights(straight)
    assert resumed.keys() == expected.keys()
    diff = max((resumed[k] - expected[k]).abs().max().item() for k in expected)
    print(f"resumed vs uninterrupted adapter: max abs difference {diff:.3g}")
    assert diff <= 1e-6, diff
    halfway = _weights(checkpoints / "checkpoint-2")  # the comparison sees the last two steps' updates
    assert max((halfway[k] - expected[k]).abs().max().item() for k in expected) > 1e-4


def test_checkpoints_of_another_tune_are_one_line_and_left_as_they_are(tiny_model_dir, tmp_path, capsys):
    """A tune into a folder whose checkpoints another tune made (another option, other data, or no
    record at all) would mix the two; it names what differs, exits 2 and changes nothing."""
    from conftest import snapshot

    run = write_run(tmp_path / "run", TASKS * 3)
    out = tmp_path / "tuned"
    argv = ["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "2", "--save-steps", "1",
            "--batch-size", "2", "--max-length", "64"]
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((out / "checkpoints" / "tune.json").read_text())
    assert record["options"]["lr"] == 2e-4 and record["options"]["max_steps"] == 2 and len(record["data_sha256"]) == 64
    capsys.readouterr()
    before = snapshot(out)

    def refused(args, said):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("selfinstruct tune: error: ") and err.count("\n") == 1 and said in err, err
        assert snapshot(out) == before
        return err

    err = refused(argv + ["--lr", "1e-3"], "--lr differs from the tune that made")
    assert "(0.0002 there, 0.001 now)" in err and "run the same command on the same data" in err
    assert f"delete {out / 'checkpoints'}" in err and "another --out" in err
    cfg = tmp_path / "tune.yaml"
    cfg.write_text("lora_r: 8\n")
    refused(argv + ["--config", str(cfg)], f"{cfg}: field 'lora_r' differs")
    other = write_run(tmp_path / "other", [dict(t, output=t["output"] + "!") for t in TASKS * 3])
    refused([argv[0], other, *argv[2:]], "the data differs from the rows the tune that made")
    refused(argv + ["--seed", "7"], "--seed differs")  # the same rows, split and shuffled otherwise

    # Logging and checkpoint cadence may change: the finished tune resumes at its end and saves again.
    assert main(argv + ["--logging-steps", "5", "--save-steps", "3"]) == 0, capsys.readouterr().err
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'} (step 2 of 2)" in capsys.readouterr().out

    (out / "checkpoints" / "tune.json").unlink()  # as a tune before this version left them
    before = snapshot(out)
    refused(argv, "holds checkpoints with no record of how they were made")


def test_a_finished_tune_rerun_trains_no_step_past_its_end(tiny_model_dir, tmp_path, capsys):
    """The Trainer checks --max-steps only after a step, so a resume from the last checkpoint (a
    finished tune rerun, or one killed during its final save) would train one more step. With a
    constant learning rate that step changes the weights; the rerun must save the same adapter."""
    run = write_run(tmp_path / "run", TASKS * 3)
    out = tmp_path / "tuned"
    argv = ["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "2", "--save-steps", "1",
            "--lr-scheduler", "constant", "--batch-size", "2", "--max-length", "64"]
    assert main(argv) == 0, capsys.readouterr().err
    first = _weights(out)
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'} (step 2 of 2)" in printed, printed
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    again = _weights(out)
    assert max((again[k] - first[k]).abs().max().item() for k in first) == 0.0
    assert json.loads((out / "log_history.json").read_text())[-1].get("step") == 2


def test_a_resume_takes_the_same_model_folder_however_it_is_spelled(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--model ./tiny/ and --model /abs/tiny are one model: a rerun naming it either way resumes;
    another folder is still refused."""
    import shutil

    run = write_run(tmp_path / "run", TASKS * 3)
    out = tmp_path / "tuned"
    rest = ["--out", str(out), "--max-steps", "2", "--save-steps", "1", "--batch-size", "2", "--max-length", "64"]
    assert main(["tune", run, "--model", str(tiny_model_dir), *rest]) == 0, capsys.readouterr().err
    capsys.readouterr()
    monkeypatch.chdir(tiny_model_dir.parent)
    assert main(["tune", run, "--model", f"./{tiny_model_dir.name}/", *rest]) == 0, capsys.readouterr().err
    assert "resuming from" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert main(["tune", run, "--model", str(copy), *rest]) == 2
    assert "--model differs" in capsys.readouterr().err


def test_a_resume_skips_a_checkpoint_cut_short_and_a_failed_resume_keeps_the_checkpoints(tiny_model_dir, tmp_path,
                                                                                         capsys):
    """The Trainer writes a checkpoint in place, its trainer_state.json last: one without it was cut
    short by a kill and is not resumed from. A resume stopped before its next checkpoint takes back
    only what it made."""
    from rich.console import Console

    from conftest import snapshot

    run = write_run(tmp_path / "run", TASKS * 3)
    opts = sft.TuneOptions(model=str(tiny_model_dir), max_steps=4, save_steps=1, batch_size=2, max_length=64)
    out = tmp_path / "tuned"
    quiet = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        sft.tune(run, out, opts, console=Console(file=quiet), callbacks=[_stop_at_step(3)])
    (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").unlink()  # as a kill mid-save leaves it
    before = snapshot(out)
    with pytest.raises(KeyboardInterrupt):
        sft.tune(run, out, opts, console=Console(file=quiet), callbacks=[_stop_at_step(2)])
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-1'} (step 1 of 4)" in quiet.getvalue()
    assert snapshot(out) == before and not (out / sft.NEW_HELDOUT).exists()
    # Resumed with another --save-steps, it saves at steps 3 and 4 (the end), not at each step as the checkpoints did.
    assert sft.tune(run, out, opts.model_copy(update={"save_steps": 3}), console=Console(file=quiet))["steps"] == 4
    checkpoints = out / "checkpoints"
    assert [(checkpoints / f"checkpoint-{k}" / "trainer_state.json").exists() for k in (1, 2, 3, 4)] == [True, False, True, True]


@pytest.mark.parametrize("damaged", ["optimizer.pt", "adapter_model.safetensors"])
def test_a_checkpoint_damaged_by_hand_is_one_line_naming_it(tiny_model_dir, tmp_path, capsys, damaged):
    """The Trainer's saves are whole, but a file cut by hand (a copy stopped short, an edit) made the
    resume a torch or safetensors traceback. It is one line naming the checkpoint and what to do,
    changes nothing, and deleting that checkpoint resumes from the one before."""
    from rich.console import Console

    from conftest import snapshot

    run = write_run(tmp_path / "run", TASKS * 3)
    out = tmp_path / "tuned"
    opts = sft.TuneOptions(model=str(tiny_model_dir), max_steps=4, save_steps=1, batch_size=2, max_length=64)
    with pytest.raises(KeyboardInterrupt):
        sft.tune(run, out, opts, console=Console(file=io.StringIO()), callbacks=[_stop_at_step(3)])
    checkpoint = out / "checkpoints" / "checkpoint-2"
    with open(checkpoint / damaged, "r+b") as f:
        f.truncate(100)
    before = snapshot(out)
    argv = ["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "4", "--save-steps", "1",
            "--batch-size", "2", "--max-length", "64"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.splitlines()[-1]  # after transformers' loading bar
    assert line.startswith(f"selfinstruct tune: error: {checkpoint}: a file there does not load (") and \
        line.endswith("delete that checkpoint folder to resume from the one before, or choose another --out"), line
    assert snapshot(out) == before
    import shutil

    shutil.rmtree(checkpoint)
    assert main(argv) == 0, capsys.readouterr().err
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-1'} (step 1 of 4)" in capsys.readouterr().out


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_checkpoint_missing_a_state_file_is_one_line_not_a_fresh_optimizer(tiny_model_dir, tmp_path, capsys,
                                                                              missing):
    """Without optimizer.pt or scheduler.pt the Trainer resumes with a fresh AdamW and the schedule at
    step 0 (it loads neither without both), without rng_state.pth with other dropout masks: another
    run than the one the checkpoint's tune would have made, and it said nothing. It is one line naming
    the checkpoint and the file, and nothing changes."""
    from rich.console import Console

    from conftest import snapshot

    run = write_run(tmp_path / "run", TASKS * 3)
    out = tmp_path / "tuned"
    opts = sft.TuneOptions(model=str(tiny_model_dir), max_steps=4, save_steps=1, batch_size=2, max_length=64)
    with pytest.raises(KeyboardInterrupt):
        sft.tune(run, out, opts, console=Console(file=io.StringIO()), callbacks=[_stop_at_step(3)])
    checkpoint = out / "checkpoints" / "checkpoint-2"
    (checkpoint / missing).unlink()
    before = snapshot(out)
    argv = ["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "4", "--save-steps", "1",
            "--batch-size", "2", "--max-length", "64"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = err.splitlines()[-1]
    assert "Traceback" not in err and line.startswith(f"selfinstruct tune: error: {checkpoint}: lacks {missing}"), err
    assert line.endswith("delete that checkpoint folder to resume from the one before, or choose another --out"), line
    assert snapshot(out) == before


def test_epochs_may_differ_on_resume_when_max_steps_is_set(tiny_model_dir, tmp_path, capsys):
    """With --max-steps the Trainer takes its steps, schedule and epochs from it alone: a resume with
    another --epochs goes on and saves what an uninterrupted tune saves. Without --max-steps, --epochs
    sets the steps, and another value is still refused."""
    from rich.console import Console

    run = write_run(tmp_path / "run", TASKS * 3)  # 11 training rows: 6 steps an epoch
    opts = sft.TuneOptions(model=str(tiny_model_dir), max_steps=4, save_steps=1, batch_size=2, max_length=64)
    out = tmp_path / "tuned"
    quiet = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        sft.tune(run, out, opts, console=Console(file=quiet), callbacks=[_stop_at_step(3)])
    # 0.5 epochs would be 3 steps, were it counted
    assert sft.tune(run, out, opts.model_copy(update={"epochs": 0.5}), console=Console(file=quiet))["steps"] == 4
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'} (step 2 of 4)" in quiet.getvalue()
    straight = tmp_path / "straight"
    sft.tune(run, straight, opts.model_copy(update={"save_steps": None}), console=Console(file=quiet))
    resumed, expected = _weights(out), _weights(straight)
    assert max((resumed[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6

    small = write_run(tmp_path / "small", TASKS)  # 4 rows, none held out: one step an epoch
    argv = ["tune", small, "--model", str(tiny_model_dir), "--out", str(tmp_path / "by-epochs"), "--save-steps", "1",
            "--batch-size", "4", "--max-length", "64", "--epochs", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([*argv[:-1], "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--epochs differs from the tune that made" in err, err


def test_a_one_step_tune_trains_its_step_though_a_warmup_would_take_it(tiny_model_dir, tmp_path):
    """transformers rounds the warmup up (ceil(0.03 x 1) = 1 step), and a warmup's first step runs at
    learning rate 0: a one-step tune saved an adapter identical to its base (every lora_B still 0)."""
    from rich.console import Console

    run = write_run(tmp_path / "run", TASKS)
    opts = sft.TuneOptions(model=str(tiny_model_dir), max_steps=1, batch_size=4, max_length=64, logging_steps=1)
    sft.tune(run, tmp_path / "tuned", opts, console=Console(file=io.StringIO()))
    lora_b = {k: v for k, v in _weights(tmp_path / "tuned").items() if "lora_B" in k}
    assert lora_b and all(v.abs().max().item() > 0 for v in lora_b.values()), lora_b.keys()


def test_a_fresh_tune_stopped_before_its_first_checkpoint_leaves_no_tune_record(tiny_model_dir, tmp_path):
    from rich.console import Console

    from selfinstruct.datafiles import run_lock

    run = write_run(tmp_path / "run", TASKS * 3)
    opts = sft.TuneOptions(model=str(tiny_model_dir), max_steps=3, save_steps=2, batch_size=2, max_length=64)
    quiet = Console(file=io.StringIO())
    out = tmp_path / "tuned"
    out.mkdir()
    (out / "heldout.jsonl").write_text("{}\n")  # an earlier tune's folder: its rows beside the lock it held
    with run_lock(out, "tune"):
        pass
    with pytest.raises(KeyboardInterrupt):
        sft.tune(run, out, opts, console=quiet, callbacks=[_stop_at_step(2)])  # step 1 done, no checkpoint yet
    assert sorted(p.name for p in out.iterdir()) == [".selfinstruct-lock", "heldout.jsonl"]
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "tune.json").write_text("{}")  # a record beside no checkpoint: of no tune
    with pytest.raises(KeyboardInterrupt):
        sft.tune(run, out, opts, console=quiet, callbacks=[_stop_at_step(2)])
    assert not (out / "checkpoints" / "tune.json").exists()


@pytest.mark.parametrize("argv, said", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["ad", "hello", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: ADAPTER_DIR"),
    (["--heldout", "2", "--compare"], "the following arguments are required: ADAPTER_DIR"),
])
def test_try_names_an_unknown_flag_and_asks_only_for_adapter_dir(capsys, argv, said):
    """`try --bogus` was told 'the following arguments are required: ADAPTER_DIR, INSTRUCTION': the
    optional INSTRUCTION listed as required, and --bogus never named. --help still shows ADAPTER_DIR required."""
    try:
        code = main(["try", *argv])
    except SystemExit as e:  # argparse's own refusals exit from the parser
        code = e.code
    assert code == 2
    assert capsys.readouterr().err == f"selfinstruct try: error: {said} (see selfinstruct try --help)\n"
    with pytest.raises(SystemExit):
        main(["try", "--help"])
    assert " ADAPTER_DIR [INSTRUCTION ...]\n" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["ad", "--compare", "Give three tips for sleeping better."],  # README's own example and tune's hint
    ["ad", "--model", "m", "--max-new-tokens", "5", "Give three tips for sleeping better."],
    ["--compare", "--model", "m", "ad", "Give three tips for sleeping better."],
    ["ad", "Give three tips for sleeping better.", "--compare", "Name a color."],
], ids=["readme", "flags-between", "flags-first", "mixed"])
def test_try_takes_instructions_after_flags(monkeypatch, argv):
    seen = {}
    monkeypatch.setattr(sft, "run_try", lambda args: seen.update(vars(args)) or 0)
    assert main(["try", *argv]) == 0
    assert seen["tuned"] == "ad" and seen["instructions"][0] == "Give three tips for sleeping better."
    assert seen["instructions"][1:] == (["Name a color."] if "Name a color." in argv else [])
    assert seen["compare"] == ("--compare" in argv) and seen["max_new_tokens"] == (5 if "5" in argv else 256)


def test_try_an_empty_instruction_is_one_line_before_any_model_loads(monkeypatch, capsys):
    monkeypatch.setattr(sft, "load_tuned", lambda *a: pytest.fail("the model loaded"))
    assert main(["try", "ad", "Name a color.", "  "]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "INSTRUCTION 2 is empty" in err, err


@pytest.mark.parametrize("value, said", [(str(10**20), "--max-new-tokens must be at most 16,777,216"),
                                         (str(sft.MAX_LENGTH), "no-such-adapter")])
def test_try_max_new_tokens_past_any_context_is_one_line_before_any_model_loads(tmp_path, capsys, value, said):
    """try --max-new-tokens 10**20 was taken: the model loaded and wrote on past its context (a tiny model
    that never ends its answer ran until killed). The bound itself passes to the adapter's own check."""
    assert main(["try", str(tmp_path / "no-such-adapter"), "hello", "--max-new-tokens", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err, err


@pytest.mark.parametrize("value", ["inf", "nan", "1e300", "-1"])
def test_try_temperature_past_any_sampling_is_one_line_before_any_model_loads(tmp_path, capsys, value):
    """try --temperature inf and nan were taken: the model loaded and answered (rc 0) with logits divided by inf,
    or by nan. A temperature must be a number from 0 (greedy) to 100, said before any model or adapter is read."""
    assert main(["try", str(tmp_path / "no-such-adapter"), "hello", "--temperature", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--temperature must be a number from 0 to 100" in err, err


def test_try_loads_the_kind_the_last_tune_recorded(tiny_model_dir, tmp_path, capsys):
    """A folder holding both an adapter and a full model (left by an older version) loads the kind
    its tune_config.yaml names, not always the adapter."""
    import shutil

    import yaml

    run = write_run(tmp_path / "run", TASKS)
    out = tmp_path / "tuned"
    assert main(["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--max-length", "64"]) == 0, capsys.readouterr().err
    assert hasattr(sft.load_tuned(out)[0], "disable_adapter")  # the LoRA tune's adapter
    for name in ("config.json", "model.safetensors"):  # a later full tune's model, as an older version left it
        shutil.copy(tiny_model_dir / name, out / name)
    cfg = yaml.safe_load((out / "tune_config.yaml").read_text())
    (out / "tune_config.yaml").write_text(yaml.safe_dump(dict(cfg, full=True)))
    model, _, base = sft.load_tuned(out)
    assert not hasattr(model, "disable_adapter") and base == str(tiny_model_dir)
    (out / "tune_config.yaml").write_text(yaml.safe_dump(dict(cfg, full=False)))
    assert hasattr(sft.load_tuned(out)[0], "disable_adapter")


def test_try_finds_a_base_model_given_as_a_relative_folder_from_any_folder(tiny_model_dir, tmp_path, capsys,
                                                                           monkeypatch):
    """tune_config.yaml records a local --model as its absolute path, so `try` run elsewhere finds it;
    a recorded base that is not there is one line saying to pass --model. Hub ids stay as typed."""
    import yaml

    run = write_run(tmp_path / "run", TASKS)
    out = tmp_path / "tuned"
    monkeypatch.chdir(tiny_model_dir.parent)
    assert main(["tune", run, "--model", f"./{tiny_model_dir.name}", "--out", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--max-length", "64"]) == 0, capsys.readouterr().err
    cfg = yaml.safe_load((out / "tune_config.yaml").read_text())
    assert cfg["model"] == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["try", str(out), "--max-new-tokens", "2", "Name a color."]) == 0, capsys.readouterr().err
    for gone in ("./gone", "gone/model"):  # a folder recorded relative to where an older tune ran
        (out / "tune_config.yaml").write_text(yaml.safe_dump(dict(cfg, model=gone)))
        assert main(["try", str(out), "--max-new-tokens", "2", "Name a color."]) == 2
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith(f"selfinstruct try: error: {out}: the base model its tune recorded cannot be found (")
        assert gone in err and err.endswith("pass --model with the base model's folder or hub id"), err
    assert main(["try", str(out), "--model", str(tiny_model_dir), "--max-new-tokens", "2", "Name a color."]) == 0
    assert sft.model_as_recorded("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert sft.model_as_recorded("smollm2") == "smollm2"


def test_unknown_target_modules_are_one_line_before_anything_is_read(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Checked on the model built from its config alone: before the data is read or a weight loaded."""
    import selfinstruct.export

    run = write_run(tmp_path / "run", TASKS)
    out = tmp_path / "tuned"
    argv = ["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "1", "--max-length", "64"]
    cfg = tmp_path / "tune.yaml"
    cfg.write_text("target_modules: [nope]\n")
    one = tmp_path / "one.yaml"  # one string is that one module, as the flag with one value (was 'not a valid list')
    one.write_text("target_modules: nope\n")
    with monkeypatch.context() as m:
        m.setattr(sft, "load_model", lambda *a, **k: pytest.fail("the model's weights loaded"))
        m.setattr(selfinstruct.export, "read_conversations", lambda *a, **k: pytest.fail("the data was read"))
        # Alone, PEFT fails mid-setup with a traceback; beside a good name, PEFT would silently skip the typo.
        for names, flag in ((["--target-modules", "nope"], "--target-modules"),
                            (["--target-modules", "nope", "q_proj"], "--target-modules"),
                            (["--config", str(cfg)], f"{cfg}: field 'target_modules'"),
                            (["--config", str(one)], f"{one}: field 'target_modules'")):
            assert main(argv + names) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith(f"selfinstruct tune: error: {flag}: ") and "'nope'" in err, err
            assert "q_proj" in err.split("linear layers are")[1] and "'q_proj'" not in err
            assert not out.exists()  # refused before heldout.jsonl
    assert main(argv + ["--target-modules", "all-linear"]) == 0, capsys.readouterr().err  # PEFT's shorthand
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"]


def test_bf16_without_a_gpu_for_it_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import transformers.utils

    # As on a CPU-only machine, where the Trainer would raise its own traceback mid-setup.
    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: False)
    monkeypatch.setattr(transformers.utils, "is_torch_xla_available", lambda: False)
    out = tmp_path / "out"
    argv = ["tune", write_run(tmp_path / "run", TASKS), "--out", str(out), "--bf16", "--model", str(tmp_path / "none")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfinstruct tune: error: --bf16: ") and err.count("\n") == 1, err
    assert not out.exists()


def test_try_a_damaged_adapter_is_one_line(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    assert main(["try", str(tmp_path), "hello"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading bar
    assert err == f"selfinstruct try: error: {tmp_path}: cannot load the adapter (KeyError: 'peft_type')"


def test_out_may_be_new_empty_or_a_previous_tune_but_not_a_folder_of_the_users(tmp_path):
    """A tune writes README.md, config and tokenizer files into --out: a folder holding files it
    did not write is refused; a new or empty folder, or an earlier tune's (datafiles.is_tune_folder:
    its tune_config.yaml, or its heldout.jsonl beside the lock a tune held, with PEFT's card), is
    tuned into again. A bare heldout.jsonl (export writes one too) does not make a folder a tune's."""
    from selfinstruct.datafiles import run_lock

    sft._check_not_users_folder(tmp_path / "new")
    sft._check_not_users_folder(tmp_path)  # empty
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in ("heldout.jsonl", "README.md", "adapter_config.json"):
        (earlier / name).write_text("")
    with pytest.raises(UserError, match=r"holds files a tune did not write \(README.md, adapter_config.json, "
                                        r"heldout.jsonl\); .* there: choose a new folder for --out$"):
        sft._check_not_users_folder(earlier)  # someone's own adapter, and rows exported beside it
    with pytest.raises(UserError, match=r"there: move it$"):
        sft.check_out_folder(earlier, False, "move it")  # the advice given (pipeline's)
    with run_lock(earlier, "tune"):
        pass
    sft._check_not_users_folder(earlier)  # the lock a tune held beside its heldout.jsonl
    (earlier / "heldout.jsonl").unlink()
    (earlier / "tune_config.yaml").write_text("")
    sft._check_not_users_folder(earlier)


def test_a_tune_killed_while_writing_its_heldout_rows_is_rerun_into_the_same_folder(tiny_model_dir, tmp_path, capsys):
    """kill -9 mid-write of a new folder's heldout.jsonl leaves only the lock and the write's temp
    (named with the dead writer's pid): the folder is still the tune's, and the rerun tunes into it."""
    from selfinstruct.datafiles import LOCK

    run = write_run(tmp_path / "run", TASKS * 3)
    out = tmp_path / "tuned"
    out.mkdir()
    (out / LOCK).write_text("")
    dead = out / ".heldout.jsonl.tmp-4194305"  # above Linux's largest pid: no process has it
    dead.write_text('{"instruction": "What is')
    code = main(["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--max-length", "64"])
    assert code == 0, capsys.readouterr().err
    assert (out / "adapter_config.json").is_file() and (out / "heldout.jsonl").is_file() and not dead.exists()


@pytest.mark.parametrize("long_rows", ["train", "heldout"])
def test_rows_whose_prompt_fills_max_length_are_one_line_before_training(tiny_model_dir, tmp_path, capsys, long_rows):
    """TRL cuts a row at --max-length and drops one left with no reply token. When that drops every
    training row (or every held-out row, so no eval loss can be had), the tune is one line naming
    --max-length, exit 2, and leaves no folder; not a traceback, nor one after the training."""
    rows = [dict(t, instruction=f"{t['instruction']} ({i})") for i, t in enumerate(TASKS * 3)]
    _, held = sft.split_rows(list(range(len(rows))), 0.03, 42)
    for i in range(len(rows)):
        if (i in held) == (long_rows == "heldout"):
            rows[i]["instruction"] = f"({i}) " + "word " * 200  # each its own instruction, so the split is as above
    run = write_run(tmp_path / "run", rows)
    out = tmp_path / "tuned"
    code = main(["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--max-length", "64"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and "--max-length 64" in err[0], err
    assert not out.exists()


def test_rows_left_out_at_max_length_are_counted_alike_everywhere(tiny_model_dir, tmp_path, capsys):
    """The card counted the training rows left after --max-length but every held-out row, and
    heldout.jsonl kept held-out rows never evaluated: the card, the table, heldout.jsonl and the
    `try` hint now count the rows trained on and evaluated, one row said as one."""
    rows = [dict(t, instruction=f"{t['instruction']} ({i})") for i, t in enumerate(TASKS * 3)]
    train, held = sft.split_rows(list(range(len(rows))), 0.25, 42)  # 9 and 3 rows, each its own instruction
    for i in train[1:] + held[:1]:  # all training rows but one, and one held-out row, too long to learn from
        rows[i]["instruction"] = f"({i}) " + "word " * 200
    run = write_run(tmp_path / "run", rows)
    out = tmp_path / "tuned"
    code = main(["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--max-length", "64", "--eval-ratio", "0.25"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "8 training rows and 1 held-out row left out: their prompt fills --max-length 64" in printed, printed
    saved = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert saved == [rows[i] for i in held[1:]]  # the two evaluated, not the one left out
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "on `run`: 1 training row, 2 rows held out (9 rows left out" in card, card
    assert "| Data | `run`: 1 row trained on, 2 rows held out" in card, card
    table = printed[printed.index("tune: adapter saved to"):]
    header, values = [[c.strip() for c in line.split(sep)[1:-1]] for line, sep in (
        (next(line for line in table.splitlines() if "steps" in line), "┃"),
        (next(line for line in table.splitlines() if line.startswith("│")), "│"))]
    assert dict(zip(header, values))["rows trained"] == "1" and dict(zip(header, values))["held out"] == "2", table
    assert f"try it: selfinstruct try {out} --heldout 2 --compare" in printed


def test_default_out_is_inside_the_run_or_beside_the_file(tmp_path):
    run = Path(write_run(tmp_path / "run", TASKS))
    (tmp_path / "hf").mkdir()  # a saved dataset folder is not a run folder
    assert sft.default_out(run, full=False) == run / "adapter"
    assert sft.default_out(f"{run}/", full=True) == run / "model"
    assert sft.default_out(tmp_path / "data" / "chat.jsonl", full=False) == tmp_path / "data" / "chat-adapter"
    assert sft.default_out(tmp_path / "data.json", full=True) == tmp_path / "data-model"
    assert sft.default_out(tmp_path / "hf", full=False) == tmp_path / "hf-adapter"


def test_default_out_of_a_datasetdict_split_is_beside_the_datasetdict(tmp_path, monkeypatch):
    """DIR/NAME-adapter would be inside the saved DatasetDict DIR, which tune's own check refuses."""
    from selfinstruct.datafiles import check_output

    dd = tmp_path / "dd"
    (dd / "test").mkdir(parents=True)
    (dd / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    assert sft.default_out(dd / "test", full=False) == tmp_path / "dd-test-adapter"
    assert sft.default_out(dd / "test", full=True) == tmp_path / "dd-test-model"
    monkeypatch.chdir(dd)
    assert sft.default_out("test", full=False).resolve() == tmp_path / "dd-test-adapter"
    check_output(sft.default_out(dd / "test", full=False), [dd / "test"])  # not refused


def test_the_try_command_tune_suggests_asks_for_no_more_heldout_rows_than_it_saved(tiny_model_dir, tmp_path, capsys):
    run = write_run(tmp_path / "run", TASKS[:4])
    code = main(["tune", run, "--model", str(tiny_model_dir), "--max-steps", "1", "--batch-size", "2",
                 "--max-length", "64", "--eval-ratio", "0.25"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert len((Path(run) / "adapter" / "heldout.jsonl").read_text().splitlines()) == 1
    assert f"try it: selfinstruct try {Path(run) / 'adapter'} --heldout 1 --compare" in printed.out  # not 3: refused


def test_a_tunes_adapter_config_that_does_not_parse_is_one_line_naming_it(tiny_model_dir, tmp_path, capsys):
    """A tune's folder names its base in tune_config.yaml, so adapter_config.json was left to PEFT,
    whose error named no file."""
    (tmp_path / "adapter_config.json").write_text("{not json")
    (tmp_path / "adapter_model.safetensors").write_text("")
    (tmp_path / "tune_config.yaml").write_text(f"model: {tiny_model_dir}\n")
    assert main(["try", str(tmp_path), "hello"]) == 2
    err = capsys.readouterr().err
    assert err == f"selfinstruct try: error: {tmp_path / 'adapter_config.json'}:1: not valid JSON (Expecting property name " \
                  "enclosed in double quotes at column 2)\n", err


# Twelve distinct rows, so "the held-out rows" names exactly three of them.
@pytest.mark.parametrize("full", [False, True], ids=["lora-run-folder", "full-messages-file"])
def test_tune_without_out_saves_beside_its_input_with_the_heldout_rows(tiny_model_dir, tmp_path, capsys, full):
    run = write_run(tmp_path / "run", DISTINCT)
    if full:  # a messages file: held-out rows come back as messages
        source = tmp_path / "data" / "chat.jsonl"
        source.parent.mkdir()
        assert main(["export", run, "--format", "messages", "--out", str(source)]) == 0
        out = tmp_path / "data" / "chat-model"
    else:
        source, out = Path(run), Path(run) / "adapter"
    capsys.readouterr()
    code = main(["tune", str(source), "--model", str(tiny_model_dir), "--max-steps", "1", "--batch-size", "2",
                 "--max-length", "64", "--eval-ratio", "0.25"] + (["--full"] if full else []))
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert (out / ("config.json" if full else "adapter_config.json")).exists()
    assert f"-> {out}" in printed.out and f"try it: selfinstruct try {out} --heldout 3" in printed.out

    # heldout.jsonl is exactly the eval split, in the input's own shape, and none of it was trained on.
    convs = read_conversations(source)
    train, held = sft.split_rows(convs, 0.25, 42)
    saved = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(saved) == 3 and saved == [sft.heldout_row(c) for c in held]
    assert all(("messages" in r) == full and ("instruction" in r) != full for r in saved)
    user = [c["messages"][0]["content"] for c in train]
    assert not {c["messages"][0]["content"] for c in held} & set(user)

    assert main(["try", str(out), "--heldout", "2", "--compare", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    asked = [c["messages"][0]["content"] for c in held]
    assert f"[held out] {asked[0]}" in printed and f"[held out] {asked[1]}" in printed and asked[2] not in printed
    assert printed.count("reference (heldout.jsonl)") == 2 and "base: " in printed and "2 answers" in printed


def test_tune_reads_a_messages_file_and_a_yaml_config(tiny_model_dir, tmp_path, capsys):
    import yaml

    run = write_run(tmp_path / "run", DISTINCT)
    data = tmp_path / "messages.jsonl"
    assert main(["export", run, "--format", "messages", "--out", str(data)]) == 0
    cfg = tmp_path / "tune.yaml"
    out = tmp_path / "tuned"  # out: as generate's, respond's, evolve's and dedup's files take it
    cfg.write_text(f"model: {tiny_model_dir}\nmax_steps: 1\nlora_r: 4\nbatch_size: 2\nmax_length: 64\nout: {out}\n")
    assert main(["tune", str(data), "--config", str(cfg), "--lora-alpha", "8"]) == 0
    printed = capsys.readouterr().out
    assert "11 training rows, 1 row held out; chat template; LoRA" in printed
    resolved = yaml.safe_load((out / "tune_config.yaml").read_text())
    assert (resolved["lora_r"], resolved["lora_alpha"], resolved["max_steps"]) == (4, 8, 1)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_tune_takes_out_from_its_config_file_and_the_flag_wins(tmp_path, capsys, monkeypatch):
    """--out is a tune flag and `--config tune.yaml` takes the same options: `out:` was an unknown option."""
    saved_to = []
    monkeypatch.setattr(sft, "tune", lambda source, out, opts, **k: saved_to.append(out) or {"out": out, "heldout": 0})
    run = write_run(tmp_path / "run", TASKS)
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(f"out: {tmp_path / 'from-file'}\nlora_r: 4\n")
    assert main(["tune", run, "--config", str(cfg)]) == 0, capsys.readouterr().err
    assert main(["tune", run, "--config", str(cfg), "--out", str(tmp_path / "from-flag")]) == 0
    assert saved_to == [str(tmp_path / "from-file"), str(tmp_path / "from-flag")]
    capsys.readouterr()
    cfg.write_text("out: ''\n")
    assert main(["tune", run, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{cfg}: field 'out'" in err and saved_to == saved_to[:2], err


# Llama 2's and Mistral's rule, in a ChatML-shaped template: user and assistant turns must alternate.
STRICT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set turns = messages[1:] %}{%- else %}{%- set turns = messages %}"
    "{%- endif %}{%- for m in turns %}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("turns", [["user", "user", "assistant"], ["assistant", "user", "assistant"]],
                         ids=["two-user-turns", "assistant-first"])
def test_a_conversation_the_chat_template_refuses_is_one_line_naming_it_before_the_model_loads(
        tiny_model_dir, tokenizer, tmp_path, capsys, monkeypatch, turns):
    """A template that requires alternating roles raised its TemplateError from inside the trainer
    (a traceback, after the model loaded). Each record is rendered once at read time: the one it
    refuses is named by file and line, with its turns, and nothing is written. SmolLM2's template
    takes the same record, so it is refused only where the template refuses it."""
    import shutil

    strict = tmp_path / "strict"
    shutil.copytree(tiny_model_dir, strict)
    config = json.loads((strict / "tokenizer_config.json").read_text())
    (strict / "chat_template.jinja").unlink(missing_ok=True)
    (strict / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": STRICT_TEMPLATE}))
    good = [{"messages": [{"role": "user", "content": t["instruction"]}, {"role": "assistant", "content": t["output"]}]}
            for t in TASKS * 3]
    odd = {"messages": [{"role": role, "content": f"turn {k}"} for k, role in enumerate(turns)]}
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in good[:5] + [odd] + good[5:]))
    monkeypatch.setattr(sft, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "tuned"
    assert main(["tune", str(data), "--model", str(strict), "--out", str(out), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err == (f"selfinstruct tune: error: {data}:6: the chat template of {strict} refuses this conversation "
                   "(TemplateError: Conversation roles must alternate user/assistant/user/assistant/...); its turns "
                   f"are {', '.join(turns)}: fix or drop that record\n"), err
    assert not out.exists()
    examples = [sft.to_example(c, True) for c in read_conversations(data)]
    sft.check_chat_template(tokenizer, examples, data, "smollm2")  # SmolLM2's template takes it


@pytest.mark.slow
def test_lora_on_smollm2_learns_saves_and_changes_answers(student, tmp_path, capsys):
    import torch

    run = write_run(tmp_path / "run", TASKS * 5)  # 20 rows of 4 instructions: 15 train, one instruction's 5 held out
    out = tmp_path / "adapter"
    code = main(["tune", run, "--out", str(out), "--max-steps", "8", "--batch-size", "2", "--lr", "1e-3",
                 "--max-length", "96", "--logging-steps", "1", "--lr-scheduler", "constant", "--warmup-ratio", "0"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "step     1/8  loss" in printed.out and "eval loss" in printed.out

    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tune_config.yaml",
                 "log_history.json"):
        assert (out / name).exists(), name
    history = json.loads((out / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 * 0.8, losses
    assert any("eval_loss" in h for h in history)
    import yaml

    resolved = yaml.safe_load((out / "tune_config.yaml").read_text())
    assert resolved["model"] == "smollm2" and resolved["lr"] == 1e-3 and resolved["target_modules"] == ["q_proj", "v_proj"]
    assert resolved["bf16"] is False

    # Reload through `try`'s loader: the adapter moves the logits and the greedy answer.
    model, tok, base = sft.load_tuned(out)
    assert base == "smollm2"
    enc = tok.apply_chat_template(sft.instruction_prompt(TASKS[0]["instruction"], True), add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        tuned_logits = model(**enc).logits
        with model.disable_adapter():
            base_logits = model(**enc).logits
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)
    tuned = sft.answer(model, tok, [TASKS[0]["instruction"]], max_new_tokens=12)[0]
    with model.disable_adapter():
        plain = sft.answer(model, tok, [TASKS[0]["instruction"]], max_new_tokens=12)[0]
    assert tuned != plain



def test_sharegpt_and_messages_files_become_training_pairs(tmp_path):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye"}]}) + "\n")
    conv = read_conversations(src)[0]
    chat = sft.to_example(conv, chat=True)
    assert [m["content"] for m in chat["prompt"]] == ["Hi", "Hello", "Bye"]
    assert chat["completion"] == [{"role": "assistant", "content": "Goodbye"}]
    plain = sft.to_example(conv, chat=False)
    assert plain["completion"] == "Goodbye" and plain["prompt"].endswith("### Instruction:\nBye\n\n### Response:\n")
    assert sft.to_example({"messages": [{"role": "user", "content": "x"}], "alpaca": None}, True) is None


@pytest.mark.parametrize("reply", ["\u200b", " \ufeff\u2060\n", "\u200b\u00a0\u3164"])
def test_a_reply_of_only_zero_width_characters_is_no_reply_to_train_on(tmp_path, reply):
    """str.strip keeps a zero-width space, a BOM or a word joiner: such an answer was trained on, teaching
    the model to answer nothing; it is skipped as an empty one is (filters.no_visible_text)."""
    src = tmp_path / "data.json"
    src.write_text(json.dumps([{"instruction": "Name a colour.", "input": "", "output": reply},
                               {"instruction": "Name a fruit.", "input": "", "output": "\u200bA pear."}]))
    # The Alpaca reader refuses such a row before tune sees it (datafiles.alpaca_row), naming it.
    with pytest.raises(UserError, match="field 'output': shows nothing"):
        read_conversations(src)
    src.write_text(json.dumps([{"instruction": "Name a fruit.", "input": "", "output": "\u200bA pear."}]))
    (shown,) = read_conversations(src)
    for chat in (True, False):
        assert sft.to_example(shown, chat) is not None  # one that shows something stays, as it is


def test_options_reject_unknown_yaml_keys(tmp_path):
    cfg = tmp_path / "tune.yaml"
    cfg.write_text("lora_r: 8\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match="learning_rate.*unknown option"):
        sft.resolve(sft.TuneOptions, None, cfg)
    cfg.write_text("lora_r: 8\nepochs: 1\n")
    opts = sft.resolve(sft.TuneOptions, None, cfg)
    assert (opts.lora_r, opts.lora_alpha, opts.lora_dropout, opts.epochs) == (8, 32, 0.05, 1.0)
    assert all(f.description for f in sft.TuneOptions.model_fields.values())


def test_lora_options_with_full_are_named_as_given_flag_or_config_key(tmp_path, capsys):
    """--full with LoRA's options is refused naming each where the user wrote it: the --config
    file's key (not a --lora-r they never typed), or the flag."""
    run = write_run(tmp_path / "run", TASKS)
    cfg = tmp_path / "tune.yaml"
    no_model = ["--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out")]
    for yaml_text, flags, said in (
        ("full: true\nlora_r: 8\n", [], f"{cfg}: field 'lora_r' applies to LoRA only, and field 'full' tunes"),
        ("lora_r: 8\n", ["--full"], f"{cfg}: field 'lora_r' applies to LoRA only, and --full tunes"),
        ("full: true\n", ["--lora-alpha", "4"], f"--lora-alpha applies to LoRA only, and field 'full' of {cfg} tunes"),
        ("epochs: 1\n", ["--full", "--lora-r", "8"], "--lora-r applies to LoRA only, and --full tunes"),
    ):
        cfg.write_text(yaml_text)
        assert main(["tune", run, "--config", str(cfg), *flags, *no_model]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err, err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["empty_run", "missing_model", "not_a_model", "unknown_key", "out_not_writable",
                                  "out_holds_users_files", "full_over_lora", "lora_over_full", "full_with_lora_r",
                                  "full_with_target_modules", "try_missing", "try_not_tuned", "try_nothing_asked", "try_adapter_not_json",
                                  "try_adapter_not_object", "try_config_not_yaml", "try_no_weights", "heldout_zero",
                                  "heldout_no_file", "heldout_empty", "heldout_too_many"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    run = write_run(tmp_path / "run", TASKS)
    out = str(tmp_path / "out")
    argv = ["tune", run, "--out", out, "--max-steps", "1"]
    if case == "empty_run":
        argv[1] = write_run(tmp_path / "empty", [])
    elif case == "missing_model":
        argv += ["--model", str(tmp_path / "no-such-model")]
    elif case == "not_a_model":
        argv += ["--model", str(tmp_path)]
    elif case == "unknown_key":
        (tmp_path / "c.yaml").write_text("lora_rank: 8\n")
        argv += ["--config", str(tmp_path / "c.yaml")]
    elif case == "out_not_writable":
        (tmp_path / "a-file").write_text("")
        argv[3] = str(tmp_path / "a-file" / "out")
        argv += ["--model", str(tmp_path / "no-such-model")]  # the out folder is checked first
    elif case == "out_holds_users_files":
        Path(out).mkdir()
        (Path(out) / "README.md").write_text("# My project\n")  # PEFT's model card would be written over it
        argv += ["--model", str(tmp_path / "no-such-model")]  # refused before any model is looked for
    elif case in ("full_over_lora", "lora_over_full"):
        # An earlier tune of the other kind: its files would stay beside the new model, so `try` would load it.
        Path(out).mkdir()
        marker = "adapter_config.json" if case == "full_over_lora" else "config.json"
        for name in ("heldout.jsonl", "tune_config.yaml", marker):
            (Path(out) / name).write_text("{}")
        argv += ["--model", str(tmp_path / "no-such-model")] + (["--full"] if case == "full_over_lora" else [])
    elif case in ("full_with_lora_r", "full_with_target_modules"):  # LoRA's options, which --full would ignore
        lora = ["--lora-r", "8"] if case == "full_with_lora_r" else ["--target-modules", "q_proj"]
        argv += ["--full", *lora, "--model", str(tmp_path / "no-such-model")]  # refused before any model is looked for
    elif case == "try_missing":
        argv = ["try", str(tmp_path / "nope"), "hello"]
    elif case == "try_not_tuned":
        argv = ["try", str(tmp_path), "hello"]
    elif case == "try_nothing_asked":
        argv = ["try", str(tmp_path)]
    elif case in ("try_adapter_not_json", "try_adapter_not_object", "try_config_not_yaml", "try_no_weights"):
        adapter = {"try_adapter_not_json": "not json", "try_adapter_not_object": "[1]"}.get(case, "{}")
        (tmp_path / "adapter_config.json").write_text(adapter)
        if case == "try_config_not_yaml":
            (tmp_path / "tune_config.yaml").write_text("model: [\n")
        argv = ["try", str(tmp_path), "hello"] + (["--model", str(tmp_path / "none")] if case == "try_no_weights" else [])
    elif case.startswith("heldout_"):
        # A folder that is not even a model: the held-out checks come before any model loads.
        rows = {"heldout_empty": [], "heldout_too_many": TASKS[:2], "heldout_zero": TASKS[:2]}.get(case)
        if rows is not None:
            (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        argv = ["try", str(tmp_path), "--heldout", {"heldout_zero": "0", "heldout_too_many": "3"}.get(case, "1")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"selfinstruct {argv[0]}: error: ") and err.count("\n") == 1, err
    if case == "out_not_writable":
        assert "cannot write" in err
    if case == "out_holds_users_files":
        assert "holds files a tune did not write (README.md)" in err
        assert (Path(out) / "README.md").read_text() == "# My project\n" and len(list(Path(out).iterdir())) == 1
    if case in ("full_over_lora", "lora_over_full"):
        what = "LoRA adapter (adapter_config.json)" if case == "full_over_lora" else "full fine-tune (config.json)"
        assert f"holds an earlier tune's {what}" in err and "choose another --out" in err
        assert sorted(p.name for p in Path(out).iterdir()) == sorted(["heldout.jsonl", "tune_config.yaml", marker])
        assert all(p.read_text() == "{}" for p in Path(out).iterdir())  # nothing written over
    expected = {"heldout_zero": "--heldout must be at least 1, got 0", "heldout_no_file": "heldout.jsonl: no such file",
                "heldout_empty": "no rows were held out", "heldout_too_many": "holds only 2 rows",
                "try_nothing_asked": "give an INSTRUCTION", "try_adapter_not_json": "adapter_config.json:1: not valid JSON",
                "try_adapter_not_object": "adapter_config.json: not a JSON object",
                "try_config_not_yaml": "tune_config.yaml:2: not valid YAML",
                "try_no_weights": "adapter_config.json without the adapter's weights",
                "full_with_lora_r": "--lora-r applies to LoRA only", "full_with_target_modules": "--target-modules applies"}
    assert expected.get(case, "") in err


@pytest.mark.parametrize("flag", [["--epochs", "inf"], ["--lr", "inf"], ["--eval-ratio", "nan"], ["--warmup-ratio", "nan"]])
def test_a_number_that_is_not_finite_is_one_line_before_any_model_loads(tmp_path, capsys, flag):
    """argparse's float takes 'inf' and 'nan': --epochs inf died in the Trainer with an OverflowError
    after the model loaded, and --lr inf trained to a nan model."""
    run = write_run(tmp_path / "run", TASKS)
    assert main(["tune", run, "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-such-model"), *flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag[0]}: " in err and "finite" in err, err


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_numpy_cannot_take_is_one_line_before_any_model_loads(tmp_path, capsys, seed):
    """The Trainer seeds numpy, which takes 0 to 2**32 - 1: --seed -1 was a traceback after the model loaded."""
    run = write_run(tmp_path / "run", TASKS)
    assert main(["tune", run, "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-such-model"),
                 "--seed", seed]) == 2
    err = capsys.readouterr().err
    bound = "greater than or equal to 0" if seed == "-1" else "less than or equal to 4294967295"
    assert err.count("\n") == 1 and f"--seed: Input should be {bound}" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, bound", [("lora_r", sft.MAX_LORA), ("lora_alpha", sft.MAX_LORA),
                                           ("batch_size", sft.MAX_BATCH), ("grad_accum", sft.MAX_BATCH),
                                           ("max_length", sft.MAX_LENGTH), ("max_steps", sft.MAX_STEPS),
                                           ("logging_steps", sft.MAX_STEPS), ("eval_steps", sft.MAX_STEPS),
                                           ("save_steps", sft.MAX_STEPS), ("epochs", sft.MAX_STEPS), ("lr", 10)])
@pytest.mark.parametrize("where", ["flag", "config"])
def test_a_count_past_its_bound_is_one_line_naming_it_before_any_model_loads(tmp_path, capsys, option, bound, where):
    """--lora-r 10**20 was a TypeError traceback from torch after the model loaded, --batch-size 10**20 one
    from islice, --max-steps 10**20 a tune without end: each is one line naming the option, the bound
    itself is taken, and no model is needed (there is none here)."""
    run = write_run(tmp_path / "run", TASKS)
    argv = ["tune", run, "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-such-model")]
    for value, refused in ((10**20, True), (bound + 1, True), (bound, False)):
        if where == "flag":
            given = [sft._flag(option), str(value)]
        else:
            (tmp_path / "tune.yaml").write_text(f"{option}: {value}\n")
            given = ["--config", str(tmp_path / "tune.yaml")]
        assert main([*argv, *given]) == 2
        err = capsys.readouterr().err
        said = sft._flag(option) if where == "flag" else f"tune.yaml: field '{option}'"
        assert err.count("\n") == 1 and (f"{said}: Input should be less than or equal to {bound}" in err) == refused, err
        if not refused:  # the bound passes; the missing model is what stops it
            assert "no-such-model" in err, err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["flag", "config"])
def test_a_max_length_past_the_models_context_is_one_line_before_the_model_loads(tiny_model_dir, tmp_path, capsys,
                                                                                 monkeypatch, where):
    """--max-length past the model's context (its config's max_position_embeddings: 2,048 for the tiny
    model) is one line from the config alone; the context itself passes, and so does the default (1024)
    for a model of less, as it did: only a length the user gave is checked."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(sft, "load_tokenizer", loaded)  # what a tune loads first, after the checks
    run = write_run(tmp_path / "run", TASKS)
    argv = ["tune", run, "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir)]
    for value, refused in ((2049, True), (2048, False)):
        if where == "flag":
            given = ["--max-length", str(value)]
        else:
            (tmp_path / "tune.yaml").write_text(f"max_length: {value}\n")
            given = ["--config", str(tmp_path / "tune.yaml")]
        if not refused:
            with pytest.raises(AssertionError, match="the model loaded"):
                main([*argv, *given])
            continue
        assert main([*argv, *given]) == 2
        said = "--max-length" if where == "flag" else f"{tmp_path / 'tune.yaml'}: field 'max_length'"
        assert capsys.readouterr().err == (
            f"selfinstruct tune: error: {said}: 2049 is past the context of {tiny_model_dir} (2,048 tokens, its "
            "config's max_position_embeddings); give at most 2048\n")
        assert not (tmp_path / "out").exists()
    short = tmp_path / "short-model"  # the tiny model's config with a context below the default max_length
    short.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    with pytest.raises(AssertionError, match="the model loaded"):
        main(["tune", run, "--out", str(tmp_path / "out"), "--model", str(short)])
    # A model that scales its rotary positions reaches past max_position_embeddings by that scaling's rule.
    scaled = tmp_path / "scaled-model"
    scaled.mkdir()
    (scaled / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}))
    with pytest.raises(AssertionError, match="the model loaded"):
        main(["tune", run, "--out", str(tmp_path / "out"), "--model", str(scaled), "--max-length", "8192"])


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs, smaller than one tokenizer.json; skipped where mounting is not allowed."""
    from conftest import tmpfs

    with tmpfs(tmp_path / "disk", "3m") as mnt:
        yield mnt


@pytest.mark.parametrize("save_steps", [[], ["--save-steps", "1"]], ids=["final-save", "checkpoint"])
def test_a_disk_that_fills_during_a_save_is_one_line_and_the_rerun_finishes(tiny_model_dir, tmp_path, capsys,
                                                                            small_disk, save_steps):
    """The tokenizer's writer (Rust) says a full disk with a plain Exception, torch and safetensors with
    their own: each was a traceback. It is one line naming --out; with room made, the same command finishes."""
    import subprocess

    run = write_run(tmp_path / "run", TASKS * 3)
    out = small_disk / "tuned"
    argv = ["tune", run, "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "2",
            "--batch-size", "2", "--max-length", "64", *save_steps]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"selfinstruct tune: error: {out}: cannot write (No space left on device)"), err
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file() and (out / "tune_config.yaml").is_file()


@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path) -> Path:
    """A LoRA adapter of the tiny model as `tune` saves one (its base recorded in adapter_config.json),
    made without a step of training."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path / "adapter"
    with sft._no_peft_checkpointing_warning():
        model = get_peft_model(sft.load_model(str(tiny_model_dir)), LoraConfig(r=4, task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def wider_model_dir(tmp_path, tokenizer) -> Path:
    """The tiny Llama at twice its width: a base whose layers have other shapes than the tiny one's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    folder = tmp_path / "wider"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_try_an_adapter_on_a_base_model_of_other_shapes_is_one_line(adapter_dir, wider_model_dir, capsys):
    """--model (or a recorded base folder since replaced) of another width was torch's RuntimeError traceback,
    a size mismatch per layer."""
    assert main(["try", str(adapter_dir), "hello", "--model", str(wider_model_dir)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"selfinstruct try: error: {adapter_dir}: the adapter's layers have other shapes than those of "
                   f"{wider_model_dir} (a size mismatch): it was tuned on another base model; pass --model with that "
                   "one"), err


@pytest.mark.parametrize("cut_to", [0, 100, -100], ids=["empty", "in-header", "in-weights"])
def test_try_an_adapter_whose_weights_were_cut_short_is_one_line(adapter_dir, capsys, cut_to):
    """A half-written adapter_model.safetensors (a copy cut short, a full disk) was safetensors' traceback."""
    weights = adapter_dir / "adapter_model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, cut_to % size)
    assert main(["try", str(adapter_dir), "hello"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"selfinstruct try: error: {adapter_dir}: cannot load the adapter (SafetensorError: "), err


def test_a_model_whose_weights_were_cut_short_is_one_line_in_try_and_tune(tiny_model_dir, tmp_path, capsys):
    """A full tune's (or a --model folder's) model.safetensors cut short was safetensors' traceback."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    os.truncate(model / "model.safetensors", (model / "model.safetensors").stat().st_size // 2)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(TASKS))
    said = f"cannot load model '{model}': Error while deserializing header: "
    for argv in (["try", str(model), "hello"],
                 ["tune", str(data), "--model", str(model), "--out", str(tmp_path / "out"), "--max-steps", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith(f"selfinstruct {argv[0]}: error: {said}"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["5", "[a, b]", "{name: x}"])
def test_try_a_tune_config_whose_model_is_not_text_is_one_line_naming_it(adapter_dir, capsys, value):
    """tune_config.yaml edited by hand to a model that is no name (a number, a list) was a TypeError traceback."""
    (adapter_dir / "tune_config.yaml").write_text(f"model: {value}\n")
    assert main(["try", str(adapter_dir), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"selfinstruct try: error: {adapter_dir / 'tune_config.yaml'}: field 'model': "), err


@pytest.mark.parametrize("value, shown", [("3", "int 3"), ("'no'", "str 'no'"), ("[true]", "list [True]")])
def test_try_a_tune_config_whose_full_is_not_true_or_false_is_one_line_naming_it(adapter_dir, capsys, value, shown):
    """tune_config.yaml edited by hand to `full: 3` (or the string 'no') was taken for true or false as
    Python takes it: in a folder holding an adapter and a model, 'no' loaded the full model."""
    (adapter_dir / "tune_config.yaml").write_text(f"full: {value}\n")
    assert main(["try", str(adapter_dir), "hello"]) == 2
    err = capsys.readouterr().err
    assert err == (f"selfinstruct try: error: {adapter_dir / 'tune_config.yaml'}: field 'full': must be true or "
                   f"false, not {shown}\n"), err


@pytest.mark.parametrize("heldout", [[], ["--heldout", "1"]], ids=["instruction", "heldout"])
def test_try_a_file_for_adapter_dir_says_it_is_not_a_folder(tmp_path, capsys, heldout):
    """try on the data file (or the adapter's weights file) said 'no such folder' of a file that is there."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(TASKS))
    assert main(["try", str(data), "hello", *heldout]) == 2
    assert capsys.readouterr().err == (f"selfinstruct try: error: {data}: is a file, not a folder: give the folder "
                                       "`selfinstruct tune` saved into\n")


def test_try_heldout_on_a_checkpoint_says_where_its_tunes_rows_go(tmp_path, capsys):
    """try OUT/checkpoints/checkpoint-N --heldout said folders tuned before heldout.jsonl existed lack it, and to
    tune again; a checkpoint keeps none, and its tune writes them to OUT when it ends."""
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    assert main(["try", str(checkpoint), "--heldout", "1"]) == 2
    assert capsys.readouterr().err == (
        f"selfinstruct try: error: {checkpoint / 'heldout.jsonl'}: no such file: a checkpoint keeps no held-out rows; "
        f"its tune writes them to {tmp_path / 'out' / 'heldout.jsonl'} when it ends: try that folder then, or give "
        "INSTRUCTIONs to answer\n")


def test_try_an_instruction_that_is_not_utf8_is_one_line_before_any_model_loads(monkeypatch, capsys):
    """A Latin-1 byte in an argument (a terminal not in UTF-8, $(cat latin1.txt)) reaches Python as a lone
    surrogate, which the tokenizer refused with a TypeError traceback once the model had loaded."""
    monkeypatch.setattr(sft, "load_tuned", lambda *a: pytest.fail("the model loaded"))
    assert main(["try", "ad", "Name a color.", "caf\udce9 au lait"]) == 2
    assert capsys.readouterr().err == ("selfinstruct try: error: INSTRUCTION 2 is not UTF-8 text (byte 0xe9 at "
                                       "character 4): give it in UTF-8 (iconv -t utf-8)\n")


@pytest.mark.parametrize("given", ["out", "source"])
def test_an_out_path_that_is_not_utf8_is_one_line_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch,
                                                                         given):
    """The tokenizer's save (Rust) takes only UTF-8 paths: an --out holding a Latin-1 byte, or the default
    out beside a file so named, trained every step and then lost them to a UnicodeEncodeError traceback.
    (Called directly: pytest's captured stderr, unlike a terminal's, cannot print the byte's escape.)"""
    from rich.console import Console

    name = "caf\udce9"  # the byte 0xe9, as Python reads it from a file name or an argument
    data = tmp_path / (f"{name}.json" if given == "source" else "data.json")
    data.write_text(json.dumps(DISTINCT))
    out = tmp_path / name if given == "out" else None
    monkeypatch.setattr(sft, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    opts = sft.TuneOptions(model=str(tiny_model_dir), max_steps=1, max_length=64)
    with pytest.raises(UserError) as caught:
        sft.tune(str(data), out, opts, console=Console(file=io.StringIO()))
    where = out or tmp_path / f"{name}-adapter"
    assert str(caught.value) == (f"{where}: not a UTF-8 path (byte 0xe9 at character {len(str(tmp_path)) + 5}), "
                                 "which the tokenizer's save cannot write: choose an --out whose path is UTF-8")
    assert not where.exists()


def test_try_compare_on_a_model_folder_with_no_recorded_base_is_one_line(tiny_model_dir, capsys):
    """A whole model's folder without tune_config.yaml (a full tune's that lost it, any model folder) has no
    base to compare with: that was a TypeError traceback after the tuned model had answered."""
    assert main(["try", str(tiny_model_dir), "hello", "--compare", "--max-new-tokens", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == (f"selfinstruct try: error: {tiny_model_dir}: the base model to --compare "
                                             "with is not recorded (no tune_config.yaml): pass --model"), captured.err
    assert "tuned" not in captured.out  # refused before any answer
