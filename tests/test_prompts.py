"""Parsing teacher replies: numbering, <noinput>, chatter, truncation, broken JSON."""

import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfinstruct import prompts
from selfinstruct.records import Instance


def test_alpaca_reply_with_numbering_and_noinput():
    text = (
        "Here are your tasks!\n###\n1. Instruction: Give two synonyms for happy.\n1. Input:\n<noinput>\n"
        "1. Output:\nJoyful, cheerful.\n###\n2. Instruction: Reverse the word.\n2. Input:\nstone\n2. Output:\nenots\n###"
    )
    got = prompts.parse_alpaca(text, "stop")
    assert [(c.instruction, c.instances, c.error) for c in got] == [
        ("Give two synonyms for happy.", [Instance(input="", output="Joyful, cheerful.")], None),
        ("Reverse the word.", [Instance(input="stone", output="enots")], None),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "Instruction: Add the numbers.\nInput: 2, 3\nOutput: 5",
        "**Instruction:** Add the numbers.\n**Input:** 2, 3\n**Output:** 5",
        "### Instruction: Add the numbers.\n### Input: 2, 3\n### Output: 5\n###",
        "7. instruction: Add the numbers.\n7. input: 2, 3\n7. output: 5",
        "Sure! I can do that.\n\nInstruction 4: Add the numbers.\nInput 4: 2, 3\nOutput 4: 5\n\nHope this helps.",
    ],
)
def test_alpaca_marker_variants(text):
    (c,) = prompts.parse_alpaca(text, "stop")
    assert c.error is None and c.instruction == "Add the numbers."
    assert c.instances[0].input == "2, 3"
    assert c.instances[0].output.startswith("5")


def test_alpaca_no_input_line_means_empty_input():
    (c,) = prompts.parse_alpaca("Instruction: Name a fruit that is red.\nOutput: A strawberry.", "stop")
    assert c.instances == [Instance(input="", output="A strawberry.")]


def test_truncated_last_task_is_marked():
    text = "###\nInstruction: Name a red fruit now.\nOutput: Apple.\n###\nInstruction: Name a blue fruit.\nOutput: Blue"
    got = prompts.parse_alpaca(text, "length")
    assert got[0].error is None
    assert got[1].error.startswith("truncated")


@pytest.mark.parametrize("text", ["", "I cannot think of any tasks.", "Output: 5"])
def test_reply_without_tasks_is_one_parse_error(text):
    (c,) = prompts.parse_alpaca(text, "stop")
    assert c.error.startswith("no_task_found") and c.raw == text


def test_missing_output_is_a_parse_error():
    got = prompts.parse_alpaca("Instruction: Say hi to me.\nInput: Bob\nInstruction: Say bye now.\nOutput: Bye", "stop")
    assert got[0].error.startswith("missing_output")
    assert got[1].error is None and got[1].instances[0].output == "Bye"


@pytest.mark.parametrize("output", [
    "Run it like this.\nInput: 2 3\nOutput: 5\nThat is all.",
    "The function's contract:\n- Output: the sum of the list.",
])
def test_an_outputs_own_input_and_output_lines_are_kept_in_it_not_cut(output):
    """Keeping the first 'Output:' up to the next marker would silently keep "Run it like this." alone."""
    text = f"###\nInstruction: Explain how to call the adder program.\nInput: <noinput>\nOutput: {output}\n###\n" \
           "Instruction: Name a red fruit now.\nOutput: Apple."
    got = prompts.parse_alpaca(text, "stop")
    assert got[0].error is None and got[0].instances == [Instance(input="", output=output)]
    assert got[1].error is None and got[1].instances == [Instance(input="", output="Apple.")]


def test_a_second_input_before_the_output_is_rejected_not_guessed():
    text = "###\nInstruction: Add the numbers.\nInput: 2 3\nInput: 4 5\nOutput: 9\n###\nInstruction: Name a fruit.\nOutput: Fig."
    got = prompts.parse_alpaca(text, "stop")
    assert got[0].error == "repeated_field: a second 'Input:' line before this task's output" and got[0].instances == []
    assert got[0].raw.endswith("Output: 9")
    assert got[1].error is None and got[1].instances == [Instance(input="", output="Fig.")]
    (last,) = prompts.parse_alpaca("Instruction: Add the numbers.\nInput: 2 3", "stop")  # an input, no output, at the end
    assert last.error == "missing_output: no 'Output:' for this task"


def test_an_outputs_markdown_headings_and_code_are_kept_as_written():
    output = "### Step 1\nDo this.\n```python\nprint('hi')  # Output: hi\n```\n### Step 2\nDone. \U0001F600 e\u0301 \u200b\u00a0\u05e9"
    (c,) = prompts.parse_alpaca(f"###\nInstruction: Explain the two steps.\nInput: <noinput>\nOutput: {output}\n###", "stop")
    assert c.error is None and c.instances == [Instance(input="", output=output)]


