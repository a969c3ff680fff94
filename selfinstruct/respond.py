"""Answer a dataset's instructions again with another teacher: the ``respond`` command.

Alpaca-GPT4 style: instructions from a cheap teacher, answers from a good one. Each
row of the input (a run folder's kept instances, or any single-exchange dataset) is
one request: the instruction, and its input after a blank line, as the user turn (a
row's system prompt is counted and said, not sent: the Alpaca record cannot keep it). The
answer goes through the output filters of ``generate`` (control characters, refusals,
empty or colon-ended output, input equal to output; a reply cut at ``max_tokens`` is
``truncated``, one that repeats a line or block three times in a row ``degenerate``, as in magpie), and a kept record keeps the old answer in ``provenance.previous``. A row whose
own instruction or input holds a control character, or whose input ends with ':', is rejected
before it is asked (``unasked_reason``).

The output is a run folder with generate's conventions: ``responses.jsonl`` is the
write-ahead log (group commit through ``runfolder.GroupWriter``), every row ends in
``kept.jsonl`` or ``rejected.jsonl`` under ``r<row>-0``, ``stats.json`` and ``data.json``
are rewritten at the end, the folder's lock is held, and the same command resumes:
logged replies are processed again from the log, rows not yet answered are asked.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from selfinstruct import filters
from selfinstruct.config import (MAX_RETRIES, MAX_TEACHER_PARALLEL, MAX_TEACHER_THREADS, MAX_TOKENS, VLLM_BATCH_TWICE, OneConfig, UserError, add_flags, check_concurrency, check_urls,
                                 counted, distinct_urls, given_by_file, named_file, one_item_list, printable, resolve,
                                 said_as_given, url_list)
from selfinstruct.prompts import degenerate
from selfinstruct.records import Instance, KeptRecord, Previous, Provenance, Rejected, Response, Usage
from selfinstruct.teacher import FATAL_KINDS, TeacherClient, fatal_line, now_iso


class RespondOptions(BaseModel):
    """Options of ``selfinstruct respond``; each one is also a flag and a YAML key."""

    # inf and nan are refused: an infinite --timeout was a traceback, an infinite --temperature
    # a request body that is not JSON, so every prompt failed.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    source: str = Field(description="The run folder or dataset whose instructions are answered.")
    out: str = Field(description="A new run folder for the answers. An existing one is resumed.")
    teacher: Literal["embedded", "openai", "vllm"] | None = Field(None, description="As for generate: embedded, openai (--base-url) or vllm (launch 'vllm serve --model'). Default: openai when --base-url is given, else embedded.")
    base_url: list[str] = Field([], description="OpenAI-compatible servers serving the same --model, e.g. http://127.0.0.1:8000/v1; give several (--base-url URL1 URL2, or the flag again) and each request goes to the one in service with the fewest in flight.")
    api_key: str | None = Field(None, description="API key for --base-url (or SELFINSTRUCT_API_KEY / OPENAI_API_KEY). Never saved.", exclude=True)
    model: str | None = Field(None, description="Model name on the server (--base-url), or what vLLM serves (--teacher vllm).")
    teacher_model: str | None = Field(None, description="A GGUF file for the embedded teacher instead of the bundled SmolLM2-135M.")
    teacher_threads: int | None = Field(None, ge=1, le=MAX_TEACHER_THREADS, description="CPU threads of the embedded teacher. Default: all cores but one. At most 4096.")
    teacher_parallel: int = Field(2, ge=1, le=MAX_TEACHER_PARALLEL, description="Requests the embedded teacher decodes together (at most 1024).")
    vllm_bin: str | None = Field(None, description="The 'vllm' executable for --teacher vllm.")
    vllm_args: list[str] = Field([], description="--teacher vllm: flags passed to 'vllm serve' as they are, after '--'.")
    concurrency: int | None = Field(None, description="Requests in flight at once per server (at most 4096, as for generate). Default: as for generate.")
    client_processes: int = Field(0, ge=0, le=64, description="As for generate: send the requests from this many child processes. 0: from the coordinator.")
    temperature: float = Field(0.7, ge=0, le=100, description="Sampling temperature (at most 100; inf is refused, as servers refuse it).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling.")
    max_tokens: int = Field(1024, ge=16, le=MAX_TOKENS, description="Most tokens per answer (at most 16,777,216).")
    stop: list[str] = Field([], description="Stop sequences.")
    teacher_seed: int | None = Field(None, description="Seed each request from this, its prompt and its attempt (off by default).")
    limit: int | None = Field(None, ge=1, description="Answer only the first N rows (may grow on resume; left out, a resume keeps the run's own).")
    timeout: float = Field(300, gt=0, description="Seconds per teacher request.")
    max_retries: int = Field(5, ge=0, le=MAX_RETRIES, description="Retries per request (429, 5xx, timeouts, dropped connections, malformed replies; at most 1000).")
    fsync: bool = Field(True, description="fsync each group commit, so a power cut loses nothing acknowledged.")
    progress: bool = Field(True, description="Show the progress bar.")

    _one_url_is_a_list = field_validator("base_url", mode="before")(url_list)
    _urls_parse = field_validator("base_url")(check_urls)
    _no_empty_stop = field_validator("stop")(filters.no_empty_stop)  # as generate's
    _one_stop_is_a_list = field_validator("stop", mode="before")(one_item_list)  # `stop: "###"`, as generate's

    @field_validator("concurrency")
    @classmethod
    def _concurrency_a_server_can_take(cls, v):
        return check_concurrency(v, holds=VLLM_BATCH_TWICE + "row's prompt and reply in memory")


RESUMABLE_CHANGES = {"limit", "concurrency", "client_processes", "timeout", "max_retries", "progress", "fsync", "api_key", "base_url",
                     "vllm_bin", "teacher_threads", "teacher_parallel", "out"}


def add_arguments(parser, options: type[BaseModel] = RespondOptions,
                  example: str = "selfinstruct respond outputs/demo --base-url http://127.0.0.1:8000/v1 --model big "
                                 "--out outputs/demo-big") -> None:
    """The input as a positional argument, --config, and a flag per option (respond's, or evolve's)."""
    parser.add_argument("source", metavar="RUN_OR_FILE", help=options.model_fields["source"].description)
    parser.add_argument("--config", action=OneConfig, help="YAML file of options (flags override it).")
    add_flags(parser, options, skip=("source",), passthrough="vllm_args")
    parser.epilog = f"example: {example}"


def run(args) -> int:
    cfg = resolve(RespondOptions, args)
    # The options the --config file gave (and no flag overrode), named by their keys if refused.
    stats = respond(cfg, *given_by_file(args, cfg))
    return 0 if stats["kept"] + stats["rejected"] >= stats["rows"] else 1


# --------------------------------------------------------------------- the rows


class Row(BaseModel):
    instruction: str
    input: str
    is_classification: bool | None = None
    previous: Previous
    system: str = ""  # the row's system prompt: counted and said, never asked nor kept (see respond())

    @field_validator("instruction", "input")
    @classmethod
    def _newlines(cls, text: str) -> str:
        """CR LF is a newline, as in a teacher's reply: a dataset saved on Windows holds them, and the
        CR, asked and kept, is a control character (the filters rejected the input after the answer)."""
        return text.replace("\r\n", "\n")

    @field_validator("input")
    @classmethod
    def _no_input(cls, text: str) -> str:
        """An input that shows nothing (a zero-width space, a BOM) is no input: it was sent to the teacher
        after the instruction and kept as the record's input, where export and the filters read it as empty."""
        return "" if filters.no_visible_text(text) else text


