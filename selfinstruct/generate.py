"""The bootstrap loop: sample examples, ask the teacher, parse, filter, dedup, keep.

One unit of work is one prompt to the teacher (alpaca mode), one prompt for
new instructions plus the follow-up classification and instance prompts
(self-instruct mode), or one query and its answer (magpie mode); each mode's
module in ``selfinstruct/modes/`` makes its units and parses them. Units run concurrently; their replies are logged to
``responses.jsonl`` first and then processed in this loop, in order (the replies found
done at one wait are decided together), so the pool, the dedup index and the files have
a single writer.

Resume: the same command on an existing run folder repairs any partial last
line, reloads kept records into the pool and the index, processes every
logged reply whose candidates are not in kept/rejected yet, and carries on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import math
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from selfinstruct import filters
from selfinstruct.config import (MAX_CONCURRENCY, MAX_RETRIES, MAX_TEACHER_PARALLEL, MAX_TEACHER_THREADS, MAX_TOKENS,
                                 VLLM_BATCH_TWICE, UserError, add_flags, check_concurrency, check_urls,
                                 counted, distinct_urls, file_key, given_by_file, keys_like, named_file, one_item_list,
                                 printable, resolve, pair_waits_for_the_run, said_as_given, save_config, section_of,
                                 url_list)
from selfinstruct.modes import alpaca, instruction_verdict, is_request, magpie, one_line, self_instruct
from selfinstruct.prompts import bundled_dir, load_templates
from selfinstruct.records import KeptRecord, Neighbor, Provenance, Rejected, Response, Usage, example
from selfinstruct.datafiles import iter_models, load_stats, read_jsonl, rejection_heads, run_file_ids, write_json_atomic
from selfinstruct.runfolder import (FILES, GroupWriter, SessionCounts, begin_session, check_run_files,
                                    remove_session_file, repair)
from selfinstruct.teacher import FATAL_KINDS, TeacherClient, TeacherError, api_key_of, fatal_line, now_iso

# --mode name -> the module that makes its units and parses their replies (selfinstruct/modes/).
MODES = {"alpaca": alpaca, "self-instruct": self_instruct, "magpie": magpie}

# Tasks a prompt asks for (--tasks-per-request), and instances a task (--instances-per-task): a reply of 1,000
# tasks is some 100,000 tokens, past what a teacher writes in one, so a larger number is a typo (10**20 was
# written into every prompt and the schema's maxItems).
MAX_PER_REQUEST = 1000
# 'vllm serve' servers one run starts (--teacher-replicas), each a process that loads the model: a server
# per GPU of the largest nodes, several times over.
MAX_REPLICAS = 256


class GenerateOptions(BaseModel):
    """Options of ``selfinstruct generate``; each one is also a flag and a YAML key."""

    # inf and nan are refused: an infinite --timeout was a traceback, an infinite --temperature
    # a request body that is not JSON, so every prompt failed.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    out: str = Field(description="Run folder. An existing one is resumed.")
    # At most 10**12: far past any run, and below what the request budget and the progress bar
    # (floats) can hold (a --num of 309 digits was an OverflowError traceback once the folder was made).
    num: int = Field(100, ge=1, le=10**12, description="Stop when this many tasks are kept (at most 10**12).")
    seeds: list[str] = Field([], description="Seed files (self-instruct JSONL or Alpaca JSON/JSONL). Default: the bundled seeds.")
    prompts: str | None = Field(None, description="Folder of prompt templates. Default: the bundled prompts/.")
    mode: Literal["alpaca", "self-instruct", "magpie"] = Field("alpaca", description="alpaca: one request gives instruction, input and output. self-instruct: instructions, then classification, then instances. magpie: the teacher writes a user query after its chat template's opening of a user turn (/v1/completions), then answers it; no seeds or prompts needed.")
    magpie_prefix: str | None = Field(None, description="--mode magpie: the text that opens a user turn in the teacher's chat template (e.g. '<|im_start|>user\\n'; a backslash-n is a newline, two backslashes one backslash). Default: from the teacher's chat template (llama.cpp's /props, or tokenizer_config.json of a local --model folder).")
    teacher: Literal["embedded", "openai", "vllm"] | None = Field(None, description="embedded: start the bundled CPU teacher; openai: use --base-url; vllm: launch 'vllm serve --model'. Default: openai when --base-url is given, else embedded.")
    base_url: list[str] = Field([], description="OpenAI-compatible servers serving the same --model, e.g. http://127.0.0.1:8000/v1; give several (--base-url URL1 URL2, or the flag again) and each request goes to the one in service with the fewest in flight.")
    api_key: str | None = Field(None, description="API key for --base-url (or set SELFINSTRUCT_API_KEY / OPENAI_API_KEY). Never saved in the run folder.", exclude=True)
    model: str | None = Field(None, description="Model name on the server (--base-url), or what vLLM serves (--teacher vllm).")
    teacher_model: str | None = Field(None, description="A GGUF file for the embedded teacher instead of the bundled SmolLM2-135M.")
    teacher_threads: int | None = Field(None, ge=1, le=MAX_TEACHER_THREADS, description="CPU threads of the embedded teacher. Default: all cores but one. At most 4096.")
    teacher_parallel: int = Field(2, ge=1, le=MAX_TEACHER_PARALLEL, description="Requests the embedded teacher decodes together (its slots, each holding 2,048 tokens of context; at most 1024).")
    vllm_bin: str | None = Field(None, description="The 'vllm' executable for --teacher vllm (e.g. from another virtual environment).")
    vllm_args: list[str] = Field([], description="--teacher vllm: flags passed to 'vllm serve' as they are, after '--'.")
    teacher_replicas: int = Field(1, ge=1, le=MAX_REPLICAS, description="--teacher vllm: start this many 'vllm serve' servers, each on its own port (and its own share of the GPUs) and feed them all. At most 256.")
    concurrency: int | None = Field(None, description="Requests in flight at once per server; keep it above the server's batch size. Default: for --teacher vllm, twice its --max-num-seqs (256 when not given), so a finished sequence always has a waiting one to replace it; for the embedded teacher, --teacher-parallel + 1; else 8. At most 4096.")
    client_processes: int = Field(0, ge=0, le=64, description="Send the requests from this many child processes, each with its own HTTP client, instead of from the coordinator's own loop (which then only decides): for many fast servers, or self-instruct mode's many requests, on a machine with cores to spare. 0: from the coordinator; at most 64.")
    seed_examples: int = Field(6, ge=0, le=1000, description="Human seed tasks shown in each prompt (at most 1,000: far past any context).")
    machine_examples: int = Field(2, ge=0, le=1000, description="Already generated tasks shown in each prompt (seeds fill in while there are none; at most 1,000).")
    tasks_per_request: int = Field(5, ge=1, le=MAX_PER_REQUEST, description="New tasks asked for per prompt (at most 1000).")
    instances_per_task: int = Field(2, ge=1, le=MAX_PER_REQUEST, description="self-instruct mode: instances asked for per task (at most 1000).")
    followup_sampling: Literal["greedy", "run"] = Field("greedy", description="self-instruct mode: how the classification and instances requests sample. greedy: temperature 0, as the original asked them (and presence penalty 1.5 for instances; a classification answer of at most 16 tokens); run: the run's --temperature, --top-p and --max-tokens. A run begun before this option resumes with run.")
    temperature: float = Field(0.7, ge=0, le=100, description="Sampling temperature (at most 100; inf is refused, as servers refuse it).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling.")
    max_tokens: int = Field(1024, ge=16, le=MAX_TOKENS, description="Most tokens per reply (at most 16,777,216).")
    stop: list[str] = Field([], description="Stop sequences.")
    repeat_penalty: float | None = Field(None, gt=0, description="Penalty on repeated tokens, sent in the request body as llama.cpp's repeat_penalty and vLLM's repetition_penalty (1 = none; hosted APIs refuse it). Default: not sent.")
    seed: int = Field(0, description="Seed for choosing the examples shown in each prompt.")
    teacher_seed: int | None = Field(None, description="Also seed the teacher's sampling: each request gets a seed derived from this, its prompt and its attempt, so a rerun asks the same questions the same way and a retry is not a replay. Default: unseeded (vLLM on CPU fails on seeded requests batched together).")
    dry_multiplier: float | None = Field(None, ge=0, description="llama.cpp's DRY sampler: penalise tokens that would extend a sequence already in the prompt or reply, such as an example being copied (0 = off; llama.cpp only). Default: not sent.")
    structured: bool = Field(False, description="Ask for JSON through response_format json_schema instead of text; the schema bounds the list to --tasks-per-request items and each string to its share of --max-tokens.")
    prefill: bool | None = Field(None, description="alpaca mode: start the teacher's reply with '### Instruction:' (an assistant prefill, which llama.cpp and vLLM continue; hosted APIs may not). Small teachers follow the format far better with it. Default: on for the servers selfinstruct starts (embedded, vllm), off for --base-url.")
    lead_word: bool = Field(False, description="alpaca mode: start each new instruction with the first word of a random seed task not shown in its prompt ('Summarize', 'Why', ...), through the --prefill, or with --structured through the prompt and a pattern in the schema. Small teachers otherwise copy an example word for word; this keeps the seeds' mix of task types.")
    continue_output: bool = Field(False, description="alpaca mode, text replies: when a reply stops after an instruction (and input) with no 'Output:', ask the teacher to go on from 'Output:' in one more request. The prompt is the same, so llama.cpp reads only the new tokens (its prompt cache). Small teachers often skip the output; this turns most of those tasks from missing_output into candidates.")
    threshold: float = Field(0.7, gt=0, lt=1, description="ROUGE-L F1 above which an instruction is a duplicate.")
    nearest: int = Field(3, ge=0, le=1000, description="Most similar instructions kept on each record (at most 1,000).")
    nearest_floor: float | None = Field(None, ge=0, lt=1, description="Record as 'nearest' only instructions with ROUGE-L above this. Default: --threshold, so a duplicate names what it duplicates and a kept record lists nothing; 0.5 also lists a kept record's near misses, at about 4.5 times the dedup cost (bench/README.md).")
    blacklist: list[str] = Field(list(filters.BLACKLIST), description="Whole words that reject an instruction. Default: Alpaca's 18 words; in --mode self-instruct, self-instruct's own 13 (without video, audio, music, flowchart, diagram).")
    min_words: int = Field(3, ge=0, description="Instructions of this many words or fewer are rejected.")
    max_words: int = Field(150, ge=1, validate_default=True, description="Instructions of more words are rejected.")
    max_requests: int | None = Field(None, ge=1, description="Give up after this many prompts. Default: 50 times what --num needs if every task were kept (a small teacher keeps few).")
    timeout: float = Field(300, gt=0, description="Seconds per teacher request.")
    max_retries: int = Field(5, ge=0, le=MAX_RETRIES, description="Retries per request (429 with Retry-After, 5xx, timeouts, dropped connections, malformed replies; at most 1000).")
    fsync: bool = Field(True, description="fsync after each write, so a power cut loses nothing acknowledged.")
    progress: bool = Field(True, description="Show the progress bar.")

    @field_validator("out", mode="before")
    @classmethod
    def _out_is_a_folder(cls, v):
        # A --config file's `out: null` said pydantic's "Input should be a valid string".
        if not isinstance(v, str):
            shown = "null" if v is None else printable(v)
            raise ValueError(f"needs a folder: the run folder to make, or one to resume (not {shown})")
        return v

    _one_url_is_a_list = field_validator("base_url", mode="before")(url_list)
    _urls_parse = field_validator("base_url")(check_urls)
    # One string is that one item, as base_url's one URL is: YAML's `stop: "###"` or `seeds: s.jsonl` is
    # what the flag gives. Not vllm_args: "--max-model-len 4096" as one item would be one word to vLLM.
    _one_is_a_list = field_validator("seeds", "stop", "blacklist", mode="before")(one_item_list)

    @field_validator("blacklist")
    @classmethod
    def _words_can_match(cls, v, info):
        # A resumed run's own list (config.yaml, the option left out) is taken as it is: a word that
        # cannot match whole, refused as a flag since, then decides as it did in the run's earlier
        # sessions, and the list cannot change on resume (a flag without it is refused too).
        return filters.trimmed_words(v) if _the_runs_own(info, "blacklist") else filters.blacklist_words(v)

    _no_empty_stop = field_validator("stop")(filters.no_empty_stop)

    @field_validator("magpie_prefix")
    @classmethod
    def _prefix_holds_text(cls, v, info):
        # An empty one was taken as not given: the chat template was looked for instead. A resumed
        # run's own still is (find_pre_query), as its queries were asked.
        if v is not None and not magpie.unescape_prefix(v).strip() and not _the_runs_own(info, "magpie_prefix"):
            raise ValueError("is empty; give the text that opens a user turn, or leave it out to read the chat template")
        return v

    @field_validator("concurrency")
    @classmethod
    def _concurrency_a_server_can_take(cls, v):
        return check_concurrency(v, holds=VLLM_BATCH_TWICE + "unit's prompt and replies in memory")

    @field_validator("nearest_floor")
    @classmethod
    def _floor_within_threshold(cls, v, info):
        # The dedup index refuses it (a traceback, once the folder was made and the teacher asked).
        threshold = info.data.get("threshold")
        if pair_waits_for_the_run(info):  # a run to resume: checked with its own values (take_the_runs_own)
            return v
        if v is not None and threshold is not None and v > threshold:
            if not filters.where_given(info) or filters.all_the_runs_own(info, "nearest_floor", "threshold"):
                # built in Python, or both a resumed run's own (config.yaml): the field is named
                raise ValueError(f"must be at most {filters.the_runs_own_or_flag(info, 'threshold')} ({threshold}), got {v}")
            raise filters.options_conflict(info, ("nearest_floor", v), "must be at most", ("threshold", threshold),
                                           "else a duplicate would not name what it duplicates")
        return v

    _some_length_passes = field_validator("max_words")(filters.max_words_above_min)

    @model_validator(mode="after")
    def _blacklist_of_the_mode(self):
        # Each mode filters with its original's list when none is given. Set without marking it
        # given (model_fields_set), so that a resume still takes the run's own saved list.
        if "blacklist" not in self.model_fields_set and self.mode == "self-instruct":
            self.__dict__["blacklist"] = list(filters.SELF_INSTRUCT_BLACKLIST)
        return self


def _the_runs_own(info, field: str) -> bool:
    """Whether a validator's value is a resumed run's own, from its config.yaml (``as_the_run_was``),
    not one the command gave."""
    return bool(info.context) and field in info.context.get("the_runs_own", ())


# The embedded teacher's own defaults, in place of the field defaults above (which suit a 7B+
# teacher on vLLM or --base-url). Measured on SmolLM2-135M on 2 cores (README, "The embedded
# teacher"): a flag or YAML key that is given always wins, and config.yaml saves the resolved values.
EMBEDDED_DEFAULTS = {
    "tasks_per_request": 1,
    "seed_examples": 2,
    "machine_examples": 0,
    "max_tokens": 200,
    "lead_word": True,
    "continue_output": True,
}
# ...in alpaca mode: one task per reply, the model ends a task by starting another. In the
# other modes these would cut a self-instruct instance's or a magpie answer's own "###" heading.
EMBEDDED_ALPACA_DEFAULTS = {"stop": ["###", "\nInstruction"]}
# ...and with --structured, where the text format's stops would cut the JSON (the model
# writes "###" inside a string) and the JSON's keys and indentation need more tokens. The
# DRY sampler stops the model copying its input into the output and repeating a sentence;
# in the text format it penalised the format's own lines, but here the grammar writes those.
# Three --num 20 runs (seeds 0-2) kept 0.72 tasks a prompt with it, 0.47 without.
EMBEDDED_STRUCTURED_DEFAULTS = {"stop": [], "max_tokens": 320, "dry_multiplier": 0.8}


def teacher_defaults(cfg: GenerateOptions, teacher_kind: str) -> GenerateOptions:
    """``cfg`` with the embedded teacher's defaults for every option the user did not give.

    >>> teacher_defaults(GenerateOptions(out="r", max_tokens=300), "embedded").max_tokens
    300
    >>> o = teacher_defaults(GenerateOptions(out="r"), "embedded"); o.tasks_per_request, o.max_tokens
    (1, 200)
    >>> teacher_defaults(GenerateOptions(out="r"), "vllm").tasks_per_request
    5
    >>> [teacher_defaults(GenerateOptions(out="r", structured=s), "embedded").dry_multiplier for s in (False, True)]
    [None, 0.8]
    """
    if teacher_kind != "embedded":
        return cfg
    table = {**EMBEDDED_DEFAULTS, **(EMBEDDED_ALPACA_DEFAULTS if cfg.mode == "alpaca" else {}),
             **(EMBEDDED_STRUCTURED_DEFAULTS if cfg.structured else {})}
    return cfg.model_copy(update={k: v for k, v in table.items() if k not in cfg.model_fields_set})


def as_the_run_was(cfg: GenerateOptions, config_file: str | None = None,
                   in_file: set[str] = frozenset()) -> GenerateOptions:
    """On resume, ``cfg`` with the run's saved value (config.yaml) for every option the user
    left out (neither a flag nor in the YAML file), so that rerunning the command resumes
    even where a default changed since: a newer version, or the embedded teacher's table.
    An option the user gave must still match (``_check_resume``), and the resumable ones
    (``RESUMABLE_CHANGES``) take the new value, or the default when left out, except the
    servers, --vllm-bin and --num (``KEPT_WHEN_LEFT_OUT``). ``take_the_runs_own`` does it, as for respond and evolve.
    """
    return take_the_runs_own(cfg, RESUMABLE_CHANGES, KEPT_WHEN_LEFT_OUT,
                             functools.partial(_a_run_to_resume, config_file=config_file, in_file=in_file),
                             config_file, in_file)


# What a run whose config.yaml lacks these options was made with: they came later, with another
# default (self-instruct's follow-ups sampled as the run did; every mode filtered with Alpaca's list).
BEFORE_SAVED = {"followup_sampling": "run", "blacklist": list(filters.BLACKLIST)}


# Keys an older version saved in config.yaml that are options no longer (renamed or dropped), read
# on resume without a word: none yet. The git log of config.py, generate.py, respond.py and
# evolve.py shows every key ever saved still an option (api_key is never saved); a rename adds its
# old key here.
SAVED_BEFORE: frozenset[str] = frozenset()
# What respond's and evolve's config.yaml keep beside their options (respond.saved_options): the
# command that made the run, its source resolved, and the number of its first row in the ids.
SAVED_BESIDE: frozenset[str] = frozenset({"mode", "source_resolved", "row_ids_from"})


def refuse_unknown_saved_keys(options, old: dict, saved: Path) -> None:
    """One line for a key of a run's config.yaml (``old``, from ``saved``) that is no option of
    ``options`` (generate's, respond's, evolve's): ignored, it said nothing, where --config refuses
    the same key, and a misspelt option edited in (say 'temprature: 0.2') had the run go on as if taken."""
    for key in old:
        if key not in options.model_fields and key not in SAVED_BEFORE | SAVED_BESIDE:
            raise UserError(f"{saved}: field '{printable(key)}': unknown option (edited by hand, or saved by a newer "
                            "version of selfinstruct?); remove it to resume, or resume with the version that made the run")


def _a_run_to_resume(cfg: GenerateOptions, old: dict, saved: Path, config_file: str | None = None,
                     in_file: set[str] = frozenset()) -> bool:
    """Whether the run folder's saved options ``old`` are generate's; another command's run, or a
    change of --mode in a run that made something, or a mode its logged replies were not made in,
    is refused here (a --mode the --config file ``config_file`` gave, ``in_file``, named there).
    ``old`` gains ``BEFORE_SAVED``'s values for the options it lacks, so that they are taken as the run's own."""
    from selfinstruct.datafiles import nothing_made

    for key, value in BEFORE_SAVED.items():
        old.setdefault(key, value)

    if isinstance(old.get("mode"), str) and old["mode"] not in MODES:  # respond's or evolve's run: not one to resume
        raise UserError(f"{cfg.out}: is a run folder of '{printable(old['mode'])}', not of 'generate'; choose another --out")
    refuse_unknown_saved_keys(GenerateOptions, old, saved)
    # First: a given --mode that differs from an edited config.yaml's would be told config.yaml's as the run's.
    _refuse_a_mode_the_log_was_not_made_in(cfg, old, saved)
    if "mode" in cfg.model_fields_set and "mode" in old and old["mode"] != cfg.mode and not nothing_made(Path(cfg.out)):
        # Said first: else magpie's pre-query is looked for (a teacher started, a server asked),
        # and its failure, or --structured's or --prompts' of the run, told instead.
        raise _not_as_made(saved, "mode", old["mode"], cfg.mode, cfg.model_fields_set, config_file, in_file)
    # As take_the_runs_own refuses it next (for respond and evolve too), but naming the option as given:
    # the --config file's key, or the flag (--teacher, or --base-url's server), not config.yaml.
    named = cfg.teacher or ("openai" if cfg.base_url else None)
    if named is not None and named != teacher_of(old) and not nothing_made(Path(cfg.out)):
        raise _not_as_made(saved, "teacher", teacher_of(old), named, cfg.model_fields_set, config_file, in_file,
                           "teacher" if cfg.teacher else "base_url")
    return True


def _refuse_a_mode_the_log_was_not_made_in(cfg: GenerateOptions, old: dict, saved: Path) -> None:
    """The run's mode (``old``'s, from its config.yaml) against the one its first logged reply
    records: a config.yaml edited by hand had another mode's prompts sent into the run, its log
    mixing modes and its card naming the new one. One line before any request or pre-query
    lookup; the first line alone is read (every reply logs the mode it was made in, and a run's
    replies share it)."""
    from selfinstruct.datafiles import nothing_made

    mode = old.get("mode", cfg.mode)  # none saved: the one given, or the default
    log = Path(cfg.out) / "responses.jsonl"
    if not log.is_file() or nothing_made(Path(cfg.out)):  # not a FIFO, which would block here: refused later
        return
    first = next(iter_models(log, Response), None)
    if first is None or first.mode == mode:
        return
    says = f"says {mode!r}" if "mode" in old else f"gives no mode (so {mode!r})"
    given = f" and give --mode {first.mode}" if "mode" in cfg.model_fields_set and cfg.mode != first.mode else ""
    raise UserError(f"{log}: this run's replies were made in mode {first.mode!r}, but {saved} {says} "
                    f"(edited since?); put 'mode: {first.mode}' back in it{given} to resume, or use a new --out folder")


def take_the_runs_own(cfg, resumable: set[str], kept: set[str], its_own_run, config_file: str | None = None,
                      in_file: set[str] = frozenset()):
    """``cfg`` (generate's, respond's or evolve's options) with the value saved in its run
    folder's config.yaml for every option the command left out, the ``resumable`` ones excepted
    (they take the new value, or the default), but not those ``kept`` (the servers and --vllm-bin;
    evolve's rounds).

    ``its_own_run(cfg, old, saved)``: whether the saved options ``old`` are of a run this command
    resumes (False: nothing is taken, the folder is refused later) or, raising, why not. A command
    naming another teacher than the run's (--teacher, or --base-url; ``teacher_of``) is refused here
    in a run that made something, before that teacher's own needs (--teacher vllm's --model, vLLM
    itself) are told; in a folder that made nothing it takes nothing from it: the corrected command
    stands as it is, with none of the old teacher's resolved defaults (the embedded teacher's
    tasks_per_request 1, max_tokens 200...). Read before the folder's lock is taken: only a resume
    rewrites config.yaml, and never in the options taken from it.
    ``in_file``: the options the --config file ``config_file`` gave, named by the file if refused.
    Validated again even when nothing is taken: ``config.resolve`` left the checks of a pair of options
    to this, the values the run will use known (``config.PAIRS_ON_RESUME``).
    """
    from selfinstruct.config import a_run_to_resume, format_validation_error, load_yaml, validation_error
    from selfinstruct.datafiles import nothing_made

    saved = Path(cfg.out) / "config.yaml"
    if not a_run_to_resume(cfg.out):  # a user's own folder is refused later; resolve checked every pair
        return cfg
    old = load_yaml(saved)
    given = cfg.model_fields_set
    taken = {}
    # Another command's run takes nothing (refused later); nor does a folder that made nothing named
    # with another teacher (--teacher and --base-url name one teacher; none named: the run's own,
    # its servers and model kept).
    named = cfg.teacher or ("openai" if cfg.base_url else None)
    if its_own_run(cfg, old, saved):
        refuse_unknown_saved_keys(type(cfg), old, saved)  # generate's callback did already, before its checks of --mode
        if named is not None and named != teacher_of(old) and not nothing_made(Path(cfg.out)):
            # Named as given (the --config file's key, or the flag), as generate's _a_run_to_resume does first.
            raise _not_as_made(saved, "teacher", teacher_of(old), named, given, config_file, in_file,
                               "teacher" if cfg.teacher else "base_url")
        if named is None or named == teacher_of(old):
            taken = {k: v for k, v in old.items() if k in type(cfg).model_fields and k not in given and k != "out"
                     and (k not in resumable or k in kept)}
    try:
        # Built from what was given and what is taken, so that both count as set (teacher_defaults
        # fills neither) and a check of two options (--max-words above --min-words) sees both; the
        # validators are told which values are the run's own, and where the others were given (as
        # config.resolve tells them), so each is named as given: --config's min_words: 120 by the
        # file and its key, not as a --min-words the user never typed.
        return type(cfg).model_validate({**{k: getattr(cfg, k) for k in given}, **taken},
                                        context={"the_runs_own": set(taken), "given": set(given),
                                                 "in_file": in_file, "config_file": config_file})
    except ValidationError as e:
        # Named as given: a value the run's own contradicts is the flag's, or the --config file's,
        # not config.yaml's; a value taken is config.yaml's.
        if (loc := e.errors()[0]["loc"]) and config_file and loc[0] in in_file:
            raise UserError(format_validation_error(e, config_file, section_of(in_file))) from None
        raise UserError(validation_error(e, set(given), str(saved), in_file=set(taken))) from None


def teacher_of(options: dict) -> str:
    """The teacher a command's options (or a run's config.yaml) name: --teacher, else a --base-url's
    server, else the embedded one. A run saved with ``teacher: null`` is resumed by ``--teacher openai``.

    >>> teacher_of({"teacher": None, "base_url": ["http://h/v1"]}), teacher_of({"base_url": []}), teacher_of({"teacher": "vllm"})
    ('openai', 'embedded', 'vllm')
    """
    return options.get("teacher") or ("openai" if options.get("base_url") else "embedded")


# The --teacher kinds that start their own server, which --base-url would contradict.
STARTS_ITS_OWN = ("embedded", "vllm")


def refuse_two_teachers(cfg, config_file: str | None = None, in_file: set[str] = frozenset()) -> None:
    """--teacher embedded or vllm with --base-url names two teachers (generate, respond, evolve): else
    the teacher started would make the data while config.yaml names the server. ``in_file``: the
    options the --config file ``config_file`` gave, named by the file and their keys."""
    if cfg.teacher in STARTS_ITS_OWN and cfg.base_url:
        base_url = said_as_given("base_url", None, in_file)
        raise UserError(f"{named_file(config_file, in_file, 'teacher', 'base_url')}"
                        f"{said_as_given('teacher', cfg.teacher, in_file)} starts its own teacher, so {base_url} does "
                        f"not apply; give {base_url} alone (or with {said_as_given('teacher', 'openai', in_file)}) "
                        "to use that server")


def refuse_a_model_for_the_embedded_teacher(teacher_kind: str, model: str | None, config_file: str | None = None,
                                            in_file: set[str] = frozenset()) -> None:
    """--model with the embedded teacher (no --base-url, or ``base_url: []``) would be ignored, and
    SmolLM2-135M would make the data of a command that named, say, a 7B model: one line instead.

    ``config_file``: the --config file that gave ``model`` (None: a flag), named with its key (in
    the section of ``in_file``, the options it gave)."""
    if teacher_kind == "embedded" and model:
        in_file = keys_like({"model"}, in_file) if config_file else set()
        raise UserError(f"{named_file(config_file, in_file, 'model')}{said_as_given('model', repr(printable(model)), in_file)} "
                        "names the model of a --base-url server or of --teacher vllm; "
                        "the embedded teacher serves its own (--teacher-model FILE.gguf for another): "
                        f"give --base-url (or --teacher vllm), or leave {said_as_given('model', None, in_file)} out")


def refuse_a_teacher_without_its_model(cfg, teacher_kind: str, config_file: str | None = None,
                                       in_file: set[str] = frozenset()) -> None:
    """--teacher vllm without --model, or a server (--base-url, --teacher openai) without its URL or
    model (generate, respond, evolve), before anything starts. Named as given: an option the --config
    file ``config_file`` gave by the file and its key, and the one it lacks the same way (a line that
    named '--base-url' for a file's base_url named a flag the user never typed)."""
    if teacher_kind == "vllm" and not cfg.model:
        option, value, lacks, what = "teacher", "vllm", "model", "a hub id or a local folder"
    elif teacher_kind == "openai" and not cfg.base_url:
        option, value, lacks, what = "teacher", "openai", "base_url", None
    elif teacher_kind == "openai" and not cfg.model:
        option, value, lacks, what = "base_url", None, "model", "the model name the server serves"
    else:
        return
    lacking = said_as_given(lacks, None, keys_like({lacks}, in_file) if option in in_file else set())
    raise UserError(f"{named_file(config_file, in_file, option)}{said_as_given(option, value, in_file)} needs "
                    f"{lacking}" + (f" ({what})" if what else ""))


# Options that only one mode uses: given (and not turned off) in another, they would be silently unused.
ONE_MODE_OPTIONS = {"lead_word": "alpaca", "continue_output": "alpaca", "prefill": "alpaca",
                    "instances_per_task": "self-instruct", "followup_sampling": "self-instruct", "magpie_prefix": "magpie"}


def refuse_options_that_do_nothing(cfg: GenerateOptions, given: set[str], config_file: str | None = None,
                                   in_file: set[str] = frozenset()) -> None:
    """One line for an option this command gives whose effect the run would not have.

    ``given``: the options the command gave (flags and YAML), not those taken from a resumed
    run's config.yaml, where the embedded teacher's table may have saved --lead-word in any mode.
    ``cfg.prefill`` is resolved (on for the servers selfinstruct starts). ``in_file``: those the
    --config file ``config_file`` gave, named by the file and their keys.
    """
    def flag(name: str) -> str:
        return said_as_given(name, None, in_file)

    def opening(*names: str) -> str:
        return named_file(config_file, in_file, *names)

    # A file's option at its default asks for nothing the mode would drop: a run's config.yaml names every
    # option (an alpaca run's holds instances_per_task: 2), and given as --config to a new run it was
    # refused. A flag is typed for its effect, so one at the default is still refused.
    fields = type(cfg).model_fields
    given = {n for n in given if not (n in in_file and n in fields and getattr(cfg, n) == fields[n].default)}
    for name, mode in ONE_MODE_OPTIONS.items():
        if name in given and getattr(cfg, name) not in (False, None) and cfg.mode != mode:
            raise UserError(f"{opening(name, 'mode')}{flag(name)} applies to {said_as_given('mode', mode, in_file)} "
                            f"only, not {cfg.mode}; leave it out")
    if cfg.mode == "magpie":  # a unit is one query from the bare pre-query: no examples shown, one task asked
        for name in ("tasks_per_request", "seed_examples", "machine_examples"):
            if name in given:
                raise UserError(f"{opening(name, 'mode')}{flag(name)} does nothing in "
                                f"{said_as_given('mode', 'magpie', in_file)} (each request is one query, written "
                                "from the chat template's opening alone, with no examples); leave it out")
    examples = ("seed_examples", "machine_examples")
    if cfg.mode != "magpie" and not any(getattr(cfg, n) for n in examples) and given.intersection(examples):
        # Every prompt would show no example, what a template without $examples is refused for; checked
        # here, after the embedded teacher's table (its machine_examples is 0), not in the model. Both
        # alpaca and self-instruct mode show seed_examples + machine_examples; a resumed run's own are kept.
        said = [said_as_given(n, 0, in_file) if n in given else
                f"{file_key(n, in_file) if in_file.intersection(examples) else flag(n)} (default 0)" for n in examples]
        raise UserError(f"{opening(*examples)}{said[0]} with {said[1]} shows no example in any prompt, so the "
                        "teacher has none to follow (a template without $examples is refused for that); give "
                        "at least one of either")
    if cfg.structured:
        for name in ("continue_output", "prefill"):  # a grammar-constrained reply is neither prefilled nor continued
            if name in given and getattr(cfg, name):
                raise UserError(f"{opening(name, 'structured')}{flag(name)} applies to text replies, not "
                                f"{said_as_given('structured', 'true' if 'structured' in in_file else None, in_file)}; "
                                "leave it out")
    elif "lead_word" in given and cfg.lead_word and not cfg.prefill:
        # Why the prefill is off, as it came to be: the command's own --no-prefill (or the file's
        # prefill: false) is not the --base-url default, and on a server selfinstruct starts, whose
        # default is on, the way out is to leave it out, not to add --prefill.
        starts_its_own = teacher_of(cfg.model_dump()) in STARTS_ITS_OWN
        if "prefill" in given:
            off = said_as_given("prefill", "false", in_file) if "prefill" in in_file else "--no-prefill"
            why, way = f"{off} was given", (f"leave {off} out, or give --structured" if starts_its_own else
                                            "give --prefill instead if the server continues an assistant message "
                                            "(llama.cpp, vLLM do), or --structured")
        elif starts_its_own:  # neither given nor the default: a resumed run's own (its config.yaml)
            why, way = "the run's prefill is false", "use a new --out folder"
        else:
            why, way = "--prefill is off for --base-url", ("add --prefill if the server continues an assistant "
                                                           "message (llama.cpp, vLLM do), or --structured")
        raise UserError(f"{opening('lead_word', 'prefill')}{flag('lead_word')} starts each instruction through "
                        f"--prefill or --structured, and this run has neither ({why}): {way}")


# Options of the teachers selfinstruct starts: given (not at their default) with another, they
# would be silently unused, as --teacher-model was with --base-url (the server made the data).
ONE_TEACHER_OPTIONS = {"teacher_model": "embedded", "teacher_threads": "embedded", "teacher_parallel": "embedded",
                       "vllm_bin": "vllm", "vllm_args": "vllm", "teacher_replicas": "vllm"}


def refuse_teacher_options_that_do_nothing(cfg, given: set[str], teacher_kind: str, config_file: str | None = None,
                                           in_file: set[str] = frozenset()) -> None:
    """One line for an option of another teacher than the run's, given by this command (generate,
    respond, evolve: each option its options have). ``in_file``: those the --config file
    ``config_file`` gave, named by the file and their keys."""
    fields = type(cfg).model_fields
    for name, kind in ONE_TEACHER_OPTIONS.items():
        if name in given and name in fields and teacher_kind != kind and getattr(cfg, name) != fields[name].default:
            which = "--teacher embedded (no --base-url)" if kind == "embedded" else "--teacher vllm"
            opening = named_file(config_file, in_file, name)
            if name == "vllm_args":
                said = (f"{file_key(name, in_file)} (flags for 'vllm serve') apply to" if name in in_file
                        else "flags after '--' go to 'vllm serve', for")
                raise UserError(f"{opening}{said} {which}, not this run's teacher ({teacher_kind}); leave them out")
            raise UserError(f"{opening}{said_as_given(name, None, in_file)} applies to {which}, not this run's "
                            f"teacher ({teacher_kind}); leave it out")


# The shortest maxLength --structured's schema may give a string: about a dozen words, a typical
# Alpaca instruction. The schema shares --max-tokens among the list's items (prompts.bounded_schema),
# and below this most tasks are cut mid-sentence: 20 tasks at the default 1,024 tokens left each
# instruction 20 characters, and a 28-character one was rejected as truncated.
MIN_STRUCTURED_CHARS = 60


def refuse_a_structured_list_too_long(cfg: GenerateOptions, config_file: str | None = None,
                                      in_file: set[str] = frozenset()) -> None:
    """One line when --structured would leave a string under ``MIN_STRUCTURED_CHARS``, naming the
    --max-tokens that would do and the most items that fit in the one given.

    ``in_file``: the options the --config file ``config_file`` gave, named by their keys there.

    >>> refuse_a_structured_list_too_long(GenerateOptions(out="r", structured=True, tasks_per_request=5))
    >>> refuse_a_structured_list_too_long(GenerateOptions(out="r", structured=True, tasks_per_request=9))
    Traceback (most recent call last):
    selfinstruct.config.UserError: --structured with --tasks-per-request 9 and --max-tokens 1024 leaves each instruction at most 58 characters; raise --max-tokens to 1050, or lower --tasks-per-request to 8
    """
    from selfinstruct.prompts import InstanceListJSON, InstructionListJSON, TaskListJSON, bounded_schema, string_limits

    lists = {"alpaca": [(TaskListJSON, "tasks_per_request")],
             "self-instruct": [(InstructionListJSON, "tasks_per_request"), (InstanceListJSON, "instances_per_task")]}

    def shortest(model, items: int, tokens: int) -> tuple[str, int]:
        return min(string_limits(bounded_schema(model, items, tokens)).items(), key=lambda kv: kv[1])

    def first(low: int, high: int, fits) -> int:
        """The least value in low..high that fits (``fits`` turns true once and stays so)."""
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if fits(mid) else (mid + 1, high)
        return low

    for model, option in lists.get(cfg.mode, []):
        items = getattr(cfg, option)
        field, chars = shortest(model, items, cfg.max_tokens)
        if chars >= MIN_STRUCTURED_CHARS:
            continue
        # The budget is linear in --max-tokens: items times one item's tokens always fits.
        tokens = first(cfg.max_tokens, cfg.max_tokens * items + 1000,
                       lambda t: shortest(model, items, t)[1] >= MIN_STRUCTURED_CHARS)
        most = first(1, items, lambda n: shortest(model, n, cfg.max_tokens)[1] < MIN_STRUCTURED_CHARS) - 1
        # Each option as it was given: 'c.yaml: structured: true with tasks_per_request: 9 and ...',
        # not '--tasks-per-request 9', a flag the user never typed.
        opening = named_file(config_file, in_file, "structured", option, "max_tokens")
        lower = f", or lower {said_as_given(option, None, in_file)} to {most}" if most >= 1 else ""
        raise UserError(f"{opening}{said_as_given('structured', 'true' if 'structured' in in_file else None, in_file)} "
                        f"with {said_as_given(option, items, in_file)} and {said_as_given('max_tokens', cfg.max_tokens, in_file)} "
                        f"leaves each {field} at most {chars} characters; raise {said_as_given('max_tokens', None, in_file)} "
                        f"to {tokens}{lower}")


# Resumable, but a resume that leaves them out keeps the run's: without its --base-url servers,
# the teacher would quietly become the embedded one, and its records join a run made by another;
# without its --vllm-bin, another vllm (the one on PATH, or none) would serve the run's model;
# without its --num, a `--num 50` run resumed with only `--timeout 20` asked for 50 more tasks (the
# default 100), as respond's --limit is kept: --num grows only when given.
KEPT_WHEN_LEFT_OUT = {"base_url", "vllm_bin", "num"}

# Options that may change when a run is resumed; any other change is refused.
RESUMABLE_CHANGES = {"num", "max_requests", "concurrency", "client_processes", "timeout", "max_retries", "progress", "fsync", "api_key",
                     "base_url", "vllm_bin", "teacher_threads", "teacher_parallel", "teacher_replicas"}


def add_arguments(parser, config_help: str = "YAML file of options (flags override it).") -> None:
    from selfinstruct.config import OneConfig

    parser.add_argument("--config", action=OneConfig, help=config_help)
    add_flags(parser, GenerateOptions, passthrough="vllm_args")
    def shown(value) -> str:
        return (" ".join(map(repr, value)) or "none") if isinstance(value, list) else str(value)

    for action in parser._actions:  # say in --help where the embedded teacher differs
        said = []
        if action.dest in EMBEDDED_DEFAULTS:
            said.append(shown(EMBEDDED_DEFAULTS[action.dest]))
        if action.dest in EMBEDDED_ALPACA_DEFAULTS:
            said.append(f"{shown(EMBEDDED_ALPACA_DEFAULTS[action.dest])} in alpaca mode")
        if action.dest in EMBEDDED_STRUCTURED_DEFAULTS:
            said.append(f"{shown(EMBEDDED_STRUCTURED_DEFAULTS[action.dest])} with --structured")
        if said:
            action.help += f" (embedded teacher: {'; '.join(said)})"
    parser.epilog = "example: selfinstruct generate --teacher vllm --model ./SmolLM2 --num 100 --out outputs/v -- --max-model-len 4096"


def run(args) -> int:
    cfg = resolve(GenerateOptions, args)
    # The options the --config file gave (and no flag overrode), named by their keys if refused.
    summary = generate(cfg, *given_by_file(args, cfg))
    return 0 if summary["kept"] >= summary["num"] else 1


# --------------------------------------------------------------------- setup


class _ErrorLine(BaseModel):
    """One line of errors.jsonl: a prompt that failed after every retry."""

    index: int
    kind: str
    message: str = ""
    at: str = ""


def _open_folder(cfg: GenerateOptions, stack, pre_query=None, own_templates=None, given: set[str] = frozenset(),
                 config_file: str | None = None, in_file: set[str] = frozenset(),
                 command: str = "generate") -> tuple[Path, bool, int]:
    """Make or find the run folder and hold its lock (in ``stack``) for the rest of the run; a resume
    is checked completely (the saved options, every file readable and valid). Nothing is written in
    it: ``_write_folder`` does, once the teacher passed its preflight (``check_servers``), so a
    refused resume, or a server that fails its check, changes nothing. Returns the folder,
    whether config.yaml needs writing, and how many candidates the run rejected for its quota.
    ``given``, ``config_file``, ``in_file``: where the command's options came from, to name them.
    """
    from selfinstruct.datafiles import (MARKER, foreign_folder, refuse_a_link_to_nothing, refuse_a_run_inside_a_run,
                                        run_lock, special_kind)

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():  # a file, or a device (/dev/null), a FIFO...: say which
        raise UserError(f"{out}: is {special_kind(out) or 'a file'}; --out must be a folder (a new one, or "
                        "a run folder to resume)")
    refuse_a_link_to_nothing(out)
    refuse_a_run_inside_a_run(out)

    if foreign_folder(out):
        raise UserError(f"{out}: folder exists and is not a run folder (no {MARKER}); choose another --out")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the run folder ({e.strerror or e})") from None
    stack.enter_context(run_lock(out, command))
    if made:  # (registered after the lock: it runs while the lock is still held)
        stack.callback(remove_if_unwritten, out)
    if foreign_folder(out):  # filled between the check and the lock
        raise UserError(f"{out}: folder exists and is not a run folder (no {MARKER}); choose another --out")
    saved = out / "config.yaml"
    # Every file the run reads or replaces, and session.json. data.json and seeds.json were found
    # only when written, data.json after a whole session's requests; a FIFO seeds.json was taken as
    # no record, so the seeds went uncompared.
    check_run_files(out, ("config.yaml", "stats.json", *FILES, "errors.jsonl", "data.json", SEEDS_FILE))
    changed, quota = True, 0
    if saved.exists():
        changed, quota = _check_resume(cfg, out, pre_query, own_templates, given, config_file, in_file)
    elif any((out / name).exists() for name in (*FILES, "errors.jsonl")):
        raise UserError(f"{saved}: missing, so this run's options are unknown; use a new --out folder")
    return out, changed, quota


def _write_folder(cfg: GenerateOptions, out: Path, changed: bool) -> None:
    """Mark the folder ``_open_folder`` checked as a run folder, save the resolved config (when
    ``changed``) and cut off a partial last line a kill left."""
    from selfinstruct.datafiles import MARKER, mark_run_folder

    try:
        if not (out / MARKER).exists():
            mark_run_folder(out)  # a new folder, or one made before the marker existed
        if changed:
            save_config(cfg, out / "config.yaml")
    except OSError as e:
        raise UserError(f"{out}: cannot write the run folder ({e.strerror or e})") from None
    # errors.jsonl too: a line a kill cut there had the next failed prompt glued onto it, which
    # stopped every later resume (respond's write_folder repairs it as well).
    for name in (*FILES, "errors.jsonl"):
        # The log's last line without its newline, when whole, is a reply: its decisions come after
        # it is durable (GroupWriter), so kept/rejected may hold them (an editor dropped the newline).
        repair(out / name, whole=_whole_reply if name == "responses.jsonl" else None)


def _whole_reply(line: bytes) -> bool:
    """Whether a log line without its newline is a whole, valid Response."""
    try:
        Response.model_validate_json(line)
    except ValidationError:
        return False
    return True


def _logged_tail(log: Path) -> Response | None:
    """The reply on the log's last line when it lacks its newline and is whole (``_whole_reply``):
    ``repair`` keeps it, but the readers skip it until then."""
    from selfinstruct.runfolder import unterminated_tail

    tail = unterminated_tail(log) if log.is_file() else b""
    return Response.model_validate_json(tail) if tail and _whole_reply(tail) else None


def _reply_index(cid: str) -> int:
    """The number of the reply a candidate's id names (``r000012-3``: 12); -1 if none.

    >>> _reply_index("r000012-3"), _reply_index("r1234567-0"), _reply_index("x")
    (12, 1234567, -1)
    """
    head = cid.rsplit("-", 1)[0]
    return int(head[1:]) if head[:1] == "r" and head[1:].isdigit() else -1


def _refuse_decisions_of_replies_not_logged(out: Path, logged: set[str]) -> None:
    """One line when kept.jsonl or rejected.jsonl decides a candidate of a reply responses.jsonl does
    not log (``logged``: its reply ids): the log deleted, or an older copy put back. The session
    numbered its replies from the log, so a new reply took an id already decided: its candidates
    were passed over as decided, neither kept nor rejected, and old records named another reply."""
    from selfinstruct.datafiles import run_file_ids

    for name in ("kept.jsonl", "rejected.jsonl"):
        for cid in run_file_ids(out / name):
            reply = cid.rsplit("-", 1)[0]
            if reply not in logged:
                raise UserError(f"{out / name}: record {cid} decides reply {reply}, which {out / 'responses.jsonl'} "
                                "does not log (deleted, or an older copy put back?); restore the log to resume, "
                                "or use a new --out folder")


def remove_if_unwritten(out: Path) -> None:
    """Remove the folder this command made when it holds nothing but the lock and the marker: a
    first command that failed (a server's preflight, the teacher's start) leaves no folder behind.
    (generate, respond and evolve; a vllm.log the failed start wrote is kept, with the marker.)"""
    from selfinstruct.datafiles import LOCK, MARKER

    try:
        names = {p.name for p in out.iterdir()}
        if names <= {LOCK, MARKER}:
            for name in names:
                (out / name).unlink()
            out.rmdir()
    except OSError:
        pass  # another command began in it meanwhile, or it cannot be read: left as it is


def check_servers(base_urls: list[str], api_key: str, model: str, cfg) -> dict[str, str | None]:
    """The teacher's preflight (GET /models with the key, the model listed) before anything is
    written to the run folder (respond, evolve; generate writes it from its loop, after the loop's
    own preflight): a wrong URL, key or model left a new folder behind, or a resumed one's
    config.yaml naming a server that does not serve the run's model, which the same command then
    failed to resume. Here only none passing is refused; returns what each server's check found
    (URL -> problem or None), which the loop's ``preflight`` takes instead of asking GET /models again
    (``respond.many_servers``), and which takes out one of several that failed."""

    async def check() -> dict[str, str | None]:
        teacher = TeacherClient(base_url=base_urls, api_key=api_key, model=model, sampling={}, concurrency=cfg.concurrency,
                                timeout=cfg.timeout, max_retries=0, on_event=lambda line: None)
        try:
            problems = await teacher.check_all()
            teacher.refuse_if_none_passed(problems)
            return problems
        finally:
            await teacher.close()

    return asyncio.run(check())


def _check_resume(cfg: GenerateOptions, out: Path, pre_query=None, own_templates=None, given: set[str] = frozenset(),
                  config_file: str | None = None, in_file: set[str] = frozenset()) -> tuple[bool, int]:
    """Refuse a resume that would change the data, or whose files are not all readable and valid,
    or whose --num is below what the run kept (``given``, ``config_file``, ``in_file``: where the
    command's options came from, to name it).

    Returns whether config.yaml needs writing (a resumable option changed), and how many
    candidates rejected.jsonl holds rejected for the quota (the loop's yield estimate). The folder
    is named by --out however it is spelled (``r1/``, ``./r1``, an absolute path), so
    ``out`` is not compared. In magpie mode the pre-query (``pre_query``) is compared with
    the one the run's logged queries were asked with; with --prompts (``own_templates``, as
    load_templates gives them), each template against the hash seeds.json keeps of it, and the
    one whose hash each reply logs (alpaca.txt, or self-instruct's instructions template)
    against the log, which a run begun before seeds.json kept them has alone.
    """
    from selfinstruct.config import load_yaml
    from selfinstruct.datafiles import nothing_made

    saved = out / "config.yaml"
    written = load_yaml(saved)
    old = {**BEFORE_SAVED, **written}  # an option saved since is compared with what the run was made with
    new = cfg.model_dump(mode="json")
    fresh = nothing_made(out)
    # config.yaml keeps --prompts as a path: an edited template, or another folder of that name
    # read from elsewhere, would change the run's prompts halfway. The bundled ones are the
    # version's own, taken after an upgrade as the bundled seeds are.
    recorded = (_seeds_began(out) or {}).get("templates") if own_templates and not fresh else None
    for key, value in new.items():
        if key in RESUMABLE_CHANGES or key == "out" or fresh:
            continue
        if key == "seeds" and (out / SEEDS_FILE).exists():
            continue  # however they are spelled now, the seeds are the run's own: generate compared them
        if (key == "prompts" and value and old.get(key) and isinstance(recorded, dict)
                and all(t.name in recorded for t in own_templates.values())):
            continue  # however the folder is spelled now (~/p, ./p/, /abs/p): each template's hash is compared below
        if key == "magpie_prefix" and pre_query is not None:
            continue  # the pre-query it gives is compared below, as is one read from the chat template
        if key == "seed" and cfg.mode == old.get("mode") == "magpie":
            continue  # it only picks the examples a prompt shows, and magpie's pre-query shows none
        if key == "teacher":  # the teacher, not the key: a run saved with null is --teacher openai's (or embedded's)
            if teacher_of(old) != teacher_of(new):
                raise _not_as_made(saved, key, teacher_of(old), teacher_of(new), given, config_file, in_file,
                                   "teacher" if "teacher" in given or "base_url" not in given else "base_url")
            continue
        if key in old and old[key] != value:
            raise _not_as_made(saved, key, old[key], value, given, config_file, in_file)
    # Every line is checked, one at a time: a run of millions of records is never held whole
    # (as models, a million kept and their rejections took several GB).
    seen: set[str] = set()
    for rec in iter_models(out / "kept.jsonl", KeptRecord):
        if rec.id in seen:  # cannot happen with one writer (the lock); never let it pass silently
            raise UserError(f"{out / 'kept.jsonl'}: record {rec.id} appears twice")
        seen.add(rec.id)
    if cfg.num < len(seen):
        # config.yaml would say fewer tasks than kept.jsonl and stats.json hold, as respond's --limit would.
        raise _num_below_kept(cfg.num, len(seen), given, config_file, in_file, saved)
    rejected, quota = [], 0
    for rej in iter_models(out / "rejected.jsonl", Rejected):
        if rej.id in seen:  # a candidate is decided once: in both, the run's counts and its funnel are wrong
            raise UserError(f"{out / 'rejected.jsonl'}: record {rej.id} is also in kept.jsonl")
        rejected.append(rej.id)
        quota += rej.stage == "quota"
    seen.update(rejected)  # every decided id, for the replies parsed again below (as the replay has them)
    del rejected
    moved = _SameParse(cfg, out / "responses.jsonl", seen)
    run = None  # the pre-query hash the run's queries were asked with: its first logged reply's
    hashes = set()  # every template hash the log holds (a run may have been resumed with an edited one before)
    # A self-instruct marker may only name one of its reply's instructions, with a ROUGE-L above
    # --threshold: how many there are takes the run's options to read, so it is checked here, where they are known.
    markers = ({"instructions": lambda first: self_instruct.instruction_count(first, cfg), "threshold": cfg.threshold}
               if cfg.mode == "self-instruct" else None)
    logged = set()  # every logged reply's id: each decided candidate's reply must be one
    k = -1
    for k, resp in enumerate(iter_models(out / "responses.jsonl", Response, context=markers)):
        run = run or resp.prompt_hash
        hashes.add(resp.prompt_hash)
        moved.check_count(k, resp)
        if resp.id in logged:  # a line copied in (`cat backup >> responses.jsonl`): stats.json counted it twice
            raise UserError(f"{out / 'responses.jsonl'}: reply {resp.id} appears twice")
        logged.add(resp.id)
    if (tail := _logged_tail(out / "responses.jsonl")) is not None:
        # The whole last line without its newline that the repair keeps (an editor dropped it, or a
        # kill came before it): the replay parses it as any other reply, so it is checked as they are,
        # its self-instruct markers too (else refused only by the next resume, once it has its newline).
        if markers is not None:
            from selfinstruct.datafiles import validated

            log = out / "responses.jsonl"
            tail = validated(Response, tail.model_dump(mode="json"), f"{log}:{_last_line(log)}", markers)
        moved.check_count(k + 1, tail)
        if tail.id in logged:
            raise UserError(f"{out / 'responses.jsonl'}: reply {tail.id} appears twice")
        logged.add(tail.id)
    if any(cid.rsplit("-", 1)[0] not in logged for cid in seen):
        _refuse_decisions_of_replies_not_logged(out, logged)  # names the first, in file order
    del seen, logged
    moved.check_instructions()
    for template in (own_templates or {}).values():
        was = recorded.get(template.name) if isinstance(recorded, dict) else None
        if isinstance(was, str) and was != template.sha256:
            raise _not_the_template(cfg, template, was)
    own = (own_templates or {}).get(OWN_TEMPLATE.get(cfg.mode))
    if own is not None and hashes and own.sha256 not in hashes:
        raise _not_the_template(cfg, own, sorted(hashes)[0])
    for _ in iter_models(out / "errors.jsonl", _ErrorLine):
        pass
    if pre_query is not None and run is not None and run != pre_query.sha256:
        # A pre-query read from the chat template is not in config.yaml (magpie_prefix is null
        # there): the log's prompt_hash says which one the run's queries were asked with.
        records = itertools.chain(iter_models(out / "kept.jsonl", KeptRecord), iter_models(out / "rejected.jsonl", Rejected))
        said = next((repr(r.provenance.prompt_template) for r in records if r.provenance.prompt_hash == run),
                    f"sha256 {run[:12]}")
        raise UserError(f"{out / 'responses.jsonl'}: this run's queries were asked after the pre-query {said}, not "
                        f"{pre_query.text!r} (from {pre_query.source}); use a new --out folder, or --magpie-prefix with the run's to resume")
    try:
        load_stats(out)
    except UserError as e:
        raise UserError(f"{e}; delete it and run again: the counts are rebuilt from the run's files") from None
    return any(written.get(k) != v for k, v in new.items() if k != "out") or "out" not in written, quota


def _num_below_kept(num: int, kept: int, given: set[str], config_file: str | None, in_file: set[str],
                    saved: Path = Path("config.yaml")) -> UserError:
    """The line for a resume whose --num is below the ``kept`` tasks the run holds, as given; left
    out, it is the run's own (``KEPT_WHEN_LEFT_OUT``), from its config.yaml ``saved``, edited since.

    >>> str(_num_below_kept(100, 101, set(), None, set(), Path("r/config.yaml")))
    'r/config.yaml: field num: 100, but this run has kept 101 tasks already (edited by hand?); give --num 101 or more'
    """
    from selfinstruct.respond import may_grow_not_shrink

    if "num" in given:
        return may_grow_not_shrink("num", num, f"kept {counted(kept, 'task')}", kept, config_file, in_file)
    return UserError(f"{saved}: field num: {num}, but this run has kept {counted(kept, 'task')} already "
                     f"(edited by hand?); give --num {kept} or more")


def _not_the_template(cfg: GenerateOptions, template, was: str) -> UserError:
    return UserError(f"{Path(cfg.prompts) / template.name}: not the template this run's prompts were made with "
                     f"(sha256 {was}, not {template.sha256}); put that one back to resume, or use a new --out folder")


def _not_as_made(saved: Path, key: str, was, now, given: set[str] = frozenset(), config_file: str | None = None,
                 in_file: set[str] = frozenset(), option: str | None = None) -> UserError:
    """The line for a resume whose ``key`` is ``now``, not the ``was`` the run was made with, naming
    where the user can change it: the --config file ``config_file`` and its key when it gave
    ``option`` (the option that set ``key``: ``base_url`` names the teacher too), its flag when the
    command gave it (``given``), else the run's config.yaml ``saved`` (edited by hand since).
    A line that named config.yaml for a --config file's value sent the user to edit the run's record.

    >>> str(_not_as_made(Path("r/config.yaml"), "seed", 0, 3, {"seed"}, "my.yaml", {"seed"}))
    "my.yaml: field 'seed': this run was made with 0, not 3; use a new --out folder, or leave seed out of this file to resume with the run's own"
    >>> str(_not_as_made(Path("r/config.yaml"), "teacher", "vllm", "openai", {"base_url"}, option="base_url"))
    "--base-url: this run was made with teacher 'vllm', not 'openai'; use a new --out folder, or leave --base-url out to resume with the run's own"
    >>> str(_not_as_made(Path("r/config.yaml"), "limit", None, 3, {"limit"}))
    "--limit: this run was made without limit, not with 3; use a new --out folder, or leave --limit out to resume with the run's own"
    """
    option = option or key
    what = "" if option == key else f"{key} "
    if was is None:  # "made with None" named a Python value, not what the user gave
        made = f"this run was made without {key}, not with {now!r}; use a new --out folder"
    elif now is None:
        made = f"this run was made with {key} {was!r}, not without it; use a new --out folder"
    else:
        made = f"this run was made with {what}{was!r}, not {now!r}; use a new --out folder"
    if config_file and option in in_file:
        key = file_key(option, in_file)  # in its section of a pipeline file
        return UserError(f"{config_file}: field '{key}': {made}, or leave {key} out of this file to resume "
                         "with the run's own")
    if option in given:
        flag = said_as_given(option)
        return UserError(f"{flag}: {made}, or leave {flag} out to resume with the run's own")
    return UserError(f"{saved}: field '{key}': {made}, or the same options to resume")


class Pool:
    """The tasks examples are drawn from, and the dedup index over their instructions.

    Examples are kept as (id, instruction, input, output) tuples, not records: with a
    million instructions in the pool the Pydantic objects alone took about 1.5 GB.
    """

    def __init__(self, seeds: list[tuple[str, str, str, str]], threshold: float, floor: float | None = None):
        from selfinstruct import rouge

        self.seeds = seeds  # (id, instruction, input, output), as load_seeds(compact=True) gives them
        self.machine: list[tuple[str, str, str, str]] = []
        self.floor = threshold if floor is None else floor
        # Looked up here, not imported by name, so bench/scale.py can swap in FullScanIndex.
        if rouge.RougeLIndex is rouge.FullScanIndex:
            self.index = rouge.FullScanIndex(threshold=threshold)
        else:
            self.index = rouge.RougeLIndex(threshold=threshold, floor=self.floor)
        self.add_many(self.seeds, into_machine=False)

    def add_many(self, examples: list[tuple[str, str, str, str]], into_machine: bool = True) -> None:
        """Many (id, instruction, input, output) into the index at once (seeds, or what a resumed run kept)."""
        if into_machine:
            self.machine.extend(examples)
        if hasattr(self.index, "add_many"):  # not FullScanIndex (bench/scale.py's reference)
            self.index.add_many([e[1] for e in examples], [e[0] for e in examples])
            self.index.prepare()
        else:
            for ref, instruction, _, _ in examples:
                self.index.add(instruction, ref)

    def add(self, rec: KeptRecord, ids: list[int] | None = None, tokens: list[str] | None = None) -> None:
        """A kept record into the examples and the index (``ids``: its instruction's ``encode``,
        or ``tokens``: its ``tokenize``)."""
        self.machine.append(example(rec))
        if ids is not None:
            self.index.add(rec.instruction, rec.id, ids=ids)
        else:
            self.index.add(rec.instruction, rec.id, tokens=tokens)

    def sample(self, rng: random.Random, n_seed: int, n_machine: int) -> list[tuple[str, str, str, str]]:
        """(id, instruction, input, output) examples: n_seed seeds + n_machine generated (seeds fill in)."""
        machine = rng.sample(self.machine, min(n_machine, len(self.machine)))
        picked = rng.sample(self.seeds, min(len(self.seeds), n_seed + n_machine - len(machine))) + machine
        rng.shuffle(picked)
        return picked


# -------------------------------------------------------------- processing


def candidates_of(resp: Response, cfg) -> list[dict]:
    """Deterministically turn a logged Response into candidates (the same on resume), by its mode.

    Each is a dict: raw, instruction, instances, is_classification, error (and stage, when not 'parse').
    """
    return MODES[resp.mode].candidates(resp, cfg)


class _SameParse:
    """A resume's check that each logged reply the replay parses again reads as it was decided.

    The replay parses a reply with a candidate undecided (a kill between its rejected and kept
    lines) and names its candidates by position (``<reply id>-<n>``). Parsed otherwise now (another
    version's parser, or an option that shapes it), a decided id would stand for another
    instruction, and an instruction decided before be decided again under another id. Only the
    replies the replay parses are parsed here, with their count recorded (``Response.candidates``):
    a reply whose candidates are all decided is passed over unparsed, as the replay does, and one
    logged before counts were is parsed by the replay alone (every one of them: twice would double
    an old run's resume). ``decided``: every id kept.jsonl and rejected.jsonl hold.
    """

    def __init__(self, cfg, log: Path, decided: set[str]):
        self.cfg, self.log, self.decided = cfg, log, decided
        self.wanted: dict[str, tuple[int, int, str | None]] = {}  # decided id -> (reply's place in the log, n, instruction now)

    def check_count(self, k: int, resp: Response) -> None:
        """The ``k``-th logged reply (from 0): its count, and which instructions its decided ids must hold."""
        if resp.candidates is None or all(f"{resp.id}-{n}" in self.decided for n in range(resp.candidates)):
            return
        cands = candidates_of(resp, self.cfg)
        if len(cands) != resp.candidates:
            raise self._refused(k, f"reply {resp.id} was logged with {counted(resp.candidates, 'candidate')} "
                                   f"and reads as {len(cands)} now")
        text_of = MODES[resp.mode].instruction_text
        for n, cand in enumerate(cands):
            if f"{resp.id}-{n}" in self.decided:
                self.wanted[f"{resp.id}-{n}"] = (k, n, text_of(cand["instruction"]) or None)

    def check_instructions(self) -> None:
        """Each decided candidate of a reply parsed again holds the instruction its position gives now.

        Read from the files once, and only when such a reply has one decided: its record's
        instruction, which the resume holds for no record (a million of them took GBs)."""
        self.decided = frozenset()  # every decided id, held no longer: only the wanted ones are looked for now
        left = len(self.wanted)
        # Rejected first: a kill between a reply's lines leaves its rejections written, not its kept.
        for name, model in (("rejected.jsonl", Rejected), ("kept.jsonl", KeptRecord)):
            if not left:
                return
            for rec in iter_models(self.log.parent / name, model):
                if rec.id not in self.wanted:
                    continue
                left -= 1
                k, n, now = self.wanted[rec.id]
                if now != rec.instruction:
                    raise self._refused(k, f"reply {rec.id.rsplit('-', 1)[0]}'s candidate {n} ({rec.id}) reads "
                                           f"{_said(now)} now, but {name} decided it as {_said(rec.instruction)}")
                if not left:
                    return

    def _refused(self, k: int, why: str) -> UserError:
        from selfinstruct.datafiles import iter_jsonl

        # The line is looked for only now: iter_models does not say it, and a refusal is rare. Past
        # the lines iter_jsonl reads, it is the last one, without its newline (``_logged_tail``).
        line, _ = next(itertools.islice(iter_jsonl(self.log, run_file=True), k, None), (None, None))
        if line is None:
            line = _last_line(self.log)
        return UserError(f"{self.log}:{line}: {why}; it is parsed otherwise than when it was decided (another "
                         "version of selfinstruct, or a config.yaml edited by hand), so a decided id would name another instruction: "
                         "finish the run with the version that made it, or start a new --out folder")


def _last_line(log: Path) -> int:
    """The number of a file's last line when it lacks its newline (``_logged_tail``), which
    ``iter_jsonl`` does not read: counted, streamed (a refusal, or a tail, is rare)."""
    with open(log, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b"")) + 1