def test_instruction_list():
    got = prompts.parse_instructions("Task 7: Name a color.\nTask 8: Add two\nnumbers together.\n9. Sort the list.", "stop")
    assert [c.instruction for c in got] == ["Name a color.", "Add two numbers together.", "Sort the list."]
    assert prompts.parse_instructions("nothing here", "stop")[0].error.startswith("no_task_found")
    assert prompts.parse_instructions("Task 1: A.\nTask 2: B", "length")[-1].error.startswith("truncated")


@pytest.mark.parametrize("text,expected", [("Yes.", True), ("No, it is not.", False), ("Answer: yes", True), ("Maybe", None),
                                           (" No\n", False), ("Yes, it is", True), ("", None),
                                           # the question's "Yes or No" echoed is not the answer
                                           ("Is this a classification task? Answer Yes or No.\nNo", False),
                                           ("It is not a yes/no question, so: No", False), ("Yes / No: no", False)])
def test_yes_no(text, expected):
    assert prompts.parse_yes_no(text) == expected


def test_instances_input_first_and_output_first():
    a = prompts.parse_instances("Example 1\nInput: I loved it\nOutput: positive\nExample 2\nInput: <noinput>\nOutput: 4", False, "stop")
    assert a == [Instance(input="I loved it", output="positive"), Instance(input="", output="4")]
    b = prompts.parse_instances("Class label: Spam\nInput: WIN NOW\nClass label: Not spam\nInput: See you at 5", True, "stop")
    assert b == [Instance(input="WIN NOW", output="Spam"), Instance(input="See you at 5", output="Not spam")]
    # A last pair cut at max_tokens is dropped, not kept half-written.
    c = prompts.parse_instances("Input: a\nOutput: b\nInput: c\nOutput: d", False, "length")
    assert c == [Instance(input="a", output="b")]


def test_an_example_whose_input_has_no_label_keeps_its_input():
    text = ("Example 1\nWhat is 2 + 2?\nOutput: 4\nExample 2:\nInput: 3 + 3\nOutput: 6\n"
            "Example 3\n<noinput>\nOutput: 0\nExample 4.\nOutput: 1")
    assert prompts.parse_instances(text, False, "stop") == [
        Instance(input="What is 2 + 2?", output="4"), Instance(input="3 + 3", output="6"),
        Instance(input="", output="0"), Instance(input="", output="1")]
    # Output-first: what follows "Example N" is not an input (the class label comes first).
    assert prompts.parse_instances("Example 1\nClass label: Spam\nInput: WIN", True, "stop") == [
        Instance(input="WIN", output="Spam")]


def test_structured_tasks_and_bad_json():
    text = json.dumps({"tasks": [{"instruction": "Add two and three.", "input": "<noinput>", "output": "5"}]})
    (c,) = prompts.parse_structured_tasks(text, "stop")
    assert c.instruction == "Add two and three." and c.instances == [Instance(input="", output="5")]
    (bad,) = prompts.parse_structured_tasks('{"tasks": [{"instruction": "x"', "length")
    assert bad.error.startswith("truncated") and bad.raw.startswith('{"tasks"')
    (bad,) = prompts.parse_structured_tasks("not json", "stop")
    assert bad.error.startswith("bad_json")


def test_response_format_is_json_schema_of_model():
    fmt = prompts.response_format(prompts.TaskListJSON)
    assert fmt["type"] == "json_schema"
    schema = fmt["json_schema"]["schema"]
    assert "tasks" in schema["properties"] and schema == prompts.TaskListJSON.model_json_schema()


def test_templates_render_and_hash(tmp_path):
    t = prompts.load_templates()
    text = t["alpaca"].render(num=3, examples=prompts.render_alpaca_examples([("Do x {now}.", "", "done")]),
                              format=prompts.ALPACA_FORMAT)
    assert "Do x {now}." in text and "<noinput>" in text and "$" not in text and "starts with ###" in text
    assert len(t["alpaca"].sha256) == 16
    with pytest.raises(prompts.UserError, match="prompt template missing"):
        prompts.load_templates(tmp_path)


# ------------------------------------------------------- degenerate replies


@pytest.mark.parametrize("text, head", [
    # The same line again and again (blank lines between copies do not hide it).
    ("Instruction: Add 2 and 3.\nInput: <noinput>\nOutput: 5\n###\n###\n\n###\n###\n###",
     "Instruction: Add 2 and 3.\nInput: <noinput>\nOutput: 5\n###\n"),
    ("Instruction:\nInstruction:\nInstruction:\nInstruction:", "Instruction:\n"),
    # A block of two lines repeating.
    ("Output: ok\nThis is fun.\nIt is creative.\nThis is fun.\nIt is creative.\nThis is fun.\nIt is creative.\n",
     "Output: ok\nThis is fun.\nIt is creative.\n"),
])
def test_a_reply_that_repeats_itself_is_cut_where_the_repeating_starts(text, head):
    got_head, tail = prompts.cut_degenerate(text)
    assert got_head == head and got_head + tail == text