def load_rows(source: str, first: int = 1) -> list[Row]:
    """One row per instance of a run folder's kept tasks, or per record of a single-exchange dataset;
    a file's rows are ``row 1``, ``row 2``... (from ``first``: ``row_ids_from``)."""
    from selfinstruct.datafiles import is_run_folder, load_kept, read_located
    from selfinstruct.export import to_alpaca

    src = Path(source)
    if src.is_dir() and is_run_folder(src):
        from selfinstruct.datafiles import note_if_live

        note_if_live(src)
        rows = [Row(instruction=rec.instruction, input=inst.input, is_classification=rec.is_classification,
                    previous=Previous(source=source, id=rec.id if len(rec.instances) == 1 else f"{rec.id}/{k}",
                                      teacher_model=rec.provenance.teacher_model, output=inst.output))
                for rec in load_kept(src) for k, inst in enumerate(rec.instances)]
        if not rows:
            raise UserError(f"{src}: the run has no kept records to answer")
        return rows
    out = []
    for i, (where, rec) in enumerate(read_located(src)):
        # Multi-turn is one line; a user turn alone is a question to answer, as an Alpaca row without output.
        row = to_alpaca(rec, where, "; respond and evolve read single exchanges only", unanswered=True)
        out.append(Row(instruction=row["instruction"], input=row["input"], system=row.get("system", ""),
                       previous=Previous(source=source, id=f"row {i + first}", output=row["output"])))
    return out


def user_prompt(row: Row) -> str:
    from selfinstruct.export import user_text

    return user_text(row.instruction, row.input)


def prompt_hash(row: Row) -> str:
    """What was asked, so a resume can tell that the input still holds the same row."""
    return hashlib.sha256(user_prompt(row).encode()).hexdigest()[:16]


def same_rows(folder: Path, logged, rows: list[Row], source: str, limit: int | None = None,
              unasked: dict[str, str] | None = None, config_file: str | None = None,
              in_file: set[str] = frozenset(), first: int = 1) -> None:
    """Refuse a resume whose input no longer holds the rows its ``logged`` replies answer, or the
    rows it rejected unasked (``unasked``: id -> prompt hash), or whose ``--limit`` is below a row
    already answered or rejected (the run's counts would leave that row out); ``in_file``: the
    options the --config file ``config_file`` gave, named by the file and their keys."""
    last, asked = -1, True  # the last row decided, and whether it was asked (or rejected unasked)
    for resp in logged:
        if resp.index >= len(rows) or resp.prompt_hash != prompt_hash(rows[resp.index]):
            raise UserError(f"{folder / 'responses.jsonl'}: reply {resp.id} answers a row that {source} no longer "
                            "holds (the input changed since this run began); use a new --out folder")
        last = max(last, resp.index)
    for rid, hashed in (unasked or {}).items():
        m = re.fullmatch(r"r(\d+)-0", rid)
        index = int(m.group(1)) - first if m else len(rows)
        if index >= len(rows) or hashed != prompt_hash(rows[index]):
            raise UserError(f"{folder / 'rejected.jsonl'}: {rid} rejects a row that {source} no longer holds "
                            "(the input changed since this run began); use a new --out folder")
        if index > last:
            last, asked = index, False
    if limit is not None and last >= limit:
        # A row rejected for its own text (unasked_reason) was never answered: say what was done to it.
        done = "answered" if asked else "rejected (without asking it)"
        # Left out, --limit is the run's own (KEPT_WHEN_LEFT_OUT): every row is asked for by its number.
        every = f" (or {said_as_given('limit', len(rows), in_file)} for every row)" if last + 1 < len(rows) else ""
        raise may_grow_not_shrink("limit", limit, f"{done} row {last + 1}", last + 1, config_file, in_file, every)


