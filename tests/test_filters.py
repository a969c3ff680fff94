"""The filters keep or reject exactly as Alpaca's and self-instruct's post-processing did."""

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfinstruct import filters
from selfinstruct.records import Instance


def alpaca_reference(inst: str) -> bool:
    """Stanford Alpaca's post_process_gpt3_response instruction checks, restated."""
    if len(inst.split()) <= 3 or len(inst.split()) > 150:
        return False
    for word in filters.BLACKLIST:
        if re.compile(r"\b({0})\b".format(word), flags=re.IGNORECASE).search(inst):
            return False
    if inst.startswith("Write a program"):
        return False
    if inst[0] in string.punctuation:
        return False
    if not inst[0].isascii():
        return False
    return True


CASES = [
    ("Name three birds.", False, "too_short"),
    ("Name three common garden birds.", True, None),
    ("word " * 150 + "end", False, "too_long"),
    ("Tell " + "a " * 148 + "story", True, None),  # exactly 150 words is kept
    ("Describe the image in three sentences.", False, "blacklisted_word"),
    ("Describe the IMAGES in three sentences.", False, "blacklisted_word"),
    ("Imagine a mapping from colors to moods.", True, None),  # 'map' only as a whole word
    ("Explain how to go to the station from here.", False, "blacklisted_word"),  # two-word entry
    ("Summarize this profile of a filmmaker briefly.", True, None),  # 'file' inside 'profile'
    ("Write a program that sorts a list.", False, "write_a_program"),
    ("write a program that sorts a list.", True, None),  # Alpaca's check is case-sensitive
    ('"Quote" the following text back please.', False, "starts_with_punctuation"),
    ("- List the planets of the solar system.", False, "starts_with_punctuation"),
    ("Ébauchez un plan pour une courte lettre.", False, "starts_with_non_ascii"),
    ("As an AI, explain your own limits here.", False, "refusal"),
]


@pytest.mark.parametrize("instruction,keep,reason", CASES)
def test_check_instruction(instruction, keep, reason):
    verdict = filters.check_instruction(instruction)
    if keep:
        assert verdict is True
    else:
        assert verdict[0] is False and verdict[1].split(":")[0] == reason


@pytest.mark.parametrize("instruction,keep,reason", [c for c in CASES if c[2] != "refusal"])
def test_same_decision_as_alpaca(instruction, keep, reason):
    assert (filters.check_instruction(instruction) is True) == alpaca_reference(instruction)


def test_custom_blacklist_replaces_default():
    assert filters.check_instruction("Describe the image in three sentences.", blacklist=["sentences"])[1] == \
        "blacklisted_word: 'sentences'"
    assert filters.check_instruction("Describe the image in three sentences.", blacklist=[]) is True


@pytest.mark.parametrize(
    "inp,out,reason",
    [
        ("", "", "empty_output"),
        ("abc", "   ", "empty_output"),
        ("", "...", "placeholder_output"),
        ("", " \u2026\n\u2026 ", "placeholder_output"),
        ("Describe it.", "-- \u2014 \u2013", "placeholder_output"),
        ("", ". . .", "placeholder_output"),
        ("same", "same", "input_equals_output"),
        ("Translate this:", "Hola", "ends_with_colon"),
        ("", "Here are the steps:", "ends_with_colon"),
        ("", "I'm sorry, but I cannot help with that request.", "refusal"),
        ("", "As an AI language model I do not have opinions.", "refusal"),
    ],
)
def test_check_instance_rejects(inp, out, reason):
    verdict = filters.check_instance(Instance(input=inp, output=out))
    assert verdict[0] is False and verdict[1].startswith(reason)


def test_check_instance_keeps_good_pair():
    assert filters.check_instance(Instance(input="2 + 2", output="4")) is True


@pytest.mark.parametrize("out", ["?", ".", "-", "\u2026", "\u2014", "Wait... no.", "5 - 3", "-1", "?!", "..?"])
def test_one_mark_or_a_mark_among_others_is_not_a_placeholder(out):
    """Only two or more dots, ellipses and dashes, and nothing else, are a placeholder: one mark may be the answer."""
    assert filters.check_instance(Instance(input="", output=out)) is True


def test_clean_instances_drops_bad_and_repeated():
    kept, why = filters.clean_instances([
        Instance(input="a", output="b"), Instance(input="a ", output="b"), Instance(input="x", output="x"),
    ])
    assert why is None and kept == [Instance(input="a", output="b")]
    kept, why = filters.clean_instances([Instance(input="x", output="x")])
    assert kept == [] and why.startswith("input_equals_output")
    assert filters.clean_instances([])[1].startswith("no_instances")


