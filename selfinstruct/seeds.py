"""Load and validate seed tasks, in the self-instruct or the Alpaca format.

self-instruct: JSONL of ``{"id", "name", "instruction", "instances": [{"input", "output"}], "is_classification"}``.
Alpaca: a JSON list (or JSONL) of ``{"instruction", "input", "output"}``; ids are made from file and position.

Any problem stops the run before a teacher is called, with one line naming
file, line and field.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from selfinstruct.config import UserError
from selfinstruct.records import SeedTask


def _field_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(object)"
    msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    return f"field '{loc}': {msg}"


def _to_seed(obj, where: str, default_id: str) -> SeedTask:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "instances" not in obj and "instruction" in obj and ("output" in obj or "input" in obj):
        # An Alpaca row: one task with one instance.
        extra = set(obj) - {"instruction", "input", "output"}
        if extra:
            raise UserError(f"{where}: field '{sorted(extra)[0]}': unknown field")
        obj = {
            "id": default_id,
            "instruction": obj.get("instruction"),
            "instances": [{"input": obj.get("input") or "", "output": obj.get("output")}],
        }
    try:
        task = SeedTask.model_validate(obj)
    except ValidationError as e:
        raise UserError(f"{where}: {_field_error(e)}") from None
    if not task.instruction.strip():
        raise UserError(f"{where}: field 'instruction': is empty")
    for i, inst in enumerate(task.instances):
        if not inst.output.strip():
            raise UserError(f"{where}: field 'instances.{i}.output': is empty")
    return task


def load_seed_file(path: str | Path) -> list[SeedTask]:
    return [task for _, task in _read_seed_file(path)]


def _read_seed_file(path: str | Path) -> list[tuple[str, SeedTask]]:
    """(where, task) pairs, where = "file:line" or "file: item i"."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: seed file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"{path}: seed file is empty")
    tasks = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, obj in enumerate(data):
            where = f"{path}: item {i}"
            tasks.append((where, _to_seed(obj, where, f"{path.stem}_{i}")))
        return tasks
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        tasks.append((f"{path}:{n}", _to_seed(obj, f"{path}:{n}", f"{path.stem}_{n}")))
    return tasks


def load_seeds(paths) -> list[SeedTask]:
    """All seed files together; ids must be unique across them."""
    tasks: list[SeedTask] = []
    where: dict[str, str] = {}
    for path in paths:
        for here, task in _read_seed_file(path):
            if task.id in where:
                raise UserError(f"{here}: field 'id': duplicate id '{task.id}' (first at {where[task.id]})")
            where[task.id] = here
            tasks.append(task)
    if not tasks:
        raise UserError("no seed tasks given")
    return tasks
