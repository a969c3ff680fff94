"""Self-instruct mode: new instructions; then, for each that could be kept, is-it-classification and instances."""

from __future__ import annotations

import asyncio
import random
import re
import time

from selfinstruct import filters
from selfinstruct.modes import candidate, fluent_instances, instruction_verdict, one_line, parse_first
from selfinstruct.prompts import (STRUCTURED_HINT, ClassificationJSON, InstanceListJSON, InstructionListJSON,
                                  LabeledInstanceListJSON, bounded_schema, parse_instances, parse_instructions,
                                  parse_structured_instances, parse_structured_instructions, parse_yes_no,
                                  render_task_lines, response_format, string_limits, unfenced)
from selfinstruct.records import Neighbor, Reply, Response, read_repeat
from selfinstruct.rouge import Tokens, rouge_l_tokens
from selfinstruct.teacher import FATAL_KINDS, TeacherError, now_iso

TEMPLATES = {
    "instructions": ("self_instruct_instructions.txt", {"examples"}, {"num", "first"}),
    "classify": ("self_instruct_classify.txt", {"instruction"}, set()),
    "instances_input_first": ("self_instruct_instances_input_first.txt", {"instruction"}, {"num"}),
    "instances_output_first": ("self_instruct_instances_output_first.txt", {"instruction"}, {"num"}),
}
# An instruction is kept on one line (the paper's data was); its line breaks were layout, not meaning.
instruction_text = one_line

# The original asked both follow-ups greedily (identify_clf_or_not.py, generate_instances.py:
# temperature 0, top_p 0), so the classification, which picks the instances template, and the
# instances were the teacher's most likely ones. top_p is not sent: under temperature 0 it changes
# nothing, and vLLM refuses 0. The yes/no answer was cut at 3 GPT-3 tokens; a chat model may lead
# with "Answer:" or "**Yes**" before the word parse_yes_no looks for, so 16 (32 for the JSON
# object, whose keys and braces are tokens too). The instances keep the run's --max-tokens: our
# instances prompts are chat prompts asking for --instances-per-task labelled examples, longer
# than GPT-3's 300, and a cut last example is dropped.
CLASSIFY_MAX_TOKENS, CLASSIFY_MAX_TOKENS_JSON = 16, 32
GREEDY = {"temperature": 0.0, "top_p": None}
INSTANCES_PRESENCE_PENALTY = 1.5  # the original's; OpenAI, vLLM and llama.cpp servers take it


def followup_sampling(cfg) -> dict[str, dict]:
    """What the classify and instances requests send in place of the run's sampling, by purpose
    (nothing with ``followup_sampling`` run, as runs made before the option were asked).

    >>> from types import SimpleNamespace as S
    >>> followup_sampling(S(followup_sampling="greedy", structured=False))["classify"]
    {'temperature': 0.0, 'top_p': None, 'max_tokens': 16}
    >>> followup_sampling(S(followup_sampling="run", structured=False))
    {}
    """
    if getattr(cfg, "followup_sampling", "run") != "greedy":
        return {}
    return {"classify": {**GREEDY, "max_tokens": CLASSIFY_MAX_TOKENS_JSON if cfg.structured else CLASSIFY_MAX_TOKENS},
            "instances": {**GREEDY, "presence_penalty": INSTANCES_PRESENCE_PENALTY}}