@pytest.mark.parametrize("text", [
    "Output: A\nA\nB",                                       # twice is not degenerate
    "def f():\n    if x:\n        return {\n        }\n    }\n}",  # closing braces, each indented differently
    "###\nInstruction: a\nOutput: b\n###\nInstruction: c\nOutput: d\n###\nInstruction: e\nOutput: f\n",  # a list of tasks
    "",
])
def test_ordinary_replies_are_not_cut(text):
    assert prompts.cut_degenerate(text) == (text, "")


# --------------------------------------------------------- bounded schemas


def test_the_bounded_schema_limits_the_list_and_every_string_to_fit_max_tokens():
    schema = prompts.bounded_schema(prompts.TaskListJSON, 2, 512)
    tasks = schema["properties"]["tasks"]
    assert (tasks["minItems"], tasks["maxItems"]) == (1, 2)
    limits = prompts.string_limits(schema)
    assert set(limits) == {"instruction", "input", "output"}
    # Two tasks at their longest fit in max_tokens at 3 characters a token.
    assert 2 * (sum(limits.values()) + 50) <= 3 * 512
    assert limits["output"] > limits["input"] > limits["instruction"] >= 100
    inst = prompts.bounded_schema(prompts.InstructionListJSON, 4, 320)
    assert inst["properties"]["instructions"]["maxItems"] == 4
    assert prompts.string_limits(inst) == {"instructions": 3 * 320 // 4 - 50}
    # The schema the server gets is the bounded one; a plain one is unchanged.
    assert prompts.response_format(prompts.TaskListJSON, schema)["json_schema"]["schema"] is schema
    assert "maxItems" not in json.dumps(prompts.response_format(prompts.TaskListJSON))


def test_a_string_closed_at_its_max_length_is_truncated():
    limits = {"instruction": 20, "input": 30, "output": 40}
    text = json.dumps({"tasks": [{"instruction": "Name a fruit.", "input": "", "output": "An apple."},
                                 {"instruction": "Say yes.", "input": "", "output": "yes " * 10}]})
    first, second = prompts.parse_structured_tasks(text, "stop", limits)
    assert first.error is None and first.instances[0].output == "An apple."
    assert second.error.startswith("truncated: the output reached the schema's maxLength (40")
    # Without limits (a reply from an unbounded schema) nothing is judged by length.
    assert all(c.error is None for c in prompts.parse_structured_tasks(text, "stop"))


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=" \n\t#a1\u2003\x1c\x85", max_size=16))
def test_trailing_separator_dropped_as_the_regex_did(value):
    """``_drop_separator`` is ``re.sub(r"\\s*#{2,}\\s*$", "", value).strip()``, without the regex."""
    from selfinstruct.prompts import _drop_separator

    assert _drop_separator(value) == re.sub(r"\s*#{2,}\s*$", "", value).strip()


def test_prompts_given_a_file_or_a_template_that_is_a_folder_says_so(tmp_path):
    """--prompts my_alpaca.txt (the template, not its folder) said 'prompts folder not found' of
    a file that is there; a folder named alpaca.txt said 'prompt template missing'."""
    own = tmp_path / "alpaca.txt"
    own.write_text("Write $num tasks.\n$examples\n$format\n")
    with pytest.raises(prompts.UserError, match=re.escape(f"{own}: is a file; --prompts wants the folder that holds "
                                                          "the templates (alpaca.txt)")):
        prompts.load_templates(own, mode="alpaca")
    (tmp_path / "odd" / "alpaca.txt").mkdir(parents=True)
    with pytest.raises(prompts.UserError, match=re.escape(f"{tmp_path / 'odd' / 'alpaca.txt'}: is a folder, not a prompt template")):
        prompts.load_templates(tmp_path / "odd", mode="alpaca")
    with pytest.raises(prompts.UserError, match=re.escape(f"{tmp_path / 'none'}: prompts folder not found")):
        prompts.load_templates(tmp_path / "none", mode="alpaca")
    fifo = tmp_path / "piped" / "alpaca.txt"  # a named pipe there was 'prompt template missing'
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(prompts.UserError, match=re.escape(f"{fifo}: is a pipe (FIFO), not a regular file")):
        prompts.load_templates(fifo.parent, mode="alpaca")


# ------------------------------------------- as Alpaca and self-instruct did


