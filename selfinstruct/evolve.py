"""Evolve a dataset's instructions into harder and rarer ones: the ``evolve`` command (Evol-Instruct).

WizardLM (Xu et al. 2023): each round, every surviving record gets one operation, the
teacher rewrites the instruction (and its input) with that operation's prompt
(``prompts/evolve/<operation>.txt``), then answers the rewritten instruction as a chat
turn, as ``respond`` does. In-depth operations make a task harder (add_constraints,
deepen, concretise, increase_reasoning, complicate_input); in-breadth (breadth) makes a
new, rarer task of the same domain. The operation is fixed by ``--seed``, the round and
the record's id, so a resumed run asks exactly what an uninterrupted one would.

An evolution is eliminated, with a reason in ``rejected.jsonl``, by the paper's rules
(no information gained over the ancestor; an answer that is a refusal or too short; a
rewrite that leaks the prompt's own words), by magpie's ``degenerate`` (a rewrite or an answer
that repeats a line or block three times in a row), by generate's instruction and output
filters, and by exact ROUGE-L dedup against the input records and everything kept so
far (a record's own ancestors excepted: a deepened task is meant to resemble its
ancestor). Kept records of round r are the inputs of round r + 1.

The output is a run folder with respond's conventions (``prepare_folder``,
``GroupWriter``, ``responses.jsonl`` as the write-ahead log, ``stats.json`` and
``data.json``). Records are decided in input order within a round, whatever order the
replies arrive in, so dedup (which depends on what was kept before) decides the same
after any number of kills and resumes.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator

from selfinstruct import filters
from selfinstruct.config import UserError, counted, given_by_file, one_item_list, resolve
from selfinstruct.prompts import degenerate
from selfinstruct.records import Evolution, Instance, KeptRecord, Neighbor, Provenance, Rejected, Response, Usage
from selfinstruct.respond import KEPT_WHEN_LEFT_OUT, RESUMABLE_CHANGES, RespondOptions, may_grow_not_shrink

Operation = Literal["add_constraints", "deepen", "concretise", "increase_reasoning", "complicate_input", "breadth"]
OPERATIONS: tuple[str, ...] = get_args(Operation)  # in-depth five, then in-breadth

# The prompts' own words, echoed into a rewrite (WizardLM's elimination rule: "given prompt",
# "rewritten prompt", "#Rewritten Prompt#"), plus the words of our own templates.
# "given the task:" is the template's "#Given Task#:" heading echoed as prose; with the colon only,
# so that "Given the task list below, ..." stays a task.
LEAKS = ("#given prompt#", "#rewritten prompt#", "#created prompt#", "given prompt", "rewritten prompt",
         "created prompt", "#given task#", "#rewritten task#", "#new task#", "given task", "rewritten task",
         "given the task:")

# A rewrite wrapped whole in one pair of quotes (small teachers often quote it): the pair is dropped.
_QUOTES = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}

# Words that carry no content: an answer made only of these (and punctuation) says nothing.
# Function words only: "Yes." or "No, it is not." can be a whole answer (too short, maybe, but that is another rule).
STOP_WORDS = frozenset("""a an and are as at be but by for from i if in is it its of on or so that the this these
those to was we were will with you""".split())


# Rounds an evolution may run (--rounds). WizardLM evolved 4, and each in-depth rewrite lengthens an instruction, so
# records stop (--max-words, no new information) within tens of rounds: --rounds 10**20, a typo, was taken, saved in
# config.yaml and run while any record survived.
MAX_ROUNDS = 1000


class EvolveOptions(RespondOptions):
    """Options of ``selfinstruct evolve``: respond's teacher and sampling options, plus the evolution's."""

    source: str = Field(description="The run folder or dataset whose records are evolved.")
    out: str = Field(description="A new run folder for the evolved records. An existing one is resumed.")
    limit: int | None = Field(None, ge=1, description="Evolve only the first N records of the input.")
    rounds: int = Field(3, ge=1, le=MAX_ROUNDS, description="Rounds of evolution; the records kept in one round are evolved in the next. May grow on resume; left out, a resume goes on with the run's own. At most 1,000 (WizardLM evolved 4; each round rewrites what the last kept, which grows with each rewrite, so a larger number is a typo).")
    seed: int = Field(0, description="Seed of the operation each record gets (with the round and the record's id).")
    operations: list[Operation] = Field(list(OPERATIONS), min_length=1, description="The operations to choose from: " + ", ".join(OPERATIONS) + ".")
    prompts: str | None = Field(None, description="Folder with one template per operation (<operation>.txt, with $instruction and $input). Default: the bundled prompts/evolve/.")
    same_threshold: float = Field(0.9, gt=0, le=1, description="An evolved task (instruction and input) with ROUGE-L F1 at least this to its ancestor gained no information and is eliminated.")
    min_answer_words: int = Field(3, ge=0, description="Answers of fewer words are eliminated.")
    threshold: float = Field(0.7, gt=0, lt=1, description="ROUGE-L F1 above which an evolved instruction duplicates an input or a kept one.")
    blacklist: list[str] = Field(list(filters.BLACKLIST), description="Whole words that reject an instruction.")
    min_words: int = Field(3, ge=0, description="Instructions of this many words or fewer are rejected.")
    max_words: int = Field(150, ge=1, validate_default=True, description="Instructions of more words are rejected.")

    # generate's checks of the same options: a word that can never match whole, or a length no
    # instruction can have, is one line before the run (else every evolution is rejected).
    _some_length_passes = field_validator("max_words")(filters.max_words_above_min)
    # One string is that one item, as generate takes it (`operations: deepen`, `blacklist: image`).
    _one_is_a_list = field_validator("operations", "blacklist", mode="before")(one_item_list)

    @field_validator("blacklist")
    @classmethod
    def _words_can_match(cls, v, info):
        # A resumed run's own list (config.yaml, the option left out: ``as_the_run_was``) is taken as
        # it is, as generate takes its own: a word refused as a flag since then decides as it did in
        # the run's earlier sessions, and the list cannot change on resume.
        if info.context and "blacklist" in info.context.get("the_runs_own", ()):
            return filters.trimmed_words(v)
        return filters.blacklist_words(v)


# --limit would change which records later rounds start from, so it is fixed for a run; --rounds may grow.
EVOLVE_RESUMABLE = (RESUMABLE_CHANGES - {"limit"}) | {"rounds"}
# ...and left out, a rerun goes on with the run's own rounds (the default 3 stopped a --rounds 5 run
# short, or refused its rerun naming a --rounds 3 the user never typed), as with its servers.
EVOLVE_KEPT_WHEN_LEFT_OUT = KEPT_WHEN_LEFT_OUT | {"rounds"}


def add_arguments(parser) -> None:
    from selfinstruct.respond import add_arguments as add_source_and_flags

    add_source_and_flags(parser, EvolveOptions, "selfinstruct evolve outputs/demo --rounds 3 --out outputs/evo")


def run(args) -> int:
    cfg = resolve(EvolveOptions, args)
    # The options the --config file gave (and no flag overrode), named by their keys if refused.
    stats = evolve(cfg, *given_by_file(args, cfg))
    return 0 if stats["complete"] else 1


# --------------------------------------------------------------------- operations


def choose_operation(seed: int, record_id: str, rnd: int, operations=OPERATIONS) -> str:
    """The operation a record gets in a round: fixed by seed, round and id, so a resume asks the same.

    >>> choose_operation(0, "row 3", 1) == choose_operation(0, "row 3", 1)
    True
    >>> len({choose_operation(0, f"row {i}", 1) for i in range(60)})
    6
    """
    digest = hashlib.blake2b(f"{seed}\0{rnd}\0{record_id}".encode(), digest_size=8).digest()
    return operations[int.from_bytes(digest, "big") % len(operations)]


def load_operation_templates(folder: str | Path | None, operations) -> dict:
    """``{operation: string.Template}``; a missing file, or a missing or unknown placeholder, is one line."""
    import string

    from selfinstruct.datafiles import read_text
    from selfinstruct.prompts import bundled_dir, placeholders

    folder = Path(folder) if folder else bundled_dir("prompts") / "evolve"
    out = {}
    for op in dict.fromkeys(operations):
        path = folder / f"{op}.txt"
        text = read_text(path, "prompt template")
        found = placeholders(path, text)
        for name in ("instruction", "input"):  # without one, the teacher would rewrite a task it never saw
            if name not in found:
                raise UserError(f"{path}: placeholder ${name} missing (this template needs $input, $instruction)")
        unknown = found - {"instruction", "input"}
        if unknown:
            raise UserError(f"{path}: unknown placeholder ${sorted(unknown)[0]} (use $instruction and $input)")
        out[op] = string.Template(text)
    return out


@dataclass(frozen=True)
class Item:
    """A record to evolve in a round: an input record (round 1) or one kept in the round before."""

    id: str
    instruction: str
    input: str
    root_id: str
    lineage: tuple[str, ...]  # its own and its ancestors' refs in the dedup index, which dedup passes over


@dataclass
class Rewrite:
    instruction: str
    input: str


# "Instruction:", "**Instructions:**", "Input:"...; an "Output:" a teacher adds unasked ends the fields before it.
_FIELD = re.compile(r"^[ \t>*_#-]*(instruction|input|output)s?\s*:[*_]*[ \t]*", re.IGNORECASE | re.MULTILINE)


def parse_rewrite(text: str) -> Rewrite:
    """The rewritten task out of a reply: its "Instruction:" and "Input:" fields, else the text before any field.

    >>> parse_rewrite("Instruction: Add 2 and 3, then double it.\\nInput: <noinput>")
    Rewrite(instruction='Add 2 and 3, then double it.', input='')
    >>> parse_rewrite("Sort these words.\\n\\nInputs: pear, fig\\nOutput: fig, pear")
    Rewrite(instruction='Sort these words.', input='pear, fig')
    """
    marks = list(_FIELD.finditer(text))
    fields, first = {}, marks[0].start() if marks else len(text)
    for j, m in enumerate(marks):
        stop = marks[j + 1].start() if j + 1 < len(marks) else len(text)
        fields.setdefault(m.group(1).lower(), text[m.end():stop].strip())
    instruction = _unquote(fields.get("instruction", text[:first].strip()))
    inp = fields.get("input", "")
    if inp.strip("<>`'\"*_. ").lower() in ("noinput", "no input", "none", "n/a", ""):  # Alpaca's <noinput>
        inp = ""
    return Rewrite(instruction=instruction, input=inp)


def _unquote(text: str) -> str:
    """``text`` without one pair of quotes around all of it, when neither quote mark is inside.

    >>> _unquote('"Name three rivers of Asia."'), _unquote('\u201cName three rivers.\u201d')
    ('Name three rivers of Asia.', 'Name three rivers.')
    >>> _unquote('"Stop" and "go" are verbs: explain.'), _unquote('"Hi," she said, "how are you?"')
    ('"Stop" and "go" are verbs: explain.', '"Hi," she said, "how are you?"')
    """
    close = _QUOTES.get(text[:1])
    inner = text[1:-1]
    if close and len(text) > 2 and text.endswith(close) and text[0] not in inner and close not in inner:
        return inner.strip()
    return text


# --------------------------------------------------------------------- the elimination rules


def leaks_prompt(rewrite: Rewrite):
    """WizardLM's rule: the rewrite copies the evolving prompt's own words.

    >>> leaks_prompt(Rewrite("#Rewritten Prompt#: Name three rivers.", ""))
    (False, "leaked_prompt: contains '#rewritten prompt#'")
    >>> leaks_prompt(Rewrite("Given the task: name three rivers.", "")), leaks_prompt(Rewrite("Given the task list, rank it.", ""))
    ((False, "leaked_prompt: contains 'given the task:'"), True)
    """
    low = f"{rewrite.instruction}\n{rewrite.input}".lower()
    for phrase in LEAKS:
        if phrase in low:
            return False, f"leaked_prompt: contains '{phrase}'"
    return True


# A rewrite that opens with an apology is the teacher declining to rewrite ("Sorry, I cannot
# rewrite this task."), which generate's refusal phrases miss; a task may still say sorry later on.
_APOLOGY = re.compile(r"\W*(?:(?:i'm|i am)\s+)?(?:sorry|my apologies|apologies|i apologi[sz]e)\b", re.IGNORECASE)


def declined(rewrite: Rewrite):
    """The rewrite is an apology instead of a task.

    >>> declined(Rewrite("Sorry, I cannot rewrite this task.", "")), declined(Rewrite("Write a note saying sorry.", ""))
    ((False, 'refusal: the rewrite opens with an apology'), True)
    """
    if _APOLOGY.match(rewrite.instruction.replace("\u2019", "'")):
        return False, "refusal: the rewrite opens with an apology"
    return True


def no_new_information(ancestor: Item, rewrite: Rewrite, same_threshold: float):
    """WizardLM's rule: the evolved task gains no information over its ancestor.

    The paper asked ChatGPT to judge whether two instructions are equal. We use a cheap,
    exact proxy instead: identical after normalisation, or ROUGE-L F1 at least
    ``same_threshold`` over instruction and input together. It needs no second model,
    decides the same on every run (resume depends on that), and catches what a small
    teacher does most: hand the task back unchanged or nearly so.

    >>> it = Item("r1", "Name three rivers.", "", "r1", ())
    >>> no_new_information(it, Rewrite("name three RIVERS", ""), 0.9)
    (False, 'no_new_information: the same as its ancestor after normalisation')
    >>> no_new_information(it, Rewrite("Name three rivers of Asia, longest first.", ""), 0.9)
    True
    """
    from selfinstruct.dedup import normalise
    from selfinstruct.export import user_text
    from selfinstruct.rouge import rouge_l

    old, new = user_text(ancestor.instruction, ancestor.input), user_text(rewrite.instruction, rewrite.input)
    if " ".join(normalise(old).split()) == " ".join(normalise(new).split()):
        return False, "no_new_information: the same as its ancestor after normalisation"
    score = rouge_l(old, new)
    if score >= same_threshold:
        return False, f"no_new_information: ROUGE-L {score:.3f} to its ancestor (at least {same_threshold})"
    return True


def unhelpful_answer(answer: str, min_words: int):
    """WizardLM's rules on the answer: a refusal, 'sorry' in a short answer, nothing but stop words, too short.

    >>> unhelpful_answer("Sorry, I don't know that one.", 3)
    (False, "refusal: says 'sorry' in 6 words (under 80)")
    >>> unhelpful_answer("It is.", 1)
    (False, 'empty_answer: only punctuation and stop words')
    >>> unhelpful_answer("Paris.", 3)
    (False, 'answer_too_short: 1 word (need at least 3)')
    """
    if (verdict := filters.refusal(answer)) is not True:
        return verdict
    words = answer.split()
    # The paper: "sorry" in a response under 80 words is usually the teacher failing at the task.
    if "sorry" in answer.lower() and len(words) < 80:
        return False, f"refusal: says 'sorry' in {counted(len(words), 'word')} (under 80)"
    # Words in any script (ROUGE's tokenizer keeps only ASCII letters and digits, so an answer in
    # Cyrillic or Japanese, a translation task's, read as nothing but punctuation); "_" is no word.
    if not any(t not in STOP_WORDS for t in re.findall(r"[^\W_]+", answer.lower())):
        return False, "empty_answer: only punctuation and stop words"
    if len(words) < min_words:
        return False, f"answer_too_short: {counted(len(words), 'word')} (need at least {min_words})"
    return True


def unasked_reason(item: Item) -> str | None:
    """Why a record is rejected before its rewrite is asked: a control character in its instruction or
    input, an input ending with ':', or an invisible character in either (respond's rules,
    ``respond.unasked_reason``).

    A rewrite that keeps a control character is rejected for it (``screen_rewrite``, the instruction
    first), and one that drops it would make a task of a record whose own text cannot be trained on.
    An input that ends with ':' ("The sentence is:") is a label whose text is missing: a rewrite that
    keeps it is rejected for it after its answer was paid for (``check_instance``), and one that fills
    it in makes up the very text the task was about. The colon last, as in respond, so a record that
    holds a control character too keeps the reason it had."""
    for text, field in ((item.instruction, "instruction"), (item.input, "input")):
        if (bad := filters.control_characters(text, field)) is not True:
            return bad[1]
    # The last character that shows, as respond looks: "Translate:\u200b" ends with a colon too.
    if next((ch for ch in reversed(item.input) if not filters.no_visible_text(ch)), "") == ":":
        return "ends_with_colon: input ends with a colon"
    for text, field in ((item.instruction, "instruction"), (item.input, "input")):  # respond's rule, after the colon
        if (bad := filters.invisible_characters(text, field)) is not True:
            return bad[1]
    return None


def screen_rewrite(item: Item, rewrite: Rewrite, truncated: bool, cfg: EvolveOptions) -> tuple[str, str] | None:
    """The checks a rewrite must pass before its answer is asked for: None, or (stage, reason)."""
    # magpie's rule, before truncated as there: a rewrite that repeats a line three times ran to max_tokens for it.
    for field, text in (("instruction", rewrite.instruction), ("input", rewrite.input)):
        if why := degenerate(text, f"rewritten {field}"):
            return "parse", why
    if truncated:
        return "parse", f"truncated: the rewrite was cut at max_tokens {cfg.max_tokens}"
    if not rewrite.instruction:
        return "parse", "no_task_found: the rewrite holds no instruction"
    for stage, verdict in (
        ("evolve", leaks_prompt(rewrite)),
        ("evolve", declined(rewrite)),
        ("filter", filters.check_instruction(rewrite.instruction, cfg.blacklist, cfg.min_words, cfg.max_words)),
        ("filter", filters.control_characters(rewrite.input, "input")),
        ("filter", filters.invisible_characters(rewrite.input, "input")),
        ("evolve", no_new_information(item, rewrite, cfg.same_threshold)),
    ):
        if verdict is not True:
            return stage, verdict[1]
    return None


# --------------------------------------------------------------------- one record, one round


def unit_id(rnd: int, index: int, first: int) -> str:
    """The id of a round's record at ``index`` (from 0), numbered from ``first`` (``respond.row_ids_from``).

    >>> unit_id(2, 0, 1), unit_id(2, 0, 0)
    ('e2-000001', 'e2-000000')
    """
    return f"e{rnd}-{index + first:06d}"


def render(template, item: Item) -> str:
    return template.substitute(instruction=item.instruction, input=item.input or "<noinput>")


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


async def evolve_one(rnd: int, index: int, item: Item, op: str, prompt: str, teacher, cfg: EvolveOptions,
                     first: int = 1) -> Response:
    """Rewrite, then (if the rewrite passes its checks) answer: one logged Response with one or two replies."""
    from selfinstruct.export import user_text
    from selfinstruct.teacher import now_iso

    t0 = time.monotonic()
    rewrite = await teacher.complete(prompt, f"evolve:{op}")
    replies = [rewrite]
    new = parse_rewrite(rewrite.text)
    if screen_rewrite(item, new, rewrite.finish_reason == "length", cfg) is None:
        replies.append(await teacher.complete(user_text(new.instruction, new.input), "answer"))
    return Response(id=unit_id(rnd, index, first), index=index, mode="evolve", prompt_hash=prompt_hash(prompt),
                    example_ids=[item.id], replies=replies, created_at=now_iso(),
                    elapsed_s=round(time.monotonic() - t0, 3))


class Decider:
    """Turns logged Responses into kept or rejected records, in input order, against one dedup index."""

    def __init__(self, cfg: EvolveOptions, model: str, base_url: str, sampling: dict, first: int = 1):
        from selfinstruct.rouge import RougeLIndex

        self.cfg, self.model, self.base_url, self.sampling, self.first = cfg, model, base_url, sampling, first
        self.index = RougeLIndex(cfg.threshold)

    def reject_unasked(self, index: int, item: Item, op: str, rnd: int, prompt: str, reason: str) -> list:
        """The lines of a record never asked (``unasked_reason``): rejected as a rewrite holding the same
        character is, with no reply (``raw`` empty, no usage) and no response id, which marks it on resume."""
        from selfinstruct.teacher import now_iso

        prov = Provenance(teacher_model=self.model, base_url=self.base_url, mode="evolve", sampling=self.sampling,
                          prompt_template=f"evolve/{op}", prompt_hash=prompt_hash(prompt), example_ids=[item.id],
                          response_id="", usage=Usage(), created_at=now_iso(), elapsed_s=0.0,
                          evolution=Evolution(ancestor_id=item.id, ancestor_instruction=item.instruction,
                                              root_id=item.root_id, source=self.cfg.source, operation=op, round=rnd))
        rej = Rejected(id=f"{unit_id(rnd, index, self.first)}-0", stage="filter", reason=reason, raw="",
                       instruction=item.instruction, provenance=prov)
        return [("rejected.jsonl", [rej]), ("kept.jsonl", [])]

    def decide(self, resp: Response, item: Item, op: str, rnd: int) -> tuple[list, KeptRecord | None]:
        from selfinstruct.export import user_text

        cfg = self.cfg
        rewrite_reply = resp.replies[0]
        new = parse_rewrite(rewrite_reply.text)
        usage = Usage(prompt_tokens=sum(r.usage.prompt_tokens for r in resp.replies),
                      completion_tokens=sum(r.usage.completion_tokens for r in resp.replies))
        prov = Provenance(teacher_model=self.model, base_url=rewrite_reply.server or self.base_url, mode="evolve",
                          sampling=self.sampling,
                          prompt_template=f"evolve/{op}", prompt_hash=resp.prompt_hash, example_ids=[item.id],
                          response_id=resp.id, usage=usage, created_at=resp.created_at, elapsed_s=resp.elapsed_s,
                          evolution=Evolution(ancestor_id=item.id, ancestor_instruction=item.instruction,
                                              root_id=item.root_id, source=cfg.source, operation=op, round=rnd))
        cid = f"{resp.id}-0"

        def reject(stage, reason, raw, instances=(), nearest=()):
            rej = Rejected(id=cid, stage=stage, reason=reason, raw=raw, instruction=new.instruction or None,
                           instances=list(instances), nearest=list(nearest), provenance=prov)
            return [("rejected.jsonl", [rej]), ("kept.jsonl", [])], None

        verdict = screen_rewrite(item, new, rewrite_reply.finish_reason == "length", cfg)
        if verdict is not None:
            return reject(*verdict, rewrite_reply.text)
        if len(resp.replies) < 2:  # logged by a version whose checks screened this rewrite out: never answered
            return reject("parse", "no_answer: the rewrite was logged without an answer", rewrite_reply.text)
        answer = resp.replies[1]
        inst = Instance(input=new.input, output=answer.text.strip())
        if why := degenerate(answer.text, "answer"):  # as respond's answers (and magpie's): before truncated
            return reject("parse", why, answer.text, [inst])
        if answer.finish_reason == "length":
            return reject("parse", f"truncated: the answer was cut at max_tokens {cfg.max_tokens}", answer.text, [inst])
        if (bad := unhelpful_answer(inst.output, cfg.min_answer_words)) is not True:
            return reject("evolve", bad[1], answer.text, [inst])
        instances, why = filters.clean_instances([inst])
        if not why and (echo := filters.repeats_instruction(inst.output, new.instruction,
                                                            user_text(new.instruction, new.input))) is not True:
            why = echo[1]
        if why:
            return reject("filter", why, answer.text, [inst])
        # Dedup: a duplicate of anything indexed but its own line of ancestors, which it is meant to resemble.
        match = self.index.query(new.instruction, nearest=len(item.lineage) + 1)
        others = [m for m in match.nearest if m[0] not in item.lineage]
        if others:
            ref, text, score = others[0]
            near = [Neighbor(id=r, instruction=t, rouge_l=round(s, 6)) for r, t, s in others]
            short = text if len(text) <= 60 else text[:57] + "..."
            return reject("dedup", f"duplicate: ROUGE-L {score:.3f} > {cfg.threshold} with {ref} '{short}'",
                          answer.text, instances, near)
        rec = KeptRecord(id=cid, instruction=new.instruction, instances=instances, provenance=prov)
        self.index.add(rec.instruction, rec.id)
        return [("rejected.jsonl", []), ("kept.jsonl", [rec])], rec


# --------------------------------------------------------------------- the run


def input_items(source: str, limit: int | None, first: int = 1) -> tuple[list[Item], dict]:
    """Round 1's records: one per row ``respond`` would answer (a run's kept instances, a file's rows);
    and, for stats.json, how many rows had a system prompt (said in one line: evolve drops it, as respond does)."""
    from selfinstruct.respond import load_rows, say_system_prompts

    rows = load_rows(source, first)[:limit]
    return [Item(id=r.previous.id, instruction=r.instruction, input=r.input, root_id=r.previous.id,
                 lineage=(f"in:{r.previous.id}",)) for r in rows], say_system_prompts(rows, "evolve")


def evolve(cfg: EvolveOptions, config_file: str | None = None, in_file: set[str] = frozenset()) -> dict:
    """Evolve (or resume evolving) ``cfg.source`` for ``cfg.rounds`` rounds into ``cfg.out``; returns the stats.

    ``in_file``: the options the --config file ``config_file`` gave, named by their keys when refused."""
    import contextlib

    from selfinstruct.generate import check_servers
    from selfinstruct.respond import (as_the_run_was, finish_stats, prepare_folder, row_ids_from, start_teacher,
                                      teacher_settings, write_folder)
    from selfinstruct.runfolder import begin_session

    started = time.monotonic()
    given = set(cfg.model_fields_set)  # by this command, not taken from the run's config.yaml
    # The run's own options first: --limit, --operations and --prompts choose what is read below.
    cfg = as_the_run_was(cfg, "evolve", EVOLVE_RESUMABLE, EVOLVE_KEPT_WHEN_LEFT_OUT, config_file, in_file)
    first = row_ids_from(cfg.out)  # a run made when ids counted from 0 keeps them: its choices of operation hang on them
    inputs, dropped = input_items(cfg.source, cfg.limit, first)  # every record read and checked before the folder is touched
    templates = load_operation_templates(cfg.prompts, cfg.operations)
    cfg, teacher_kind = teacher_settings(cfg, given, config_file, in_file)
    with contextlib.ExitStack() as stack:
        folder = prepare_folder(cfg, stack, mode="evolve", resumable=EVOLVE_RESUMABLE,
                                check=lambda out, logged, unasked: _same_first_round(cfg, out, logged, inputs,
                                                                                     templates, unasked, config_file,
                                                                                     in_file, first),
                                given=given, config_file=config_file, in_file=in_file)
        base_urls, api_key, model = start_teacher(cfg, teacher_kind, stack, folder)
        checked = check_servers(base_urls, api_key, model, cfg)  # before anything is written: a failed check changes nothing
        write_folder(cfg, folder, "evolve")
        counts = begin_session(folder, started, lambda rec, last: finish_stats(
            folder, rec.get("model") or "", rec.get("base_urls") or [""], rec.get("rows") or len(inputs), rec["wall_s"],
            rec.get("faults", {}), rec.get("servers", {}), last, mode="evolve",
            extra={"rounds": cfg.rounds, "complete": False, **dropped, **per_round_and_operation(folder)}))
        counts.teacher_up(model, base_urls)
        return asyncio.run(_loop(cfg, folder, inputs, templates, base_urls, api_key, model, started, counts, dropped,
                                 checked, first))


def _same_first_round(cfg: EvolveOptions, folder: Path, logged, inputs: list[Item], templates: dict,
                      unasked: dict[str, str] | None = None, config_file: str | None = None,
                      in_file: set[str] = frozenset(), first: int = 1) -> None:
    """Refuse, before anything is written, a resume whose input (or a template) no longer gives
    the round-1 prompts its ``logged`` replies answer, or those of the records it rejected unasked
    (``unasked``: id -> prompt hash); ``_round`` checks every round again, but by then config.yaml
    and session.json are written and the teacher started (minutes, for vLLM).
    A ``--rounds`` below a round already evolved is refused too: config.yaml and stats.json would
    say fewer rounds than the folder holds."""

    def first_round_prompt_hash(index: int) -> str | None:
        if index >= len(inputs):  # --limit cannot change on resume: the input lost rows
            return None
        item = inputs[index]
        return prompt_hash(render(templates[choose_operation(cfg.seed, item.id, 1, cfg.operations)], item))

    # The last round evolved, said after the whole log is read: the first one above --rounds was
    # named before, and giving it was then refused for the next ('round 3', then 'round 4').
    last = 0
    for resp in logged:
        m = re.match(r"e(\d+)-", resp.id)  # unit_id: e<round>-<index>
        last = max(last, int(m.group(1)) if m else 0)
        if resp.id != unit_id(1, resp.index, first):
            continue  # a later round's: its records come from the run's own kept ones
        if resp.prompt_hash != first_round_prompt_hash(resp.index):
            raise _changed(folder, resp, cfg)
    for rid, hashed in (unasked or {}).items():
        m = re.fullmatch(r"e(\d+)-(\d+)-0", rid)
        if not m:
            continue
        last = max(last, int(m.group(1)))
        if m.group(1) == "1" and hashed != first_round_prompt_hash(int(m.group(2)) - first):
            raise UserError(f"{folder / 'rejected.jsonl'}: {rid} rejects a record that {cfg.source} no longer holds "
                            "(the input or a template changed since this run began); use a new --out folder")
    if last > cfg.rounds:
        raise may_grow_not_shrink("rounds", cfg.rounds, f"evolved round {last}", last, config_file, in_file)


def _changed(folder: Path, resp: Response, cfg: EvolveOptions) -> UserError:
    return UserError(f"{folder / 'responses.jsonl'}: reply {resp.id} evolves a record that {cfg.source} "
                     "no longer holds (the input or a template changed since this run began); use a new --out folder")


async def _loop(cfg: EvolveOptions, folder: Path, inputs: list[Item], templates: dict, base_urls: list[str], api_key: str,
                model: str, started: float, session_counts, dropped: dict,
                checked: dict[str, str | None] | None = None, first: int = 1) -> dict:
    from selfinstruct.datafiles import load_kept, read_jsonl, run_file_ids
    from selfinstruct.progress import RunProgress
    from selfinstruct.respond import close_session, finish_stats, many_servers, none_usable, say_refused
    from selfinstruct.runfolder import GroupWriter

    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                "stop": cfg.stop or None, "seed": cfg.teacher_seed}
    decider = Decider(cfg, model, base_urls[0], sampling, first)
    lineage = {it.lineage[0]: it.lineage for it in inputs}
    for it in inputs:
        decider.index.add(it.instruction, it.lineage[0])
    kept_by_round: dict[int, list[KeptRecord]] = {}
    for rec in load_kept(folder):  # in decision order, so the index holds what it held when the run stopped
        lineage[rec.id] = lineage.get(_ref(rec), ()) + (rec.id,)
        kept_by_round.setdefault(rec.provenance.evolution.round, []).append(rec)
        decider.index.add(rec.instruction, rec.id)
    decided = set(run_file_ids(folder / "kept.jsonl")) | set(run_file_ids(folder / "rejected.jsonl"))
    logged: dict[str, Response] = {}
    for o in read_jsonl(folder / "responses.jsonl"):
        resp = Response.model_validate(o)
        logged[resp.id] = resp

    writer = GroupWriter(folder, ("responses.jsonl", "errors.jsonl", "rejected.jsonl", "kept.jsonl"), fsync=cfg.fsync)
    progress = RunProgress(len(inputs) * cfg.rounds, enabled=cfg.progress)  # the most that can be kept
    teacher = await many_servers(base_urls, api_key, model, sampling, cfg, progress, checked)
    counts = Counter(kept=sum(len(v) for v in kept_by_round.values()),
                     rejected=sum(1 for _ in read_jsonl(folder / "rejected.jsonl")))
    refused: Counter = Counter()  # requests the teacher refused as sent, by kind
    complete, clean = True, False
    saver = asyncio.create_task(session_counts.keep(teacher))
    try:
        with progress:
            items = inputs
            for rnd in range(1, cfg.rounds + 1):
                if rnd > 1:
                    items = [Item(id=r.id, instruction=r.instruction, input=r.instances[0].input,
                                  root_id=r.provenance.evolution.root_id, lineage=lineage[r.id])
                             for r in sorted(kept_by_round.get(rnd - 1, []), key=lambda r: r.id)]
                if not items:
                    break
                already = {r.id: r for r in kept_by_round.get(rnd, [])}
                got = await _round(cfg, folder, rnd, items, templates, logged, decided, already, decider, writer,
                                   teacher, counts, progress, refused)
                if got is None:  # a record failed every retry: later rounds wait for the next session
                    complete = False
                    break
                for rec in got:
                    lineage[rec.id] = lineage[_ref(rec)] + (rec.id,)
                kept_by_round[rnd] = got
        clean = True
    finally:
        saver.cancel()
        stats = await close_session(clean, teacher, writer, lambda: finish_stats(
            folder, model, base_urls, len(inputs), time.monotonic() - started, dict(teacher.faults),
            teacher.server_stats(), {"id": session_counts.id}, mode="evolve",
            extra={"rounds": cfg.rounds, "complete": complete and clean, **dropped, **per_round_and_operation(folder)}))
    if line := none_usable(teacher):
        raise UserError(line)
    progress.summary(stats, "selfinstruct evolve")
    say_refused(refused, "evolve", "record")
    return stats


def _ref(rec: KeptRecord) -> str:
    """The dedup index's ref of a kept record's ancestor (input records are "in:<id>")."""
    ev = rec.provenance.evolution
    return f"in:{ev.ancestor_id}" if ev.round == 1 else ev.ancestor_id


async def _round(cfg, folder, rnd, items, templates, logged, decided, already, decider, writer, teacher, counts,
                 progress, refused: Counter) -> list[KeptRecord] | None:
    """One round: ask what the log lacks, decide every record in input order; the kept, or None if one failed.

    ``decided``: ids already in kept/rejected (not decided again: the index holds the kept ones
    already, ``already`` maps them to their records).
    """
    import collections
    import contextlib

    from selfinstruct.respond import ask_all

    first = decider.first
    ops = [choose_operation(cfg.seed, it.id, rnd, cfg.operations) for it in items]
    prompts = [render(templates[op], it) for op, it in zip(ops, items)]
    replies: dict[int, Response] = {}
    for i in range(len(items)):
        resp = logged.get(unit_id(rnd, i, first))
        if resp is not None:
            if resp.prompt_hash != prompt_hash(prompts[i]):
                raise _changed(folder, resp, cfg)
            replies[i] = resp
    unasked = {i: why for i in range(len(items)) if i not in replies and f"{unit_id(rnd, i, first)}-0" not in decided
               and (why := unasked_reason(items[i]))}
    todo = iter([i for i in range(len(items)) if i not in replies and i not in unasked
                 and f"{unit_id(rnd, i, first)}-0" not in decided])
    kept: list[KeptRecord] = []
    pending = collections.deque()
    nxt = 0

    def advance() -> None:
        nonlocal nxt
        while nxt < len(items):
            cid = f"{unit_id(rnd, nxt, first)}-0"
            if cid in decided:
                rec = already.get(cid)
            elif nxt in replies or nxt in unasked:
                if nxt in replies:
                    lines, rec = decider.decide(replies[nxt], items[nxt], ops[nxt], rnd)
                else:  # rejected in its turn, so the files keep the input order
                    lines, rec = decider.reject_unasked(nxt, items[nxt], ops[nxt], rnd, prompts[nxt], unasked[nxt]), None
                pending.append(writer.submit(lines))
                counts["kept"] += len(lines[1][1])
                counts["rejected"] += len(lines[0][1])
            else:
                return  # its reply is still to come (or failed): the records after it wait, in order
            if rec is not None:
                kept.append(rec)
            nxt += 1

    advance()

    def ask(i: int):
        return evolve_one(rnd, i, items[i], ops[i], prompts[i], teacher, cfg, first)

    async with contextlib.aclosing(ask_all(todo, ask, teacher, writer, pending, {"round": rnd},
                                           refused=refused)) as results:
        async for i, resp in results:
            replies[i] = resp
            pending.append(writer.submit([("responses.jsonl", [resp])]))  # logged before it is decided
            advance()
            while pending and pending[0].done():
                pending.popleft().result()  # the first write error stops the run here
            # every round's replies: the summary's 'prompts answered' counts them all
            progress.update(counts["kept"], counts["rejected"], counts["answered"] + len(replies),
                            sum(teacher.faults.values()), 0.0)
    while pending:
        pending.popleft().result()
    counts["answered"] += len(replies)
    return kept if nxt == len(items) else None


def per_round_and_operation(folder: Path) -> dict:
    """stats.json's ``by_round`` and ``by_operation``: kept, rejected and rejections by reason, from the files."""
    from selfinstruct.datafiles import read_jsonl

    def empty():
        return {"kept": 0, "rejected": 0, "rejected_by_reason": Counter()}

    by_round, by_op = {}, {}
    for name in ("kept.jsonl", "rejected.jsonl"):
        for o in read_jsonl(folder / name):
            ev = o["provenance"].get("evolution") or {}
            for table, key in ((by_round, str(ev.get("round"))), (by_op, ev.get("operation"))):
                row = table.setdefault(key, empty())
                if name == "kept.jsonl":
                    row["kept"] += 1
                else:
                    row["rejected"] += 1
                    row["rejected_by_reason"][o["reason"].split(":", 1)[0]] += 1
    for table in (by_round, by_op):
        for row in table.values():
            row["rejected_by_reason"] = dict(row["rejected_by_reason"].most_common())
    return {"by_round": dict(sorted(by_round.items(), key=lambda kv: int(kv[0]))),
            "by_operation": dict(sorted(by_op.items()))}