async def unit(index: int, cfg, teacher, templates, pool, wanted=None) -> Response:
    """New instructions; then, for each that could be kept, is-it-classification and instances.

    ``wanted`` (``generate.Wanted``): whether the run may still keep one more, asked before each
    instruction's follow-ups; one it may not is logged as ``quota:N`` instead (rejected as quota)."""
    rng = random.Random(f"{cfg.seed}-{index}")
    examples = pool.sample(rng, cfg.seed_examples, cfg.machine_examples)
    tpl = templates["instructions"]
    prompt = tpl.render(num=cfg.tasks_per_request, first=len(examples) + 1,
                        examples=render_task_lines([e[1] for e in examples]))
    fmt = None
    if cfg.structured:
        prompt += STRUCTURED_HINT
        fmt = response_format(InstructionListJSON, bounded_schema(InstructionListJSON, cfg.tasks_per_request, cfg.max_tokens))
    t0 = time.monotonic()
    first = await teacher.complete(prompt, "tasks", fmt)
    firsts = _parse(first, cfg)
    follow_sampling = followup_sampling(cfg)

    async def follow_up(n: int, instruction: str) -> list[Reply]:
        replies = []
        try:
            c_prompt = templates["classify"].render(instruction=instruction)
            c_fmt = response_format(ClassificationJSON) if cfg.structured else None
            cls = await teacher.complete(c_prompt + (STRUCTURED_HINT if c_fmt else ""), f"classify:{n}", c_fmt,
                                         sampling=follow_sampling.get("classify"))
            replies.append(cls)
            is_cls = _read_classification(cls.text, cfg.structured)
            name = "instances_output_first" if is_cls else "instances_input_first"
            i_prompt = templates[name].render(instruction=instruction, num=cfg.instances_per_task)
            # Output-first in JSON too: the grammar writes the fields in the schema's order.
            model = LabeledInstanceListJSON if is_cls else InstanceListJSON
            i_fmt = response_format(model, _instances_schema(cfg, model)) if cfg.structured else None
            replies.append(await teacher.complete(i_prompt + (STRUCTURED_HINT if i_fmt else ""), f"instances:{n}", i_fmt,
                                                  sampling=follow_sampling.get("instances")))
        except TeacherError as e:
            if e.kind in FATAL_KINDS:
                raise
            # One instruction's follow-up failed after every retry: the rest of the unit stands,
            # and this instruction is logged with the failure so it is rejected with a reason.
            replies.append(Reply(purpose=f"failed:{n}", text=f"{e.kind}: {e}"))
        return replies

    # Only spend follow-up requests on instructions that pass the filters and are not
    # duplicates now; the pool only grows, so a duplicate now is still one when processed.
    could = [n for n, cand in enumerate(firsts) if cand.error is None and instruction_verdict(cand.instruction, cfg) is True]
    # One query for the reply's instructions, not one each: a batch spreads its pass over the
    # index's threads, and at a million kept that pass is most of a candidate's cost.
    found = pool.index.query_many([firsts[n].instruction for n in could], nearest=0) if could else []
    asked = [n for n, match in zip(could, found) if not match.duplicate]
    repeats = _repeats(asked, firsts, cfg.threshold)

    spent: set[int] = set()  # this unit's instructions asked for that are known never to be kept

    async def if_wanted(n: int) -> list[Reply]:
        # The run may have --num kept, or enough asked for to reach it: two calls saved, and the
        # instruction rejected as quota (the marker says so in the log, for a resume to read alike).
        if wanted is not None and not (within_a_small_num(wanted, cfg, len(spent)) and wanted.claim(index)):
            return [Reply(purpose=f"quota:{n}", text=f"--num {cfg.num} kept or asked for when this reply came back")]
        return await follow_up(n, firsts[n].instruction)

    async def unless_repeated(n: int, copies: list[tuple[int, float]]) -> list[Reply]:
        # An instruction the reply repeats is a duplicate of an earlier copy once that is kept:
        # its follow-ups are asked only if no copy's gave usable instances, as then it may be kept.
        # Each copy in turn: ROUGE-L is not transitive, and a copy that was itself a repeat
        # (no follow-ups) is never kept, so it makes no duplicate of this one.
        for m, score in copies:
            its_replies = await jobs[m]
            if _gives_instances(its_replies, m, cfg):
                return [Reply(purpose=f"repeat:{n}", text=f"{m} {score!r}")]
            if not any(r.purpose.startswith(("quota:", "repeat:")) for r in its_replies):
                spent.add(m)  # asked for, and it gave nothing usable: it will not be kept
        return await if_wanted(n)

    jobs: dict[int, asyncio.Task] = {}
    for n in asked:  # an earlier copy's job is made first, so each repeat finds its copies' jobs
        # (A task starts at the next await, in this order: the earlier instructions are asked for first.)
        jobs[n] = asyncio.create_task(unless_repeated(n, repeats[n]) if n in repeats else if_wanted(n))
    replies = [first]
    try:
        for n, job in jobs.items():
            replies += await job
    except BaseException:
        for job in jobs.values():
            job.cancel()
        raise
    return Response(
        id=f"r{index:06d}", index=index, mode="self-instruct", prompt_hash=tpl.sha256,
        example_ids=[e[0] for e in examples], replies=replies, created_at=now_iso(),
        elapsed_s=round(time.monotonic() - t0, 3),
    )


