"""Pure checks on a candidate: each returns True (keep) or (False, "reason_key: detail").

The instruction checks follow Stanford Alpaca's ``post_process_gpt3_response``
and self-instruct's ``bootstrap_instructions.py`` exactly (same word counts,
same whole-word blacklist regex, same first-character tests); the instance
checks follow self-instruct's ``filter_invalid_instances``. The reason key
(before the colon) is what stats and the audit group by.
"""

from __future__ import annotations

import re
import string
import unicodedata
from functools import lru_cache

from selfinstruct.config import counted, keys_like, pair_waits_for_the_run, said_as_given
from selfinstruct.records import Instance

Verdict = "bool | tuple[bool, str]"

# Stanford Alpaca's list (generate_instruction.py): alpaca mode's default, and evolve's.
BLACKLIST = [
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
]
# self-instruct's own (bootstrap_instructions.py's post_process_gpt3_response): Alpaca's without
# video, audio, music, flowchart and diagram, which Alpaca added. --mode self-instruct's default.
SELF_INSTRUCT_BLACKLIST = [
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to",
]

# Phrases of a teacher declining or talking about itself instead of doing the task.
REFUSALS = [
    "as an ai", "as a language model", "i'm sorry, but", "i am sorry, but", "i cannot fulfill",
    "i can't fulfill", "i cannot assist", "i can't assist", "i cannot help with", "i can't help with",
    "i'm not able to", "i am not able to", "i'm unable to", "i am unable to", "i cannot provide",
    "i can't provide", "i do not have the ability", "i don't have the ability",
]


def instruction_length(instruction: str, min_words: int = 3, max_words: int = 150):
    """Alpaca: drop when ``len(inst.split()) <= 3 or > 150``.

    >>> instruction_length("Name three birds.")
    (False, 'too_short: 3 words (need more than 3)')
    >>> instruction_length("Hello")
    (False, 'too_short: 1 word (need more than 3)')
    """

    n = len(instruction.split())
    if n <= min_words:
        return False, f"too_short: {counted(n, 'word')} (need more than {min_words})"
    if n > max_words:
        return False, f"too_long: {n} words (at most {max_words})"
    return True


@lru_cache(maxsize=64)
def _blacklist_regex(words: tuple[str, ...]) -> tuple[re.Pattern, tuple[str, ...] | None]:
    """The test, and the words lowercased where all are ASCII (None otherwise)."""
    # One alternation of whole words is the same test as Alpaca's per-word \b(w)\b search,
    # in one pass instead of eighteen.
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    return pattern, tuple(w.lower() for w in words) if all(w.isascii() for w in words) else None


def blacklist_words(words: list[str]) -> list[str]:
    """``--blacklist`` as given, checked: each word trimmed, an empty one dropped (``--blacklist ''``
    is how a command line gives none: as a word it matched everywhere and rejected every
    instruction), and one that cannot match whole refused (``ValueError``).

    >>> blacklist_words([" image ", "", "go to"])
    ['image', 'go to']
    >>> blacklist_words(["c++"])
    Traceback (most recent call last):
    ValueError: 'c++' can never match: a whole-word match needs a letter, digit or _ at both ends
    """
    out = trimmed_words(words)
    for word in out:
        if not (re.match(r"\w", word) and re.search(r"\w$", word)):
            raise ValueError(f"{word!r} can never match: a whole-word match needs a letter, digit or _ at both ends")
    return out


def trimmed_words(words: list[str]) -> list[str]:
    """``--blacklist`` words trimmed, an empty one dropped; ``blacklist_words`` without its check."""
    return [word.strip() for word in words if word.strip()]