def may_grow_not_shrink(option: str, value: int, done: str, least: int, config_file: str | None = None,
                        in_file: set[str] = frozenset(), more: str = "") -> UserError:
    """The line for a resume whose ``option`` (respond's --limit, evolve's --rounds) is below what the
    run has ``done``, named as it was given: the flag, or the --config file and its key.

    >>> str(may_grow_not_shrink("rounds", 1, "evolved round 2", 2))
    '--rounds 1: this run has evolved round 2 already; --rounds may grow on resume, not shrink: give --rounds 2 or more'
    >>> str(may_grow_not_shrink("rounds", 1, "evolved round 2", 2, "c.yaml", {"rounds"}))
    'c.yaml: rounds: 1, but this run has evolved round 2 already; rounds may grow on resume, not shrink: give rounds: 2 or more'
    """
    said = said_as_given(option, value, in_file)
    # 'c.yaml: rounds: 1, but this run ...': a third colon ('c.yaml: rounds: 1: this run') would read as one more key.
    opening = f"{named_file(config_file, in_file, option)}{said}, but" if option in in_file else f"{said}:"
    return UserError(f"{opening} this run has {done} already; {said_as_given(option, None, in_file)} may grow on "
                     f"resume, not shrink: give {said_as_given(option, least, in_file)} or more{more}")


# --------------------------------------------------------------------- the folder


def _same_path(key: str, was, now) -> bool:
    """Whether the saved and the given ``source`` (or ``prompts``) name one path, spelled two ways:
    config.yaml keeps them as typed, and ``b1``, ``./b1/`` and ``~/w/b1`` are the same input."""
    if key not in ("source", "prompts") or not (isinstance(was, str) and isinstance(now, str)):
        return False
    return Path(was).expanduser().resolve() == Path(now).expanduser().resolve()


# Row ids (r000001, evolve's e1-000001, a file's "row 1") count rows from 1, as every message does;
# a run made when they counted from 0 keeps its ids, so its resume still finds them (``row_ids_from``).
ROW_IDS_FROM = "row_ids_from"


def row_ids_from(out: str | Path) -> int:
    """The number of a run's first row in its ids: its config.yaml's ``row_ids_from``; 0 for a run
    made before that key, which has written ids; else (a new run, or one that made nothing) 1."""
    from selfinstruct.config import load_yaml
    from selfinstruct.datafiles import is_run_folder, nothing_made

    out = Path(out)
    if not (out / "config.yaml").is_file() or not is_run_folder(out):
        return 1
    try:
        old = load_yaml(out / "config.yaml")
    except UserError:
        return 1  # prepare_folder says what is wrong with it
    if isinstance(old, dict) and old.get(ROW_IDS_FROM) in (0, 1):
        return old[ROW_IDS_FROM]
    return 1 if nothing_made(out) else 0


def saved_options(cfg, mode: str) -> dict:
    """What a run's config.yaml holds: its options, its ``mode``, and its --source resolved
    (``source_resolved``; the option stays as typed, for the card): a relative one names a file
    from the folder the run was made from, and a later command run elsewhere must still find it
    (`export A/r --out A/data.jsonl` from another folder replaced the source it did not find)."""
    return {**cfg.model_dump(mode="json"), "mode": mode,
            "source_resolved": str(Path(cfg.source).expanduser().resolve()), ROW_IDS_FROM: row_ids_from(cfg.out)}