def _said(instruction: str | None) -> str:
    """An instruction in a line, on one line and cut short (a rejected parse error has none)."""
    return "no instruction" if instruction is None else repr(_short(instruction))


class Processor:
    """Turns logged Responses into kept and rejected records, in log order (the single decider)."""

    def __init__(self, cfg, pool: Pool, teacher_model: str, base_url: str, templates):
        self.cfg, self.pool = cfg, pool
        self.done: set[str] = set()
        self.kept = 0
        self.rejected = 0
        self.quota = 0  # of the rejected, those rejected only for the quota: tasks the teacher gave, as kept ones are
        self.teacher_model, self.base_url = teacher_model, base_url
        self.template_names = {t.sha256: t.name for t in templates.values()}
        self.sampling = recorded_sampling(cfg)
        self._held: tuple | None = None  # a group whose query runs, not yet decided (feed): (group, _start's)
        self._waiting: list[tuple[Response, list]] = []  # replies short of a group: (reply, its todo)
        self._undecided: set[str] = set()  # candidates parsed, not yet decided

    def provenance(self, resp: Response) -> Provenance:
        usage = Usage(prompt_tokens=sum(r.usage.prompt_tokens for r in resp.replies),
                      completion_tokens=sum(r.usage.completion_tokens for r in resp.replies))
        return Provenance(
            teacher_model=self.teacher_model, base_url=resp.replies[0].server or self.base_url, mode=resp.mode,
            sampling=self.sampling,
            prompt_template=self.template_names.get(resp.prompt_hash, "?"), prompt_hash=resp.prompt_hash,
            example_ids=resp.example_ids, response_id=resp.id, usage=usage, created_at=resp.created_at,
            elapsed_s=resp.elapsed_s,
        )

    def process_many(self, resps: list[Response]) -> list[list[tuple[str, list]]]:
        """Decide every not-yet-decided candidate of each reply, in order: per reply, the
        lines to write, per file.

        Rejections come first, then kept: on a kill in between, the kept lines are
        redone from the log. The caller writes them (``GroupWriter``), a reply at a time.

        The replies arrive together (a busy loop finds dozens done at each wait), and
        their candidates are scored against the pool in one ``query_many`` call per
        ``GROUP`` of them: the index's fixed cost per call (lookups, threads) is shared.
        The ones the group keeps are not in that answer, so each later candidate is also
        scored against them (``rouge_l_matrix``), and every decision is the same as one
        query per candidate with the pool growing in between.
        """
        if self.held:
            raise RuntimeError("process_many with a group held back: feed([]) first")
        return [lines for _, lines in self.feed(resps)]

    @property
    def held(self) -> int:
        """Replies held back by ``feed(hold=True)``, not yet decided."""
        return len(self._waiting) + (len(self._held[0]) if self._held else 0)

    def feed(self, resps: list[Response], hold: bool = False) -> list[tuple[Response, list]]:
        """``process_many`` as (reply, lines) pairs: those an earlier call held back first.

        Each group's query starts before the group ahead of it is decided: its pass over the
        pool runs on the index's other threads (``RougeLIndex.start_query``) while this thread
        decides that group, and each candidate is scored against what that group kept too.
        Every decision is the same as one query per candidate with the pool growing in between.

        With ``hold``, the last group started is not decided, and replies short of a whole group
        wait for the next call: the pass then runs while the caller does other work (the
        generation loop reads and sends replies). ``feed([])`` decides everything held.
        """
        cfg = self.cfg
        group = self._waiting  # replies parsed, short of a group, not yet started
        scored = sum(verdict is True for _, todo in group for *_, verdict in todo)
        out = []
        seen = self._undecided  # the same reply twice (in ``resps``, or held back and again) is decided once
        for resp in resps:
            todo = []  # (cid, cand, instruction, verdict)
            text_of = MODES[resp.mode].instruction_text  # one line, or magpie's query as asked
            for n, cand in enumerate(self._candidates(resp)):
                cid = f"{resp.id}-{n}"
                if cid in self.done or cid in seen:
                    continue
                seen.add(cid)
                instruction = text_of(cand["instruction"])
                # The filters read it on one line whatever the mode: a phrase they look for may span a line break.
                flat = instruction if text_of is one_line else one_line(instruction)
                verdict = None if cand["error"] else instruction_verdict(flat, cfg)
                todo.append((cid, cand, instruction, verdict))
            group.append((resp, todo))
            scored += sum(verdict is True for *_, verdict in todo)
            if scored >= GROUP:
                out += self._advance(group)
                group, scored = [], 0
        if group and not hold:
            out += self._advance(group)
            group, scored = [], 0
        self._waiting = group
        if self._held and not hold:
            held, self._held = self._held, None
            out += self._finish(*held)
        return out

    def _advance(self, group: list[tuple[Response, list]]) -> list[tuple[Response, list]]:
        """Start a group's query, then decide the group ahead of it (``feed``): its replies' lines."""
        started = self._start(group)
        out = []
        if self._held:  # let go first, so that an error in it decides nothing twice
            held, self._held = self._held, None
            out = self._finish(*held, missed_by=started[-1])
        self._held = (group, started)
        return out

    def _candidates(self, resp: Response) -> list[dict]:
        """A reply's candidates, its count recorded on it for the log (``Response.candidates``);
        none for a logged reply whose candidates are all decided: a resume replays every
        logged reply, and parsing them again was most of its time (3 of 12 s at 300,000). One
        parsed again reads as it was decided: the resume's check (``_SameParse``) refused it else."""
        if resp.candidates is not None and all(f"{resp.id}-{n}" in self.done for n in range(resp.candidates)):
            return []
        cands = candidates_of(resp, self.cfg)
        if resp.candidates is None:  # a new reply, logged after this (a replayed one keeps its count)
            resp.candidates = len(cands)
        return cands

    def _start(self, group: list[tuple[Response, list]]) -> tuple:
        """A group's query against the pool, started (``feed``): what ``_finish`` needs."""
        from selfinstruct.rouge import Looked, Tokens, rouge_l_matrix, tokenize

        cfg, pool = self.cfg, self.pool
        # Dedup before the instance checks, as self-instruct did (it wrote instances only
        # for new instructions): a duplicate is rejected as one whatever its instances.
        scored = [(cid, instruction) for _, todo in group for cid, _, instruction, verdict in todo if verdict is True]
        to_score = [instruction for _, instruction in scored]
        split = [tokenize(instruction) for instruction in to_score]  # once, for the query, the pairs and the add
        top = max(cfg.nearest, 1)
        if hasattr(pool.index, "lookup"):  # each token looked up once, for the query, the pairs and the add
            looked = pool.index.lookup(split)
            matches = (pool.index.start_query(to_score, top, ids=looked.ids, lengths=list(map(len, split))) if to_score
                       else lambda: [])
        else:  # bench/scale.py's FullScanIndex
            tokens = Tokens()
            looked = Looked(None, [tokens(text, words) for text, words in zip(to_score, split)], [False] * len(split))
            found = pool.index.query_many(to_score, nearest=top, tokens=split) if to_score else []
            matches = lambda: found  # noqa: E731
        # Each candidate against each other in the group; only pairs with one kept earlier, above the
        # floor, are read.
        pairs = rouge_l_matrix(looked.seqs, above=pool.floor)
        # What the group ahead keeps if it is decided after this query started: (its place in the
        # pool, id, instruction, tokens).
        missed: list[tuple[int, str, str, list[str]]] = []
        return scored, split, looked, matches, pairs, missed

    def _finish(self, group: list[tuple[Response, list]], started: tuple,
                missed_by: list | None = None) -> list[tuple[Response, list]]:
        """Decide a started group's candidates, in order: per reply, (reply, its lines); what it
        keeps goes on ``missed_by`` too (the next group's, started before this one was decided)."""
        from selfinstruct.rouge import Tokens, rouge_l_matrix

        cfg, pool = self.cfg, self.pool
        scored, split, looked, matches, pairs, missed = started
        ids, seqs, whole = looked.ids, looked.seqs, looked.whole
        matches = matches()
        # The pool's answer lacks what the group ahead kept after this query started: each candidate
        # against those too, in the codes the pool has now. A text of this group with a token the pool
        # lacked at its lookup and has added since (the group ahead's) is looked up again.
        if missed and hasattr(pool.index, "sequences"):
            ahead = pool.index.sequences([at for at, *_ in missed])
            if redo := pool.index.stale(looked, split):
                seqs = list(seqs)
                for j, again in zip(redo, pool.index.lookup([split[j] for j in redo]).seqs):
                    seqs[j] = again
            behind = rouge_l_matrix(seqs, above=pool.floor, others=ahead)
        elif missed:  # bench/scale.py's FullScanIndex
            tokens = Tokens()
            ahead = [tokens("", words) for *_, words in missed]
            behind = rouge_l_matrix([tokens("", words) for words in split], above=pool.floor, others=ahead)
        # For each candidate, the earlier ones in the group above the floor, in order: few, as most
        # of a group is far apart, so a candidate reads those rather than every one kept before it.
        earlier: list[list[int]] = [[] for _ in scored]
        for i, k in zip(*(pairs > pool.floor).nonzero()):
            if i < k:
                earlier[k].append(int(i))
        fresh = [False] * len(scored)  # the group's kept so far, by their place in scored
        any_fresh = False
        j = -1  # the candidate's place in scored
        out = []
        for resp, todo in group:
            prov = None
            kept_lines, rejected_lines = [], []
            for cid, cand, instruction, verdict in todo:
                prov = prov or self.provenance(resp)
                base = {"id": cid, "raw": cand["raw"], "instruction": instruction or None,
                        "instances": cand["instances"], "provenance": prov}

                def reject(stage: str, reason: str, nearest=()):
                    rejected_lines.append(Rejected(stage=stage, reason=reason, nearest=list(nearest), **base))

                if cand["error"]:
                    reject(cand.get("stage", "parse"), cand["error"])
                    self.quota += cand.get("stage") == "quota"  # self-instruct's, its follow-ups not asked
                elif verdict is not True:
                    reject("filter", verdict[1])
                else:
                    j += 1
                    found = [m for m in matches[j].nearest if m[2] > pool.floor]
                    # The pool's own answer first, then the group ahead's, then this one's, each in the
                    # order added: sorted by score alone (stable), on equal scores the earlier text wins.
                    more = [(*missed[i][1:3], float(behind[j, i])) for i in behind[j].nonzero()[0]] if missed else []
                    if any_fresh:
                        more += [(*scored[i], float(pairs[i, j])) for i in earlier[j] if fresh[i]]
                    if more:
                        found += more
                        found.sort(key=lambda m: -m[2])
                    near = [Neighbor(id=r, instruction=t, rouge_l=round(s, 6)) for r, t, s in found[: cfg.nearest]]
                    instances, why = filters.clean_instances(cand["instances"])
                    repeat = cand.get("repeat_of")  # self-instruct: an earlier copy in its reply had the follow-ups
                    if found and found[0][2] > cfg.threshold:
                        r, t, s = found[0]
                        reject("dedup", f"duplicate: ROUGE-L {s:.3f} > {cfg.threshold} with {r} '{_short(t)}'", near)
                    elif repeat is not None:  # the copy was not kept (quota, or a duplicate of a newer task)
                        reject("dedup", f"duplicate: ROUGE-L {repeat.rouge_l:.3f} > {cfg.threshold} with {repeat.id} "
                                        f"'{_short(repeat.instruction)}' in the same reply, whose examples were asked "
                                        "instead", [repeat, *near][:max(cfg.nearest, 1)])
                    elif why:
                        reject("filter", why, near)
                    elif self.kept + len(kept_lines) >= cfg.num:
                        base["instances"] = instances
                        reject("quota", f"quota: the run reached --num {cfg.num}")
                        self.quota += 1
                    else:
                        base["instances"] = instances
                        try:
                            rec = KeptRecord(id=cid, instruction=instruction, instances=instances,
                                             is_classification=cand["is_classification"], nearest=near, provenance=prov)
                        except ValidationError as e:
                            reject("validate", f"invalid: {e.errors()[0]['msg']}")
                        else:
                            kept_lines.append(rec)
                            if missed_by is not None:
                                missed_by.append((len(pool.index), cid, instruction, split[j]))
                            pool.add(rec, ids[j] if whole[j] else None, split[j])
                            fresh[j] = any_fresh = True
                self.done.add(cid)
                self._undecided.discard(cid)
            self.kept += len(kept_lines)
            self.rejected += len(rejected_lines)
            out.append((resp, [("rejected.jsonl", rejected_lines), ("kept.jsonl", kept_lines)]))
        return out


