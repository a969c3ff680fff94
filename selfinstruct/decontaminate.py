"""Decontamination against evaluation sets: the ``decontaminate`` command.

A record is contaminated when

* its instruction + input shares a word n-gram (13 by default, the rule of the
  GPT-3 and later model reports) with any text field of a benchmark item, or
* its instruction's ROUGE-L F1 with a benchmark item's instruction (its question,
  prompt...) is above the threshold (0.7, the self-instruct duplicate rule).

Words are rouge_score's tokens (``rouge.tokenize``: lowercase ``[a-z0-9]+`` runs), so
case and punctuation never hide a copy. The n-gram index is numpy: every benchmark
n-gram's 64-bit hash in one sorted array, every record's n-grams hashed at once and
looked up by binary search; each hit is then compared word by word (so a hash
collision never removes a record) and reported as text. The ROUGE-L part is the
exact ``rouge.RougeLIndex`` (the generation loop's pool) holding the benchmark
instructions, so a decision is the one rouge_score would make.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import suppress
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from selfinstruct import config
from selfinstruct.config import OneConfig, UserError, one_item_list
from selfinstruct.rouge import tokenize

# Fields that hold a benchmark item's question, in the order they are looked for
# (GSM8K question, HumanEval prompt, MATH problem, HellaSwag ctx, plain text sets...).
# A list of texts in one of them is read as turns (MT-Bench's and Arena-Hard's "turns").
QUESTION_KEYS = ("instruction", "question", "prompt", "problem", "query", "ctx", "context", "text", "sentence", "input",
                 "turns")

# Records read, checked and written at a time: the rows of one batch, with their tokens, ids and
# hashes (about 8 KB a row besides the row), are all the data held besides the benchmark's index.
# 10,000 rows: 297 MB peak on 100,000 run-shaped rows (752 MB in batches of 50,000), no slower.
BATCH = 10_000

# Fixed odd multipliers: the hash of an n-gram is sum(id_k * R_k) mod 2**64. Fixed, so a
# run is reproducible; every hit is checked word by word, so a collision costs nothing.
_R = (np.random.default_rng(20250611).integers(1, 2**63, size=64, dtype=np.uint64) * np.uint64(2) + np.uint64(1))


# --------------------------------------------------------------------------- the texts of a record


def _strings(obj) -> list[str]:
    """Every string inside a record (values, list items, nested), in order."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


def _user_turns(rec: dict) -> list[str] | None:
    for key, role_key, text_key, user in (("messages", "role", "content", ("user",)),
                                          ("conversations", "from", "value", ("human", "user"))):
        turns = rec.get(key)
        if isinstance(turns, list):
            # A turn's text as export reads it: a string, or OpenAI's text parts. A turn holding an
            # image is skipped, as before, not refused: a multimodal benchmark's text is still checked.
            return [t for t in (_text(turn.get(text_key)) for turn in turns
                                if isinstance(turn, dict) and turn.get(role_key) in user) if t is not None]
    return None


def _text(content) -> str | None:
    from selfinstruct.export import content_text

    try:
        return content_text(content, "")
    except UserError:
        return None


def _turn_texts(value) -> list[str] | None:
    """A question field's list of turns as their texts: strings, or ``{"content": text}`` as
    Arena-Hard writes them; None for anything else (a list of numbers, an empty list).

    >>> _turn_texts(["Write a poem.", "Now shorten it."]), _turn_texts([{"content": "Hi."}]), _turn_texts([1, 2])
    (['Write a poem.', 'Now shorten it.'], ['Hi.'], None)
    """
    if not isinstance(value, list):
        return None
    texts = [v if isinstance(v, str) else v.get("content") if isinstance(v, dict) else None for v in value]
    if not all(isinstance(t, str) for t in texts):
        return None
    return [t for t in texts if t.strip()] or None


