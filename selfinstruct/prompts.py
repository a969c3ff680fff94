"""Prompt templates: ``format_input`` turns tasks into a prompt, ``format_output`` turns a reply into candidates.

Templates are plain text files in ``prompts/`` with ``$name`` placeholders
(``string.Template``, so braces in code examples need no escaping). A run
records the sha256 of each template it used.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from selfinstruct.config import UserError
from selfinstruct.records import Instance

NO_INPUT = "<noinput>"


def bundled_dir(name: str) -> Path:
    """A data folder shipped beside the package (seeds/ or prompts/).

    An editable install finds it at the repository root; a wheel carries a copy
    inside the package.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "data" / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise UserError(f"cannot find the bundled {name}/ folder; pass its path explicitly")


@dataclass
class Template:
    name: str
    text: str
    sha256: str

    def render(self, **values) -> str:
        try:
            return string.Template(self.text).substitute(**values)
        except (KeyError, ValueError) as e:
            raise UserError(f"prompt template {self.name}: bad or unknown placeholder {e}") from None


def placeholders(path: Path, text: str) -> set[str]:
    """The ``$name`` placeholders of a template; a stray ``$`` is one line naming file and line.

    >>> sorted(placeholders(Path("t.txt"), "Write $num tasks like ${examples}; costs $$5."))
    ['examples', 'num']
    """
    names = set()
    for m in string.Template.pattern.finditer(text):
        if m.group("invalid") is not None:
            line = text.count("\n", 0, m.start("invalid")) + 1
            raise UserError(f"{path}:{line}: a '$' that starts no placeholder (write $$ for a dollar sign)")
        name = m.group("named") or m.group("braced")
        if name:
            names.add(name)
    return names


def load_templates(folder: str | Path | None = None, mode: str | None = None) -> dict[str, Template]:
    """Read the templates ``mode`` renders (every mode's, without a mode); a user's folder needs only those.

    Each must use its required placeholders and no unknown one, checked before the run folder
    exists: a template without $examples would silently show no examples. Which files a mode
    needs, and their placeholders, is its module's ``TEMPLATES`` (selfinstruct/modes/).
    """
    from selfinstruct.datafiles import read_text, refuse_special_input
    from selfinstruct.generate import MODES

    specs = {}
    for name, module in MODES.items():
        if mode is None or name == mode:
            specs.update(module.TEMPLATES)
    if not specs:
        return {}  # a mode with no templates (magpie) reads no folder
    folder = Path(folder) if folder else bundled_dir("prompts")
    needs = ", ".join(filename for filename, _, _ in specs.values())
    if folder.is_file():  # the template itself, given for its folder
        raise UserError(f"{folder}: is a file; --prompts wants the folder that holds the templates ({needs})")
    if not folder.is_dir():
        raise UserError(f"{folder}: prompts folder not found")
    out = {}
    for key, (filename, required, optional) in specs.items():
        path = folder / filename
        if path.is_dir():
            raise UserError(f"{path}: is a folder, not a prompt template")
        refuse_special_input(path, "prompt template")  # a FIFO there was "missing"; opened, it would wait
        if not path.is_file():
            who = f"--mode {mode}" if mode else "a prompts folder"
            raise UserError(f"{path}: prompt template missing ({who} needs {needs})")
        text = read_text(path, "prompt template")
        found = placeholders(path, text)
        for name in sorted(required - found):
            raise UserError(f"{path}: placeholder ${name} missing (this template needs {_names(required)})")
        for name in sorted(found - required - optional):
            raise UserError(f"{path}: unknown placeholder ${name} (this template may use {_names(required | optional)})")
        out[key] = Template(filename, text, hashlib.sha256(text.encode()).hexdigest()[:16])
    return out


def _names(names: set[str]) -> str:
    return ", ".join(f"${n}" for n in sorted(names))


# ---------------------------------------------------------------- format_input


# The alpaca template's $format: how the reply is laid out, said in the examples' own terms.
ALPACA_FORMAT = 'each one starts with ###, then "Instruction:", "Input:" and "Output:" lines.'
ALPACA_JSON_FORMAT = ('one JSON object per task with "instruction", "input" and "output", '
                      'all in one list: {"tasks": [...]}.')


def example_instruction(instruction: str) -> str:
    r"""An example's instruction as both originals' ``encode_prompt`` showed it: on one line, single
    spaces, no trailing colon. A seed's line break would break the one-task-a-line layout.

    >>> example_instruction("  Rewrite the sentence\nin the passive\tvoice:  ")
    'Rewrite the sentence in the passive voice'
    """
    return " ".join(instruction.split()).rstrip(":")