def prepare_folder(cfg, stack, mode: str = "respond", resumable: set[str] = RESUMABLE_CHANGES, check=None,
                   given: set[str] = frozenset(), config_file: str | None = None,
                   in_file: set[str] = frozenset()) -> Path:
    """Make or find ``cfg.out`` as a ``mode`` run folder and hold its lock; a resume is checked whole.
    Nothing is written in it: ``write_folder`` does, once the teacher passed its preflight
    (``generate.check_servers``), so a refused resume, or a server that fails its check, changes nothing.

    Shared with ``evolve``: the same folder rules, the options saved with ``mode``, and only
    ``resumable`` options may differ from the saved ones. ``check(folder, logged, unasked)`` reads
    the logged Responses as they are validated, before anything is written: it may refuse the
    resume too (what it leaves unread is validated after it). ``unasked``: the id and prompt hash
    of each rejection made without a request (``unasked_reason``), which no logged reply answers.
    A changed option is named as the user gave it (generate's ``_not_as_made``): the --config file
    ``config_file`` and its key for those it gave (``in_file``), the flag for the others the command
    gave (``given``, not those ``as_the_run_was`` took), else the run's config.yaml.
    """
    from selfinstruct.config import load_yaml
    from selfinstruct.datafiles import (MARKER, foreign_folder, iter_models, nothing_made, refuse_a_run_inside_a_run,
                                        run_lock, special_kind)
    from selfinstruct.generate import _not_as_made, remove_if_unwritten, teacher_of
    from selfinstruct.runfolder import check_run_files

    out, src = Path(cfg.out).resolve(), Path(cfg.source).resolve()
    if out == src or out in src.parents:
        raise UserError(f"{cfg.out}: --out would overwrite the input {cfg.source}")
    if src in out.parents:  # a run inside the input run would litter it with a folder it does not own
        raise UserError(f"{cfg.out}: --out is inside the input {cfg.source}; choose a folder outside it")
    refuse_a_run_inside_a_run(cfg.out)  # the same, however the input is named (run/kept.jsonl)
    if out.exists() and not out.is_dir():  # a file, or a device (/dev/null), a FIFO...: say which
        raise UserError(f"{cfg.out}: is {special_kind(out) or 'a file'}; --out must be a folder (a new one, or "
                        f"a run of {mode} to resume)")
    if foreign_folder(out):
        raise UserError(f"{cfg.out}: folder exists and is not a run folder (no {MARKER}); choose another --out")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{cfg.out}: cannot create the run folder ({e.strerror or e})") from None
    stack.enter_context(run_lock(out, mode))
    if made:  # a first command that fails leaves no folder (run while the lock is held)
        stack.callback(remove_if_unwritten, out)
    saved = out / "config.yaml"
    new = saved_options(cfg, mode)
    # data.json too: replaced at the session's end, a folder there was found after its requests were spent.
    check_run_files(out, ("config.yaml", "stats.json", "responses.jsonl", "kept.jsonl", "rejected.jsonl",
                          "errors.jsonl", "data.json"))
    if saved.exists():
        old = load_yaml(saved)
        if old.get("mode") != mode:
            made = old.get("mode")  # respond's, evolve's, or one of generate's modes (alpaca, ...)
            made = made if made in ("respond", "evolve") else f"generate --mode {made}" if made else "generate"
            raise UserError(f"{cfg.out}: is a run folder of '{printable(str(made))}', not of '{mode}'; choose another --out")
        fresh = nothing_made(out)  # stopped before its first request: any options start it afresh
        if not fresh and teacher_of(old) != teacher_of(new):  # the teacher, not the key (null is openai's or embedded's)
            raise _not_as_made(saved, "teacher", teacher_of(old), teacher_of(new), given, config_file, in_file,
                               "teacher" if "teacher" in given or "base_url" not in given else "base_url")
        for key, value in new.items():
            # the teacher: above; source_resolved: --source's (_same_path); row_ids_from: the run's own
            if key in ("teacher", "source_resolved", ROW_IDS_FROM):
                continue
            if key not in resumable and key in old and old[key] != value and not fresh and not _same_path(key, old[key], value):
                # The input is positional (RUN_OR_FILE), never a --source flag: named by config.yaml, as before.
                raise _not_as_made(saved, key, old[key], value, given - {"source"}, config_file, in_file)
        unasked = {}
        for name, model in (("kept.jsonl", KeptRecord), ("rejected.jsonl", Rejected)):
            for rec in iter_models(out / name, model):  # each line checked, none held but the unasked
                if name == "rejected.jsonl" and not rec.provenance.response_id:
                    unasked[rec.id] = rec.provenance.prompt_hash
        logged = iter_models(out / "responses.jsonl", Response)
        if check:
            check(out, logged, unasked)  # in the same pass: the log is the run's biggest file after rejected.jsonl
        for _ in logged:
            pass
    elif any((out / n).exists() for n in ("responses.jsonl", "kept.jsonl", "rejected.jsonl")):
        raise UserError(f"{saved}: missing, so this run's options are unknown; use a new --out folder")
    return out


def write_folder(cfg, out: Path, mode: str = "respond") -> None:
    """Mark ``out`` (checked by ``prepare_folder``) a ``mode`` run folder, save its options in
    config.yaml when they changed, and cut off a partial last line a kill left."""
    import yaml

    from selfinstruct.config import load_yaml
    from selfinstruct.datafiles import MARKER, mark_run_folder, write_atomic
    from selfinstruct.runfolder import repair

    saved = out / "config.yaml"
    new = saved_options(cfg, mode)
    if not (out / MARKER).exists():
        mark_run_folder(out)
    if not saved.exists() or load_yaml(saved) != new:
        write_atomic(saved, yaml.safe_dump(new, sort_keys=False))
    for name in ("responses.jsonl", "kept.jsonl", "rejected.jsonl", "errors.jsonl"):
        repair(out / name)


# --------------------------------------------------------------------- the answers


def process(resp: Response, row: Row, model: str, base_url: str, sampling: dict) -> list[tuple[str, list]]:
    """A logged reply to its one record: kept, or rejected with the filter's reason."""

    reply = resp.replies[0]
    prov = Provenance(teacher_model=model, base_url=reply.server or base_url, mode="respond", sampling=sampling,
                      prompt_template="respond", prompt_hash=resp.prompt_hash, example_ids=[],
                      response_id=resp.id, usage=reply.usage, created_at=resp.created_at,
                      elapsed_s=resp.elapsed_s, previous=row.previous)
    cid = f"{resp.id}-0"
    answer = Instance(input=row.input, output=reply.text.strip())
    if why := degenerate(reply.text, "answer"):  # magpie's rule: '###\n###\n###', or one block 2,000 times over
        stage = "parse"
    elif reply.finish_reason == "length":
        why, stage = f"truncated: the answer was cut at max_tokens {sampling.get('max_tokens')}", "parse"
    else:
        instances, why = filters.clean_instances([answer])
        for check in (filters.control_characters, filters.invisible_characters):
            if not why and (bad := check(row.instruction)) is not True:
                why = bad[1]  # the row's own: checked as the input is, so nothing kept holds one
        if not why and (echo := filters.repeats_instruction(answer.output, row.instruction, user_prompt(row))) is not True:
            why = echo[1]
        stage = "filter"
    if why:
        rej = Rejected(id=cid, stage=stage, reason=why, raw=reply.text, instruction=row.instruction,
                       instances=[answer], provenance=prov)
        return [("rejected.jsonl", [rej]), ("kept.jsonl", [])]
    # The row's input as it was asked (clean_instances strips it: a code input would lose its first indent).
    rec = KeptRecord(id=cid, instruction=row.instruction, instances=[answer],
                     is_classification=row.is_classification, provenance=prov)
    return [("rejected.jsonl", []), ("kept.jsonl", [rec])]