def within_a_small_num(wanted, cfg, spent: int = 0) -> bool:
    """Whether one more instruction's follow-ups stay within what --num still wants, for a small one
    before the session has a keep rate (``wanted``: ``generate.Wanted``); True otherwise. ``spent``:
    of the instructions asked for, those known never to be kept (a repeat's copy whose examples
    were unusable, which the repeat replaces).

    ``Wanted`` asks for ``MARGIN`` (1.5) times the tasks still wanted, at a prior keep rate of one
    before any asked instruction is decided: --num 1 asked follow-ups for 2 instructions, and when
    both were usable the second was a quota rejection that cost the teacher two calls. Where one
    reply's instructions can fill what is wanted (at most --tasks-per-request of them), no more are
    asked until a keep rate is known; a larger run keeps the margin, which saves it a round of
    requests near its end, and so does any run once its keep rate is measured.

    >>> from types import SimpleNamespace as S
    >>> [within_a_small_num(S(num=1, kept=0, out=out, asked=0), S(tasks_per_request=5)) for out in (0, 1)]
    [True, False]
    >>> within_a_small_num(S(num=100, kept=0, out=100, asked=0), S(tasks_per_request=5))  # Wanted's margin decides
    True
    >>> within_a_small_num(S(num=1, kept=0, out=1, asked=3), S(tasks_per_request=5))  # a keep rate is known
    True
    """
    still = wanted.num - wanted.kept
    return wanted.asked > 0 or still > cfg.tasks_per_request or wanted.out - spent < still


def candidates(resp: Response, cfg) -> list[dict]:
    follow = {r.purpose: r for r in resp.replies[1:]}
    out = []
    parsed = _parse(resp.replies[0], cfg)
    for n, c in enumerate(parsed):
        cand = candidate(c, instances=[])
        cls, inst, failed = follow.get(f"classify:{n}"), follow.get(f"instances:{n}"), follow.get(f"failed:{n}")
        repeat, quota = follow.get(f"repeat:{n}"), follow.get(f"quota:{n}")
        if c.error is None and quota is not None:
            cand["error"] = f"quota: its examples were not asked ({quota.text})"
            cand["stage"] = "quota"
        elif c.error is None and failed is not None:
            cand["error"] = f"teacher_error: a follow-up request failed after every retry ({failed.text})"
            cand["stage"] = "teacher"
        elif c.error is None and cls is not None and inst is not None:
            cand["is_classification"] = _read_classification(cls.text, cfg.structured)
            cand["raw"] += "\n\n" + inst.text
            cand["instances"], cand["error"] = _instances_of(cls, inst, cfg)
        elif c.error is None and repeat is not None:
            # Rejected as a duplicate of that copy when decided; the copy is named even if it was not kept.
            m, score = read_repeat(repeat.purpose, repeat.text)  # checked when the log was read
            cand["repeat_of"] = Neighbor(id=f"{resp.id}-{m}", instruction=instruction_text(parsed[m].instruction),
                                         rouge_l=round(score, 6))
        out.append(cand)
    return out