def max_words_above_min(max_words: int, info) -> int:
    """``--max-words`` checked against ``--min-words`` (a pydantic field validator, run after it):
    an instruction passes with more than min and at most max words, so max <= min would reject
    every task the teacher writes, to the last request."""
    if pair_waits_for_the_run(info):  # a run to resume: checked with its own values (take_the_runs_own)
        return max_words
    low = info.data.get("min_words")
    if low is not None and max_words <= low:
        why = "no instruction could pass: one needs more than min and at most max words"
        if not where_given(info) or all_the_runs_own(info, "max_words", "min_words"):
            # built in Python, or both a resumed run's own (config.yaml): the field is named
            raise ValueError(f"must be above {the_runs_own_or_flag(info, 'min_words')} ({low}), got {max_words}")
        if "max_words" in where_given(info)["given"] or "min_words" not in where_given(info)["given"]:
            raise options_conflict(info, ("max_words", max_words), "must be above", ("min_words", low), why)
        # --max-words left at its default: the --min-words that was given is the one to change
        raise options_conflict(info, ("min_words", low), "must be below", ("max_words", max_words), why)
    return max_words


def the_runs_own_or_flag(info, name: str) -> str:
    """``name`` as a resumed run's config.yaml holds it (``as_the_run_was``: "the run's min_words", whichever
    file or flag the line names for the other option), else as its flag."""
    return f"the run's {name}" if name in (info.context or {}).get("the_runs_own", ()) else "--" + name.replace("_", "-")


def all_the_runs_own(info, *names: str) -> bool:
    """Whether every option ``names`` is a resumed run's own (``as_the_run_was``), none given by the command."""
    return set(names) <= set((info.context or {}).get("the_runs_own", ()))


def where_given(info) -> dict | None:
    """The validation context ``config.resolve`` passes: ``given`` (the options the command gave),
    ``in_file`` (those of them the --config file gave) and ``config_file``; None when there is none."""
    context = info.context or {}
    return context if "given" in context else None


def option_as_given(info, name: str, value, beside: str = "") -> str:
    """An option and its value as the command gave it: the --config file's key (``max_words: 3``),
    the flag (``--max-words 3``), both as ``config.said_as_given`` says them, a resumed run's own as
    ``the run's max_words (3)``, or, left out, its
    default, named as the option ``beside`` it is (``max_words (default 150)`` beside the file's
    ``min_words: 200``, else ``--max-words (default 150)``).
    """
    where = where_given(info)
    if name in (info.context or {}).get("the_runs_own", ()):  # a resumed run's own (its config.yaml)
        return f"the run's {name} ({value})"
    if name in where["given"]:
        return said_as_given(name, value, where["in_file"])
    as_key = keys_like({name}, where["in_file"]) if beside in where["in_file"] else set()  # the key beside it, in its section
    return f"{said_as_given(name, None, as_key)} (default {value})"


def options_conflict(info, blamed: tuple[str, object], relation: str, other: tuple[str, object], why: str):
    """The ``UserError`` of two options that contradict each other, each named as the command gave it,
    the file first when it gave either: ``c.yaml: max_words: 3 must be above min_words: 5 (...)``.

    Raised from a pydantic validator, which passes any error but ValueError and AssertionError
    through as it is: a ValueError's line would name only the validated field, and the other
    option's name inside it could not tell a flag from the file's key."""
    from selfinstruct.config import UserError

    where = where_given(info)
    file = where.get("config_file")
    opening = f"{file}: " if file and where["in_file"] & {blamed[0], other[0]} else ""
    return UserError(f"{opening}{option_as_given(info, *blamed)} {relation} "
                     f"{option_as_given(info, *other, beside=blamed[0])} ({why})")


def no_empty_stop(stop: list[str]) -> list[str]:
    """Stop sequences without the empty one (a pydantic validator of generate's, respond's and evolve's
    --stop): llama.cpp stops at once on '' (every reply one token long), and `--stop ''` is how a
    command line gives none, over the embedded teacher's own.

    >>> no_empty_stop(["", "###"])
    ['###']
    """
    return [s for s in stop if s]


