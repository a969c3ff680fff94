"""The records every stage reads and writes (Pydantic v2).

A run folder holds three append-only JSONL files, one model per line:
``responses.jsonl`` (Response: what the teacher said, written first),
``kept.jsonl`` (KeptRecord) and ``rejected.jsonl`` (Rejected). Every candidate
parsed out of a Response ends up in exactly one of the last two, under the id
``<response id>-<index>``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class Instance(BaseModel):
    """One input/output pair of a task. ``input`` is empty when the task needs none."""

    model_config = ConfigDict(extra="forbid")

    input: str = ""
    output: str


class SeedTask(BaseModel):
    """A human-written task, in the original self-instruct seed format."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    name: str = ""
    instruction: str = Field(min_length=1)
    instances: list[Instance] = Field(min_length=1)
    is_classification: bool = False


def example(task: SeedTask | KeptRecord) -> tuple[str, str, str, str]:
    """(id, instruction, input, output) of a task's first instance: how the generation pool
    keeps its examples (a million Pydantic records took about 1.5 GB)."""
    return task.id, task.instruction, task.instances[0].input, task.instances[0].output


class Neighbor(BaseModel):
    """A similar instruction already in the pool, with its ROUGE-L F1."""

    id: str
    instruction: str
    rouge_l: float


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Previous(BaseModel):
    """``respond``: the record an answer replaced, and the answer it had."""

    source: str  # the run folder or file it was read from
    id: str  # its id there (a run's record id, or "row N" of a file)
    teacher_model: str | None = None  # who wrote the old answer, when known
    output: str


class Evolution(BaseModel):
    """``evolve``: which record this one was evolved from, by which operation, in which round."""

    ancestor_id: str  # the record it was rewritten from: an input's id ("row N" of a file), or an evolved record's
    ancestor_instruction: str
    root_id: str  # the input record its line of evolution began with
    source: str  # the run folder or file the root was read from
    operation: str  # the prompt under prompts/evolve/ that rewrote it (add_constraints, deepen, ...)
    round: int  # 1 for a rewrite of an input record, r + 1 for a rewrite of a round-r record


class Provenance(BaseModel):
    """Where a candidate came from: enough to reproduce or audit it."""

    teacher_model: str
    base_url: str
    mode: Literal["alpaca", "self-instruct", "magpie", "respond", "evolve"]
    sampling: dict
    prompt_template: str
    prompt_hash: str
    example_ids: list[str]
    response_id: str
    usage: Usage
    created_at: str
    elapsed_s: float
    previous: Previous | None = None  # respond: the old answer (absent in older files and in generate's records)
    evolution: Evolution | None = None  # evolve: ancestor, operation, round (absent elsewhere and in older files)


class KeptRecord(BaseModel):
    """A generated task that passed every filter and the dedup.

    ``instances`` has one item in alpaca mode, one or more in self-instruct mode;
    the Alpaca export writes one row per instance.
    """

    id: str
    instruction: str
    instances: list[Instance] = Field(min_length=1)
    is_classification: bool | None = None
    nearest: list[Neighbor] = []
    provenance: Provenance


class Rejected(BaseModel):
    """A candidate that did not make it, with the stage and reason that stopped it."""

    id: str
    stage: Literal["parse", "teacher", "filter", "dedup", "validate", "quota", "evolve"]
    reason: str
    raw: str
    instruction: str | None = None
    instances: list[Instance] = []
    nearest: list[Neighbor] = []
    provenance: Provenance


class Reply(BaseModel):
    """One completion from the teacher."""

    # "tasks" | "classify:<n>" | "instances:<n>" | "failed:<n>" (text: the fault) | "repeat:<n>" (read_repeat)
    purpose: str
    text: str
    finish_reason: str | None = None
    usage: Usage = Usage()
    server: str | None = None  # the base URL that answered (several may serve one run)


class Response(BaseModel):
    """Everything the teacher replied for one unit of work, logged before it is processed.

    On resume, candidates of a logged Response missing from kept/rejected are
    processed again from this text, so nothing the teacher said is lost.
    """

    id: str
    index: int
    mode: Literal["alpaca", "self-instruct", "magpie", "respond", "evolve"]
    prompt_hash: str
    example_ids: list[str]
    replies: list[Reply]
    created_at: str
    elapsed_s: float
    # How many candidates the reply gave when it was decided (generate's modes; None in a log
    # made before this was recorded). A resume passes over a reply whose candidates are all
    # decided without parsing it again: faster, and a parser changed since never re-reads it.
    candidates: int | None = None

    @field_validator("replies")
    @classmethod
    def _repeat_markers_readable(cls, replies: list[Reply], info: ValidationInfo) -> list[Reply]:
        # A resume reads a self-instruct marker to decide its instruction: one edited, cut or
        # corrupted by hand is refused with the line it is on, before anything is written.
        # A resume's check hands the count of the first reply's instructions as a function
        # (context "instructions"): only the run's options can parse it, and only a reply
        # with a marker pays for the parse. It hands the run's --threshold too ("threshold").
        count = (info.context or {}).get("instructions")
        threshold = (info.context or {}).get("threshold")
        if info.data.get("mode") == "self-instruct":
            purposes = {r.purpose for r in replies}
            for i, r in enumerate(replies):
                if r.purpose.startswith("repeat:"):
                    try:
                        m, _ = read_repeat(r.purpose, r.text, count(replies[0]) if count and replies else None, threshold)
                        _copy_was_asked(r.purpose, m, purposes)
                    except ValueError as e:
                        raise ValueError(f"reply {i}: {e}") from None
        return replies