def test_one_input_with_two_outputs_rejects_the_task():
    """self-instruct's filter_duplicate_instances: an input labelled two ways drops every example."""
    kept, why = filters.clean_instances([Instance(input="I loved it.", output="Positive"),
                                         Instance(input="Great film.", output="Positive"),
                                         Instance(input="I loved it. ", output="Negative")])
    assert kept == [] and why == "conflicting_outputs: two examples have the input 'I loved it.' and different outputs"
    # Empty inputs may have many outputs (write three poems), and invalid examples do not count.
    kept, why = filters.clean_instances([Instance(input="", output="A poem."), Instance(input="", output="Another."),
                                         Instance(input="x", output="y"), Instance(input="x", output="x")])
    assert why is None and len(kept) == 3


# Words and characters where a shortcut could go wrong: blacklisted words in other cases,
# inside longer words and across a space ("go to"), and non-ASCII letters that IGNORECASE
# folds onto ASCII ones (the Kelvin sign onto "k", the long s onto "s").
PIECES = ["image", "IMAGES", "Map", "maps.", "go", "to", "go to", "toga", "imagery", "mu\u017fic", "\u212aite",
          "fi\u0131le", "file", "Go", "a", " ", "  ", ",", "\n", "caf\u00e9", "draw-"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12).map("".join),
       st.sampled_from([filters.BLACKLIST, ["music", "kite"], ["\u212aite"], ["go to", "IMAGE"], [""]]))
def test_blacklisted_is_alpacas_per_word_regex(text, words):
    """The substring shortcut for ASCII text gives the regex's answer, word for word."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    m = pattern.search(text)
    expected = (False, f"blacklisted_word: '{m.group(1).lower()}'") if m else True
    assert filters.blacklisted(text, words) == expected


def test_an_empty_blacklist_entry_turns_it_off_and_one_that_cannot_match_is_refused(tmp_path, capsys):
    """--blacklist '' (the only way to give none on the command line) rejected every instruction as
    "blacklisted_word: ''": an empty word matches at every word boundary. 'c++' or '.net' never
    matched (a whole-word match needs a word character at both ends), silently."""
    import argparse

    from selfinstruct.cli import main
    from selfinstruct.config import resolve
    from selfinstruct.generate import GenerateOptions, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    opts = resolve(GenerateOptions, p.parse_args(["--out", "o", "--blacklist", "", " "]))
    assert opts.blacklist == []
    assert filters.check_instruction("Describe the image of a red barn.", opts.blacklist) is True
    assert resolve(GenerateOptions, p.parse_args(["--out", "o", "--blacklist", " image ", "video"])).blacklist == ["image", "video"]
    for word in ("c++", ".net", "C#"):
        assert main(["generate", "--out", str(tmp_path / "r"), "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                     "--blacklist", "image", word]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: --blacklist: {word!r} can never match" in err, err
    assert not (tmp_path / "r").exists()


# Characters that show nothing: str.strip keeps the first five (format characters, not whitespace),
# and the rest are Unicode spaces it removes, tested so the helper keeps treating them as blank.
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00a0", "\u2002", "\u2003", "\u2009", "\u202f",
             "\u205f", "\u3000", "\u180e", "\u00ad", "\u3164", "\u2800"]


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
def test_an_output_of_only_invisible_characters_is_empty(char):
    """An output of only a zero-width space was kept as an answer: nothing shows, nothing to train on."""
    for out in (char, char * 3, f" {char}\n{char} "):
        assert filters.check_instance(Instance(input="", output=out)) == (False, filters.EMPTY_OUTPUT)
    assert filters.check_instance(Instance(input="", output=f"{char}Seven.")) is True


def test_the_judge_and_filter_take_an_invisible_answer_as_no_answer():
    """The judge's and filter's empty test is the filters' own: a zero-width answer is not sent to the judge."""
    from selfinstruct.audit import Item
    from selfinstruct.judge import answered

    it = Item("r1", "Name a prime.", [Instance(input="", output="\u200b\ufeff"), Instance(input="x", output="Two.")])
    assert [i.output for i in answered(it)] == ["Two."]


@pytest.mark.parametrize("out", ["...\u200b", "\u200b...", ". \ufeff. .", "\u2060\u2014\u2014"])
def test_a_placeholder_with_invisible_characters_in_it_is_still_a_placeholder(out):
    """'...' with a zero-width space after it (or before) was kept as an answer: what shows is only dots."""
    verdict = filters.check_instance(Instance(input="", output=out))
    assert verdict[0] is False and verdict[1].startswith("placeholder_output"), verdict