def test_an_example_instruction_is_shown_on_one_line_as_the_originals_did():
    """Both originals show re.sub(r"\\s+", " ", inst).strip().rstrip(":"); a seed's line break broke the one-task-a-line list."""
    inst = "  Rewrite the sentence\nin the passive\tvoice:  "
    assert prompts.render_task_lines([inst, "Name a fruit."]) == \
        "Task 1: Rewrite the sentence in the passive voice\nTask 2: Name a fruit.\n"
    # Only the instruction: an input or output is shown as written (Alpaca's encode_prompt), "<noinput>" for none.
    assert prompts.render_alpaca_examples([(inst, "Line one.\nLine two.", "It was\nwritten.\n")]) == \
        "###\nInstruction: Rewrite the sentence in the passive voice\nInput: Line one.\nLine two.\nOutput: It was\nwritten.\n\n"
    assert json.loads(prompts.render_alpaca_examples([(inst, "", "x")], as_json=True))["instruction"] == \
        "Rewrite the sentence in the passive voice"


def test_the_bundled_seeds_prompts_are_as_before():
    """The bundled seeds need no normalising: their prompts are byte for byte what they were."""
    from selfinstruct.seeds import load_seeds

    seeds = load_seeds([prompts.bundled_dir("seeds") / "seed_tasks.jsonl"], compact=True)
    assert len(seeds) > 100
    for _, inst, inp, out in seeds:
        assert prompts.render_task_lines([inst]) == f"Task 1: {inst}\n"
        assert prompts.render_alpaca_examples([(inst, inp, out)]) == \
            f"###\nInstruction: {inst}\nInput: {inp or '<noinput>'}\nOutput: {out}\n"


_CUT_AFTER_TASK_4 = "###\n1. Instruction: Name a red fruit now.\n1. Input: <noinput>\n1. Output: Apple.\n###\n" \
                    "2. Instruction: Add the two numbers.\n2. Input: 2 3\n2. Output: 5\n###"


@pytest.mark.parametrize("tail", ["", "\n", "\n3", "\n3. Instr", "\n3. Instruction", "\n**Instruction"])
def test_a_reply_cut_after_a_tasks_separator_keeps_that_task_whole(tail):
    """Alpaca drops only the text after the last ###: the task before it ended there."""
    got = prompts.parse_alpaca(_CUT_AFTER_TASK_4 + tail, "length")
    assert [(c.instruction, c.instances, c.error) for c in got[:2]] == [
        ("Name a red fruit now.", [Instance(input="", output="Apple.")], None),
        ("Add the two numbers.", [Instance(input="2 3", output="5")], None),
    ]
    # The cut start of the next task is one rejection that keeps its text; nothing at all is none.
    assert [(c.raw, c.error.split(":")[0]) for c in got[2:]] == ([(tail.strip(), "truncated")] if tail.strip() else [])


@pytest.mark.parametrize("text", [
    # Cut inside the last task's output: it may be half written.
    "###\nInstruction: Name a red fruit now.\nOutput: Apple.\n###\nInstruction: Add the two numbers.\nInput: 2 3\nOutput: The sum is",
    # A bare ### that ends the reply, in an output written with ### headings: the start of the next heading, maybe.
    "###\nInstruction: Explain the two steps.\nInput: <noinput>\nOutput: ### Step 1\nDo this.\n###",
])
def test_a_reply_cut_inside_its_last_task_still_marks_it_truncated(text):
    got = prompts.parse_alpaca(text, "length")
    assert got[-1].error.startswith("truncated")
    assert all(c.error is None for c in got[:-1])


def test_an_input_holding_an_output_line_is_rejected_not_split_wrong():
    """The input's own "Output: a" (a program's printout) read as the output header gave input
    "print('a')" and output "a\\nOutput:\\nIt prints a.": a second bare 'Output:' header says so."""
    text = "###\nInstruction: Say what the program prints.\nInput:\nprint('a')\nOutput: a\nOutput:\nIt prints a.\n###\n" \
           "Instruction: Name a red fruit now.\nOutput: Apple."
    got = prompts.parse_alpaca(text, "stop")
    assert got[0].error == ("repeated_field: a second 'Output:', a header line as this task's 'Input:' is, after an "
                            "inline one: which starts the output, no one can tell") and got[0].instances == []
    assert got[1].error is None and got[1].instances == [Instance(input="", output="Apple.")]


@pytest.mark.parametrize("task, output", [
    # The task's own markers inline (as the prompt shows them): an "Output:" header line is the output's text.
    ("Input: <noinput>\nOutput: ", "The code:\n```python\nprint(2 + 3)\n```\nOutput:\n```\n5\n```"),
    # Header lines throughout: the first "Output:" laid out as the "Input:" is starts the output.
    ("Input:\n<noinput>\nOutput:\n", "The code:\nprint(2 + 3)\nOutput:\n5"),
    # No "Input:" line to compare with.
    ("Output: ", "The code:\nprint(2 + 3)\nOutput:\n5"),
])
def test_an_output_header_line_in_an_output_is_its_own_text(task, output):
    (c,) = prompts.parse_alpaca(f"###\nInstruction: Show the program and its printout.\n{task}{output}\n###", "stop")
    assert c.error is None and c.instances == [Instance(input="", output=output)]