def record_texts(rec, where: str, benchmark: bool = False) -> tuple[str, str]:
    """(instruction, instruction + input) of a record of any shape.

    Alpaca rows: the instruction, and it with its input; chat records: the first user
    turn, and every user turn. A record of the dataset being cleaned is read as dedup reads it
    (``dedup.dataset_row``: an Alpaca row, or a conversation through export's ``to_messages``),
    so the two commands take and refuse the same records. A ``benchmark`` item is read more
    loosely (its shapes are the benchmark's, not ours): other records by the first of
    ``QUESTION_KEYS``, which may hold a list of texts (MT-Bench's turns), read as a chat's
    user turns are.

    >>> record_texts({"instruction": "Add.", "input": "1 + 1", "output": "2"}, "x")
    ('Add.', 'Add.\\n1 + 1')
    >>> record_texts({"question": "What is 2 + 2?", "answer": "4"}, "x", benchmark=True)
    ('What is 2 + 2?', 'What is 2 + 2?')
    >>> record_texts({"question_id": 81, "turns": ["Write a blog post.", "Rewrite it."]}, "x", benchmark=True)
    ('Write a blog post.', 'Write a blog post.\\nRewrite it.')
    """
    if not benchmark:
        from selfinstruct.dedup import dataset_row

        return row_texts(dataset_row(rec, where))
    if not isinstance(rec, dict):
        from selfinstruct.datafiles import json_kind

        raise UserError(f"{where}: expected a JSON object, got {json_kind(rec)}")
    if isinstance(rec.get("instruction"), str):
        inp = rec.get("input") if isinstance(rec.get("input"), str) else ""
        return rec["instruction"], f"{rec['instruction']}\n{inp}" if inp else rec["instruction"]
    turns = _user_turns(rec)
    if turns:
        return turns[0], "\n".join(turns)
    for key in QUESTION_KEYS:
        if isinstance(rec.get(key), str) and rec[key].strip():
            return rec[key], rec[key]
        # Turns, as a chat's: the first is the instruction the ROUGE-L rule compares (a copied task
        # copies the opening request; a follow-up joined to it would dilute the score), all of them the text.
        if turns := _turn_texts(rec.get(key)):
            return turns[0], "\n".join(turns)
    wrong = next((k for k in QUESTION_KEYS if rec.get(k) is not None and not isinstance(rec[k], str)), None)
    if wrong:  # the field is there, of the wrong type: say so, not that it is missing
        got = type(rec[wrong]).__name__
        if isinstance(rec[wrong], list):  # a list is fine there: say what is in it
            got = f"a list holding {next((type(v).__name__ for v in rec[wrong] if not isinstance(v, str)), 'no text')}"
        raise UserError(f"{where}: field '{wrong}': must be a string or a list of strings, got {got}")
    raise UserError(f"{where}: no instruction, user turn or question field ({', '.join(QUESTION_KEYS)}); "
                    f"the record has {sorted(rec)}")


def row_texts(row) -> tuple[str, str]:
    """(instruction, instruction + input) of a record ``dedup.dataset_row`` has checked: an Alpaca
    row's instruction, and it with its input; a conversation's first user turn, and every user turn.

    >>> from selfinstruct.dedup import Row
    >>> row_texts(Row({}, "Add.", "1 + 1")), row_texts(Row({}, "Hi.", user_turns=("Hi.", "More.")))
    (('Add.', 'Add.\\n1 + 1'), ('Hi.', 'Hi.\\nMore.'))
    """
    if row.user_turns:
        return row.instruction, "\n".join(row.user_turns)
    return row.instruction, f"{row.instruction}\n{row.input}" if row.input else row.instruction