def render_alpaca_examples(tasks, as_json: bool = False) -> str:
    """Examples as ###-separated blocks, the format the teacher is asked to continue.

    Each task is (instruction, input, output); the instruction is shown as ``example_instruction``
    gives it, the input and output as written (as Alpaca's ``encode_prompt``). With ``as_json``
    (for ``--structured``) each is one line of the JSON object the schema asks for: a small
    teacher shown ### blocks but held to JSON copies the "###" into its strings.

    >>> print(render_alpaca_examples([("Add the numbers.", "2, 3", "5")], as_json=True))
    {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"}
    <BLANKLINE>
    """
    if as_json:
        return "".join(json.dumps({"instruction": example_instruction(i), "input": inp or NO_INPUT, "output": o},
                                  ensure_ascii=False) + "\n" for i, inp, o in tasks)
    blocks = []
    for instruction, inp, out in tasks:
        blocks.append(f"###\nInstruction: {example_instruction(instruction)}\nInput: {inp or NO_INPUT}\nOutput: {out}\n")
    return "".join(blocks)


def render_task_lines(instructions: list[str]) -> str:
    """The self-instruct examples, one "Task N:" line each (``example_instruction``)."""
    return "".join(f"Task {i}: {example_instruction(inst)}\n" for i, inst in enumerate(instructions, 1))


# --------------------------------------------------------------- format_output


@dataclass
class Candidate:
    """One task parsed out of a reply; ``error`` set when it could not be parsed."""

    raw: str
    instruction: str = ""
    instances: list[Instance] = field(default_factory=list)
    error: str | None = None


