"""Seed files: one fault is said in one wording, whichever of the two formats holds it."""

import json

import pytest

from selfinstruct.config import UserError
from selfinstruct.seeds import load_seeds

TASK = {"id": "t1", "instruction": "Name a red fruit please.", "instances": [{"input": "", "output": "Apple"}]}
ROW = {"instruction": "Name a red fruit please.", "input": "", "output": "Apple"}


@pytest.mark.parametrize("fault,task,row,said", [
    ("null instruction", TASK | {"instruction": None}, ROW | {"instruction": None}, "field 'instruction': missing"),
    ("no instruction", {k: v for k, v in TASK.items() if k != "instruction"},
     {k: v for k, v in ROW.items() if k != "instruction"}, "field 'instruction': missing"),
    ("null output", TASK | {"instances": [{"input": "", "output": None}]}, ROW | {"output": None},
     "': missing"),
    ("output a number", TASK | {"instances": [{"input": "", "output": 3}]}, ROW | {"output": 3},
     "': must be a string, got int"),
])
def test_a_seed_fault_is_said_alike_in_the_self_instruct_and_the_alpaca_format(tmp_path, fault, task, row, said):
    """A self-instruct task's null instruction said 'must be a string, got null' (and a left-out one
    pydantic's 'Field required'), an Alpaca row's 'missing': one mistake, two wordings."""
    lines = []
    for name, obj in (("task", task), ("row", row)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(obj) + "\n")
        with pytest.raises(UserError) as e:
            load_seeds([path])
        lines.append(str(e.value).removeprefix(f"{path}:1: "))
    assert said in lines[0] and said in lines[1], lines
    # The field differs only by where the format keeps it (instances.0.output, output); the reason is the same.
    assert lines[0].split("': ", 1)[1] == lines[1].split("': ", 1)[1], lines


@pytest.mark.parametrize("line, said", [("null", "null"), ("[]", "an empty list []"), ("\"Add 2 and 3.\"", "a string")])
def test_a_seed_line_that_is_no_object_says_what_it_is(tmp_path, line, said):
    """A null line said 'got NoneType', Python's word for it, not JSON's."""
    path = tmp_path / "seeds.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + line + "\n")
    with pytest.raises(UserError) as e:
        load_seeds([path])
    assert str(e.value) == f"{path}:2: expected a JSON object, got {said}"


@pytest.mark.parametrize("blank", ["", "   ", "\u200b", " \u200b\ufeff ", "\u3164"])
@pytest.mark.parametrize("field", ["instruction", "output"])
def test_a_seed_field_that_shows_nothing_is_empty_in_both_formats(tmp_path, blank, field):
    """A seed instruction of only U+200B was accepted: shown to the teacher, it is an example with no task."""
    task = TASK | {"instruction": blank} if field == "instruction" else TASK | {"instances": [{"input": "", "output": blank}]}
    for name, obj, said in (("task", task, "instruction" if field == "instruction" else "instances.0.output"),
                            ("row", ROW | {field: blank}, field)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(obj) + "\n")
        with pytest.raises(UserError) as e:
            load_seeds([path])
        # An Alpaca row is read by datafiles.alpaca_row, which says so in its own words.
        assert str(e.value).startswith((f"{path}:1: field '{said}': is empty",
                                        f"{path}:1: field '{said}': shows nothing")), str(e.value)


@pytest.mark.parametrize("extra", [{"id": "r1"}, {"name": "red_fruit"}, {"id": "r1", "is_classification": False}])
def test_an_alpaca_row_with_a_self_instruct_key_says_why_it_wants_instances(tmp_path, extra):
    """An Alpaca row with an `id` (a dataset's own column) is read as a self-instruct task, and said
    only `field 'instances': missing (and 2 more)`, about a field Alpaca data never has. The line
    says which key made it a self-instruct task and what to drop."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW | extra) + "\n")
    with pytest.raises(UserError) as e:
        load_seeds([path])
    keys = " and ".join(f"'{k}'" for k in extra)
    assert str(e.value) == (f"{path}:2: field 'instances': missing; the row has {keys}, so it is read as a "
                            "self-instruct task (id, instruction, instances), not an Alpaca row (instruction, "
                            f"input, output): leave {keys} out for an Alpaca row"), str(e.value)
