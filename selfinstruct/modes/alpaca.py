"""Alpaca mode: one prompt with k examples; the reply holds several instruction/input/output tasks."""

from __future__ import annotations

import random
import time

from selfinstruct.modes import candidate, parse_first
from selfinstruct.prompts import (STRUCTURED_HINT, TaskListJSON, bounded_schema, parse_alpaca,
                                  parse_structured_tasks, render_alpaca_examples, response_format, string_limits)
from selfinstruct.records import Response
from selfinstruct.teacher import now_iso

TEMPLATES = {"alpaca": ("alpaca.txt", {"examples"}, {"num"})}

# Starts the teacher's reply in the format asked for (with --prefill).
PREFILL = "###\nInstruction:"


async def unit(index: int, cfg, teacher, templates, pool) -> Response:
    """One prompt with k examples; the reply holds several instruction/input/output tasks."""
    rng = random.Random(f"{cfg.seed}-{index}")
    examples = pool.sample(rng, cfg.seed_examples, cfg.machine_examples)
    tpl = templates["alpaca"]
    prompt = tpl.render(num=cfg.tasks_per_request, examples=render_alpaca_examples([e[1:] for e in examples]))
    fmt = None
    if cfg.structured:
        prompt += STRUCTURED_HINT
        fmt = response_format(TaskListJSON, bounded_schema(TaskListJSON, cfg.tasks_per_request, cfg.max_tokens))
    t0 = time.monotonic()
    prefill = PREFILL if cfg.prefill and not cfg.structured else None
    reply = await teacher.complete(prompt, "tasks", fmt, prefill=prefill)
    return Response(
        id=f"r{index:06d}", index=index, mode="alpaca", prompt_hash=tpl.sha256,
        example_ids=[e[0] for e in examples], replies=[reply], created_at=now_iso(),
        elapsed_s=round(time.monotonic() - t0, 3),
    )


def candidates(resp: Response, cfg) -> list[dict]:
    limits = string_limits(bounded_schema(TaskListJSON, cfg.tasks_per_request, cfg.max_tokens)) if cfg.structured else None
    return [candidate(c) for c in parse_first(resp.replies[0], cfg, parse_alpaca, parse_structured_tasks, limits)]
