"""Alpaca mode: one prompt with k examples; the reply holds several instruction/input/output tasks."""

from __future__ import annotations

import copy
import random
import re
import time

from selfinstruct.modes import candidate, cut_degenerate, one_line, parse_first
from selfinstruct.prompts import (ALPACA_FORMAT, ALPACA_JSON_FORMAT, STRUCTURED_HINT, TaskListJSON, bounded_schema, parse_alpaca,
                                  parse_structured_tasks, render_alpaca_examples, response_format, string_limits)
from selfinstruct.records import Response
from selfinstruct.teacher import now_iso

TEMPLATES = {"alpaca": ("alpaca.txt", {"examples"}, {"num", "format"})}
# An instruction is kept on one line (the paper's data was); its line breaks were layout, not meaning.
instruction_text = one_line

# Starts the teacher's reply in the format asked for (with --prefill).
PREFILL = "###\nInstruction:"
LEAD_HINT = '\nStart the new instruction with the word "{lead}".'


async def unit(index: int, cfg, teacher, templates, pool) -> Response:
    """One prompt with k examples; the reply holds several instruction/input/output tasks."""
    rng = random.Random(f"{cfg.seed}-{index}")
    examples = pool.sample(rng, cfg.seed_examples, cfg.machine_examples)
    tpl = templates["alpaca"]
    prompt = tpl.render(num=cfg.tasks_per_request, examples=render_alpaca_examples([e[1:] for e in examples], cfg.structured),
                        format=ALPACA_JSON_FORMAT if cfg.structured else ALPACA_FORMAT)
    fmt = None
    if cfg.structured:
        prompt += STRUCTURED_HINT
        fmt = response_format(TaskListJSON, bounded_schema(TaskListJSON, cfg.tasks_per_request, cfg.max_tokens))
    t0 = time.monotonic()
    prefill = PREFILL if cfg.prefill and not cfg.structured else None
    if cfg.lead_word and (prefill or cfg.structured):
        shown = {e[0] for e in examples}
        others = [s for s in pool.seeds if s[0] not in shown and s[1][:1].isalpha()] or pool.seeds
        lead = rng.choice(others)[1].split()[0]
        if prefill:
            prefill += " " + lead
        else:  # a grammar-constrained reply cannot be prefilled: the schema's pattern leads instead
            prompt += LEAD_HINT.format(lead=lead)
            fmt = response_format(TaskListJSON, lead_schema(fmt["json_schema"]["schema"], lead))
    replies = [await teacher.complete(prompt, "tasks", fmt, prefill=prefill)]
    if cfg.continue_output and not cfg.structured:
        rest = _output_prefill(replies[0])
        if rest is not None:
            replies.append(await teacher.complete(prompt, "tasks", prefill=rest))
    return Response(
        id=f"r{index:06d}", index=index, mode="alpaca", prompt_hash=tpl.sha256,
        example_ids=[e[0] for e in examples], replies=replies, created_at=now_iso(),
        elapsed_s=round(time.monotonic() - t0, 3),
    )


def lead_schema(schema: dict, lead: str) -> dict:
    """A bounded task schema whose instruction must start with ``lead`` and hold no '#' or newline.

    A JSON-schema ``pattern`` is how grammar-constrained decoding (llama.cpp, vLLM) takes a
    prefix. The pattern bounds the length itself, so a converter that reads only one of
    pattern and maxLength still ends the string.

    >>> s = lead_schema(bounded_schema(TaskListJSON, 1, 200), "Why")
    >>> print(s["$defs"]["TaskJSON"]["properties"]["instruction"]["pattern"])
    ^Why [^#\\n]{20,106}$
    """
    schema = copy.deepcopy(schema)
    field = schema["$defs"]["TaskJSON"]["properties"]["instruction"]
    word = re.sub(r"[^\w'-]", "", lead) or "Write"
    # At least 20 characters after the word: the small teacher otherwise stops at "Summarize the task".
    field["pattern"] = f"^{word} [^#\\n]{{20,{max(20, field['maxLength'] - len(word) - 1)}}}$"
    return schema


def _output_prefill(reply) -> str | None:
    """The reply so far plus "Output:", when its last task stopped with an instruction but no output.

    >>> from selfinstruct.records import Reply
    >>> _output_prefill(Reply(purpose="tasks", text="###\\nInstruction: Add 2 and 3.\\n\\n", finish_reason="stop"))
    '###\\nInstruction: Add 2 and 3.\\nOutput:'
    >>> _output_prefill(Reply(purpose="tasks", text="###\\nInstruction: Add 2 and 3.\\nOutput: 5", finish_reason="stop")) is None
    True
    """
    if reply.finish_reason != "stop":  # cut at max_tokens: going on would only make it longer
        return None
    text, repeats = cut_degenerate(reply.text)
    found = parse_alpaca(text, "stop")
    if repeats or not found[-1].instruction or not (found[-1].error or "").startswith("missing_output"):
        return None
    return re.sub(r"(\s|#{2,})*$", "", text) + "\nOutput:"


def candidates(resp: Response, cfg) -> list[dict]:
    limits = string_limits(bounded_schema(TaskListJSON, cfg.tasks_per_request, cfg.max_tokens)) if cfg.structured else None
    # With --continue-output the last reply holds the whole text (it begins with the first as its prefill).
    return [candidate(c) for c in parse_first(resp.replies[-1], cfg, parse_alpaca, parse_structured_tasks, limits)]