@contextlib.contextmanager
def _refreshed_on_error(refresh):
    """On an error inside (a run stopped for want of servers, a write that failed), the bar is drawn
    once more before it is left: its last state, above the error line, showed the counts of the last
    reply taken, with the servers since taken out still in service."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # (the run's own error is the one to tell)
            refresh()
        raise


# Candidates scored in one query_many call (``Processor.process_many``). Larger groups share
# the index's fixed cost more, but each candidate is also scored against the group's kept
# so far, which grows with the group.
GROUP = 128


# Python's cyclic garbage collector, while the loop runs: a pass over the youngest objects waits for
# this many new ones (Python's default is 700). The loop's objects are nearly all freed by their
# reference counts, so at 700 a pass came every few replies and found next to nothing.
_GC_YOUNG = 10_000


@contextlib.contextmanager
def _collector_paused():
    """No cyclic garbage collection inside: for loading the seeds and building the pool, whose
    objects all live on (at 1,000,000 seeds the passes their allocations set off took 3.3 of 50 s,
    and freed nothing)."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _heap_frozen():
    """The loop's: every object made before it (the seeds, the pool, the index) left out of the
    collector's passes (``gc.freeze``), and the youngest objects' pass at ``_GC_YOUNG``; on exit,
    as it was. A full pass read each of the pool's big lists, item by item: at 100,000 seeds five
    of them took 1 s of a 9 s loop, at 1,000,000 three took 0.8 s (bench/README.md)."""
    import gc

    was = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG, *was[1:])
    try:
        yield
    finally:
        gc.set_threshold(*was)
        gc.unfreeze()