def _copy_was_asked(purpose: str, m: int, purposes: set[str]) -> None:
    """Refuse a marker naming a copy whose examples were not asked: the run names only a copy whose
    classification and instances gave usable instances, so a reason naming any other names the
    wrong copy. Whether they were usable takes the run's options; that both replies are logged does not."""
    if f"repeat:{m}" in purposes:  # a repeat had no follow-ups of its own, so the run never names it
        raise ValueError(f"{purpose!r} names instruction {m} as its earlier copy, which was itself a repeat "
                         f"('repeat:{m}'); the run names a copy whose examples were asked")
    if not {f"classify:{m}", f"instances:{m}"} <= purposes:
        raise ValueError(f"{purpose!r} names instruction {m} as its earlier copy, whose examples are not in the log "
                         f"(no 'classify:{m}' and 'instances:{m}' replies)")


def read_repeat(purpose: str, text: str, instructions: int | None = None,
                threshold: float | None = None) -> tuple[int, float]:
    """Self-instruct's ``repeat:N`` marker reply, as its unit writes it: (the earlier instruction
    of the reply that N repeats and whose examples were asked instead, their ROUGE-L).
    ``instructions``, when known, is how many the reply gave: N must be one of them; the run's
    ``threshold``, when known, is what their ROUGE-L must be above.

    >>> read_repeat("repeat:2", "0 0.88")
    (0, 0.88)
    >>> read_repeat("repeat:2", "2 0.88")
    Traceback (most recent call last):
    ValueError: 'repeat:2' names instruction 2 as its earlier copy, which is not before 2
    >>> read_repeat("repeat:2", "0 0.7", threshold=0.7)
    Traceback (most recent call last):
    ValueError: 'repeat:2' gives ROUGE-L 0.7, not above the run's --threshold 0.7: no duplicate, and the run writes a marker only for one
    """
    n, fields = purpose.removeprefix("repeat:"), text.split()
    if not (n.isascii() and n.isdigit()):  # as written: int() would take " 1", "+1" and other scripts' digits
        raise ValueError(f"{purpose[:40]!r} names no instruction (repeat:<its number>)")
    if n != str(int(n)):  # the run writes f"repeat:{n}": "repeat:01" is never looked up, so never read
        raise ValueError(f"{purpose[:40]!r} is not written as the run writes it (repeat:{int(n)})")
    if instructions is not None and int(n) >= instructions:  # no instruction of the reply it could decide
        raise ValueError(f"{purpose[:40]!r} names instruction {n}, past the reply's {instructions} "
                         f"(numbered from 0)")
    if len(fields) != 2 or not (fields[0].isascii() and fields[0].isdigit()):  # "-1" was the reply's last
        raise ValueError(f"{purpose!r} reads {text[:40]!r}, not '<the earlier copy's number> <their ROUGE-L>' "
                         "as the run wrote it")
    if int(fields[0]) >= int(n):  # itself or a later one: not a copy its examples could have come from
        raise ValueError(f"{purpose!r} names instruction {fields[0]} as its earlier copy, which is not before {n}")
    try:
        score = float(fields[1])
    except ValueError:
        score = math.nan
    if not 0 <= score <= 1:  # nan too: its reason would read 'ROUGE-L nan > 0.7'
        raise ValueError(f"{purpose!r} gives ROUGE-L {fields[1][:40]!r}, not a number from 0 to 1")
    # The run writes a marker only for a score > threshold (as the pool decides a duplicate), as
    # repr, which reads back exactly: one at or below it was no duplicate. --threshold cannot
    # change on resume (config.yaml is compared first), so this is the threshold it was written under.
    if threshold is not None and score <= threshold:
        raise ValueError(f"{purpose!r} gives ROUGE-L {fields[1][:40]}, not above the run's --threshold {threshold}: "
                         "no duplicate, and the run writes a marker only for one")
    return int(fields[0]), score
