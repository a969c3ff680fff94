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


def _to_seed(obj, where: str, default_id: str, made_ids: set) -> SeedTask:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "instances" not in obj and "id" not in obj:
        # An Alpaca row: one task with one instance.
        extra = set(obj) - {"instruction", "input", "output"}
        if extra:
            raise UserError(f"{where}: field '{sorted(extra)[0]}': unknown field")
        for name in ("instruction", "output"):
            if name not in obj:
                raise UserError(f"{where}: field '{name}': Field required")
        made_ids.add(where)
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


def _json_list_items(text: str):
    r"""(line, object) for each item of a JSON list, so an error can name the item's line.

    The standard library's decoder reads one item at a time (json.loads cannot say where
    an item began); a malformed list raises JSONDecodeError with its own line.

    >>> list(_json_list_items('[{"a": 1},\n {"b": 2}]'))
    [(1, {'a': 1}), (2, {'b': 2})]
    """
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    ws = " \t\r\n"
    while True:
        while i < len(text) and text[i] in ws:
            i += 1
        if text.startswith("]", i):
            i += 1
            break
        obj, end = decoder.raw_decode(text, i)
        yield text.count("\n", 0, i) + 1, obj
        i = end
        while i < len(text) and text[i] in ws:
            i += 1
        if text.startswith(",", i):
            i += 1
        elif not text.startswith("]", i):
            json.loads(text)  # raises with the position of the problem
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
    if text[i:].strip():
        raise json.JSONDecodeError("Extra data", text, i + len(text[i:]) - len(text[i:].lstrip()))


def _read_seed_file(path: str | Path, made_ids: set | None = None) -> list[tuple[str, SeedTask]]:
    """(where, task) pairs, where = "file:line" (a JSON list: "file:line: item i").

    ``made_ids`` collects the ``where`` of each task whose id was made from the file name.
    """
    made_ids = set() if made_ids is None else made_ids
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
            items = list(_json_list_items(text))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, (line, obj) in enumerate(items):
            where = f"{path}:{line}: item {i}"
            tasks.append((where, _to_seed(obj, where, f"{path.stem}_{i}", made_ids)))
        return tasks
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        tasks.append((f"{path}:{n}", _to_seed(obj, f"{path}:{n}", f"{path.stem}_{n}", made_ids)))
    return tasks


def load_seeds(paths) -> list[SeedTask]:
    """All seed files together; ids must be unique across them."""
    tasks: list[SeedTask] = []
    where: dict[str, str] = {}
    paths = [Path(p) for p in paths]
    for k, path in enumerate(paths):
        made_ids: set[str] = set()
        namesakes = {q.resolve() for q in paths if q.stem == path.stem and q.is_file()}
        for here, task in _read_seed_file(path, made_ids):
            if len(namesakes) > 1 and here in made_ids:
                # Alpaca rows get ids from their file's name: two data.json in different
                # folders must not collide, so the second and later get the file's position.
                task = task.model_copy(update={"id": f"{path.stem}.{k}_{task.id[len(path.stem) + 1:]}"})
            if task.id in where:
                raise UserError(f"{here}: field 'id': duplicate id '{task.id}' (first at {where[task.id]})")
            where[task.id] = here
            tasks.append(task)
    if not tasks:
        raise UserError("no seed tasks given")
    return tasks