def unasked_reason(row: Row) -> str | None:
    """Why a row is rejected before it is asked: a control character in its input or its own
    instruction, an input ending with ':' (``check_instance``'s ends_with_colon, on the input as
    it strips it), or an invisible character (``filters.invisible_characters``) in either, which no
    answer can mend (each was asked, and the answer then rejected for it).
    The input first, as ``process`` checks it (``clean_instances``) before the instruction; the colon
    after the control characters, so a row holding one too keeps the reason it had, and the invisible
    characters after the colon, as ``check_instance`` looks for them."""

    for text, field in ((row.input, "input"), (row.instruction, "instruction")):
        if (bad := filters.control_characters(text, field)) is not True:
            return bad[1]
    # The last character that shows: a colon before a zero-width space ("Translate:\u200b") was asked,
    # and the answer then rejected for it (check_instance looks past what does not show).
    if next((ch for ch in reversed(row.input) if not filters.no_visible_text(ch)), "") == ":":
        return "ends_with_colon: input ends with a colon"
    # After the colon, as check_instance looks: then a bidi control or a zero-width space inside the text.
    for text, field in ((row.input, "input"), (row.instruction, "instruction")):
        if (bad := filters.invisible_characters(text, field)) is not True:
            return bad[1]
    return None


def reject_unasked(index: int, row: Row, reason: str, model: str, base_url: str, sampling: dict,
                   first: int = 1) -> Rejected:
    """The rejection of a row never asked (``unasked_reason``): as ``process`` writes it, with no reply
    (``raw`` and the output empty, no usage) and no response id, which marks it unasked on resume."""
    prov = Provenance(teacher_model=model, base_url=base_url, mode="respond", sampling=sampling,
                      prompt_template="respond", prompt_hash=prompt_hash(row), example_ids=[], response_id="",
                      usage=Usage(), created_at=now_iso(), elapsed_s=0.0, previous=row.previous)
    return Rejected(id=f"r{index + first:06d}-0", stage="filter", reason=reason, raw="", instruction=row.instruction,
                    instances=[Instance(input=row.input, output="")], provenance=prov)


async def answer(index: int, row: Row, teacher: TeacherClient, first: int = 1) -> Response:
    """The row at ``index`` (from 0) answered: its id numbers it from ``first`` (``row_ids_from``)."""
    t0 = time.monotonic()
    reply = await teacher.complete(user_prompt(row), "answer")
    return Response(id=f"r{index + first:06d}", index=index, mode="respond", prompt_hash=prompt_hash(row),
                    example_ids=[], replies=[reply], created_at=now_iso(), elapsed_s=round(time.monotonic() - t0, 3))


def teacher_settings(cfg, given: set[str], config_file: str | None = None, in_file: set[str] = frozenset()):
    """``cfg`` with its default concurrency filled in, and the teacher kind it names (respond, evolve).

    ``given``: the options the command gave, not those ``as_the_run_was`` took from the run's config.yaml.
    ``in_file``: those the --config file ``config_file`` gave, named by the file and their keys, as generate does.
    """
    from selfinstruct.generate import (default_concurrency, refuse_a_model_for_the_embedded_teacher,
                                       refuse_a_teacher_without_its_model, refuse_senders_past_what_is_in_flight,
                                       refuse_teacher_options_that_do_nothing, refuse_two_teachers,
                                       room_for_the_teacher)

    teacher_kind = cfg.teacher or ("openai" if cfg.base_url else "embedded")
    # The teacher named, with the run's own model on resume, checked before the run folder is made
    # (as in generate), so a first command without --model (or --teacher openai without --base-url)
    # leaves nothing behind; start_teacher checks the resolved one.
    refuse_a_teacher_without_its_model(cfg, teacher_kind, config_file, in_file)
    refuse_two_teachers(cfg, config_file, in_file)  # as in generate
    # The model given: one taken from the run is the run's own teacher's, and a change of teacher is
    # refused on 'teacher' (prepare_folder), not on the model it never named.
    refuse_a_model_for_the_embedded_teacher(teacher_kind, cfg.model if "model" in given else None,
                                            config_file if "model" in in_file else None)
    refuse_teacher_options_that_do_nothing(cfg, given, teacher_kind, config_file, in_file)  # --teacher-model with --base-url
    # The teacher's files (vllm and a local --model, --teacher-model), as generate looks for them: a
    # wrong path found when the teacher starts left the new folder behind (lock, config.yaml, session.json).
    from selfinstruct.servers import check_teacher_files

    check_teacher_files(teacher_kind, cfg)
    if cfg.concurrency is None:
        cfg = cfg.model_copy(update={"concurrency": default_concurrency(teacher_kind, cfg.vllm_args, cfg.teacher_parallel)})
    refuse_senders_past_what_is_in_flight(cfg, teacher_kind, given, config_file, in_file)  # as in generate
    room_for_the_teacher(cfg, teacher_kind)
    return cfg, teacher_kind