@pytest.mark.parametrize("tail,finish", [("\n###\nI hope these tasks are helpful for your dataset!", "stop"),
                                         ("\n###\nThe sum is odd.", "length"),
                                         ("\n###\nI hope these tasks help! Let me", "length"),
                                         ("\n###\n\nTask 2", "length")])
def test_a_teachers_chatter_after_the_last_separator_is_not_the_last_output(tail, finish):
    """Alpaca splits on ### and drops a chunk with no instruction: the last task's output kept the
    teacher's closing chatter ('The Pacific Ocean.\\n###\\nI hope...'), and in a reply cut there, the
    task the ### had closed was rejected as truncated."""
    from selfinstruct.prompts import parse_alpaca

    text = "###\nInstruction: Name the largest ocean on Earth.\nInput: <noinput>\nOutput: The Pacific Ocean." + tail
    [cand] = parse_alpaca(text, finish)
    assert cand.error is None and cand.instances[0].output == "The Pacific Ocean.", cand
    # A ### heading with words (markdown) is the output's own, and a cut inside the output is still truncated.
    steps = parse_alpaca("Instruction: Write the steps.\nInput:\nOutput: ### Step 1\nMix.\n### Step 2\nBake.", "stop")
    assert steps[0].instances[0].output == "### Step 1\nMix.\n### Step 2\nBake."
    assert parse_alpaca("Instruction: Add 2 and 3.\nInput:\nOutput: The sum is", "length")[0].error.startswith("truncated")


def test_structured_bad_json_reasons_say_what_is_wrong():
    """Every broken structured reply had the same reason, 'bad_json: 1 validation error for TaskListJSON':
    pydantic's detail (the field, the JSON error's place) was on the lines after the first."""
    (missing,) = prompts.parse_structured_tasks(json.dumps({"tasks": [{"instruction": "Add 2 and 3."}]}), "stop")
    (cut,) = prompts.parse_structured_tasks('{"tasks": [{"instruction": "x"', "stop")
    (typed,) = prompts.parse_structured_instructions(json.dumps({"instructions": [1]}), "stop")
    _, why = prompts.parse_structured_instances(json.dumps({"instances": "no"}), "stop")
    assert missing.error == "bad_json: tasks.0.input: Field required (and 1 more)", missing.error
    assert cut.error.startswith("bad_json: Invalid JSON: EOF while parsing") and "line 1 column" in cut.error
    assert typed.error == "bad_json: instructions.0: Input should be a valid string", typed.error
    assert why == "bad_json: the instances reply is not valid JSON (instances: Input should be a valid array)", why
    for error in (missing.error, cut.error, typed.error, why):
        assert "validation error for" not in error and "\n" not in error


# One long line that repeats a short unit: the line-based cut_degenerate cannot see it (magpie kept a
# single 200 KB line of "a a a ...").
SONNET = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate: Rough winds do shake "
          "the darling buds of May, And summer's lease hath all too short a date; Sometime too hot the eye of heaven "
          "shines, And often is his gold complexion dimm'd; And every fair from fair sometime declines, By chance or "
          "nature's changing course untrimm'd; But thy eternal summer shall not fade, Nor lose possession of that fair "
          "thou ow'st; Nor shall death brag thou wander'st in his shade, When in eternal lines to time thou grow'st: "
          "So long as men can breathe or eyes can see, So long lives this, and this gives life to thee.")
LONG_CODE = "rows = " + json.dumps([{"id": i, "name": f"user{i % 37}", "active": i % 3 == 0, "score": i * 7 % 101}
                                    for i in range(120)])


@pytest.mark.parametrize("text", ["a " * 100_000, "The answer is yes. " * 300, "Intro line.\n" + "no no " * 150,
                                  "0, " * 1000, "!! " * 500, "Well. " + ". . " * 150, "?! ?? " * 120])
def test_one_long_line_repeating_a_short_unit_is_degenerate(text):
    assert prompts.cut_degenerate(text)[1] == ""  # the line-based rule misses it
    why = prompts.repeats_within_a_line(text)
    assert why is not None and "distinct" in why, why


@pytest.mark.parametrize("text", [", ".join(map(str, range(1, 501))), " ".join([SONNET] * 2), SONNET.replace("; ", ";\n"),
                                  LONG_CODE, "yes " * 150, "* " * 150, " ".join(f"{i} +" for i in range(300)), "\n".join(f"Step {i}: stir the pot once more." for i in range(500)),
                                  "Lorem ipsum " * 30 + "\n" + " ".join(f"word{i}" for i in range(400))])