def blacklisted(instruction: str, words=BLACKLIST):
    """Whole-word, case-insensitive match of any blacklisted word (a text model can't do these tasks).

    >>> blacklisted("Describe the image below in detail.")
    (False, "blacklisted_word: 'image'")
    >>> blacklisted("Imagine a city on the sea.")
    True
    """
    if not words:
        return True
    pattern, lowered = _blacklist_regex(tuple(words))
    if lowered is not None and instruction.isascii():
        # A match is one of the words in the text, whatever its case; between ASCII
        # strings that is a substring of the lowercased text. Most texts have none, and
        # these tests are 5x faster than the regex on a 40-word instruction (which took
        # 4% of the generation loop). Non-ASCII text goes to the regex: under IGNORECASE
        # the Kelvin sign matches "k" and the long s "s", which lower() does not give.
        text = instruction.lower()
        if not any(w in text for w in lowered):
            return True
    m = pattern.search(instruction)
    return (False, f"blacklisted_word: '{m.group(1).lower()}'") if m else True


def write_a_program(instruction: str):
    """Alpaca drops instructions that start with "Write a program" (case-sensitive, as there)."""
    return (False, "write_a_program: starts with 'Write a program'") if instruction.startswith("Write a program") else True


def starts_with_punctuation(instruction: str):
    if instruction and instruction[0] in string.punctuation:
        return False, f"starts_with_punctuation: '{instruction[0]}'"
    return True


def starts_with_non_ascii(instruction: str):
    if instruction and not instruction[0].isascii():
        return False, f"starts_with_non_ascii: '{instruction[0]}'"
    return True


def refusal(text: str):
    """A refusal or "as an AI" reply, anywhere in the text (case-insensitive)."""
    low = text.lower().replace("\u2019", "'")
    for phrase in REFUSALS:
        if phrase in low:
            return False, f"refusal: contains '{phrase}'"
    return True


# C0 controls but tab and newline, DEL and C1 controls: ESC starts terminal escape sequences,
# NUL and BEL are never text. Training data holding them teaches a model to emit them.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def control_characters(text: str, field: str = "instruction"):
    r"""A control character (ESC, BEL, NUL...) anywhere in the text; tab and newline are text.

    >>> control_characters("Say hi\x1b[2J", "output")
    (False, 'control_characters: the output holds U+001B')
    >>> control_characters("Line one\n\tline two")
    True
    """
    m = _CONTROL.search(text)
    if m:
        return False, f"control_characters: the {field} holds U+{ord(m.group()):04X}"
    return True


def replacement_character(text: str, field: str = "instruction"):
    """U+FFFD anywhere in the text: llama.cpp writes it for a character cut between two tokens, so
    the text is not what the teacher meant, and it shows as a box (kept, it was shown to later prompts).

    >>> replacement_character("Explain why caf\ufffd is", "output")
    (False, "replacement_character: the output holds U+FFFD (a character the teacher's tokens cut)")
    """
    if "\ufffd" in text:
        return False, f"replacement_character: the {field} holds U+FFFD (a character the teacher's tokens cut)"
    return True


# A chat template's special tokens written out as text: ChatML's <|im_end|>, Llama 3's <|eot_id|>, Phi's
# <|end|>, DeepSeek's full-width <｜Assistant｜>, Gemma's <end_of_turn>. A teacher whose server does not stop
# at its end-of-turn token (a base model, a wrong --chat-template) writes them, and the next turn after.
# Not </s> or [INST]: HTML's strikethrough and a bracketed word are text.
_TEMPLATE_TOKEN = re.compile(r"<\|[^|<>\s]{1,40}\|>|<｜[^｜<>\s]{1,40}｜>|<(?:start|end)_of_turn>")


def template_token(text: str, field: str = "instruction"):
    r"""A chat-template token written out as text: the teacher went on past its turn.

    >>> template_token("Paris.<|im_end|>\n<|im_start|>assistant", "output")
    (False, "template_token: the output holds chat-template text '<|im_end|>' (the teacher wrote past its turn)")
    >>> template_token("Use <s>strikethrough</s> and a|b|c.")
    True
    """
    m = _TEMPLATE_TOKEN.search(text)
    if m:
        return False, f"template_token: the {field} holds chat-template text '{m.group()}' (the teacher wrote past its turn)"
    return True