def start_teacher(cfg, teacher_kind: str, stack, folder: Path) -> tuple[list[str], str, str]:
    """Start (embedded, vllm) or name (openai) the teacher for the block of ``stack``: (base URLs, api_key, model)."""
    from selfinstruct.teacher import api_key_of

    api_key = api_key_of(cfg.api_key)
    if teacher_kind == "embedded":
        from selfinstruct.servers import embedded_teacher

        t = stack.enter_context(embedded_teacher(cfg.teacher_model, parallel=cfg.teacher_parallel, threads=cfg.teacher_threads))
        base_urls, api_key, model = [t.base_url], t.api_key, t.model
    elif teacher_kind == "vllm":
        from selfinstruct.servers import vllm_server

        if not cfg.model:
            raise UserError("--teacher vllm needs --model (a hub id or a local folder)")
        from selfinstruct.datafiles import MARKER, mark_run_folder

        if not (folder / MARKER).exists():  # its vllm.log goes in the folder: one a rerun takes as its own
            mark_run_folder(folder)
        t = stack.enter_context(vllm_server(cfg.model, vllm_bin=cfg.vllm_bin, extra_args=cfg.vllm_args, log_dir=folder))
        base_urls, api_key, model = [t.base_url], t.api_key, t.model
    else:
        if not cfg.base_url:
            raise UserError("--teacher openai needs --base-url")
        if not cfg.model:
            raise UserError("--base-url needs --model (the model name the server serves)")
        base_urls, model = distinct_urls(cfg.base_url), cfg.model
        api_key = api_key or "EMPTY"
    return base_urls, api_key, model


# Options that may change on resume but, left out, are still the run's own, not the default:
# without its servers the teacher would quietly become the embedded one, and its records would
# join a run made by another (as generate's ``KEPT_WHEN_LEFT_OUT``); without its --limit, a resumed
# `--limit 100` trial sent every row of the dataset to a paid teacher (a given larger one still grows
# the run). evolve's --limit cannot change at all: it is taken anyway. Without its --vllm-bin, another
# vllm (the one on PATH, or none) would serve the run's model.
KEPT_WHEN_LEFT_OUT = frozenset({"base_url", "limit", "vllm_bin"})


def as_the_run_was(cfg, mode: str = "respond", resumable: set[str] = RESUMABLE_CHANGES,
                   kept: frozenset[str] = KEPT_WHEN_LEFT_OUT, config_file: str | None = None,
                   in_file: set[str] = frozenset()):
    """On resume, ``cfg`` with the run's saved value (config.yaml) for every option the command
    left out (neither a flag nor in --config), as generate's ``as_the_run_was`` (both are
    ``take_the_runs_own``): a rerun of a ``--temperature 0.3`` run was refused naming the default
    0.7, which the user never typed. An option given must still match (``prepare_folder``); the
    ``resumable`` ones take the new value, or the default when left out, except ``kept`` (the
    servers; evolve's --rounds). Shared with ``evolve`` (``mode``).
    """
    from selfinstruct.generate import take_the_runs_own

    # Another command's run takes nothing: prepare_folder refuses it on its mode, under the lock
    # (generate refuses it here, before its own checks of --mode need the saved one).
    return take_the_runs_own(cfg, resumable, kept, lambda cfg, old, saved: old.get("mode") == mode,
                             config_file, in_file)


def respond(cfg: RespondOptions, config_file: str | None = None, in_file: set[str] = frozenset()) -> dict:
    """Answer (or resume answering) every row of ``cfg.source`` into ``cfg.out``; returns the stats.

    ``in_file``: the options the --config file ``config_file`` gave, named by their keys when refused."""
    import contextlib

    from selfinstruct.generate import check_servers
    from selfinstruct.runfolder import begin_session

    started = time.monotonic()
    given = set(cfg.model_fields_set)  # by this command, not taken from the run's config.yaml
    first = row_ids_from(cfg.out)
    rows = load_rows(cfg.source, first)  # every row read and checked before the folder is touched
    cfg = as_the_run_was(cfg, config_file=config_file, in_file=in_file)
    cfg, teacher_kind = teacher_settings(cfg, given, config_file, in_file)
    with contextlib.ExitStack() as stack:
        folder = prepare_folder(cfg, stack, check=lambda out, logged, unasked: same_rows(
            out, logged, rows, cfg.source, cfg.limit, unasked, config_file, in_file, first),
            given=given, config_file=config_file, in_file=in_file)
        base_urls, api_key, model = start_teacher(cfg, teacher_kind, stack, folder)
        checked = check_servers(base_urls, api_key, model, cfg)  # before anything is written: a failed check changes nothing
        write_folder(cfg, folder)
        total = min(len(rows), cfg.limit or len(rows))
        extra = say_system_prompts(rows[:total], "respond")
        counts = begin_session(folder, started, lambda rec, last: finish_stats(
            folder, rec.get("model") or "", rec.get("base_urls") or [""], rec.get("rows") or total, rec["wall_s"],
            rec.get("faults", {}), rec.get("servers", {}), last, extra=extra))
        counts.teacher_up(model, base_urls)
        return asyncio.run(_loop(cfg, folder, rows, base_urls, api_key, model, started, counts, extra, checked, first))


def say_refused(refused: Counter, command: str, noun: str) -> None:
    """One line for the requests the teacher refused as sent: each rerun sends them again as they are."""
    if refused:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(refused.items()))
        print(f"{command}: {counted(sum(refused.values()), noun)} refused as sent by the teacher ({kinds}: too long "
              "for its context?), which a rerun sends as it is; errors.jsonl has the server's words", file=sys.stderr)