def _instances_of(cls: Reply, inst: Reply, cfg) -> tuple[list, str | None]:
    """The instances an instances reply gives (and why none can be used: a JSON reply that is none, a
    text reply cut at max_tokens before its first example was whole, or every example repeating a
    short unit within a line, which alpaca mode rejects a task for)."""
    if cfg.structured:
        instances, why = parse_structured_instances(inst.text, inst.finish_reason, string_limits(_instances_schema(cfg)))
    else:
        is_cls = _read_classification(cls.text, cfg.structured)
        instances, why = parse_instances(inst.text, output_first=is_cls, finish_reason=inst.finish_reason), None
        if not instances and inst.finish_reason == "length":
            # As alpaca's reply cut before its first task: the teacher was writing one (a long code
            # output), and no_instances would say it wrote none where --max-tokens is what to raise.
            why = "truncated: the examples reply was cut at max_tokens before its first example was whole"
    return (instances, why) if why else fluent_instances(instances)


def _gives_instances(replies: list[Reply], n: int, cfg) -> bool:
    """Whether instruction n's follow-up replies give instances the filters keep."""
    follow = {r.purpose: r for r in replies}
    cls, inst = follow.get(f"classify:{n}"), follow.get(f"instances:{n}")
    if cls is None or inst is None:
        return False
    instances, why = _instances_of(cls, inst, cfg)
    return why is None and filters.clean_instances(instances)[1] is None


def _repeats(asked: list[int], firsts, threshold: float) -> dict[int, list[tuple[int, float]]]:
    """Instruction -> [(each earlier one of ``asked`` it is a duplicate of, their ROUGE-L)], within one reply.

    Every earlier one, repeats included: a third copy may repeat the second and not the first.

    >>> from selfinstruct.prompts import Candidate
    >>> texts = ("Name a river.", "Name a river!", "Sing.", "Name a big river.")
    >>> _repeats([0, 1, 2, 3], [Candidate(raw="", instruction=t) for t in texts], 0.7)
    {1: [(0, 1.0)], 3: [(0, 0.8571428571428571), (1, 0.8571428571428571)]}
    """
    tokens = Tokens()
    seqs = {n: tokens(one_line(firsts[n].instruction)) for n in asked}
    out = {}
    for i, n in enumerate(asked):
        scores = [(m, rouge_l_tokens(seqs[m], seqs[n])) for m in asked[:i]]
        copies = [(m, score) for m, score in scores if score > threshold]  # as the pool decides a duplicate
        if copies:
            out[n] = copies
    return out


def instruction_count(first: Reply, cfg) -> int:
    """How many instructions (candidates) a unit's first reply gives, as ``candidates`` reads it."""
    return len(_parse(first, cfg))


# The bundled instructions template's closing words ("Write 5 new tasks, one per line, numbered from
# Task 8 on"): a teacher that writes the prompt back puts them on the line after its last example,
# which they continue, and that instruction, far enough from its seed, was kept.
_PROMPTS_OWN_WORDS = re.compile(r"new tasks, one per line|numbered from task \d+", re.IGNORECASE)


def _parse(first: Reply, cfg):
    limits = string_limits(bounded_schema(InstructionListJSON, cfg.tasks_per_request, cfg.max_tokens)) if cfg.structured else None
    found = parse_first(first, cfg, parse_instructions, parse_structured_instructions, limits)
    for c in found:
        if c.error is None and (m := _PROMPTS_OWN_WORDS.search(c.instruction)):
            c.error = f"leaked_prompt: the instruction holds the prompt's own words ({m.group(0)!r}): the reply repeats the prompt"
    return found


def _instances_schema(cfg, model=InstanceListJSON) -> dict:
    return bounded_schema(model, cfg.instances_per_task, cfg.max_tokens)


def _read_classification(text: str, structured: bool) -> bool:
    if structured:
        try:
            return ClassificationJSON.model_validate_json(unfenced(text)).is_classification
        except ValueError:
            return False
    return bool(parse_yes_no(text))