def test_a_long_real_answer_is_not_degenerate(text):
    # Numbers 1..500, a poem (twice on one line, and on its own lines), code, a short line of repeats, many short lines.
    assert prompts.repeats_within_a_line(text) is None


# One word that is one short unit repeated: to the word count it is a single word, so neither rule saw it.
@pytest.mark.parametrize("text, unit, chars", [
    ("ab" * 100, "ab", 200),  # at the threshold
    ("hahahahahahaha" * 200, "ha", 2800), ("!" * 500, "!", 500), ("!!!!!!!!" * 500, "!", 4000),
    ("Sure, here it is: " + "lol" * 80 + "!", "lol", 241),  # the unit's run ends the word
    ("Output:\n" + '"' + "abc" * 70 + "ab", "abc", 213),  # cut mid-unit at max_tokens, after a quote
    ("-=" * 150, "-=", 300),
])
def test_one_word_repeating_a_short_unit_is_degenerate(text, unit, chars):
    assert prompts.repeats_within_a_line(text) == f"one word of {chars} characters repeats {unit!r}"


@pytest.mark.parametrize("text", [
    "ab" * 99 + "a",  # 199 characters: below the threshold
    "ha" * 99 + " " + "ha" * 99,  # two words of 198
    "x" * 150 + "abcdefghi" * 20,  # 330 characters, but neither end repeats a unit of up to 8
    "https://example.com/" + "".join(f"{i:x}" for i in range(200)),  # a long URL
    "=" * 120 + "\n" + "|---:" * 36,  # a wide rule; a markdown table's separator row
])
def test_a_long_word_that_is_no_short_unit_repeated_is_not_degenerate(text):
    assert prompts.repeats_within_a_line(text) is None