# Seconds the loop waits, once --num is reached, for replies already on their way back.
_GRACE_S = 0.5
# How long replies held back (``Processor.feed``) wait for the next reply before they are decided alone.
_HOLD_S = 0.2

# How many times the prompts the run's yield says the tasks still wanted need are kept in flight
# near its end: the tasks a reply gives vary, and a prompt too few costs one more reply's wait.
MARGIN = 1.5

# The share of the tasks a prompt asks for that a run is taken to keep before it has kept any
# (or rejected any for the quota): below what the embedded 135M teacher keeps (0.3 to 0.7 of its
# one task a prompt, README), so a small --num sends a handful of prompts, not every slot
# (--num 1 --concurrency 64 sent 50, each one a teacher call the user pays for).
PRIOR_KEEP = 0.25


def prompts_to_send(wanted: int, tasks: int, prompts: int, slots: int, asked: int = 1) -> int:
    """How many prompts to hold in flight for ``wanted`` more tasks, when the run's ``prompts`` so
    far (failed ones too) gave ``tasks`` (kept, or rejected for the quota alone): what covers them
    at that yield with ``MARGIN``, at least one and at most the ``slots`` --concurrency gives.
    Replies that come back short lower the yield and so raise it again: the run reaches --num
    whatever the yield, never stalling with a slot free and nothing in flight.

    Before any task, the yield is a prior worth one prompt: the ``asked`` tasks a prompt asks for
    (--tasks-per-request; magpie's 1) times ``PRIOR_KEEP``; each prompt back with none lowers it.

    >>> prompts_to_send(1, 24, 18, 8)  # --num 10 (10 kept, 14 quota) grown to 11: 2 prompts, not 8
    2
    >>> prompts_to_send(100, 24, 18, 8)  # far from the end: every slot
    8
    >>> prompts_to_send(1, 0, 0, 64, asked=5), prompts_to_send(1, 0, 0, 64)  # no yield yet: the prior's
    (2, 6)
    >>> prompts_to_send(1, 0, 2, 64, asked=5), prompts_to_send(1, 0, 40, 64, asked=5)  # none back yet: more
    (4, 50)
    >>> prompts_to_send(100_000, 0, 0, 64, asked=5)  # a big run fills every slot at once
    64
    >>> prompts_to_send(3, 1000, 10, 512)  # a teacher that gives many tasks a prompt
    1
    """
    if tasks <= 0:
        tasks, prompts = asked * PRIOR_KEEP, prompts + 1
    elif prompts <= 0:
        return slots
    return max(1, min(slots, math.ceil(MARGIN * wanted * prompts / tasks)))


