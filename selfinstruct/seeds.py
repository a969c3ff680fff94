"""Load and validate seed tasks, in the self-instruct or the Alpaca format.

self-instruct: JSONL of ``{"id", "name", "instruction", "instances": [{"input", "output"}], "is_classification"}``.
Alpaca: a JSON list (or JSONL) of ``{"instruction", "input", "output"}``; ids are made from file and position.

Any problem stops the run before a teacher is called, with one line naming
file, line and field.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from selfinstruct.config import UserError, format_validation_error
from selfinstruct.datafiles import alpaca_row, is_parquet, json_kind, read_json_records
from selfinstruct.filters import no_visible_text
from selfinstruct.records import SeedTask, example


def _nulls_left_out(obj: dict) -> dict:
    """A self-instruct task with null where a field may be left out (name, is_classification, an
    instance's input) read as left out, as an Alpaca row's null input is: a file written from a
    dataset holds null for a missing string.

    >>> _nulls_left_out({"id": "a", "name": None, "instances": [{"input": None, "output": "x"}]})
    {'id': 'a', 'instances': [{'output': 'x'}]}
    """
    out = {k: v for k, v in obj.items() if not (v is None and k in ("name", "is_classification"))}
    if isinstance(out.get("instances"), list):
        out["instances"] = [{k: v for k, v in inst.items() if not (k == "input" and v is None)}
                            if isinstance(inst, dict) else inst for inst in out["instances"]]
    return out


# What a seed file's line is, as {} is told (it has none of the self-instruct keys, so is read as an Alpaca row).
READS = ("a seed task is a JSON object with id, instruction and instances (self-instruct) or instruction, input "
         "and output (alpaca)")


# The keys that make a row a self-instruct task (with ``instances``), in the order a line names them.
SELF_INSTRUCT_KEYS = ("id", "name", "is_classification")


def _to_seed(obj, where: str, default_id: str, made_ids: set) -> SeedTask:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {json_kind(obj)}")
    if not obj.keys() & {"instances", *SELF_INSTRUCT_KEYS}:
        # An Alpaca row: one task with one instance, checked by the data layer's one row check.
        # A row with any key only self-instruct has is one of those, so the field it lacks is
        # named ('id'), not the key Alpaca does not know ('name': unknown field).
        row = alpaca_row(obj, where, strict=True, record=READS)
        made_ids.add(where)
        output_field = "output"  # the row's own name for it, in a line below
        obj = {"id": default_id, "instruction": row["instruction"],
               "instances": [{"input": row["input"], "output": row["output"]}]}
    else:
        if "instances" not in obj and "output" in obj:
            # Alpaca's answer beside a key only self-instruct has (a dataset's own `id`): pydantic said
            # "'instances': missing (and 2 more)", of a field Alpaca data never has.
            keys = " and ".join(f"'{k}'" for k in SELF_INSTRUCT_KEYS if k in obj)
            raise UserError(f"{where}: field 'instances': missing; the row has {keys}, so it is read as a "
                            "self-instruct task (id, instruction, instances), not an Alpaca row (instruction, "
                            f"input, output): leave {keys} out for an Alpaca row")
        obj = _nulls_left_out(obj)
        output_field = "instances.{}.output"
    try:
        task = SeedTask.model_validate(obj)
    except ValidationError as e:
        # The shared wording of a record's error ('file:line: field 'x': why (and N more)'), a task's
        # key it does not have being a field, not an option.
        line = format_validation_error(e, where, unknown="unknown field")
        first = e.errors()[0]
        if first["type"] in ("string_type", "missing"):
            # As an Alpaca row's is said (datafiles.alpaca_row), not pydantic's 'Input should be a valid
            # string' or 'Field required': one mistake, one wording in both formats. A required field
            # left out or null is 'missing' in both (null is how a dataset writes a missing string);
            # another type is 'must be a string, got int'. The reason is the line's last occurrence
            # of the message (only '(and N more)' follows it; the path comes first).
            at = line.rindex(first["msg"])
            missing = first["type"] == "missing" or first["input"] is None
            why = "missing" if missing else f"must be a string, got {type(first['input']).__name__}"
            line = f"{line[:at]}{why}{line[at + len(first['msg']):]}"
        elif first["type"] == "string_too_short":  # "": said as a blank one is below, and as an Alpaca row's
            at = line.rindex(first["msg"])
            line = f"{line[:at]}is empty{line[at + len(first['msg']):]}"
        raise UserError(line) from None
    # Nothing that shows is empty, as generate takes an output (filters.no_visible_text): a seed instruction
    # of only U+200B was accepted, and shown to the teacher as an example with no task in it.
    if no_visible_text(task.instruction):
        raise UserError(f"{where}: field 'instruction': is empty{_what_is_there(task.instruction)}")
    for i, inst in enumerate(task.instances):
        if no_visible_text(inst.output):
            raise UserError(f"{where}: field '{output_field.format(i)}': is empty{_what_is_there(inst.output)}")
    return task


def _what_is_there(text: str) -> str:
    """What an empty field holds when it is not plain whitespace, for the line that refuses it.

    >>> _what_is_there(" \u200b"), _what_is_there("  ")
    (' (only invisible characters: U+200B)', '')
    """
    shown = [f"U+{ord(ch):04X}" for ch in dict.fromkeys(text) if not ch.isspace()]
    return f" (only invisible characters: {', '.join(shown[:3])})" if shown else ""


def load_seed_file(path: str | Path) -> list[SeedTask]:
    return [task for _, task in _read_seed_file(path)]


def _read_seed_file(path: str | Path, made_ids: set | None = None):
    """(where, task) pairs, one at a time, where = "file:line" (a JSON list: "file:line: item i").

    ``made_ids`` collects the ``where`` of each task whose id was made from the file name.
    """
    made_ids = set() if made_ids is None else made_ids
    path = Path(path)
    if path.is_file() and is_parquet(path):  # read as JSON, it was "not UTF-8 text"
        raise UserError(f"{path}: a parquet file; seed files are JSON or JSONL (selfinstruct export {path} "
                        f"--format jsonl --out {path.with_suffix('.jsonl')} makes one)")
    items = read_json_records(path, what="seed file")
    is_list = bool(items) and ": item " in items[0][0][len(str(path)):]
    for i, (where, obj) in enumerate(items):
        # Alpaca rows get ids from the file's name and their position (list item, or JSONL line).
        default_id = f"{path.stem}_{i}" if is_list else f"{path.stem}_{where.rsplit(':', 1)[1]}"
        yield where, _to_seed(obj, where, default_id, made_ids)


def load_seeds(paths, compact: bool = False) -> list:
    """All seed files together; ids must be unique across them.

    ``compact``: each task as an (id, instruction, input, output) tuple of its first
    instance, made as it is read, as the generation pool keeps them: a million seed
    tasks as records held about 1 GB more at the peak.
    """
    tasks: list = []
    where: dict[str, str] = {}
    first: dict[Path, str] = {}
    for given in map(str, paths):
        # Else its tasks clash with themselves: "duplicate id 'a_0' (first at a.json:1)", an id
        # the user never wrote, in the place it names.
        key = Path(given).resolve()
        if key in first:
            said = f"{given} given twice" if first[key] == given else f"{given} is {first[key]} again"
            raise UserError(f"--seeds: {said}; give each seed file once")
        first[key] = given
    paths = [Path(p) for p in paths]
    for k, path in enumerate(paths):
        made_ids: set[str] = set()
        namesakes = {q.resolve() for q in paths if q.stem == path.stem and q.is_file()}
        before = len(tasks)
        for here, task in _read_seed_file(path, made_ids):
            if len(namesakes) > 1 and here in made_ids:
                # Alpaca rows get ids from their file's name: two data.json in different
                # folders must not collide, so the second and later get the file's position.
                task = task.model_copy(update={"id": f"{path.stem}.{k}_{task.id[len(path.stem) + 1:]}"})
            if task.id in where:
                raise UserError(f"{here}: field 'id': duplicate id '{task.id}' (first at {where[task.id]})")
            where[task.id] = here
            tasks.append(example(task) if compact else task)
        if len(tasks) == before:  # "[]": a file given and holding nothing is a mistake, beside others too
            raise UserError(f"{path}: holds no seed tasks")
    if not tasks:
        raise UserError("no seed tasks given")
    return tasks