# "1. Instruction:", "**Instruction:**", "Instruction 3:", "- input:"... all count as markers.
_MARKER = re.compile(
    r"^[ \t>*_#-]*(?:\d+\s*[.):]\s*)?[*_]*\s*(instruction|input|output)s?\s*(?:\d+)?\s*[*_]*\s*:[*_]*[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)


def _clean_input(text: str) -> str:
    """Alpaca's "<noinput>" (and the ways small teachers write it) is an empty input.

    >>> [_clean_input(t) for t in ["<noinput>", "`<noinput>`", "**<No input>**", "None.", " 3 + 4 "]]
    ['', '', '', '', '3 + 4']
    """
    text = text.strip()
    if text.strip("<>`'\"*_. ").lower() in ("noinput", "no input", "none", "n/a", ""):
        return ""
    return text


def _drop_separator(value: str) -> str:
    """A field's value without a trailing ### separator (two # or more) and whitespace: what
    ``re.sub(r"\\s*#{2,}\\s*$", "", value).strip()`` gives, without the regex's retries at
    every space of a long value (2% of the generation loop).

    >>> _drop_separator("Add 2 and 3. ## ###\\n"), _drop_separator("Rate it #1 #")
    ('Add 2 and 3. ##', 'Rate it #1 #')
    """
    value = value.rstrip()
    bare = value.rstrip("#")
    return bare.strip() if len(value) - len(bare) >= 2 else value.strip()


# A line that opens or closes a markdown code fence.
_FENCE_LINE = re.compile(r"^[ \t]*```", re.MULTILINE)


def _drop_closing_fence(value: str) -> str:
    r"""A field without a last line of bare ``` that closes no fence of its own: the close of a fence the
    teacher wrapped its whole reply in ("```\n###\nInstruction: ...\nOutput: 5\n```"), which the opening
    line before the first task leaves unpaired in the last field. A code block of the field's own is kept.

    >>> _drop_closing_fence("A short answer.\n\n```"), _drop_closing_fence("```python\nprint(1)\n```")
    ('A short answer.', '```python\nprint(1)\n```')
    """
    if not value.endswith("```"):
        return value
    head, _, last = value.rpartition("\n")
    if last.strip() != "```" or len(_FENCE_LINE.findall(value)) % 2 == 0:
        return value
    return head.rstrip()


# What a cut reply may hold after its last ### line, when it was starting the next task:
# "", "5", "5. Instr", "**Instruction" (a whole marker, with its colon, starts a task of its own).
_TASK_START_CUT = re.compile(r"[>*_#-]*\s*(?:\d+\s*[.):]?\s*)?[*_]*\s*([a-z]*)(?:\s*\d+)?[*_]*", re.IGNORECASE)
# A chat teacher's closing words after its last task, in a paragraph of their own ("I hope these tasks
# help! Let me know if you need more."): where no ### line ends the task (Alpaca's cut, _bare_separator),
# they were kept in its output, or appended to self-instruct's last instruction. Told by how they open
# (words to the reader) and what they speak of (the tasks, or more of them), never an answer's own words:
# an email's "Let me know what you think." names neither.
_CHATTER_OPENS = re.compile(r"[*_]*(?:i hope|hope (?:these|this|that|you)|(?:please )?let me know|feel free|"
                            r"i(?:'ve| have) (?:created|generated|written|provided|come up)|enjoy|happy )", re.IGNORECASE)
_CHATTER_TOPIC = re.compile(r"\b(?:tasks?|instructions|examples|prompts|more)\b", re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def is_chatter(paragraph: str) -> bool:
    """Whether a paragraph after a reply's last task is the teacher talking to the reader about the tasks.

    >>> is_chatter("I hope these tasks help! Let me know if you need more."), is_chatter("Let me know what you think.")
    (True, False)
    """
    p = paragraph.strip()
    return len(p.split()) <= 60 and bool(_CHATTER_OPENS.match(p)) and bool(_CHATTER_TOPIC.search(p))


def drop_chatter(value: str) -> str:
    r"""The last task's field without the teacher's closing paragraphs (``is_chatter``) after it.

    >>> drop_chatter("5\n\nI hope these tasks help!\n\nLet me know if you'd like more.")
    '5'
    >>> drop_chatter("Dear Ann,\n\nLet me know what you think.\n\nBest, Bo")
    'Dear Ann,\n\nLet me know what you think.\n\nBest, Bo'
    """
    while True:
        last = None
        for last in _BLANK_LINE.finditer(value):
            pass
        if last is None or not is_chatter(value[last.end():]):
            return value
        value = value[:last.start()].rstrip()


# A markdown heading, at a line's start or right after a field's marker ("Output: ### Step 1").
_HEADING = re.compile(r"(?:^|:)[ \t]*#+[ \t]+\S", re.MULTILINE)


def _starts_a_task(tail: str) -> bool:
    """Whether what a cut reply holds after its last task's closing ### is the start of a next task
    ("5. Instr", "**Instruction", "5": ``_TASK_START_CUT``), rather than the teacher's chatter.

    >>> [_starts_a_task(t) for t in ["5. Instr", "**Instruction", "I hope these help!"]]
    [True, True, False]
    """
    m = _TASK_START_CUT.fullmatch(tail)
    return m is not None and "instructions".startswith(m.group(1).lower())


def _bare_separator(text: str, lo: int, hi: int) -> tuple[int, int] | None:
    r"""The first line of text[lo:hi] past its first that holds only #s (three or more), as (its start,
    its end): the ### that closes a reply's last task, after which a teacher's chatter ("I hope these
    help!") is no part of the output, as Alpaca's split on ### drops it. Found with ``find``.

    >>> t = "Output: 5\n###\nI hope these help!"
    >>> _bare_separator(t, 7, len(t)), _bare_separator("Output: ### Step 1\nDo it.", 7, 25)
    ((10, 13), None)
    """
    pos = text.find("\n", lo, hi)
    while pos >= 0:
        k = text.find("###", pos, hi)
        if k < 0:
            return None
        line_start = text.rfind("\n", 0, k) + 1
        line_end = text.find("\n", k, hi)
        line_end = hi if line_end < 0 else line_end
        if not text[line_start:line_end].strip().strip("#"):
            return line_start, line_end
        if line_end >= hi:
            return None
        pos = line_end
    return None


def parse_alpaca(text: str, finish_reason: str | None) -> list[Candidate]:
    """Split a reply into instruction/input/output candidates.

    A new "Instruction:" marker starts a new task, so ### separators and
    numbering are optional. Text before the first instruction is chatter and is
    dropped; a reply with no instruction at all gives one parse-error candidate.
    The last task's output ends at a line of ### (``_bare_separator``), as Alpaca split there:
    what follows is dropped, a teacher's chatter. When the reply was cut at max_tokens, its
    last task is marked truncated unless such a line closed it; then what follows it, if it
    starts a next task (``_starts_a_task``), is the one truncated candidate.

    >>> [c.instruction for c in parse_alpaca("Sure!\\n###\\n1. Instruction: Add 2 and 3.\\n1. Input: <noinput>\\n1. Output: 5", "stop")]
    ['Add 2 and 3.']
    """
    marks = list(_MARKER.finditer(text))
    starts = [i for i, m in enumerate(marks) if m.group(1).lower() == "instruction"]
    if not starts:
        if finish_reason == "length":  # (a reasoning model's thinking may have taken every token)
            return [Candidate(raw=text, error="truncated: the reply was cut at max_tokens before its first task")]
        return [Candidate(raw=text, error="no_task_found: the reply has no 'Instruction:' marker")]
    out, closed = [], None
    for n, si in enumerate(starts):
        end_mark = starts[n + 1] if n + 1 < len(starts) else len(marks)
        block_end = marks[end_mark].start() if end_mark < len(marks) else len(text)
        raw = text[marks[si].start():block_end].strip()
        fields: dict[str, str] = {}
        repeated = input_mark = None
        for j in range(si, end_mark):
            key = marks[j].group(1).lower()
            # The output runs to the task's end: an "Input: 2 3" / "Output: 5" line after it is
            # its own text (an example run), as Alpaca's split on numbered markers keeps it.
            stop = marks[j + 1].start() if key != "output" and j + 1 < end_mark else block_end
            if key == "output" and n == len(starts) - 1 and (sep := _bare_separator(text, marks[j].end(), stop)) \
                    and not (finish_reason == "length" and sep[1] == len(text)
                             and _HEADING.search(text, marks[j].start(), sep[0])):  # a ### heading cut, maybe
                stop, closed = sep[0], sep  # the last task ends at its ###: what follows is chatter
            if key in fields:  # a second input before the output: which one is meant, no one can tell
                repeated = repeated or f"a second '{marks[j].group().strip()}' line before this task's output"
                continue
            value = _drop_separator(text[marks[j].end():stop])
            if key == "output" and n == len(starts) - 1 and closed is None:
                value = drop_chatter(value)  # first: a fence around the reply closes before the sign-off
            fields[key] = _drop_closing_fence(value)
            if key == "input":
                input_mark = marks[j]
            elif key == "output":
                break
        # An "Input:" header line (its text on the lines below, as Alpaca laid it out), an inline
        # "Output: a", then an "Output:" header line: the header is laid out as the task's own
        # markers are, so the inline one may be the input's own line (a program's printout).
        # (Marks after the output are rare: tested first, the common task pays one comparison.
        # "" in "\r\n": a marker at the reply's end is a header too.)
        if j + 1 < end_mark and input_mark and not repeated and "output" in fields \
                and text[input_mark.end():input_mark.end() + 1] in "\r\n" \
                and text[marks[j].end():marks[j].end() + 1] not in "\r\n":
            for later in marks[j + 1:end_mark]:  # j: the output's marker
                if later.group(1).lower() == "output" and text[later.end():later.end() + 1] in "\r\n":
                    repeated = (f"a second '{later.group().strip()}', a header line as this task's "
                                f"'{input_mark.group().strip()}' is, after an inline one: "
                                "which starts the output, no one can tell")
                    break
        cand = Candidate(raw=raw, instruction=fields.get("instruction", ""))
        if "output" not in fields:
            cand.error = "missing_output: no 'Output:' for this task"
        elif repeated:
            cand.error = f"repeated_field: {repeated}"
        else:
            cand.instances = [Instance(input=_clean_input(fields.get("input", "")), output=fields["output"])]
        out.append(cand)
    if finish_reason == "length":
        if closed is None:
            out[-1].error = "truncated: the reply was cut at max_tokens inside this task"
        elif (tail := text[closed[1]:].strip()) and _starts_a_task(tail):  # else chatter, dropped as Alpaca does
            out.append(Candidate(raw=tail, error="truncated: the reply was cut at max_tokens as it started another task"))
    return out


_TASK_LINE = re.compile(r"^\s*(?:[*_]*task\s*)?(\d+)\s*[:.)][*_]*\s*(.*)$", re.IGNORECASE)


def parse_instructions(text: str, finish_reason: str | None) -> list[Candidate]:
    """Split a "Task N: ..." list into instruction candidates (self-instruct mode).

    Lines without a number continue the previous task.

    >>> [c.instruction for c in parse_instructions("Task 9: Name a color.\\nTask 10: Add 2\\nand 2.", "stop")]
    ['Name a color.', 'Add 2 and 2.']
    """
    items: list[list[str]] = []
    blank = False  # the line before was blank
    for line in text.splitlines():
        m = _TASK_LINE.match(line)
        if m:
            items.append([line.strip(), m.group(2).strip()])
        elif items and line.strip():
            if blank and is_chatter(line):  # the teacher's closing words: the list ended before them
                break
            items[-1][0] += "\n" + line.strip()
            items[-1][1] += " " + line.strip()
        blank = not line.strip()
    if not items:
        if finish_reason == "length":
            return [Candidate(raw=text, error="truncated: the reply was cut at max_tokens before its first task")]
        return [Candidate(raw=text, error="no_task_found: the reply has no 'Task N:' line")]
    for item in items:  # a fence around the whole list: its closing line is no part of the last task
        if (raw := _drop_closing_fence(item[0])) != item[0]:
            item[0], item[1] = raw, item[1].rstrip()[:-3]
    out = [Candidate(raw=raw, instruction=inst.strip()) for raw, inst in items]
    if finish_reason == "length":
        out[-1].error = "truncated: the reply was cut at max_tokens inside this task"
    return out


# The question's own words, which a teacher echoes or talks about: not its answer.
_YES_OR_NO = re.compile(r"\b(?:yes|no)\s*(?:/|\bor\b)\s*(?:yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> bool | None:
    """The first 'Yes' or 'No' word of a reply (after chatter like 'Answer:'), not counting a
    'Yes or No' / 'yes/no' the teacher echoed from the question; None when there is none.

    >>> parse_yes_no("Is it a classification task? Answer Yes or No. No."), parse_yes_no("Not a yes/no task: Yes")
    (False, True)
    """
    m = re.search(r"\b(yes|no)\b", _YES_OR_NO.sub(" ", text), re.IGNORECASE)
    return None if m is None else m.group(1).lower() == "yes"


# "Example 2", "Input:", "**Output:**", "Class label:" at the start of a line.
_INST_MARK = re.compile(
    r"^[ \t*_#-]*(?:(example\s*\d*)[*_]*\s*:?|(input|output|class label|label)\s*[*_]*\s*:)[*_]*[ \t]*", re.I | re.M
)


def parse_instances(text: str, output_first: bool, finish_reason: str | None) -> list[Instance]:
    """Input/output pairs from an instances reply; output-first replies pair 'Class label' with 'Input'.

    A last pair cut at max_tokens is dropped (it may be incomplete). In an input-first reply, text
    between "Example N" and the next label is the input when no "Input:" line follows, as
    self-instruct read it (dropping it would pair the output with no input).

    >>> parse_instances("Example 1.\\nWhat is 2 + 2?\\nOutput: 4", False, "stop")
    [Instance(input='What is 2 + 2?', output='4')]
    """
    marks = list(_INST_MARK.finditer(text))
    pairs: list[dict] = []
    cur: dict = {}
    first_key = "output" if output_first else "input"
    for j, m in enumerate(marks):
        key = (m.group(1) or m.group(2)).lower()
        stop = marks[j + 1].start() if j + 1 < len(marks) else len(text)
        value = text[m.end():stop].strip()
        if key.startswith("example"):
            if cur:
                pairs.append(cur)
            lead = value.lstrip(".:)").strip()
            cur = {"lead": lead} if lead and not output_first else {}
            continue
        if key in ("class label", "label"):
            key = "output"
        if key == first_key and key in cur:
            pairs.append(cur)
            cur = {}
        cur.setdefault(key, value)
    if cur:
        pairs.append(cur)
    complete = [p for p in pairs if "output" in p and ("input" in p or not output_first)]
    if finish_reason == "length" and complete and complete[-1] is pairs[-1]:
        complete = complete[:-1]
    if complete and complete[-1] is pairs[-1]:  # the last example's output runs to the reply's end: chatter too
        complete[-1]["output"] = drop_chatter(complete[-1]["output"].strip())
    return [Instance(input=_clean_input(p.get("input", p.get("lead", ""))), output=_drop_closing_fence(p["output"].strip())) for p in complete]


# ---------------------------------------------------------- structured output


class TaskJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: str
    input: str
    output: str


class TaskListJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[TaskJSON]


class InstructionListJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instructions: list[str]


class InstanceJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str
    output: str


class InstanceListJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[InstanceJSON]


class LabeledInstanceJSON(BaseModel):
    """A classification task's instance, label first: a grammar-constrained reply writes the
    fields in the schema's order, and self-instruct writes a classification task's output
    (its label) before the input, so the inputs are not all of one class."""

    model_config = ConfigDict(extra="forbid")
    output: str
    input: str


class LabeledInstanceListJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[LabeledInstanceJSON]


class ClassificationJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    is_classification: bool


STRUCTURED_HINT = "\nReply with JSON only, following the given schema."


# A bounded schema gives each string its share of the reply's max_tokens, at this many
# characters a token: below English's ~4, so a reply of odd tokens still fits.
CHARS_PER_TOKEN = 3
_FIELD_SHARES = {"instruction": 2, "input": 3, "output": 5}  # of one task's characters


def bounded_schema(model: type[BaseModel], max_items: int, max_tokens: int) -> dict:
    """The model's JSON schema with its list limited to 1..max_items items and each string to a
    maxLength, so that a whole reply fits in about max_tokens.

    Grammar-constrained decoding (llama.cpp, vLLM) follows the schema token by token: without
    bounds a small model that never closes a string or the list runs to max_tokens, and the
    cut JSON does not parse.

    >>> s = bounded_schema(TaskListJSON, 2, 512)
    >>> s["properties"]["tasks"]["maxItems"], string_limits(s)
    (2, {'instruction': 143, 'input': 215, 'output': 359})
    """
    schema = model.model_json_schema()
    budget = max(16, CHARS_PER_TOKEN * max_tokens // max_items - 50)  # 50: keys and punctuation
    for prop in schema["properties"].values():
        if prop.get("type") == "array":
            prop.update(minItems=1, maxItems=max_items)
            if prop["items"].get("type") == "string":
                prop["items"]["maxLength"] = budget
    for sub in schema.get("$defs", {}).values():
        strings = [k for k, p in sub["properties"].items() if p.get("type") == "string"]
        total = sum(_FIELD_SHARES.get(k, 1) for k in strings)
        for k in strings:
            sub["properties"][k]["maxLength"] = budget * _FIELD_SHARES.get(k, 1) // total
    return schema


def string_limits(schema: dict) -> dict[str, int]:
    """Field name -> maxLength in a schema from ``bounded_schema`` (a list of strings by the list's name)."""
    out = {}
    for name, prop in schema["properties"].items():
        if "maxLength" in prop.get("items", {}):
            out[name] = prop["items"]["maxLength"]
    for sub in schema.get("$defs", {}).values():
        out.update({k: p["maxLength"] for k, p in sub["properties"].items() if "maxLength" in p})
    return out


def response_format(model: type[BaseModel], schema: dict | None = None) -> dict:
    """The ``response_format`` for vLLM / llama.cpp / OpenAI, built from the Pydantic model
    (or a ``bounded_schema`` of it)."""
    return {
        "type": "json_schema",
        "json_schema": {"name": model.__name__, "schema": schema or model.model_json_schema(), "strict": True},
    }


_LABEL = re.compile(r"^\s*(?:#+[ \t]+)?(?:(?:instruction|input|output)s?\s*:\s*)?", re.IGNORECASE)


def _unlabel(text: str) -> str:
    """A JSON field without the text format's marker that small teachers echo into it.

    >>> _unlabel("### Instruction: Add 2 and 3."), _unlabel("Output: 5"), _unlabel("#1 on the list")
    ('Add 2 and 3.', '5', '#1 on the list')
    """
    return _LABEL.sub("", text, count=1)


# A string that ran to its maxLength with fewer than this share of its words distinct (and at
# least 20 words) was repeating itself, not cut mid-answer. Measured on the embedded teacher's
# --structured replies: such strings had 4-27% distinct words ("The answer is yes. The answer
# is yes. ..."); every kept string of 20+ words had 36% or more.
_DISTINCT_WORDS = 0.3


def _at_limit(values: dict[str, str], limits: dict[str, int] | None) -> str | None:
    """Why a structured task is cut: a string the grammar closed at its maxLength, mid-sentence,
    or ``degenerate`` when that string had been repeating itself (the line-based cut of text
    replies misses a sentence repeated within one line).

    >>> _at_limit({"output": "The answer is yes. " * 5}, {"output": 95})
    "degenerate: the output repeats itself up to the schema's maxLength (95 characters; 20% of its words distinct)"
    >>> _at_limit({"output": "x" * 95}, {"output": 95})
    "truncated: the output reached the schema's maxLength (95 characters)"
    """
    cut = [name for name, value in values.items() if limits and name in limits and len(value) >= limits[name]]
    for name in cut:
        words = re.findall(r"\w+", values[name].lower())
        if len(words) >= 20 and len(set(words)) < _DISTINCT_WORDS * len(words):
            return (f"degenerate: the {name} repeats itself up to the schema's maxLength ({limits[name]} characters; "
                    f"{100 * len(set(words)) // len(words)}% of its words distinct)")
    if cut:
        return f"truncated: the {cut[0]} reached the schema's maxLength ({limits[cut[0]]} characters)"
    return None


def _reply_problem(e: ValueError) -> str:
    """What is wrong with a structured reply, on one line: pydantic's first error with its place.
    Its str() begins "1 validation error for TaskListJSON", the same line for every broken reply.

    >>> try:
    ...     TaskListJSON.model_validate_json('{"tasks": [{"instruction": "Add."}]}')
    ... except ValueError as e:
    ...     print(_reply_problem(e))
    tasks.0.input: Field required (and 1 more)
    >>> try:
    ...     TaskListJSON.model_validate_json('{"tasks": [')
    ... except ValueError as e:
    ...     print(_reply_problem(e))
    Invalid JSON: EOF while parsing a list at line 1 column 11
    """
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return str(e).splitlines()[0]
    found = errors()
    first = found[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"{where + ': ' if where else ''}{first['msg']}{more}"


def unfenced(text: str) -> str:
    r"""A JSON reply without the markdown fence a teacher wrapped it in (```` ```json ```` ... ```` ``` ````): a
    server that ignores response_format leaves the model to write JSON as it writes code for a reader.

    >>> unfenced('```json\n{"tasks": []}\n```\n'), unfenced('{"tasks": []}')
    ('{"tasks": []}', '{"tasks": []}')
    """
    body = text.strip()
    if not body.startswith("```") or not body.endswith("```") or "\n" not in body:
        return text
    return body[body.index("\n") + 1:-3].strip()


def parse_structured_tasks(text: str, finish_reason: str | None, limits: dict[str, int] | None = None) -> list[Candidate]:
    """Candidates from a TaskListJSON reply; broken JSON gives one parse-error candidate with the raw text.

    With ``limits`` (``string_limits`` of the schema sent), a task with a string at its
    maxLength is ``truncated``: the grammar closed that string, so it ends mid-sentence.
    """
    try:
        data = TaskListJSON.model_validate_json(unfenced(text))
    except ValueError as e:
        why = "truncated" if finish_reason == "length" else "bad_json"
        return [Candidate(raw=text, error=f"{why}: {_reply_problem(e)}")]
    return [
        Candidate(raw=json.dumps(t.model_dump(), ensure_ascii=False), instruction=_unlabel(t.instruction),
                  instances=[Instance(input=_clean_input(_unlabel(t.input)), output=_unlabel(t.output))],
                  error=_at_limit(t.model_dump(), limits))
        for t in data.tasks
    ] or [Candidate(raw=text, error="no_task_found: the JSON has no tasks")]


def parse_structured_instructions(text: str, finish_reason: str | None,
                                  limits: dict[str, int] | None = None) -> list[Candidate]:
    try:
        data = InstructionListJSON.model_validate_json(unfenced(text))
    except ValueError as e:
        why = "truncated" if finish_reason == "length" else "bad_json"
        return [Candidate(raw=text, error=f"{why}: {_reply_problem(e)}")]
    return [Candidate(raw=i, instruction=_untask(i), error=_at_limit({"instructions": i}, limits))
            for i in data.instructions] or [
        Candidate(raw=text, error="no_task_found: the JSON has no instructions")
    ]


# "Task 9:" (the numbering the instructions template shows and asks for), "9." or "9)" before a
# structured instruction: layout the teacher carried into the JSON string, not the instruction's words.
_TASK_LABEL = re.compile(r"^\s*(?:[*_]*task\s*\d+\s*[:.)][*_]*\s*|\d+[.)]\s+)", re.IGNORECASE)


def _untask(text: str) -> str:
    """A structured instruction without the "Task N:" numbering or "Instruction:" label it echoed.

    >>> _untask("Task 9: Name a colour."), _untask("3. Add 2 and 3."), _untask("3.5 is what fraction?")
    ('Name a colour.', 'Add 2 and 3.', '3.5 is what fraction?')
    """
    return _unlabel(_TASK_LABEL.sub("", text, count=1)).strip()


def parse_structured_instances(text: str, finish_reason: str | None,
                               limits: dict[str, int] | None = None) -> tuple[list[Instance], str | None]:
    """(instances, None) from an InstanceListJSON reply, or ([], why) when it is not one.

    An instance with a string at its maxLength is dropped (the grammar closed it mid-sentence);
    each field loses an echoed "Input:"/"Output:" label, and an input of "<noinput>" (which the
    input-first template asks for) is empty, as in the text format.
    """
    try:
        data = InstanceListJSON.model_validate_json(unfenced(text))
    except ValueError as e:
        why = "truncated" if finish_reason == "length" else "bad_json"
        return [], f"{why}: the instances reply is not valid JSON ({_reply_problem(e)})"
    return [Instance(input=_clean_input(_unlabel(i.input)), output=_unlabel(i.output).strip())
            for i in data.instances if not _at_limit(i.model_dump(), limits)], None


# A small model that loses its way repeats itself: the same line, or the same few lines, again
# and again until max_tokens. Three copies in a row is where a reply is cut; blank lines between
# copies do not count, leading whitespace does (so code's closing braces are not a repeat).
_REPEATS = 3
_LONGEST_BLOCK = 8


# One line of this many words or more, under this share of them distinct, repeats a short unit ("a a a ...",
# "The answer is yes. The answer is yes. ..."): cut_degenerate, line by line, cannot see it. The share is
# _at_limit's measure made stricter, as this line was not cut at a limit: real English keeps over a third of
# its words distinct at 200 words (a sonnet 60%, twice over on one line 40%), numbers 1..500 all of them.
_LINE_WORDS = 200
_LINE_DISTINCT = 0.1

# One word (a whitespace-split token) of this many characters or more whose first or last this many are one
# unit of up to _TOKEN_UNIT characters repeated ("hahaha...", "!!!!...", "abab..."): to the word count above it
# is one word. No real word comes near: the longest token in seeds/ is 53 characters, in the READMEs 83 (a
# link), and the longest run of one unit there 36 (a markdown table's "|---:|---:|..."); a drawn rule
# ("=====", "-----") spans a line's width, 80 to 120 columns. 200 leaves twice the room.
_TOKEN_CHARS = 200
_TOKEN_UNIT = 8


def _unit(token: str) -> str | None:
    """The shortest unit (up to 8 characters) that the token's first or last 200 characters repeat, or None.

    >>> _unit("ha" * 100), _unit('"' + "ab" * 100 + "a"), _unit("ab" * 99 + "c") is None
    ('ha', 'ba', True)
    """
    for window in (token[:_TOKEN_CHARS], token[-_TOKEN_CHARS:]):  # a quote or a cut unit may end either side
        for size in range(1, _TOKEN_UNIT + 1):
            if window[size:] == window[:-size]:  # repeats with period `size`: each character the one size before
                return window[:size]
    return None


def repeats_within_a_line(text: str) -> str | None:
    """Why ``text`` degenerates within one line (a line of 200+ words, or of 200+ pieces between spaces
    where it has fewer words, under 10% of them distinct; or one word of 200+ characters that repeats a
    unit of up to 8), or None.

    >>> repeats_within_a_line("a " * 1000)
    'one line of 1000 words repeats 1 distinct word'
    >>> repeats_within_a_line("Sure! " + "ha" * 200)
    "one word of 400 characters repeats 'ha'"
    >>> repeats_within_a_line("!! " * 300)
    'one line of 300 pieces between spaces repeats 1 distinct piece'
    >>> repeats_within_a_line(", ".join(map(str, range(1, 501)))) is None
    True
    """
    for line in text.splitlines():
        if len(line) < _TOKEN_CHARS:  # most lines: too short to hold 200 words or a 200-character word
            continue
        if len(line) >= 2 * _LINE_WORDS - 1:
            words = re.findall(r"\w+", line.lower())
            distinct = len(set(words))
            if len(words) >= _LINE_WORDS and distinct < _LINE_DISTINCT * len(words):
                return f"one line of {len(words)} words repeats {distinct} distinct word{'s' if distinct != 1 else ''}"
            # Pieces between spaces, where the words are too few to judge: a line of "!! !! !! ..." or
            # ". . . ..." has no word at all. Only then, so a line the words judged fluent stays so.
            if len(words) < _LINE_WORDS and line.count(" ") >= _LINE_WORDS - 1:  # a count first: most lines stop here
                pieces = line.split()
                distinct = len(set(pieces))
                if len(pieces) >= _LINE_WORDS and distinct < _LINE_DISTINCT * len(pieces):
                    return (f"one line of {len(pieces)} pieces between spaces repeats {distinct} distinct "
                            f"piece{'s' if distinct != 1 else ''}")
        # A word of 200+ characters holds whole one of the line's 100-character slices that start at a multiple
        # of 100: a line each of whose slices has a space (a memchr each, no words made) holds no such word.
        half = _TOKEN_CHARS // 2
        if all(" " in line[i:i + half] for i in range(0, len(line), half)):
            continue
        for token in line.split():  # str.split: linear, where a regex for a long token would rescan each run
            if len(token) >= _TOKEN_CHARS and (unit := _unit(token)):
                return f"one word of {len(token)} characters repeats {unit!r}"
    return None


def degenerate(text: str, what: str) -> str | None:
    r"""Why a whole answer, query or field repeats itself, or None: a line or block three times in a
    row (``cut_degenerate``), or one long line of a short unit (``repeats_within_a_line``). The one
    rule of magpie's answers and queries, respond's answers and evolve's rewrites and answers.

    >>> degenerate("###\n###\n###", "answer")
    'degenerate: the answer repeats itself'
    >>> degenerate("a " * 300, "query")
    'degenerate: the query repeats itself within a line (one line of 300 words repeats 1 distinct word)'
    >>> degenerate("A short answer.", "answer") is None
    True
    """
    if cut_degenerate(text)[1]:
        return f"degenerate: the {what} repeats itself"
    if why := repeats_within_a_line(text):
        return f"degenerate: the {what} repeats itself within a line ({why})"
    return None


def cut_degenerate(text: str) -> tuple[str, str]:
    r"""Split a reply where it starts repeating: (the text up to the first copy's end, the repeats).

    The tail is empty when no non-blank line, or block of up to 8 such lines, comes 3 times in a row.

    >>> cut_degenerate("Instruction: Add 2 and 3.\nOutput: 5\n###\n###\n\n###\n###")
    ('Instruction: Add 2 and 3.\nOutput: 5\n###\n', '###\n\n###\n###')
    >>> cut_degenerate("a\nb\na\nb\nc")[1]
    ''
    """
    lines = text.splitlines(keepends=True)
    starts, pos = [], 0
    for line in lines:
        starts.append(pos)
        pos += len(line)
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    key = [lines[i].rstrip() for i in nonblank]
    for i in range(len(key)):
        for b in range(1, _LONGEST_BLOCK + 1):
            if i + _REPEATS * b > len(key):
                break
            if key[i + b] != key[i] or key[i + (_REPEATS - 1) * b] != key[i]:  # first lines differ: no slices made
                continue
            block = key[i:i + b]
            if all(key[i + r * b:i + (r + 1) * b] == block for r in range(1, _REPEATS)):
                cut = starts[nonblank[i + b]]
                return text[:cut], text[cut:]
    return text, ""