class Wanted:
    """How many more of its instructions a self-instruct unit may ask follow-ups for (classification
    and instances: two teacher calls each): what covers the tasks --num still wants, beyond those
    whose follow-ups are out already, at the session's keep rate of asked instructions with
    ``MARGIN``. An instruction past it is logged with a ``quota:N`` marker and rejected as quota:
    --num 1 asked follow-ups for every instruction of every unit in flight (53 requests).

    >>> w = Wanted(num=1, kept=0)
    >>> [w.claim(0) for _ in range(3)]  # 1.5 times the one task wanted, at a keep rate of 1 (the prior)
    [True, True, False]
    >>> w.decided([0], kept=0); sum(w.claim(1) for _ in range(9))  # both asked, neither kept: 1 in 3
    5
    >>> w.decided([1], kept=1); w.claim(2)  # --num reached
    False
    """

    def __init__(self, num: int, kept: int):
        self.num, self.kept = num, kept
        self.out = 0  # instructions asked for, whose unit is not decided yet
        self.of_unit: Counter = Counter()  # unit index -> its instructions asked for
        self.asked = self.gained = 0  # this session: instructions asked for in decided units, and tasks kept

    def claim(self, index: int) -> bool:
        """Whether unit ``index`` may ask one more instruction's follow-ups (counted if so)."""
        # Only an instruction whose follow-ups were asked is ever kept; a prior of one, kept.
        rate = (self.gained + 1) / (self.asked + 1)
        if self.out >= math.ceil(MARGIN * (self.num - self.kept) / rate):
            return False
        self.out += 1
        self.of_unit[index] += 1
        return True

    def decided(self, indexes, kept: int) -> None:
        """The units ``indexes`` were decided (or failed), and the run has ``kept`` tasks now."""
        for index in indexes:
            n = self.of_unit.pop(index, 0)
            self.out -= n
            self.asked += n
        self.gained += kept - self.kept
        self.kept = kept