# A reasoning model's thinking tags (DeepSeek-R1, Qwen3, QwQ) in the reply's text: a server run without a
# reasoning parser (vLLM's --reasoning-parser) leaves the thinking in the content, before the answer.
_THINKING = re.compile(r"</?think>", re.IGNORECASE)


def thinking(text: str, field: str = "instruction"):
    r"""A reasoning model's <think> or </think> tag: the field holds the teacher's thinking, not only its answer.

    >>> thinking("<think>\nThe user asks for France.\n</think>\n\nParis.", "output")
    (False, "thinking: the output holds the teacher's '<think>' (serve it with a reasoning parser, or turn its thinking off)")
    """
    m = _THINKING.search(text)
    if m:
        return False, (f"thinking: the {field} holds the teacher's '{m.group()}' "
                       "(serve it with a reasoning parser, or turn its thinking off)")
    return True


# Characters that change what text says without showing. Anywhere: the bidi embeddings, overrides and
# isolates (U+202A-U+202E, U+2066-U+2069, "Trojan Source": the text shows in another order than it is, and
# an unclosed one turns the text after it, the next field's too) and the tag characters ("ASCII smuggling":
# text a model reads and no one sees, most often after the visible text). Between two characters that
# show: the zero-width space, the word joiner and the invisible math operators (U+2060-U+2064), the
# deprecated format controls (U+206A-U+206F), a BOM, the soft hyphen and the interlinear annotation marks
# (U+FFF9-U+FFFB); kept, each is a token the student learns to write, and it splits a word for the
# blacklist and dedup ("im\u00adage" passed the blacklist's "image"). At an end they split nothing, and the
# other checks look past them as they look past spaces (``_trimmed``). ZWNJ and ZWJ (U+200C, U+200D) are
# text in Persian and Indic scripts and in emoji sequences: only one between two ASCII characters, where it
# joins nothing, is taken. LRM, RLM and ALM (U+200E, U+200F, U+061C) are not looked for: real Arabic and
# Hebrew text places its digits and punctuation with them, and they move nothing but those neighbours.
_HIDDEN = re.compile("[\u202a-\u202e\u2066-\u2069\U000e0001\U000e0020-\U000e007f"
                     "\u200b-\u200d\u2060-\u2064\u206a-\u206f\ufeff\u00ad\ufff9-\ufffb]")
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_JOINERS = frozenset("\u200c\u200d")
# A subdivision flag (England's, Scotland's, Wales's) is U+1F3F4, tag letters and a cancel tag: its tags are text.
_TAG_FLAG = re.compile("\U0001f3f4[\U000e0020-\U000e007e]+\U000e007f")


def invisible_characters(text: str, field: str = "instruction"):
    r"""A bidi control or a tag character anywhere in the text, or another character of ``_HIDDEN`` between
    two characters that show: the first one, with where it is.

    >>> invisible_characters("Say \u202ehi", "output")
    (False, "invisible_characters: the output holds U+202E (right-to-left override, a bidi control: the text shows in another order than it is) at character 5, after 'Say '")
    >>> invisible_characters("Name a b\u200bird.")
    (False, "invisible_characters: the instruction holds U+200B (zero width space, which shows nothing) at character 9, after 'Name a b'")
    >>> invisible_characters("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 \U0001f469\u200d\U0001f4bb"), invisible_characters("Seven.\u200b")
    (True, True)
    """
    if text.isascii():  # most text: one pass in C, and nothing to look for
        return True
    shown = None  # (first, last): where the text that shows begins and ends, found when first needed
    for m in _HIDDEN.finditer(text):
        ch, i = m.group(), m.start()
        if ch >= "\U000e0000":
            if any(f.start() < i < f.end() for f in _TAG_FLAG.finditer(text)):
                continue
        elif ch not in _BIDI:
            if shown is None:
                first = _first_shown(text)
                shown = (first, _first_shown(text, reverse=True)) if first is not None else (0, -1)  # (0, -1): none
            if not shown[0] < i < shown[1]:
                continue  # at an end
            if ch in _JOINERS and not (text[i - 1] + text[i + 1]).isascii():
                continue  # beside a character it may join: an emoji, a letter of a script that joins
        what = ("a bidi control: the text shows in another order than it is" if ch in _BIDI else
                "a tag character: text that does not show" if ch >= "\U000e0000" else "which shows nothing")
        after = f", after {text[max(0, i - 20):i]!r}" if i else ""
        return False, (f"invisible_characters: the {field} holds U+{ord(ch):04X} "
                       f"({unicodedata.name(ch, 'unnamed').lower()}, {what}) at character {i + 1}{after}")
    return True


