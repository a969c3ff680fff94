"""The generation modes, one module each: ``alpaca``, ``self_instruct``, ``magpie``.

A mode module holds everything that is particular to it:

- ``TEMPLATES``: template key -> (file name in prompts/, required placeholders, allowed ones);
- ``async def unit(index, cfg, teacher, templates, pool) -> Response``: one unit of work's
  requests (the request side); self-instruct's also takes ``wanted`` (``generate.Wanted``);
- ``def candidates(resp, cfg) -> list[dict]``: the logged Response turned into candidates,
  deterministically, so a resume re-derives the same ones (the parse side);
- ``def instruction_text(instruction) -> str``: a candidate's instruction as it is filtered,
  deduplicated and kept (``one_line``, or the mode's own).

``generate.MODES`` maps each ``--mode`` name to its module. What modes share is below.
"""

from __future__ import annotations

from selfinstruct import filters
from selfinstruct.prompts import Candidate, cut_degenerate, repeats_within_a_line
from selfinstruct.records import Instance


def parse_first(first, cfg, parse, structured_parse=None, limits=None) -> list[Candidate]:
    """The candidates of a unit's first reply; a text reply that degenerates into repeats is cut
    where they start, and the repeats are one more candidate, rejected as ``degenerate``. A candidate
    whose field repeats a short unit within one line is ``degenerate`` too, in JSON as in text (a
    string's own "\\n" are its lines)."""
    if cfg.structured:
        return _within_a_line(structured_parse(first.text, first.finish_reason, limits))
    text, repeats = cut_degenerate(first.text)
    if not repeats:
        return _within_a_line(parse(text, first.finish_reason))
    # What ran to max_tokens was the repeating; the text before it ended where the model stopped making sense.
    return [*_within_a_line(parse(text, "stop")),
            Candidate(raw=repeats, error=f"degenerate: the reply repeats itself from here ({len(repeats)} characters cut)")]


def _within_a_line(found: list[Candidate]) -> list[Candidate]:
    """The candidates, each whose instruction, input or output repeats a short unit within one long line
    made ``degenerate`` (``repeats_within_a_line``: the line-based cut above misses an output of one line
    of "a a a ..."), naming that field. Its fields, not its raw text: the last task's raw holds the
    chatter after it."""
    for c in found:
        if c.error is None:
            fields = (("instruction", c.instruction), *(f for inst in c.instances for f in _fields(inst)))
            for name, text in fields:
                if why := repeats_within_a_line(text):
                    c.error = f"degenerate: the {name} repeats itself within a line ({why})"
                    break
    return found


def _fields(inst: Instance) -> tuple[tuple[str, str], tuple[str, str]]:
    return ("input", inst.input), ("output", inst.output)


def fluent_instances(instances: list[Instance]) -> tuple[list[Instance], str | None]:
    """The instances less each whose input or output repeats itself (a line or block of lines three
    times in a row, as ``cut_degenerate`` finds in a reply, or a short unit within one line); and,
    when that leaves none, why the first was dropped. As ``filters.clean_instances`` drops a bad
    example and says why only when no example is left: the task's other examples may still be kept.

    >>> fluent_instances([Instance(input="", output="ha" * 150), Instance(input="2 + 2", output="4")])
    ([Instance(input='2 + 2', output='4')], None)
    >>> fluent_instances([Instance(input="", output="ha" * 150)])[1]
    "degenerate: example 1's output repeats itself within a line (one word of 300 characters repeats 'ha')"
    >>> fluent_instances([Instance(input="", output="###\\n###\\n###\\n###")])[1]
    "degenerate: example 1's output repeats itself"
    """
    kept, first_reason = [], None
    for n, inst in enumerate(instances, 1):
        # The instances reply is not cut as a first reply is (``parse_first``): the repeats are
        # within one example's field, and the reply's other examples may be fine.
        why = next((f"degenerate: example {n}'s {name} repeats itself" + (f" within a line ({why})" if why else "")
                    for name, text in _fields(inst)
                    if (why := repeats_within_a_line(text)) or cut_degenerate(text)[1]), None)
        if why is None:
            kept.append(inst)
        else:
            first_reason = first_reason or why
    return kept, first_reason if not kept else None


# Replies a unit logs that no teacher answered: a follow-up that failed every retry ("failed:N",
# magpie's "failed"), one not asked as its instruction repeats another ("repeat:N") or as the run
# had --num kept or asked for ("quota:N"), and magpie's query not answered as it repeats the pre-query ("echo").
NOT_REQUESTS = ("failed", "repeat", "quota", "echo")


def is_request(purpose: str) -> bool:
    """Whether a logged reply of this purpose is a request the teacher answered.

    >>> [is_request(p) for p in ("tasks", "instances:2", "failed:2", "repeat:3", "failed", "quota:1", "echo")]
    [True, True, False, False, False, False, False]
    """
    return purpose.split(":", 1)[0] not in NOT_REQUESTS


def one_line(instruction: str) -> str:
    r"""The instruction on one line with single spaces, as self-instruct and Alpaca kept theirs.

    >>> one_line("  Name three\n  primary colours. ")
    'Name three primary colours.'
    """
    return " ".join(instruction.split())


def instruction_verdict(instruction: str, cfg):
    return filters.check_instruction(instruction, cfg.blacklist, cfg.min_words, cfg.max_words)


def candidate(c: Candidate, **more) -> dict:
    """The dict form of a parsed candidate (raw, instruction, instances, is_classification, error)."""
    return {"raw": c.raw, "instruction": c.instruction, "instances": c.instances, "is_classification": None,
            "error": c.error, **more}