def sampling_of(cfg) -> dict:
    """The run's sampling settings, sent with each request but self-instruct's greedy follow-ups
    (``recorded_sampling`` is what each record's provenance holds)."""
    out = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
           "stop": cfg.stop or None, "seed": cfg.teacher_seed}
    for key in ("repeat_penalty", "dry_multiplier"):
        if getattr(cfg, key) is not None:  # absent, not null: records of earlier runs stay as they were
            out[key] = getattr(cfg, key)
    return out


def recorded_sampling(cfg) -> dict:
    """``sampling_of``, and under each self-instruct follow-up's purpose ("classify", "instances") what
    it was sent with instead, when that differs (``followup_sampling`` greedy); null: not sent."""
    out = sampling_of(cfg)
    if cfg.mode == "self-instruct":
        for purpose, changed in self_instruct.followup_sampling(cfg).items():
            out[purpose] = {**sampling_of(cfg), **changed}
    return out


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# ------------------------------------------------------------------ stats


def compute_stats(folder: Path, extra: dict) -> dict:
    """Stats derived from the files themselves, so they add up after any number of resumes."""
    by_reason, by_stage = Counter(), Counter()
    kept = sum(1 for _ in run_file_ids(folder / "kept.jsonl"))
    rejected = 0
    for stage, reason in rejection_heads(folder / "rejected.jsonl"):
        rejected += 1
        by_stage[stage] += 1
        by_reason[reason] += 1
    prompt_tokens = completion_tokens = replies = responses = 0
    from selfinstruct.config import server_key
    from selfinstruct.teacher import usage_counts

    by_server: dict[tuple, Counter] = {}
    for o in read_jsonl(folder / "responses.jsonl"):
        responses += 1
        for r in o["replies"]:
            replies += is_request(str(r.get("purpose", "")))  # not self-instruct's markers (failed:N, repeat:N, quota:N)
            # As the teacher now reads a reply's usage: a count no reply could have (logged before it
            # was checked, a proxy's 10**30) is no usage, not a total ruined for every later resume.
            usage = usage_counts(r["usage"]) or Usage()
            prompt_tokens += usage.prompt_tokens
            completion_tokens += usage.completion_tokens
            if r.get("server"):  # by server_key: one server spelled two ways in two sessions is one
                by_server.setdefault(server_key(r["server"]), Counter()).update(
                    prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
    errors = Counter()
    for o in read_jsonl(folder / "errors.jsonl"):
        errors[o["kind"]] += 1
    servers = extra.get("servers")
    if servers is not None:
        # Each server's tokens from the log too, like the run's: a session ended by kill -9
        # never wrote its own counts, but its replies are in responses.jsonl.
        logged = {u: by_server.get(server_key(u), Counter()) for u in servers}
        extra = {**extra, "servers": {u: {**s, "prompt_tokens": logged[u]["prompt_tokens"],
                                          "completion_tokens": logged[u]["completion_tokens"]}
                                      for u, s in servers.items()}}
    return {
        "candidates": kept + rejected, "kept": kept, "rejected": rejected,
        "rejected_by_stage": dict(by_stage.most_common()), "rejected_by_reason": dict(by_reason.most_common()),
        "responses": responses, "replies": replies, "failed_units": sum(errors.values()),
        "errors": dict(errors), "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        **extra,
    }


# ------------------------------------------------------------------- loop


def default_concurrency(teacher_kind: str, vllm_args: list[str], teacher_parallel: int = 2) -> int:
    """Requests in flight when --concurrency is not given.

    vLLM decodes up to --max-num-seqs sequences together (256 unless told otherwise, but recent
    vLLM takes 1,024 on a GPU of 70 GB or more other than the A100, which this process cannot
    see before vLLM starts: README says to give it there); twice that many in flight keeps its
    queue non-empty while our side parses replies.
    The embedded teacher decodes --teacher-parallel at once and is slow: one request
    waiting keeps its slots full, while a longer queue only spends --timeout waiting
    (a 20-task run with 8 in flight on 2 slots saw a request time out in the queue).

    >>> default_concurrency("vllm", []), default_concurrency("vllm", ["--max-num-seqs", "32"])
    (512, 64)
    >>> default_concurrency("vllm", ["--max-num-seqs=8"]), default_concurrency("embedded", [], 2)
    (16, 3)
    >>> default_concurrency("openai", []), default_concurrency("vllm", ["--max-num-seqs", "4096"])
    (8, 4096)
    """
    if teacher_kind == "embedded":
        return teacher_parallel + 1
    if teacher_kind != "vllm":
        return 8
    seqs = 256
    for i, arg in enumerate(vllm_args):
        value = arg.split("=", 1)[1] if arg.startswith("--max-num-seqs=") else (
            vllm_args[i + 1] if arg == "--max-num-seqs" and i + 1 < len(vllm_args) else None)
        if value is not None:
            try:
                seqs = int(value)
            except ValueError:
                raise UserError(f"--max-num-seqs {value!r} is not a whole number") from None
    return min(2 * max(1, seqs), MAX_CONCURRENCY)


def servers_of(cfg, teacher_kind: str) -> int:
    """How many servers the teacher is: the distinct --base-url's, --teacher-replicas, or one."""
    return (len(distinct_urls(cfg.base_url)) if teacher_kind == "openai" else
            getattr(cfg, "teacher_replicas", 1) if teacher_kind == "vllm" else 1)


def room_for_the_teacher(cfg, teacher_kind: str) -> None:
    """``teacher.room_for_connections`` for the resolved --concurrency, before any teacher starts or the
    run folder is made: checked only when the client was made, the refusal came after vLLM's replicas had
    loaded (minutes on a GPU) and after respond and evolve had written their folder, and respond's and
    evolve's server check counted the client's default of 8, not the --concurrency given."""
    from selfinstruct.teacher import room_for_connections

    room_for_connections(cfg.concurrency, servers_of(cfg, teacher_kind), 2 if teacher_kind == "embedded" else 1)


def refuse_senders_past_what_is_in_flight(cfg, teacher_kind: str, given: set[str], config_file: str | None = None,
                                          in_file: set[str] = frozenset()) -> None:
    """--client-processes above --concurrency times the servers (generate, respond, evolve): no more
    requests are ever in flight, so TeacherClient starts only that many senders, while config.yaml
    (and a resume's comparison) kept the number given. One line instead, each option named as the
    command gave it, a default as that (``filters.options_conflict``). ``cfg.concurrency`` is
    resolved (its default filled in); ``given``: the options the command gave.

    >>> refuse_senders_past_what_is_in_flight(GenerateOptions(out="r", concurrency=4, client_processes=9,
    ...                                       base_url=["http://a/v1", "http://b/v1"]), "openai",
    ...                                       {"concurrency", "client_processes"})
    Traceback (most recent call last):
    selfinstruct.config.UserError: --client-processes 9 must be at most 2 times --concurrency 4 (the requests in flight per server, on 2 servers: 1 sender would never have a request to send)
    """
    import types

    servers = servers_of(cfg, teacher_kind)
    most = cfg.concurrency * servers
    if cfg.client_processes <= most:
        return
    # options_conflict reads where each option was given from a validator's context; this check
    # needs the teacher's servers and the resolved concurrency, known only here.
    where = types.SimpleNamespace(context={"given": set(given), "in_file": in_file, "config_file": config_file})
    idle = cfg.client_processes - most
    raise filters.options_conflict(where, ("client_processes", cfg.client_processes),
                                   "must be at most" + (f" {servers} times" if servers > 1 else ""),
                                   ("concurrency", cfg.concurrency),
                                   f"the requests in flight per server, on {counted(servers, 'server')}: "
                                   f"{counted(idle, 'sender')} would never have a request to send")


# More requests in flight per server than any server batches; each one's unit is held in memory.


def generate(cfg: GenerateOptions, config_file: str | None = None, in_file: set[str] = frozenset(),
             hold: contextlib.ExitStack | None = None, command: str = "generate") -> dict:
    """Run (or resume) a generation into ``cfg.out``; returns the stats, and ``num``: the --num it ran
    to (a resume's own when left out, not ``cfg.num``).

    ``in_file``: the options the --config file ``config_file`` gave, named by their keys when refused.
    ``hold``: a stack that keeps the run folder's lock after the generation, for a caller that goes on
    reading the run (``pipeline``'s audit and tune); ``command``: who the lock names as its holder."""
    from selfinstruct.datafiles import nothing_made
    from selfinstruct.seeds import load_seeds

    started = time.monotonic()
    given = set(cfg.model_fields_set)  # by this command, not taken from the run's config.yaml
    model_given = "model" in given
    cfg = as_the_run_was(cfg, config_file, in_file)
    refuse_two_teachers(cfg, config_file, in_file)
    if cfg.mode == "magpie" and cfg.structured:
        # The query is whatever the model writes after the pre-query and the answer is a plain
        # chat reply: there is no list of tasks for a JSON schema to shape.
        raise UserError(f"{named_file(config_file, in_file, 'structured', 'mode')}"
                        f"{said_as_given('structured', 'true' if 'structured' in in_file else None, in_file)} does not "
                        f"apply to {said_as_given('mode', 'magpie', in_file)} (its query and answer are free text)")
    if cfg.mode == "magpie" and cfg.prompts:
        # The teacher writes the query itself after the pre-query: no template is rendered,
        # so a folder of them would be silently unused.
        raise UserError(f"{named_file(config_file, in_file, 'prompts', 'mode')}{said_as_given('prompts', None, in_file)} "
                        f"does not apply to {said_as_given('mode', 'magpie', in_file)} (the teacher writes its query "
                        "after the pre-query; no prompt template is used)")
    seed_paths = cfg.seeds or [bundled_dir("seeds") / "seed_tasks.jsonl"]
    fresh = nothing_made(Path(cfg.out))  # no run yet, or one that stopped before its first request
    began = None if fresh else _seeds_began(Path(cfg.out))
    if not fresh and began is None:
        _refuse_a_run_without_its_seeds_record(Path(cfg.out))
    # The run's own files, read again: a problem is in them, not in where the command runs.
    own_files = bool(began) and [str(Path(p).resolve()) for p in seed_paths] == began.get("files")
    try:
        with _collector_paused():
            seeds = load_seeds(seed_paths, compact=True)
    except UserError as e:
        raise UserError(f"{e}{_where_seeds_were(began)}" if began and not own_files else str(e)) from None
    fingerprint = seeds_sha256(seeds)
    if began and cfg.seeds and began.get("sha256") != fingerprint:
        # A relative --seeds saved in config.yaml is read from where the command runs: never let
        # a resume from another folder (or edited seed files) build its pool from other tasks.
        # The bundled seeds are the version's own: a resume after an upgrade takes them, as it
        # takes the version's other defaults.
        why = (f" (they were edited since it began with their {_tasks(began, 'task')}: put them back to "
               "resume, or use a new --out folder)" if own_files else _where_seeds_were(began))
        raise UserError(f"{', '.join(map(str, seed_paths))}: not the seed tasks this run began with{why}")
    templates = load_templates(cfg.prompts, mode=cfg.mode)
    teacher_kind = cfg.teacher or ("openai" if cfg.base_url else "embedded")
    refuse_a_model_for_the_embedded_teacher(teacher_kind, cfg.model if model_given else None,
                                            config_file if "model" in in_file else None, in_file)
    refuse_teacher_options_that_do_nothing(cfg, given, teacher_kind, config_file, in_file)
    # A teacher's files are looked for now, not when it starts: a wrong path would leave a new
    # run folder behind, or rewrite a resumed one's config.yaml and stats.json.
    # (respond and evolve check the same, with the same function.)
    from selfinstruct.servers import check_teacher_files

    check_teacher_files(teacher_kind, cfg)
    cfg = teacher_defaults(cfg, teacher_kind)
    if cfg.prefill is None:
        # Measured on SmolLM2-135M: 3 usable tasks in 4 replies with the prefill, 0 without.
        # Only on servers we start, which are known to continue a final assistant message.
        cfg = cfg.model_copy(update={"prefill": teacher_kind in ("embedded", "vllm")})
    refuse_options_that_do_nothing(cfg, given, config_file, in_file)
    if cfg.structured and fresh:
        # Only as a run begins: a run made with them keeps them (--max-tokens cannot change on
        # resume), and its records were made so.
        refuse_a_structured_list_too_long(cfg, config_file, in_file)
    if cfg.concurrency is None:
        cfg = cfg.model_copy(update={"concurrency": default_concurrency(teacher_kind, cfg.vllm_args, cfg.teacher_parallel)})
    refuse_senders_past_what_is_in_flight(cfg, teacher_kind, given, config_file, in_file)
    room_for_the_teacher(cfg, teacher_kind)
    api_key = api_key_of(cfg.api_key)
    if cfg.mode == "magpie" and teacher_kind != "embedded":
        # Before the run folder is made: a missing chat template is one line, and no folder to clean up.
        urls = distinct_urls(cfg.base_url) if teacher_kind == "openai" else []
        templates = {"pre_query": magpie.find_pre_query(cfg, urls, api_key or "EMPTY")}
    # Before the run folder is made: a first command that fails these leaves nothing to clean up.
    refuse_a_teacher_without_its_model(cfg, teacher_kind, config_file, in_file)
    with contextlib.ExitStack() as stack:
        t = None
        if teacher_kind == "embedded" and cfg.mode == "magpie":
            # The embedded teacher is asked for its template once it runs (a --teacher-model GGUF
            # may carry none), so it starts before the run folder is made, for the same reason.
            t = _start_embedded(cfg, stack)
            templates = {"pre_query": magpie.find_pre_query(cfg, [t.base_url], t.api_key)}
        own = templates if cfg.prompts else None
        # (holds the folder's lock until the end)
        folder, changed, quota = _open_folder(cfg, stack, templates.get("pre_query"), own, given, config_file, in_file,
                                              command)
        if hold is not None:  # taken again (run_lock counts a process's own takes): released by the caller
            from selfinstruct.datafiles import run_lock

            hold.enter_context(run_lock(folder, command))
        if teacher_kind == "embedded":
            t = t or _start_embedded(cfg, stack)
            base_urls, api_key, model = [t.base_url], t.api_key, t.model
        elif teacher_kind == "vllm":
            from selfinstruct.datafiles import MARKER, mark_run_folder
            from selfinstruct.servers import vllm_replicas

            if not (folder / MARKER).exists():  # its vllm.log goes in the folder: one a rerun takes as its own
                mark_run_folder(folder)
            ts = stack.enter_context(vllm_replicas(cfg.model, cfg.teacher_replicas, vllm_bin=cfg.vllm_bin,
                                                   extra_args=cfg.vllm_args, log_dir=folder))
            base_urls, api_key, model = [t.base_url for t in ts], ts[0].api_key, ts[0].model
        else:
            base_urls, model = distinct_urls(cfg.base_url), cfg.model
            api_key = api_key or "EMPTY"

        def ready() -> SessionCounts:
            """Write the folder, once the loop's preflight passed: a server that fails it (a typo'd
            --base-url, one that does not serve the run's model) leaves the folder as it was."""
            _write_folder(cfg, folder, changed)  # saves the resolved config
            was = None if fresh else _seeds_began(folder)
            began = was or {"sha256": fingerprint, "tasks": len(seeds), "files": [str(Path(p).resolve()) for p in seed_paths]}
            if own and not isinstance(began.get("templates"), dict):
                # Every template's hash, for the resume to compare: only the one each reply logs is in
                # responses.jsonl. A run begun before they were kept gets this session's, checked since.
                began = {**began, "templates": {t.name: t.sha256 for t in own.values()}}
            if began != was:
                write_json_atomic(folder / SEEDS_FILE, began)
            # This session's requests, faults and seconds are saved every second (session.json), so
            # a kill -9 loses none of them; the next session counts them, as this one does the last's.
            counts = _SESSIONS[folder] = begin_session(folder, started, lambda rec, last: _finish(
                cfg, folder, rec.get("model") or "", rec.get("base_urls") or [""], rec["wall_s"], rec.get("faults", {}),
                rec.get("servers", {}), last))
            stack.callback(_count_session, cfg, folder)  # however the session ends, stats.json counts it
            counts.teacher_up(model, base_urls)
            return counts

        return asyncio.run(_loop(cfg, folder, seeds, templates, base_urls, api_key, model, started, ready, quota))


# The template whose sha256 each logged reply keeps (Response.prompt_hash), by mode.
OWN_TEMPLATE = {"alpaca": "alpaca", "self-instruct": "instructions"}

SEEDS_FILE = "seeds.json"  # in the run folder: which seed tasks it began with (seeds_sha256) and where they were


def seeds_sha256(seeds: list[tuple[str, str, str, str]]) -> str:
    """A hash of the seed tasks as the pool holds them (id, instruction, input, output).

    >>> seeds_sha256([("s1", "Write a poem.", "", "A poem.")])[:12]
    '46be7fc59b3a'
    """
    import hashlib
    import json

    digest = hashlib.sha256()
    for task in seeds:
        digest.update(json.dumps(task, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _seeds_began(out: Path) -> dict | None:
    """What the run in ``out`` recorded of its seeds (``SEEDS_FILE``), if it is a run that did."""
    import json

    from selfinstruct.datafiles import is_run_folder, read_json

    path = out / SEEDS_FILE
    if not path.is_file() or not is_run_folder(out):
        return None
    began = read_json(path, "seeds record")
    if not isinstance(began, dict):
        raise UserError(f"{path}: not a JSON object")
    # Every field is written as the run begins: `{}` (edited down) read as no record, the seeds went
    # uncompared and this session's were written over it.
    count = began.get("tasks")
    for key, ok, want in (("sha256", isinstance(began.get("sha256"), str) and began.get("sha256"), "a hash"),
                          ("tasks", isinstance(count, int) and not isinstance(count, bool) and count >= 0, "a count"),
                          ("files", isinstance(began.get("files"), list)
                           and all(isinstance(f, str) for f in began["files"]), "a list of paths")):
        if not ok:
            what = "missing" if key not in began else f"must be {want}, not {json.dumps(began[key])[:40]}"
            raise UserError(f"{path}: field '{key}': {what}, so the seed tasks this run began with cannot be "
                            "compared (edited?); restore it to resume, or use a new --out folder")
    # Absent in a run begun before the templates' hashes were kept (that session's are then taken); there and
    # not a mapping of names to hashes, it was taken as absent, and this session's templates written over it.
    templates = began.get("templates")
    if "templates" in began and not (isinstance(templates, dict)
                                     and all(isinstance(v, str) for v in templates.values())):
        raise UserError(f"{path}: field 'templates': must be each prompt template's name and hash, not "
                        f"{json.dumps(templates)[:40]}, so the --prompts this run began with cannot be compared "
                        "(edited?); restore it to resume, or use a new --out folder")
    return began


def _refuse_a_run_without_its_seeds_record(out: Path) -> None:
    """One line for a run that made requests and has no seeds.json: the resume took edited seed
    files silently (nothing to compare them with), where with it in place they are refused. A run
    begun before seeds.json was kept (752afab) lacks it, and logs its replies without their count
    (``Response.candidates``, which came later): that one resumes, and gets its seeds.json then."""
    from selfinstruct.datafiles import is_run_folder

    path = out / SEEDS_FILE
    if os.path.lexists(path) or not is_run_folder(out):  # one that is no file is refused by check_run_files
        return
    log = out / "responses.jsonl"
    first = next(iter_models(log, Response), None) if log.is_file() else None  # not a FIFO: refused later
    if first is not None and first.candidates is None:
        return
    raise UserError(f"{path}: missing, so the seed tasks this run began with cannot be compared (deleted?); "
                    "restore it to resume, or use a new --out folder")


def _tasks(began: dict, noun: str) -> str:
    """How many seed tasks ``began`` (seeds.json) says the run began with, and ``noun``."""
    n = began.get("tasks")
    return counted(n, noun) if isinstance(n, int) else f"? {noun}s"


def _where_seeds_were(began: dict) -> str:
    files = ", ".join(map(str, began.get("files", [])))
    return (f" (this run began with {_tasks(began, 'seed task')} from {files}: resume from the folder it "
            "began in, or give --seeds with those files)")


def _start_embedded(cfg: GenerateOptions, stack: contextlib.ExitStack):
    """The embedded teacher, served until ``stack`` closes."""
    from selfinstruct.servers import embedded_teacher

    return stack.enter_context(embedded_teacher(cfg.teacher_model, parallel=cfg.teacher_parallel,
                                                threads=cfg.teacher_threads))


async def _loop(cfg, folder: Path, seeds, templates, base_urls: list[str], api_key: str, model: str,
                started: float, ready, quota: int = 0) -> dict:
    """The generation: the servers' preflight, then ``ready()`` writes the folder and begins the
    session (its SessionCounts), then the prompts. ``quota``: the candidates rejected.jsonl
    holds rejected for the quota (``_check_resume`` counted them)."""
    from selfinstruct.progress import RunProgress

    sampling = sampling_of(cfg)
    events: list[str] = []  # servers taken out or back, shown above the bar
    teacher = TeacherClient(base_url=base_urls, api_key=api_key, model=model, sampling=sampling,
                            concurrency=cfg.concurrency, timeout=cfg.timeout, max_retries=cfg.max_retries,
                            health=True, on_event=events.append, client_processes=cfg.client_processes)
    try:
        # Before the first prompt: a wrong URL, key or model is one line now, not 50 failed prompts later.
        await teacher.preflight()
        counts = ready()  # nothing is written to the folder before the check passed
    except BaseException:
        await teacher.close()
        raise

    with _collector_paused():
        pool = Pool(seeds, cfg.threshold, cfg.nearest_floor)
        # Reload what earlier sessions kept, in order: the pool and index are as they were.
        kept_ids, done, resumed = set(), set(), []
        for rec in iter_models(folder / "kept.jsonl", KeptRecord):
            if rec.id in kept_ids:  # cannot happen with one writer; never let it pass silently either
                raise UserError(f"{folder / 'kept.jsonl'}: record {rec.id} appears twice")
            kept_ids.add(rec.id)
            resumed.append(example(rec))
        pool.add_many(resumed)
    done |= kept_ids
    done |= set(run_file_ids(folder / "rejected.jsonl"))
    proc = Processor(cfg, pool, model, base_urls[0], templates)
    proc.done, proc.kept = done, len(kept_ids)
    proc.rejected = len(done) - len(kept_ids)
    proc.quota = quota

    # Rejected before kept: GroupWriter writes its decision files in this order.
    writer = GroupWriter(folder, ("responses.jsonl", "errors.jsonl", "rejected.jsonl", "kept.jsonl"), fsync=cfg.fsync)
    unit = MODES[cfg.mode].unit
    # self-instruct: follow-ups are asked only for the instructions the run may still keep.
    wanted = Wanted(cfg.num, proc.kept) if cfg.mode == "self-instruct" else None
    if wanted is not None:
        unit = functools.partial(unit, wanted=wanted)
    per_unit = 1 if cfg.mode == "magpie" else cfg.tasks_per_request  # candidates a unit asks for
    max_requests = cfg.max_requests or max(50, 50 * math.ceil(cfg.num / per_unit))

    # Finish what the log holds before asking for more.
    next_index = 0
    logged = 0
    pending = collections.deque()  # (future, kept lines): commits not yet known to be durable
    logs = iter_models(folder / "responses.jsonl", Response)
    with _heap_frozen():
        while resps := list(itertools.islice(logs, 256)):
            for resp, lines in zip(resps, proc.process_many(resps)):
                pending.append((writer.submit(lines), len(lines[1][1])))
                next_index = max(next_index, resp.index + 1)
                logged += 1
    failed = 0
    for o in read_jsonl(folder / "errors.jsonl"):
        failed += o.get("reached", True)  # a prompt no server ever received does not use up --max-requests
        next_index = max(next_index, o["index"] + 1)
    # Never at or below a decided reply's number: its id would be taken as decided, and its
    # candidates passed over (the resume refuses a log that lacks such a reply; this holds anyway).
    next_index = max(next_index, 1 + max((_reply_index(cid) for cid in done), default=-1))
    attempts = logged + failed

    t0 = time.monotonic()
    in_flight: dict[asyncio.Task, int] = {}
    tokens0 = 0
    progress = RunProgress(cfg.num, enabled=cfg.progress)
    durable = proc.kept - sum(n for _, n in pending)  # kept records known to be on disk

    def settle() -> int:
        """Count the commits that finished; the first write error stops the run here."""
        nonlocal durable
        while pending and pending[0][0].done():
            fut, n = pending.popleft()
            fut.result()  # raises the writer's UserError (a full disk, say)
            durable += n
        return durable

    def write(decided) -> None:
        """Submit decided replies to the writer, a reply at a time. Each reply is logged before its
        candidates (the write-ahead log): the writer makes responses.jsonl durable before it writes
        rejected/kept lines."""
        nonlocal tokens0
        for resp, lines in decided:
            pending.append((writer.submit([("responses.jsonl", [resp]), *lines]), len(lines[1][1])))
            tokens0 += sum(r.usage.completion_tokens for r in resp.replies)

    def take(finished) -> None:
        """Log and decide finished prompts, in prompt order: replies into the log and the
        records, failures into errors.jsonl; a refusal no retry can mend stops the run."""
        nonlocal attempts
        replies, fatal, indexes = [], None, []
        for task in sorted(finished, key=in_flight.get):  # in prompt order, not the set's
            index = in_flight.pop(task)
            indexes.append(index)
            attempts += 1
            try:
                resp = task.result()
            except TeacherError as e:
                err = {"index": index, "kind": e.kind, "message": str(e), "at": now_iso(), "reached": e.reached}
                pending.append((writer.submit([("errors.jsonl", [err])]), 0))
                if e.kind in FATAL_KINDS:
                    fatal = fatal or e
                continue
            replies.append(resp)
        # Decided together (one index query per group), written a reply at a time. While replies
        # come faster than one group a take (the loop is busy deciding), the last group is held
        # back: its pass over the pool runs on the index's other threads while this loop reads and
        # sends replies, and the next take decides it first. Replies that come one at a time are
        # decided and written at once, as a slow teacher's should be. Nothing is held near --num
        # (the loop sends prompts by the count kept, which a held group lags), nor in self-instruct
        # mode (it asks follow-ups by what was decided).
        hold = (wanted is None and not fatal and len(replies) * per_unit >= GROUP
                and cfg.num - proc.kept > 2 * per_unit * (cfg.concurrency * max(1, teacher.in_service())
                                                          + len(replies) + proc.held))
        write(proc.feed(replies, hold=hold))
        if wanted is not None:  # their instructions asked for are kept or rejected now (or failed with the unit)
            wanted.decided(indexes, proc.kept)
        if fatal:  # the replies that came with it are written first: they cost the teacher
            pending[-1][0].result()  # commits end in order: everything above is on disk
            fatal.server = fatal.server or base_urls[0]
            raise UserError(fatal_line(fatal))

    def session() -> dict:
        return {"startup_s": round(t0 - started, 3), "loop_s": round(time.monotonic() - t0, 3), "commits": writer.groups}

    def refresh() -> None:
        progress.update(settle(), proc.rejected, attempts, sum(teacher.faults.values()),
                        tokens0 / max(1e-9, time.monotonic() - t0), servers=server_line(teacher))

    saver = asyncio.create_task(counts.keep(teacher, session))
    progress.update(settle(), proc.rejected, attempts, 0, 0.0, servers=server_line(teacher))
    for line in events:  # servers the preflight took out
        progress.note(line)
    events.clear()
    clean = False
    try:
        with progress, _refreshed_on_error(refresh), _heap_frozen():
            while proc.kept < cfg.num:
                # --concurrency is per server: enough units to fill every server in service; near
                # the end (or all along, for a small --num), only those the tasks still wanted need,
                # by the run's yield so far.
                # Before any task, by a prior of the tasks a prompt asks for (``per_unit``).
                slots = prompts_to_send(cfg.num - proc.kept, proc.kept + proc.quota, attempts,
                                        cfg.concurrency * max(1, teacher.in_service()), per_unit)
                while len(in_flight) < slots and attempts + len(in_flight) < max_requests:
                    task = asyncio.create_task(unit(next_index, cfg, teacher, templates, pool))
                    in_flight[task] = next_index
                    next_index += 1
                if not in_flight:
                    break
                # Replies held back are decided and written when no reply comes for _HOLD_S: a teacher
                # that slows down after a burst does not leave them unwritten until its next reply.
                finished, _ = await asyncio.wait(in_flight, timeout=_HOLD_S if proc.held else None,
                                                 return_when=asyncio.FIRST_COMPLETED)
                take(finished)
                for line in events:
                    progress.note(line)
                events.clear()
                refresh()
            # Replies that came back while the last ones were decided cost the teacher too: those
            # the client has (or gets within _GRACE_S) are logged, their tasks past the quota
            # rejected as such, not dropped with the prompts still out.
            if in_flight:
                done, _ = await asyncio.wait(in_flight, timeout=_GRACE_S)
                take(done)
            write(proc.feed([]))  # a group still held back
            if pending:  # the bar's last state counts only what is on disk
                await asyncio.wrap_future(pending[-1][0])
            refresh()
        clean = True
    finally:
        saver.cancel()
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
        await teacher.close()
        if proc.held:  # stopped by an error or Ctrl-C: the replies held back cost the teacher, and are written
            with contextlib.suppress(Exception):  # (the error that stopped the run is the one to tell)
                write(proc.feed([]))
        try:
            writer.close()  # commits what is queued; raises the first write error
            settle()
        except UserError:
            if clean:
                raise
        try:
            stats = _finish(cfg, folder, model, base_urls, time.monotonic() - started, dict(teacher.faults),
                            teacher.server_stats(), {"id": counts.id, **session()})
        except UserError:
            if clean:
                raise
            # The error that stopped the run (a full disk on kept.jsonl, say) is the one to report.
    progress.summary(stats)
    if stats["kept"] < cfg.num:
        progress.note(f"stopped after {counted(attempts, 'prompt')} (--max-requests {max_requests}) with {stats['kept']} of "
                      f"{cfg.num} kept")
    # The --num this session ran to: on resume the run's own when left out, which the caller's
    # options (its default, 100) do not say.
    return {**stats, "num": cfg.num}


# Run folders whose session has not written stats.json yet -> its counts.
_SESSIONS: dict[Path, SessionCounts] = {}


def _count_session(cfg, folder: Path) -> None:
    """A session that ended before the loop's own _finish (a teacher that never started, an
    error while replaying the log, Ctrl-C) is still counted, with its wall time."""
    counts = _SESSIONS.pop(folder, None)
    if counts is None:
        return
    try:
        previous = _previous_stats(folder)
        urls = previous.get("base_url") or cfg.base_url or [""]
        _finish(cfg, folder, previous.get("teacher_model") or cfg.model or "", urls if isinstance(urls, list) else [urls],
                time.monotonic() - counts.started, {}, {}, {"id": counts.id})
    except UserError:
        pass  # the error that ended the session is the one to report


def _previous_stats(folder: Path) -> dict:
    try:
        return load_stats(folder)
    except UserError:
        return {}


def _finish(cfg, folder: Path, model: str, base_urls: list[str], wall: float, faults: dict, servers: dict,
            session: dict) -> dict:
    """Write stats.json counting one more session (``wall`` seconds, its ``faults`` and per-server
    counts), and data.json; ``session``: its id, and the figures of ``last_session``."""
    from selfinstruct.export import run_rows, write_alpaca_json

    _SESSIONS.pop(folder, None)
    previous = load_stats(folder)  # its figures checked (a NaN or a negative count is one line, not written back)
    total = Counter(previous.get("faults", {}))
    total.update(faults)
    stats = compute_stats(folder, {
        "teacher_model": model, "base_url": base_urls[0] if len(base_urls) == 1 else base_urls, "mode": cfg.mode,
        "wall_time_s": round(previous.get("wall_time_s", 0.0) + wall, 3),
        "sessions": previous.get("sessions", 0) + 1, "faults": dict(total),
        # This session alone: its id; seconds to load seeds, build the index and replay the log;
        # seconds in the loop; group commits made (replies per commit = responses / commits);
        # "ended": "interrupted" for one counted by the next session from its session.json.
        "last_session": session,
        "servers": merge_server_stats(previous.get("servers") or {}, servers),
    })
    stats["alpaca_rows"] = write_alpaca_json(run_rows(folder), folder / "data.json")
    write_json_atomic(folder / "stats.json", stats)
    remove_session_file(folder)  # after stats.json: a kill in between counts it once (its id)
    return stats


def merge_server_stats(previous: dict, session: dict) -> dict:
    """Per-server counts summed over sessions (a resume may use other servers too). A server spelled
    otherwise than in an earlier session (a trailing slash, a capital in its host) is that one, under
    the earlier spelling, as ``distinct_urls`` makes one server of both within a session.

    >>> merge_server_stats({"http://u/v1": {"requests": 2, "faults": {"timeout": 1}, "taken_out": 1}},
    ...                    {"http://U/v1/": {"requests": 3, "faults": {"timeout": 1, "http_500": 2}, "taken_out": 0}})
    {'http://u/v1': {'requests': 5, 'faults': {'timeout': 2, 'http_500': 2}, 'taken_out': 1}}
    """
    from selfinstruct.config import server_key

    out = {url: dict(v) for url, v in previous.items()}
    spelled = {server_key(url): url for url in reversed(list(previous))}  # the first spelling of each
    for url, now in session.items():
        url = spelled.get(server_key(url), url)
        old = out.get(url, {})
        merged = {k: old.get(k, 0) + v for k, v in now.items() if k != "faults"}
        merged["faults"] = dict((Counter(old.get("faults", {})) + Counter(now.get("faults", {}))).most_common())
        out[url] = {k: merged[k] for k in now}  # the order the stats are written in
    return out


def server_line(teacher: TeacherClient) -> str:
    """This session's requests/faults per server for the progress bar; empty with one server.

    Servers on one host are named by port (':8001'), else by host and port, with the path where
    two would have one name (a gateway's routes on one port); '(out)' marks one out of service.
    """
    if len(teacher.servers) < 2:
        return ""
    from urllib.parse import urlsplit

    parts = [urlsplit(s.url) for s in teacher.servers]
    one_host = len({p.hostname for p in parts}) == 1
    names = [f":{p.port}" if one_host and p.port else p.netloc for p in parts]
    if len(set(names)) < len(names):
        names = [n + p.path.rstrip("/") for n, p in zip(names, parts)]
    return "  " + " ".join(f"{n} {s.requests}/{sum(s.faults.values())}{'' if s.in_service else '(out)'}"
                           for n, s in zip(names, teacher.servers))