def _first_shown(text: str, reverse: bool = False) -> int | None:
    """The index of the first (or last) character of ``text`` that shows; None when none does."""
    order = range(len(text) - 1, -1, -1) if reverse else range(len(text))
    return next((j for j in order if not _invisible(text[j])), None)


def broken_text(text: str, field: str = "instruction"):
    """``control_characters``, then ``replacement_character``, ``template_token`` and ``thinking``: the
    checks of text no field should hold, for a caller that checks a field on its own (respond's and
    evolve's instruction and input)."""
    # Every tag the last two look for starts with "<": a text without one (most) skips their regexes.
    for check in (control_characters, replacement_character, *((template_token, thinking) if "<" in text else ())):
        if (verdict := check(text, field)) is not True:
            return verdict
    return True


# Letters and symbols that render as nothing: the Hangul fillers and the blank Braille pattern
# (a trick to post "empty" text where a blank is refused).
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _invisible(ch: str) -> bool:
    """Whitespace (NBSP and the Unicode spaces too), a format character (zero-width space, joiners, word
    joiner, BOM, soft hyphen: str.strip keeps these) or a blank glyph."""
    return ch.isspace() or ch in _BLANK_GLYPHS or unicodedata.category(ch) == "Cf"


def _trimmed(text: str) -> str:
    """``text`` without what does not show at either end: ``str.strip`` keeps a zero-width space or a BOM,
    which hid a trailing colon or an input equal to the output from the checks."""
    text = text.strip()
    if text and (_invisible(text[0]) or _invisible(text[-1])):  # rare: a format character or blank glyph at an end
        i, j = 0, len(text)
        while i < j and _invisible(text[i]):
            i += 1
        while j > i and _invisible(text[j - 1]):
            j -= 1
        text = text[i:j]
    return text


def no_visible_text(text: str) -> bool:
    """Whether ``text`` shows nothing (every character ``_invisible``): the test of an empty output
    everywhere (``check_instance``, the judge, filter).

    >>> no_visible_text(" \u200b\ufeff\u00a0"), no_visible_text("\u200bSeven.")
    (True, False)
    """
    return all(map(_invisible, text))  # most texts: one look at the first character


# Dots, the ellipsis, hyphen-minus and the Unicode dashes (U+2010-U+2015), '#' (a magpie answer of only
# "###", the Alpaca separator, was kept), and whitespace.
_PLACEHOLDER = re.compile(r"[.\u2026\-\u2010-\u2015#\s]+")
_MARKS = frozenset(".\u2026-\u2010\u2011\u2012\u2013\u2014\u2015#")


def placeholder(output: str):
    """An output of nothing but dots, ellipses, dashes and '#'s, two marks or more: a teacher's stand-in
    or its layout, no answer.

    One mark is let through: "." may answer "Which mark ends a sentence?" as "?" answers for a question,
    and "#" "Which character starts a Python comment?".

    >>> placeholder("...")
    (False, "placeholder_output: the output is only dots, dashes or #s ('...')")
    >>> placeholder("- - -")[0], placeholder("###")[0], placeholder("."), placeholder("#"), placeholder("Wait... no.")
    (False, False, True, True, True)
    """
    first = output.lstrip()[:1]
    if first not in _MARKS and not (first and _invisible(first)):  # most outputs: one look at the first character
        return True
    marks = "".join(ch for ch in output if not _invisible(ch))  # what shows: '...' and a zero-width space is '...'
    if len(marks) > 1 and _PLACEHOLDER.fullmatch(marks):
        return False, f"placeholder_output: the output is only dots, dashes or #s ({marks[:20]!r})"
    return True