@pytest.mark.parametrize("inp,out,reason", [
    ("abc", "abc\u200b", "input_equals_output"),
    ("\ufeffsame", "same", "input_equals_output"),
    ("", "Here are the steps:\u200b", "ends_with_colon"),
    ("Translate this:\u2060", "Hola", "ends_with_colon"),
])
def test_an_invisible_character_at_an_end_does_not_hide_what_the_checks_look_for(inp, out, reason):
    """A zero-width space after 'steps:' or a BOM before the input let the ends_with_colon and
    input_equals_output checks pass: they compare what shows."""
    verdict = filters.check_instance(Instance(input=inp, output=out))
    assert verdict[0] is False and verdict[1].startswith(reason), verdict


# U+FFFD: what llama.cpp writes for a character cut between two tokens. It shows as a box, and a
# kept instruction holding one was shown as an example to later prompts.
@pytest.mark.parametrize("inp,out", [("", "\ufffd\ufffd"), ("", "The word is caf\ufffd."), ("caf\ufffd", "Coffee shop.")])
def test_a_replacement_character_in_the_input_or_output_rejects_the_instance(inp, out):
    field = "input" if "\ufffd" in inp else "output"
    assert filters.check_instance(Instance(input=inp, output=out)) == \
        (False, f"replacement_character: the {field} holds U+FFFD (a character the teacher's tokens cut)")


def test_a_replacement_character_in_the_instruction_rejects_it():
    assert filters.check_instruction("Explain why \ufffd is used in this sentence.") == \
        (False, "replacement_character: the instruction holds U+FFFD (a character the teacher's tokens cut)")
    # A control character is still named first, and text without either passes.
    assert filters.check_instruction("Explain why \x1b\ufffd is here.")[1].startswith("control_characters")
    assert filters.check_instruction("Explain why caf\u00e9 has an accent.") is True


@pytest.mark.parametrize("out", ["###", "##", "# # #", " ###\n### ", "#\u200b#"])
def test_an_output_of_only_hash_marks_is_a_placeholder(out):
    """'###' is the Alpaca separator: an answer of only that is the teacher's layout, not an answer."""
    verdict = filters.check_instance(Instance(input="", output=out))
    assert verdict[0] is False and verdict[1].startswith("placeholder_output"), verdict


@pytest.mark.parametrize("out", ["#", "==", "!=", "?", "#1", "# Title\nText.", "C#"])
def test_one_hash_mark_or_other_marks_are_still_answers(out):
    """'#' answers "Which character starts a Python comment?", as '==' and '!=' answer theirs."""
    assert filters.check_instance(Instance(input="", output=out)) is True


# A teacher whose server does not stop at its end-of-turn token writes the template's tokens as text,
# then the next turn: generate, respond and evolve kept "Paris.<|im_end|>\n<|im_start|>assistant\n...".
@pytest.mark.parametrize("text,token", [("Paris.<|im_end|>\n<|im_start|>assistant\nMore.", "<|im_end|>"),
                                        ("<|start_header_id|>assistant<|end_header_id|>\nHi", "<|start_header_id|>"),
                                        ("Done.<end_of_turn>", "<end_of_turn>"), ("Done.<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>")])
def test_a_chat_template_token_rejects_the_instruction_input_or_output(text, token):
    why = f"template_token: the {{}} holds chat-template text '{token}' (the teacher wrote past its turn)"
    assert filters.check_instruction(f"Name the capital of France. {text}") == (False, why.format("instruction"))
    assert filters.check_instance(Instance(input=text, output="Paris.")) == (False, why.format("input"))
    assert filters.check_instance(Instance(input="", output=text)) == (False, why.format("output"))


@pytest.mark.parametrize("text", ["Use <s>old</s> to strike it out.", "Wrap it as [INST] text [/INST] here.",
                                  "The set {x | x > 0} and a|b|c.", "Compare x <| y and y |> z."])
def test_text_that_only_looks_like_template_markup_is_kept(text):
    assert filters.check_instance(Instance(input="", output=text)) is True


# A reasoning model served without a reasoning parser writes its thinking into the reply's text: respond
# kept '<think>\nOkay, the user wants...\n</think>\n\nParis.' as the answer.
@pytest.mark.parametrize("text,tag", [("<think>\nThe user wants France.\n</think>\n\nParis.", "<think>"),
                                      ("Okay, the capital.\n</think>\nParis.", "</think>")])