def say_system_prompts(rows: list[Row], command: str) -> dict:
    """Count the rows with a system prompt, say so in one line, and give the count for stats.json.

    It is not sent: the record (Alpaca: instruction, input, output) cannot keep it, and an answer
    written under an unseen "answer in French" would teach the tuned model to do so unasked.
    """
    n = sum(1 for r in rows if r.system)
    if n:
        has = "rows has" if n == 1 else "rows have"  # '1 of 3 rows has', '2 of 3 rows have'
        print(f"{command}: {n:,} of {len(rows):,} {has} a system prompt; the teacher is not sent it, "
              "and the records (instruction, input, output) do not keep it", file=sys.stderr)
    return {"system_prompts_dropped": n}


# The request as sent is wrong (a prompt longer than the teacher's context): not retried, and a
# rerun sends it as it is, so these are said apart at the end (``say_refused``).
REFUSED_KINDS = ("http_400", "http_413", "http_422")


async def ask_all(todo, ask, teacher: TeacherClient, writer, pending, error_fields: dict | None = None,
                  refused: Counter | None = None):
    """Run ``ask(i)`` for each i of ``todo``, the teacher's slots full; yield (i, Response) as each finishes.

    A request that failed every retry goes to errors.jsonl (its future onto ``pending``) and is
    not yielded: the next session asks it again. One refused as sent is counted by kind in
    ``refused``. A 401/403/404 stops the run with one line.
    Shared by respond and evolve; use it under ``contextlib.aclosing``, so requests still in
    flight are cancelled when the caller stops early.
    """
    from selfinstruct.teacher import TeacherError

    in_flight: dict[asyncio.Task, int] = {}
    queue = iter(todo)
    try:
        while True:
            # --concurrency is per server: enough requests to fill every server in service.
            while len(in_flight) < teacher.concurrency * max(1, teacher.in_service()) \
                    and (i := next(queue, None)) is not None:
                in_flight[asyncio.create_task(ask(i))] = i
            if not in_flight:
                return
            finished, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                i = in_flight.pop(task)
                try:
                    resp = task.result()
                except TeacherError as e:
                    err = {"index": i, **(error_fields or {}), "kind": e.kind, "message": str(e), "at": now_iso()}
                    if e.kind in FATAL_KINDS:
                        writer.submit([("errors.jsonl", [err])]).result()
                        raise UserError(fatal_line(e)) from None
                    pending.append(writer.submit([("errors.jsonl", [err])]))
                    if refused is not None and e.kind in REFUSED_KINDS:
                        refused[e.kind] += 1
                    continue
                yield i, resp
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)


async def _loop(cfg: RespondOptions, folder: Path, rows: list[Row], base_urls: list[str], api_key: str, model: str,
                started: float, session_counts, extra: dict, checked: dict[str, str | None] | None = None,
                first: int = 1) -> dict:
    import contextlib

    from selfinstruct.datafiles import read_jsonl, run_file_ids
    from selfinstruct.progress import RunProgress
    from selfinstruct.runfolder import GroupWriter

    total = min(len(rows), cfg.limit or len(rows))
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                "stop": cfg.stop or None, "seed": cfg.teacher_seed}
    base_url = base_urls[0]  # in a record whose reply does not name its server (logged before they did)
    done = set(run_file_ids(folder / "kept.jsonl")) | set(run_file_ids(folder / "rejected.jsonl"))
    writer = GroupWriter(folder, ("responses.jsonl", "errors.jsonl", "rejected.jsonl", "kept.jsonl"), fsync=cfg.fsync)
    pending = collections.deque()
    logged: set[int] = set()
    # Finish what the log holds first; a logged reply to another question means the input changed.
    for o in read_jsonl(folder / "responses.jsonl"):
        resp = Response.model_validate(o)
        if resp.index >= len(rows) or resp.prompt_hash != prompt_hash(rows[resp.index]):
            writer.close()
            raise UserError(f"{folder / 'responses.jsonl'}: reply {resp.id} answers a row that {cfg.source} no longer "
                            "holds (the input changed since this run began); use a new --out folder")
        logged.add(resp.index)
        if f"{resp.id}-0" not in done:
            pending.append(writer.submit(process(resp, rows[resp.index], model, base_url, sampling)))
    # A row that failed every retry is asked again; one rejected unasked (no reply logged) is done.
    todo = [i for i in range(total) if i not in logged and f"r{i + first:06d}-0" not in done]
    unasked = {i: why for i in todo if (why := unasked_reason(rows[i]))}
    todo = [i for i in todo if i not in unasked]

    progress = RunProgress(total, enabled=cfg.progress)
    teacher = await many_servers(base_urls, api_key, model, sampling, cfg, progress, checked)
    counts = Counter(kept=sum(1 for _ in run_file_ids(folder / "kept.jsonl")),
                     rejected=sum(1 for _ in run_file_ids(folder / "rejected.jsonl")))
    if unasked:  # after the counts read the file, so they are counted once
        pending.append(writer.submit([("rejected.jsonl", [reject_unasked(i, rows[i], why, model, base_url, sampling, first)
                                                          for i, why in unasked.items()])]))
        counts["rejected"] += len(unasked)
    asked = 0
    refused: Counter = Counter()
    clean = False
    saver = asyncio.create_task(session_counts.keep(teacher))
    try:
        with progress:
            async with contextlib.aclosing(ask_all(todo, lambda i: answer(i, rows[i], teacher, first), teacher,
                                                   writer, pending, refused=refused)) as replies:
                async for i, resp in replies:
                    lines = process(resp, rows[i], model, base_url, sampling)
                    counts["kept"] += len(lines[1][1])
                    counts["rejected"] += len(lines[0][1])
                    pending.append(writer.submit([("responses.jsonl", [resp]), *lines]))
                    while pending and pending[0].done():
                        pending.popleft().result()  # the first write error stops the run here
                    asked += 1
                    progress.update(counts["kept"], counts["rejected"], len(logged) + asked,
                                    sum(teacher.faults.values()), 0.0)
        clean = True
    finally:
        saver.cancel()
        stats = await close_session(clean, teacher, writer, lambda: finish_stats(
            folder, model, base_urls, total, time.monotonic() - started, dict(teacher.faults), teacher.server_stats(),
            {"id": session_counts.id}, extra=extra))
    if line := none_usable(teacher):
        raise UserError(line)
    progress.summary(stats, "selfinstruct respond")
    say_refused(refused, "respond", "row")
    return stats