def _words(text: str) -> str:
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def repeats_instruction(output: str, *asked: str):
    """The output is one of the texts asked (the instruction, or it with its input), case and punctuation aside.

    A small teacher often hands the question back as its answer; kept, it teaches a model to echo.

    >>> repeats_instruction("Name three rivers", "Name three rivers.")
    (False, 'output_repeats_instruction: the output only repeats the instruction')
    >>> repeats_instruction("The Nile. Name three rivers.", "Name three rivers.")
    True
    """
    out = _words(output)
    if out and any(out == _words(text) for text in asked):
        return False, "output_repeats_instruction: the output only repeats the instruction"
    return True


def check_instruction(instruction: str, blacklist=BLACKLIST, min_words: int = 3, max_words: int = 150):
    """Control characters, U+FFFD and invisible characters first, then all instruction checks in Alpaca's
    order; the first failure is the reason."""
    for verdict in (
        broken_text(instruction, "instruction"),
        invisible_characters(instruction, "instruction"),
        instruction_length(instruction, min_words, max_words),
        blacklisted(instruction, blacklist),
        write_a_program(instruction),
        starts_with_punctuation(instruction),
        starts_with_non_ascii(instruction),
        refusal(instruction),
    ):
        if verdict is not True:
            return verdict
    return True


EMPTY_OUTPUT = "empty_output: the output is empty"  # also filter's and the judge's reason (judge.py)



def check_instance(inst: Instance):
    """self-instruct's instance checks, plus a placeholder, an invisible character and a refusal check.

    >>> check_instance(Instance(input="Translate:", output="ok"))
    (False, 'ends_with_colon: input ends with a colon')
    """
    for field, text in (("input", inst.input), ("output", inst.output)):
        if (verdict := broken_text(text, field)) is not True:
            return verdict
    out, inp = _trimmed(inst.output), _trimmed(inst.input)  # what shows: the checks below look at its ends
    if no_visible_text(out):
        return False, EMPTY_OUTPUT
    if (verdict := placeholder(out)) is not True:
        return verdict
    if inp == out:
        return False, "input_equals_output: the input and output are the same"
    if inp.endswith(":"):
        return False, "ends_with_colon: input ends with a colon"
    if out.endswith(":"):
        return False, "ends_with_colon: output ends with a colon"
    # After the checks above, which look past what does not show at the ends: "...\u200b" is a placeholder.
    for field, text in (("input", inst.input), ("output", inst.output)):
        if (verdict := invisible_characters(text, field)) is not True:
            return verdict
    return refusal(out)


def clean_instances(instances: list[Instance]):
    """Keep the valid, distinct instances; when none is left, return the first reason.

    Valid examples with the same input and different outputs reject the task, as in
    self-instruct's ``filter_duplicate_instances``: a classification task labelling one
    input two ways teaches neither label.

    Returns (kept_instances, reason_or_None).
    """
    kept, first_reason, seen = [], None, set()
    for inst in instances:
        verdict = check_instance(inst)
        if verdict is not True:
            first_reason = first_reason or verdict[1]
            continue
        key = (inst.input.strip(), inst.output.strip())
        if key in seen:  # self-instruct also drops repeated instances of a task
            continue
        seen.add(key)
        kept.append(Instance(input=inst.input.strip(), output=inst.output.strip()))
    if not kept:
        return [], first_reason or "no_instances: the task has no input/output example"
    outputs: dict[str, str] = {}
    for inst in kept:
        if inst.input and outputs.setdefault(inst.input, inst.output) != inst.output:
            shown = inst.input if len(inst.input) <= 40 else inst.input[:37] + "..."
            return [], f"conflicting_outputs: two examples have the input '{shown}' and different outputs"
    return kept, None