def test_no_seed_task_nor_readme_line_is_degenerate_within_a_line():
    """The thresholds are set past every real text the project holds: the bundled seeds' fields and the READMEs."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    seeds = [json.loads(line) for line in (root / "seeds" / "seed_tasks.jsonl").read_text().splitlines() if line.strip()]
    fields = [t for s in seeds for t in (s["instruction"], *(x for i in s["instances"] for x in (i["input"], i["output"])))]
    assert len(fields) > 500
    for text in [*fields, (root / "README.md").read_text(), (root / "bench" / "README.md").read_text()]:
        assert prompts.repeats_within_a_line(text) is None, text[:80]


def test_an_alpaca_task_whose_output_repeats_within_one_line_is_degenerate_and_its_neighbours_kept():
    from types import SimpleNamespace

    from selfinstruct.modes import parse_first
    from selfinstruct.records import Reply

    text = ("###\nInstruction: Say the letter a a few times.\nInput: <noinput>\nOutput: " + "a " * 5000 + "\n"
            "###\nInstruction: List the numbers from 1 to 500.\nInput: <noinput>\nOutput: "
            + ", ".join(map(str, range(1, 501))) + "\n###\n")
    found = parse_first(Reply(purpose="tasks", text=text, finish_reason="stop"), SimpleNamespace(structured=False),
                        prompts.parse_alpaca)
    assert [(c.instruction, c.error and c.error.split(":")[0]) for c in found] == [
        ("Say the letter a a few times.", "degenerate"), ("List the numbers from 1 to 500.", None)]


def _unit_reply(mode: str, *replies):
    from selfinstruct.records import Reply, Response

    return Response(id="r000000", index=0, mode=mode, prompt_hash="h", example_ids=[], created_at="t", elapsed_s=0.0,
                    replies=[Reply(purpose=purpose, text=text, finish_reason="stop") for purpose, text in replies])


def _run_cfg(structured: bool):
    from types import SimpleNamespace

    return SimpleNamespace(structured=structured, tasks_per_request=2, max_tokens=4096, instances_per_task=2)


@pytest.mark.parametrize("output, why", [
    ("a " * 300, "one line of 300 words repeats 1 distinct word"),
    ("Sure! " + "ha" * 200, "one word of 400 characters repeats 'ha'"),
])
def test_a_structured_alpaca_task_whose_output_repeats_within_a_line_is_degenerate(output, why):
    """--structured tasks were not checked within a line: a string the grammar closed before its maxLength
    (600 characters of "ha" under 3,047) was kept, as _at_limit looks only at strings cut at the limit."""
    from selfinstruct.modes import alpaca

    text = json.dumps({"tasks": [{"instruction": "Laugh for a while.", "input": "", "output": output},
                                 {"instruction": "Add 2 and 3.", "input": "", "output": "5"}]})
    found = alpaca.candidates(_unit_reply("alpaca", ("tasks", text)), _run_cfg(structured=True))
    assert [(c["instruction"], c["error"]) for c in found] == [
        ("Laugh for a while.", f"degenerate: the output repeats itself within a line ({why})"), ("Add 2 and 3.", None)]


def test_a_structured_self_instruct_instruction_that_repeats_within_a_line_is_degenerate():
    from selfinstruct.modes import self_instruct

    text = json.dumps({"instructions": ["Repeat after me: " + "la" * 120, "Name three rivers in Europe."]})
    found = self_instruct.candidates(_unit_reply("self-instruct", ("tasks", text)), _run_cfg(structured=True))
    assert [c["error"] for c in found] == [
        "degenerate: the instruction repeats itself within a line (one word of 240 characters repeats 'la')", None]


LAUGH = "ha" * 150  # one word of 300 characters
NONSENSE = "no " * 250  # one line of 250 words, 1 distinct


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("examples, kept, why", [
    ([("Tell a joke.", LAUGH), ("Tell a riddle.", "What has keys but no locks? A piano.")],
     [("Tell a riddle.", "What has keys but no locks? A piano.")], None),  # the other example is kept
    ([("Tell a joke.", LAUGH), (NONSENSE, "No.")], [],
     "degenerate: example 1's output repeats itself within a line (one word of 300 characters repeats 'ha')"),
    ([(NONSENSE, "No.")], [],
     "degenerate: example 1's input repeats itself within a line (one line of 250 words repeats 1 distinct word)"),
    # A field of the same line three times in a row, as cut_degenerate finds in a first reply: it was kept.
    ([("Mix flour and water.", "Stir.\nStir.\nStir.\nStir."), ("Tell a riddle.", "What has keys but no locks? A piano.")],
     [("Tell a riddle.", "What has keys but no locks? A piano.")], None),
    ([("Mix flour and water.", "Stir well.\n###\n###\n###")], [], "degenerate: example 1's output repeats itself"),
])
def test_a_self_instruct_example_that_repeats_within_a_line_is_dropped_as_a_bad_example_is(structured, examples, kept, why):
    """self-instruct's examples were not checked within a line: a 300-character "hahaha..." output was
    kept. A degenerate example is dropped, as filters.clean_instances drops a bad one, and the task is
    rejected, saying which example and field repeated, only when no example is left."""
    from selfinstruct.modes import self_instruct

    if structured:
        tasks = json.dumps({"instructions": ["Write a short funny reply to the prompt."]})
        cls = json.dumps({"is_classification": False})
        instances = json.dumps({"instances": [{"input": i, "output": o} for i, o in examples]})
    else:
        tasks, cls = "Task 1: Write a short funny reply to the prompt.", "No"
        instances = "".join(f"Example {n}\nInput: {i}\nOutput: {o}\n\n" for n, (i, o) in enumerate(examples, 1))
    resp = _unit_reply("self-instruct", ("tasks", tasks), ("classify:0", cls), ("instances:0", instances))
    (found,) = self_instruct.candidates(resp, _run_cfg(structured))
    assert ([(i.input, i.output) for i in found["instances"]], found["error"]) == (kept, why)


def test_a_teachers_repeating_chatter_after_the_last_task_leaves_that_task_whole():
    from types import SimpleNamespace

    from selfinstruct.modes import parse_first
    from selfinstruct.records import Reply

    text = "###\nInstruction: List the numbers from 1 to 5.\nInput: <noinput>\nOutput: 1, 2, 3, 4, 5\n###\n" + "Hope this helps! " * 300
    (found,) = parse_first(Reply(purpose="tasks", text=text, finish_reason="stop"), SimpleNamespace(structured=False),
                           prompts.parse_alpaca)
    assert found.error is None and found.instances[0].output == "1, 2, 3, 4, 5"


# Chat teachers wrap a whole reply in a markdown fence: its closing line was kept as the end of the
# last task's output (alpaca), the last instruction (self-instruct: "Name a fruit. ```") or the last
# example's output. A code block of a field's own keeps both its fences.
FENCED_ALPACA = ("Here are the tasks:\n\n```\n**Instruction:** Add 2 and 3.\n**Input:** <noinput>\n**Output:** 5\n\n"
                 "**Instruction:** Print one in Python.\n**Input:** <noinput>\n**Output:**\n```python\nprint(1)\n```\n```\n")


def test_the_fence_around_a_whole_reply_is_no_part_of_its_last_field():
    assert [(c.instruction, c.instances[0].output) for c in prompts.parse_alpaca(FENCED_ALPACA, "stop")] == [
        ("Add 2 and 3.", "5"), ("Print one in Python.", "```python\nprint(1)\n```")]
    assert [c.instruction for c in prompts.parse_instructions("```\nTask 9: Add 2 and 3.\nTask 10: Name a fruit.\n```", "stop")] \
        == ["Add 2 and 3.", "Name a fruit."]
    assert prompts.parse_instances("```\nExample 1\nInput: <noinput>\nOutput: A pear.\n```", False, "stop") == \
        [Instance(input="", output="A pear.")]


def test_a_code_block_of_the_fields_own_keeps_its_fences():
    assert [c.instruction for c in prompts.parse_instructions("Task 9: Fix this:\n```\nx = 1\n```", "stop")] == ["Fix this: ``` x = 1 ```"]
    assert prompts.parse_instances("Example 1\nInput: <noinput>\nOutput:\n```py\nx = 1\n```", False, "stop") == \
        [Instance(input="", output="```py\nx = 1\n```")]


def test_a_json_reply_in_a_markdown_fence_is_read_as_its_json():
    """A server that ignores response_format leaves the teacher to write '```json ... ```' around its
    JSON: every such reply was one bad_json rejection, its tasks lost."""
    task = {"instruction": "Name a fruit.", "input": "", "output": "A pear."}
    fenced = "```json\n" + json.dumps({"tasks": [task, {**task, "instruction": "Name a tree."}]}) + "\n```"
    assert [c.instruction for c in prompts.parse_structured_tasks(fenced, "stop")] == ["Name a fruit.", "Name a tree."]
    assert [c.instruction for c in prompts.parse_structured_instructions(
        '```\n{"instructions": ["Task 9: Name a fruit."]}\n```', "stop")] == ["Name a fruit."]
    assert prompts.parse_structured_instances('```json\n{"instances": [{"input": "", "output": "A pear."}]}\n```',
                                              "stop") == ([Instance(input="", output="A pear.")], None)
    # Text that only begins with a fence is still not JSON.
    assert prompts.parse_structured_tasks("```json\n{\"tasks\": [", "stop")[0].error.startswith("bad_json")


@pytest.mark.parametrize("text", ["", "Okay, let me think about which tasks would be good. First"])
def test_a_reply_cut_before_its_first_task_is_truncated_not_taskless(text):
    """A reply cut at max_tokens with no task in it yet (a reasoning model's thinking, an empty content
    cut at once) was no_task_found, which says nothing of --max-tokens."""
    why = "truncated: the reply was cut at max_tokens before its first task"
    assert [c.error for c in prompts.parse_alpaca(text, "length")] == [why]
    assert [c.error for c in prompts.parse_instructions(text, "length")] == [why]
    assert prompts.parse_alpaca(text, "stop")[0].error.startswith("no_task_found")


CHATTER = "\n\nI hope these tasks help! Let me know if you need more.\n\nHappy learning with these examples!"


@pytest.mark.parametrize("parse, text, got", [
    # alpaca: the last task's output, where no ### line ends it
    (lambda t: [i.output for c in prompts.parse_alpaca(t, "stop") for i in c.instances],
     "Instruction: Add 2 and 3.\nInput: <noinput>\nOutput: 5" + CHATTER, ["5"]),
    # a reply in a fence, the sign-off after its close: both go
    (lambda t: [i.output for c in prompts.parse_alpaca(t, "stop") for i in c.instances],
     "```\nInstruction: Add 2 and 3.\nInput: <noinput>\nOutput: 5\n```" + CHATTER, ["5"]),
    # self-instruct: the paragraph after the last task was appended to its instruction
    (lambda t: [c.instruction for c in prompts.parse_instructions(t, "stop")],
     "Task 9: Name a color.\nTask 10: Add 2 and 2." + CHATTER, ["Name a color.", "Add 2 and 2."]),
    # self-instruct's examples: the last one's output
    (lambda t: [i.output for i in prompts.parse_instances(t, False, "stop")],
     "Example 1\nInput: 2 + 2\nOutput: 4\n\nExample 2\nInput: 3 + 3\nOutput: 6" + CHATTER, ["4", "6"]),
])
def test_a_chat_teachers_closing_words_after_the_last_task_are_no_part_of_it(parse, text, got):
    """Where no ### line closed the last task, a chat teacher's sign-off ("I hope these tasks help! Let me
    know if you need more.") was kept in its output, or appended to self-instruct's last instruction."""
    assert parse(text) == got


@pytest.mark.parametrize("output", [
    "Dear Ann,\n\nThe report is attached.\n\nLet me know what you think.",  # an email's own words
    "Mix the flour and water.\n\nEnjoy your bread!",  # speaks of no task
    "Three steps.\n\nI hope this helps you decide which of the tasks at work to do first, and in which order, "
    "since the list you gave is long and each task on it takes a different amount of time, some of them days "
    "and others only minutes, so the order matters more than it seems at first, and a plan written down helps.",  # long
])
def test_an_outputs_own_closing_paragraph_is_kept(output):
    (cand,) = prompts.parse_alpaca(f"Instruction: Write it.\nInput: <noinput>\nOutput: {output}", "stop")
    assert cand.instances[0].output == output