def test_a_reasoning_models_think_tag_rejects_the_field(text, tag):
    why = f"thinking: the {{}} holds the teacher's '{tag}' (serve it with a reasoning parser, or turn its thinking off)"
    assert filters.check_instance(Instance(input="", output=text)) == (False, why.format("output"))
    assert filters.check_instruction(f"Name the capital of France. {text}") == (False, why.format("instruction"))
    assert filters.check_instance(Instance(input="", output="Use <thinking> tags or think about it.")) is True


# Characters that change what text says without showing ("Trojan Source" bidi controls, zero-width characters,
# tag characters) passed every filter inside an instruction, input or output, and were kept.
HIDDEN = {"\u202a": "left-to-right embedding", "\u202b": "right-to-left embedding", "\u202c": "pop directional formatting",
          "\u202d": "left-to-right override", "\u202e": "right-to-left override", "\u2066": "left-to-right isolate",
          "\u2067": "right-to-left isolate", "\u2068": "first strong isolate", "\u2069": "pop directional isolate",
          "\u200b": "zero width space", "\u2060": "word joiner", "\ufeff": "zero width no-break space",
          "\u00ad": "soft hyphen", "\u2062": "invisible times", "\u206a": "inhibit symmetric swapping",
          "\ufff9": "interlinear annotation anchor", "\U000e0041": "tag latin capital letter a"}


@pytest.mark.parametrize("char", HIDDEN, ids=[f"U+{ord(c):04X}" for c in HIDDEN])
def test_an_invisible_character_inside_the_text_rejects_the_instruction_input_or_output(char):
    text = f"Name the capital of Fr{char}ance"
    where = f"U+{ord(char):04X} ({HIDDEN[char]}, "
    verdict = filters.check_instruction(text + ".")
    assert verdict[0] is False and verdict[1].startswith(f"invisible_characters: the instruction holds {where}")
    assert verdict[1].endswith(" at character 23, after 'me the capital of Fr'")
    for inst, field in ((Instance(input=text, output="Paris."), "input"), (Instance(input="", output=text), "output")):
        verdict = filters.check_instance(inst)
        assert verdict[0] is False and verdict[1].startswith(f"invisible_characters: the {field} holds {where}")
        assert filters.clean_instances([inst]) == ([], verdict[1])


def test_a_soft_hyphen_or_a_joiner_inside_a_word_no_longer_slips_it_past_the_blacklist():
    """'im\\u00adage' shows as 'image' and passed the blacklist's whole-word 'image'; a ZWJ between two
    ASCII letters joins nothing and did the same."""
    for split in ("im\u00adage", "im\u200dage", "im\u200cage"):
        verdict = filters.check_instruction(f"Describe the {split} in three short sentences.")
        assert verdict[0] is False and verdict[1].startswith("invisible_characters: the instruction holds U+"), split


@pytest.mark.parametrize("char", ["\u202e", "\u2067", "\U000e0069"], ids=["RLO", "RLI", "tag"])
def test_a_bidi_control_or_a_tag_character_at_an_end_rejects_the_field_too(char):
    """An unclosed override at an end turns the text after it (the next field's, as a prompt or a chat shows
    them); tag characters after the text are the usual way to hide words from a reader."""
    for inst in (Instance(input="", output=f"Paris.{char}"), Instance(input=f"{char}France", output="Paris."),
                 Instance(input=char, output="Paris.")):
        verdict = filters.check_instance(inst)
        assert verdict[0] is False and verdict[1].startswith("invisible_characters: the "), inst


@pytest.mark.parametrize("text", [
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 \u0628\u0631\u0648\u0645.",  # Persian: ZWNJ inside a word
    "\u0915\u094d\u200d\u0937 and \u0d05\u0d35\u0d28\u0d4d\u200d \u0d2a\u0d4b\u0d2f\u0d3f",  # Devanagari, Malayalam chillu: ZWJ
    "A family: \U0001f468\u200d\U0001f469\u200d\U0001f467, a coder \U0001f469\u200d\U0001f4bb.",  # emoji ZWJ sequences
    "The flag \U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f of England.",  # a subdivision flag's tags
    "\u05e9\u05dc\u05d5\u05dd \u200e(2024)\u200f \u05e2\u05d5\u05dc\u05dd and \u0627\u0644\u0639\u062f\u062f \u061c-5",  # LRM, RLM, ALM
    "\ufeffThe answer is seven.\u200b",  # at the ends: the checks look past them, as past spaces
], ids=["ZWNJ", "ZWJ-scripts", "ZWJ-emoji", "flag-tags", "LRM-RLM-ALM", "at-the-ends"])
def test_real_text_with_joiners_marks_and_flags_is_kept(text):
    assert filters.check_instance(Instance(input="", output=text)) is True
    assert filters.check_instance(Instance(input=text, output="Fine.")) is True