async def many_servers(base_urls: list[str], api_key: str, model: str, sampling: dict, cfg, progress,
                       checked: dict[str, str | None] | None = None) -> TeacherClient:
    """The client for respond and evolve. Each server is checked first (GET /models, as in
    generate; ``checked``: what ``generate.check_servers`` found, so a server is not asked again): the run
    stops with one line when none passes (a typo in the URL, a wrong
    key), instead of every row failing its retries. With several servers, one that fails
    the check is put aside, and one that stops answering is taken out and probed, as in
    generate; the run stops when none has answered for --timeout. With one, a request that
    failed every retry goes to errors.jsonl and is asked again next session."""
    teacher = TeacherClient(base_url=base_urls, api_key=api_key, model=model, sampling=sampling,
                            concurrency=cfg.concurrency, timeout=cfg.timeout, max_retries=cfg.max_retries,
                            health=len(base_urls) > 1, on_event=progress.note, client_processes=cfg.client_processes)
    try:
        await teacher.preflight(checked)  # (a server it puts aside is a take-out line, from on_event)
    except BaseException:
        await teacher.close()
        raise
    return teacher


def none_usable(teacher) -> str | None:
    """The line for a session whose every reply was junk (no choices, no content), or None.

    The teacher stops a run at its twelfth junk reply (``teacher.JUNK_LIMIT``); a few records at few
    retries are fewer, and respond and evolve ended rc 1 with the stats table as if a server had dropped some."""
    from selfinstruct.teacher import fatal_line, unusable

    junk = [s for s in teacher.servers if s.faults["malformed_response"]]
    if not junk or any(s.usable for s in teacher.servers):
        return None
    return fatal_line(unusable(junk[0].url, junk[0].faults["malformed_response"], junk[0].last_junk))


async def close_session(clean: bool, teacher: TeacherClient, writer, finish) -> dict | None:
    """Close the client and the writer, then ``finish()`` (the stats), for respond and evolve.

    After a failure (``clean`` False) an error here is dropped, so the first one is what the user sees.
    """
    await teacher.close()
    try:
        writer.close()
    except UserError:
        if clean:
            raise
    try:
        return finish()
    except UserError:
        if clean:
            raise
    return None


def unanswered_failures(folder: Path, mode: str) -> int:
    """The rows (evolve: records of a round) in errors.jsonl that no logged reply has answered since,
    nor a record decided.

    A rerun asks a failed row again, so counting every line of errors.jsonl (as generate counts its
    lost prompts) said 'failed prompts 1' of a run whose every row was then answered. A row that
    failed before rows were rejected unasked (``unasked_reason``) is decided since with no reply.
    """
    from selfinstruct.datafiles import read_jsonl, run_file_ids

    first = row_ids_from(folder)
    answered = set(run_file_ids(folder / "responses.jsonl"))
    for name in ("kept.jsonl", "rejected.jsonl"):  # r000001-0 decides r000001 (evolve: e1-000001-0, e1-000001)
        answered.update(rid.rpartition("-")[0] for rid in run_file_ids(folder / name))
    failed = set()
    for o in read_jsonl(folder / "errors.jsonl"):
        if not isinstance(o.get("index"), int):
            continue  # not a line of ours: nothing to say of it
        n = o["index"] + first  # errors.jsonl's index counts from 0, as a Response's does
        rid = f"r{n:06d}" if mode == "respond" else f"e{o.get('round')}-{n:06d}"
        if rid not in answered:
            failed.add(rid)
    return len(failed)


def finish_stats(folder: Path, model: str, base_urls: list[str], rows: int, wall: float, faults: dict, servers: dict,
                 session: dict, mode: str = "respond", extra: dict | None = None) -> dict:
    """stats.json and data.json from the folder's files, wall time and faults summed over sessions (evolve too);
    ``session``: this one's id (and ``"ended": "interrupted"`` for one counted from its session.json)."""
    from selfinstruct.datafiles import load_stats, write_json_atomic
    from selfinstruct.export import run_rows, write_alpaca_json
    from selfinstruct.generate import compute_stats, merge_server_stats
    from selfinstruct.runfolder import remove_session_file

    previous = load_stats(folder)
    total = Counter(previous.get("faults", {}))
    total.update(faults)
    stats = compute_stats(folder, {
        "teacher_model": model, "base_url": base_urls[0] if len(base_urls) == 1 else base_urls, "mode": mode,
        "rows": rows, **(extra or {}), "wall_time_s": round(previous.get("wall_time_s", 0.0) + wall, 3),
        "sessions": previous.get("sessions", 0) + 1, "faults": dict(total), "last_session": session,
        "servers": merge_server_stats(previous.get("servers") or {}, servers),
    })
    stats["failed_units"] = unanswered_failures(folder, mode)
    stats["alpaca_rows"] = write_alpaca_json(run_rows(folder), folder / "data.json")
    write_json_atomic(folder / "stats.json", stats)
    remove_session_file(folder)  # after stats.json: a kill in between counts it once (its id)
    return stats