def non_finite_field(obj, path: str = "") -> str | None:
    """Where a record holds a number JSON cannot write (NaN, Infinity: Python's json reads them, and
    1e400 as inf), as a field path; None when it holds none.

    >>> non_finite_field({"output": "x", "w": [1, {"z": float("-inf")}]}), non_finite_field({"score": 0.5})
    ('w[1].z', None)
    """
    if isinstance(obj, float):
        return None if math.isfinite(obj) else path
    if isinstance(obj, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    return next((found for p, v in items if (found := non_finite_field(v, p)) is not None), None)


def refuse_non_finite(rec, where: str) -> None:
    """A record holding NaN or Infinity is one line naming its field: written to kept.jsonl as read,
    the file would not be JSON (``json_line`` refuses it, and other readers would)."""
    if (found := non_finite_field(rec)) is not None:
        raise UserError(f"{where}: field '{found}': a number JSON cannot hold (NaN, Infinity, or past 1.8e308 "
                        "as 1e400): make it a number or null, or remove it")


# --------------------------------------------------------------------------- the n-gram index


def _window_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """The hash of every n-word window of ``ids`` (len(ids) - n + 1 of them)."""
    count = len(ids) - n + 1
    h = np.zeros(max(count, 0), dtype=np.uint64)
    if count <= 0:
        return h
    for k in range(n):  # uint64 arithmetic wraps: mod 2**64, as meant
        h += ids[k : k + count] * _R[k]
    return h


def _valid_starts(lengths: np.ndarray, n: int) -> np.ndarray:
    """Positions in the concatenated texts where an n-word window lies inside one text."""
    ends = np.cumsum(lengths)
    starts = ends - lengths
    counts = np.maximum(lengths - n + 1, 0)
    total = int(counts.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    first = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return first + np.arange(total)


class NgramIndex:
    """Word n-grams of many texts, looked up for many texts at once.

    >>> idx = NgramIndex(3)
    >>> idx.add("The quick brown fox jumps.", "item-1")
    >>> idx.build()
    >>> idx.find_many(["A quick brown fox!", "A quick red fox."])
    [('item-1', 'quick brown fox'), None]
    """

    def __init__(self, n: int = 13):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.n = n
        self.vocab: dict[str, int] = {}  # word -> id (from 1; 0 is a word no indexed text has)
        self._ids: list[int] = []
        self._lengths: list[int] = []
        self._refs: list = []
        self._hashes = np.zeros(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._refs)

    def add(self, text: str, ref) -> None:
        """Index a text's n-grams under ``ref`` (a text shorter than n words adds none)."""
        vocab = self.vocab
        ids = [vocab.setdefault(t, len(vocab) + 1) for t in tokenize(text)]
        self._ids.extend(ids)
        self._lengths.append(len(ids))
        self._refs.append(ref)

    def build(self) -> None:
        """Hash every window once; sorted, so a lookup is a binary search."""
        self._all = np.asarray(self._ids, dtype=np.uint64)
        lengths = np.asarray(self._lengths, dtype=np.int64)
        starts = _valid_starts(lengths, self.n)
        hashes = _window_hashes(self._all, self.n)[starts] if len(starts) else np.zeros(0, dtype=np.uint64)
        order = np.argsort(hashes, kind="stable")  # ties stay in order: the first text wins
        self._hashes, self._pos = hashes[order], starts[order]
        self._text_of = np.repeat(np.arange(len(lengths)), lengths)
        self._ids = []

    def find_many(self, texts: list[str]) -> list[tuple[object, str] | None]:
        """For each text: (ref, the shared n-gram as words) for its first shared n-gram, or None."""
        n, vocab = self.n, self.vocab
        ids, lengths, words = [], [], []
        for text in texts:
            toks = tokenize(text)
            words.append(toks)
            lengths.append(len(toks))
            ids.extend([vocab.get(t, 0) for t in toks])
        out: list = [None] * len(texts)
        if not len(self._hashes):
            return out
        ids_a = np.asarray(ids, dtype=np.uint64)
        lengths_a = np.asarray(lengths, dtype=np.int64)
        starts = _valid_starts(lengths_a, n)
        if not len(starts):
            return out
        # A window holding a word no benchmark has cannot match: skip it before hashing.
        unknown = np.concatenate(([0], np.cumsum(ids_a == 0)))
        starts = starts[unknown[starts + n] == unknown[starts]]
        hashes = _window_hashes(ids_a, n)[starts]
        at = np.searchsorted(self._hashes, hashes)
        at_ok = at < len(self._hashes)
        hit = np.zeros(len(starts), dtype=bool)
        hit[at_ok] = self._hashes[at[at_ok]] == hashes[at_ok]
        if not hit.any():
            return out
        text_start = np.cumsum(lengths_a) - lengths_a
        h_starts, h_at = starts[hit], at[hit]
        owner = np.searchsorted(np.cumsum(lengths_a), h_starts, side="right")
        # The first hit of each text, checked word by word all at once (windows are in text order).
        first = np.unique(owner, return_index=True)[1]
        same = np.ones(len(first), dtype=bool)
        for k in range(n):
            same &= self._all[self._pos[h_at[first]] + k] == ids_a[h_starts[first] + k]
        for f, ok in zip(first.tolist(), same.tolist()):
            i = int(owner[f])
            if ok:
                p, j = int(self._pos[h_at[f]]), int(h_starts[f] - text_start[i])
                out[i] = (self._refs[int(self._text_of[p])], " ".join(words[i][j : j + n]))
                continue
            # A hash collision (rare): every window of this text, each benchmark window with its hash.
            for g in np.flatnonzero(owner == i).tolist():
                s, a = int(h_starts[g]), int(h_at[g])
                window = ids_a[s : s + n]
                while out[i] is None and a < len(self._hashes) and self._hashes[a] == hashes[hit][g]:
                    p = int(self._pos[a])
                    if np.array_equal(self._all[p : p + n], window):
                        out[i] = (self._refs[int(self._text_of[p])], " ".join(words[i][s - int(text_start[i]) : s - int(text_start[i]) + n]))
                    a += 1
                if out[i] is not None:
                    break
        return out


# --------------------------------------------------------------------------- the check


def _splits(path: str) -> list[str]:
    """A benchmark path, or each split's folder of a saved ``DatasetDict`` (``DIR/test``...).

    The data layer reads a DatasetDict as its train split (what export and tune want); a
    benchmark's test split is the one its scores come from, so every split is checked.
    """
    from selfinstruct.datafiles import dataset_splits

    splits = dataset_splits(path)
    return [str(Path(path) / s) for s in splits] if splits else [path]


class Benchmark:
    """The items of the --against files: their n-grams and instructions, indexed."""

    def __init__(self, paths: list[str], ngram: int, threshold: float):
        from selfinstruct.datafiles import read_located
        from selfinstruct.rouge import RougeLIndex

        self.items: list[tuple[str, int, str]] = []  # (file, item number in it, its instruction)
        self.ngrams = NgramIndex(ngram) if ngram else None
        self.rouge = RougeLIndex(threshold) if threshold < 1 else None
        added: dict[Path, str] = {}  # each split read: a glob and a name that overlap gave one twice
        for given in paths:
            splits, before = _splits(given), len(self.items)
            for path in splits:
                how = f"as {given}" if path == given else f"in {given}"  # a split of a DatasetDict given whole
                if (key := Path(path).resolve()) in added:
                    # Checked twice, its items were counted twice in summary.json and in export's card.
                    raise UserError(f"{path}: a benchmark given twice ({added[key]}, and {how}); give each once")
                added[key] = how
                # A DatasetDict's empty split (a validation split with no rows) is skipped: the others are checked.
                records = read_located(path, empty_ok=len(splits) > 1)
                if not records:
                    print(f"{path}: an empty split, skipped", file=sys.stderr)
                self._add(path, records)
            if len(self.items) == before:
                raise UserError(f"{given}: no records (every split is empty)")
        if self.ngrams is not None:
            self.ngrams.build()

    def _add(self, path: str, records: list[tuple[str, dict]]) -> None:
        """Index one benchmark file's (or split's) items."""
        for i, (where, rec) in enumerate(records):
            instruction, _ = record_texts(rec, where, benchmark=True)
            ref = len(self.items)
            self.items.append((str(path), i, instruction))
            if self.ngrams is not None:
                for s in _strings(rec):  # each field on its own: no n-gram spans two fields
                    self.ngrams.add(s, ref)
            if self.rouge is not None:
                self.rouge.add(instruction, str(ref))

    def check(self, texts: list[tuple[str, str]], batch: int = BATCH) -> list[list[dict]]:
        """For each (instruction, instruction + input): its matches (empty when clean)."""
        out: list[list[dict]] = [[] for _ in texts]
        for s in range(0, len(texts), batch):
            chunk = texts[s : s + batch]
            if self.ngrams is not None:
                for k, found in enumerate(self.ngrams.find_many([t for _, t in chunk])):
                    if found is not None:
                        f, i, _ = self.items[found[0]]
                        out[s + k].append({"rule": "ngram", "benchmark": f, "item": i, "ngram": found[1]})
            if self.rouge is not None:
                distinct = list(dict.fromkeys(ins for ins, _ in chunk))  # a task's instances share one instruction
                found = dict(zip(distinct, self.rouge.query_many(distinct, nearest=1)))
                for k, (ins, _) in enumerate(chunk):
                    m = found[ins]
                    if m.duplicate:
                        ref, text, score = m.nearest[0]
                        f, i, _ = self.items[int(ref)]
                        out[s + k].append({"rule": "rougeL", "benchmark": f, "item": i, "score": round(score, 6),
                                           "benchmark_instruction": text})
        return out


# --------------------------------------------------------------------------- the command


class DecontaminateOptions(BaseModel):
    """Options of ``selfinstruct decontaminate``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # nan failed as "should be less than 1"

    against: list[str] = Field(min_length=1, description="Benchmark files or folders (any format the data layer reads: "
                               "JSON, JSONL, parquet, a datasets folder, a run folder).")
    # At most a million words: numpy's int64 arithmetic overflowed past 2**63 (a traceback), and no text is longer.
    ngram: int = Field(13, ge=0, le=1_000_000,
                       description="Words in a shared n-gram that make a record contaminated (0: off).")
    threshold: float = Field(0.7, gt=0, le=1, description="ROUGE-L F1 with a benchmark instruction above which a "
                             "record is contaminated (1: off).")
    out: str = Field(description="Output folder for kept.jsonl, removed.jsonl and summary.json.")

    _one_is_a_list = field_validator("against", mode="before")(one_item_list)  # `against: gsm8k.jsonl`, as the flag


def add_arguments(parser) -> None:
    parser.add_argument("data", metavar="RUN_OR_FILE", help="A run folder or a dataset (alpaca, sharegpt, messages, "
                        "JSONL, parquet, hf; DIR/NAME: its split NAME).")
    config.add_flags(parser, DecontaminateOptions, skip=("out", "against"))
    parser.add_argument("--against", nargs="+", default=None, metavar="BENCHMARK",
                        help=DecontaminateOptions.model_fields["against"].description)
    parser.add_argument("--out", default=None, help=DecontaminateOptions.model_fields["out"].description)
    parser.add_argument("--config", action=OneConfig, default=None, help="YAML file of options; flags override it.")
    parser.epilog = "example: selfinstruct decontaminate outputs/demo --against gsm8k_test.jsonl mmlu.parquet --out outputs/clean"


def load_data(path: str) -> list[tuple[dict, tuple[str, str]]]:
    """``iter_data`` as a list."""
    return list(iter_data(path))


def iter_data(path: str) -> Iterator[tuple[dict, tuple[str, str]]]:
    """(record, its texts: ``record_texts``), a record at a time: a run folder's kept tasks one row
    per instance (their fields kept), or a file's records. A missing or unreadable source is refused
    before the first record; a bad record where it is read; no record at all once the source is read through.

    Each record is checked once, here (``dedup.dataset_row``), and its texts taken from that check:
    they were checked again when the texts were taken, after they were read.
    """
    from selfinstruct.datafiles import is_run_folder, iter_located, iter_models
    from selfinstruct.dedup import dataset_row
    from selfinstruct.records import KeptRecord

    p = Path(path)
    if p.is_dir() and is_run_folder(p):
        from selfinstruct.datafiles import note_if_live

        note_if_live(p)
        n = 0
        for n, rec in enumerate(iter_models(p / "kept.jsonl", KeptRecord), 1):
            task = rec.model_dump(mode="json", exclude={"instances"})
            for inst in rec.instances:
                row = {**task, "input": inst.input, "output": inst.output}
                # dataset_row refuses a NaN a float field (rouge_l) may read, naming the record.
                yield row, row_texts(dataset_row(row, f"{p / 'kept.jsonl'}: record {n}"))
        if not n:
            raise UserError(f"{p}: no records")
        return
    for where, rec in iter_located(p):
        # Each record is checked as dedup checks it (dataset_row: an Alpaca row's instruction, input and
        # output text, a conversation through export's to_messages, and no NaN or Infinity anywhere),
        # where it is read. A record with a question field alone was taken here and refused by dedup;
        # a chat record's turns were read apart from export's reading. Benchmarks are not checked here:
        # their shapes vary, and nothing of them is written.
        yield rec, row_texts(dataset_row(rec, where))


def decontaminate(records: Iterable[tuple[dict, tuple[str, str]]], against: list[str], ngram: int = 13,
                  threshold: float = 0.7, batch: int | None = None) -> tuple[Iterator[tuple[dict, list[dict]]], dict]:
    """Each record with its matches against the benchmarks (empty when clean), checked ``batch``
    records at a time as they are read, and the figures (``check_s`` once the rows are read through).
    ``records``: each with its (instruction, instruction + input), as ``iter_data`` gives them.

    The benchmarks are read and indexed here, before the first record is checked.
    """
    t0 = time.perf_counter()
    bench = Benchmark(against, ngram, threshold)
    # Items with no [a-z0-9] word (a benchmark in another script) can match nothing: said, not silent.
    wordless = sum(1 for _, _, text in bench.items if not tokenize(text))
    figures = {"benchmark_items": len(bench.items), "wordless_items": wordless,
               "index_s": round(time.perf_counter() - t0, 3), "check_s": 0.0}
    batch = batch or BATCH

    def checked() -> Iterator[tuple[dict, list[dict]]]:
        seconds, rows = 0.0, iter(records)
        while chunk := list(islice(rows, batch)):
            t = time.perf_counter()
            matches = bench.check([texts for _, texts in chunk], batch)
            seconds += time.perf_counter() - t
            yield from zip((r for r, _ in chunk), matches)
            del chunk, matches  # the batch is dropped before the next is read
        figures["check_s"] = round(seconds, 3)

    return checked(), figures


def run(args) -> int:
    """``selfinstruct decontaminate DATA --against FILE... --out DIR``."""
    from selfinstruct.datafiles import filtered_output

    opts = config.resolve(DecontaminateOptions, args)
    if opts.ngram == 0 and opts.threshold >= 1:
        # Nothing would be checked, yet summary.json (and export's card) would say it was decontaminated.
        config_file, in_file = config.given_by_file(args, opts)
        raise UserError(f"{config.named_file(config_file, in_file, 'ngram', 'threshold')}"
                        f"{config.said_as_given('ngram', 0, in_file)} and "
                        f"{config.said_as_given('threshold', f'{opts.threshold:g}', in_file)} turn both rules off: "
                        "nothing would be checked; keep one on")
    records = iter_data(args.data)
    # The first batch is read before --out is made: a bad or empty input is one line before any work
    # (a bad row further on is one line too, found as it is read, and leaves --out as it was).
    first = list(islice(records, BATCH))
    records = chain(first, records)
    del first
    with filtered_output(opts.out, "decontaminate", [args.data, *opts.against]) as out:
        rows, figures = decontaminate(records, opts.against, opts.ngram, opts.threshold)
        summary = _write_result(out, rows, lambda counts: {
            "decontamination": True, "input": str(args.data),
            # export's card finds the run through it, from whatever folder export is run in
            "input_resolved": str(Path(args.data).resolve()), "against": list(opts.against),
            **counts, "ngram": opts.ngram, "threshold": opts.threshold, **figures})
    _print_summary(summary, out)
    return 0


def _write_result(out: Path, rows: Iterable[tuple[dict, list[dict]]], summary_of) -> dict:
    """kept.jsonl and removed.jsonl written as ``rows`` come, then summary.json (``summary_of``
    the counts gathered on the way); returns the summary.

    As ``write_filtered``: the rows are staged beside their files and each file is moved into
    place atomically once the last row is checked; summary.json goes first and comes back last.
    A refusal while the rows are read (a bad record late in the file) leaves the three as they were.
    """
    from collections import Counter

    from selfinstruct.datafiles import claim_filtered, json_line, write_atomic

    records = n_removed = 0
    by_rule, by_file = Counter(), Counter()
    with _StagedLines(out / "kept.jsonl") as kept, _StagedLines(out / "removed.jsonl") as removed:
        for rec, m in rows:
            records += 1
            if not m:
                kept.write(json_line(rec))
                continue
            n_removed += 1
            by_rule.update(x["rule"] for x in m)
            by_file[m[0]["benchmark"]] += 1
            removed.write(json_line({**rec, "contamination": m}))
        kept.close()
        removed.close()
        summary = summary_of({
            "records": records, "kept": records - n_removed, "removed": n_removed,
            "removed_by_rule": {"ngram": by_rule.get("ngram", 0), "rougeL": by_rule.get("rougeL", 0)},
            "removed_by_benchmark": dict(by_file.most_common())})
        claim_filtered(out, "decontaminate")
        (out / "summary.json").unlink(missing_ok=True)
        kept.place()
        removed.place()
        write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


class _StagedLines:
    """Lines written beside ``path`` as they come, moved into place (``write_atomic``) by ``place``.

    A failed write (a full disk) is one line naming ``path``. Leaving the block removes what is
    still staged (an error, or a refusal found in the rows); the name holds the pid, as
    write_atomic's temps do, so the next write of ``path`` removes one that a kill -9 left.
    """

    def __init__(self, path: Path):
        self.path, self.staged = path, path.with_name(f".{path.name}.tmp-staged-{os.getpid()}")
        self._file = self._do(open, self.staged, "w", encoding="utf-8", newline="")

    def _do(self, action, *args, **kwargs):
        try:
            return action(*args, **kwargs)
        except OSError as e:
            raise UserError(f"{self.path}: cannot write ({e.strerror or e})") from None

    def write(self, line: str) -> None:
        self._do(self._file.write, line)

    def close(self) -> None:
        self._do(self._file.close)  # its last flush may find the disk full

    def place(self) -> None:
        from selfinstruct.datafiles import write_atomic

        write_atomic(self.path, lambda tmp: os.replace(self.staged, tmp))

    def __enter__(self) -> _StagedLines:
        return self

    def __exit__(self, *exc) -> None:
        with suppress(OSError):
            self._file.close()
        self.staged.unlink(missing_ok=True)  # nothing, once placed


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from selfinstruct.config import printable

    t = Table(title="decontaminate", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    total = summary["records"] or 1
    t.add_row("rules", (f"{summary['ngram']}-gram shared" if summary["ngram"] else "n-gram rule off") + ", "
              + (f"ROUGE-L > {summary['threshold']}" if summary["threshold"] < 1 else "ROUGE-L rule off"))
    t.add_row("records", f"{summary['records']:,}")
    t.add_row("benchmark items", f"{summary['benchmark_items']:,}")
    if summary.get("wordless_items"):
        t.add_row("  [yellow]with no word[/yellow]", f"{summary['wordless_items']:,}: no a-z or 0-9 word, "
                  "so they match nothing")
    t.add_row("kept", f"{summary['kept']:,}")
    t.add_row("removed", f"{summary['removed']:,} ({100 * summary['removed'] / total:.2f}%)")
    t.add_row("  by n-gram / ROUGE-L", f"{summary['removed_by_rule']['ngram']:,} / {summary['removed_by_rule']['rougeL']:,}")
    for f, n in summary["removed_by_benchmark"].items():
        t.add_row(f"  {escape(printable(f))}", f"{n:,}")
    t.add_row("seconds", f"{summary['index_s'] + summary['check_s']:.2f}")
    t.add_row("written to", escape(printable(out)))
    Console(stderr=True).print(t)
