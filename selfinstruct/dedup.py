"""Near-duplicate removal for any dataset: the ``dedup`` command.

``--method rougeL`` is the exact self-instruct/Alpaca rule, ``rouge.greedy_dedup``.
``fuzzy_dedup`` (rapidfuzz token_set_ratio) and ``minhash_dedup`` (datasketch LSH)
are looser alternatives. ``run`` is the command.
"""

from __future__ import annotations

import time
from dataclasses import replace
from collections.abc import Iterable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rapidfuzz import process

from selfinstruct import config, rouge
from selfinstruct.config import OneConfig, UserError, one_item_list
from selfinstruct.rouge import Decision, _chain, _check_threshold, greedy_dedup, tokenize

# ---------------------------------------------------------------------------
# looser methods for the dedup command


def normalise(text: str) -> str:
    """Lowercase, non-alphanumerics to spaces, trimmed (rapidfuzz's default_process).

    >>> normalise("  Write a Poem -- NOW!")
    'write a poem    now'
    """
    from rapidfuzz import utils

    return utils.default_process(text)


def fuzzy_dedup(
    texts: Iterable[str], threshold: float = 0.7, against: Iterable[str] = (), block: int = 512
) -> list[Decision]:
    """Greedy dedup scored by rapidfuzz ``token_set_ratio`` / 100 on normalised text.

    token_set_ratio is 1.0 whenever one text's word set contains the other's, so it
    removes more than ROUGE-L. There is no exact pruning for it: each block of texts
    is scored against every kept one (all cores), which is fine up to ~50k texts.

    >>> [d.kept for d in fuzzy_dedup(["Write a poem", "write a poem about love", "Add 2 and 3"])]
    [True, False, True]
    """
    from rapidfuzz import fuzz

    _check_threshold(threshold)
    cutoff = threshold * 100
    kept = [normalise(t) for t in against]
    kept_pos = [-(i + 1) for i in range(len(kept))]
    texts = [normalise(t) for t in texts]
    decisions: list[Decision] = []
    for start in range(0, len(texts), block):
        queries = texts[start : start + block]
        n_before = len(kept)
        scores = (
            process.cdist(queries, kept, scorer=fuzz.token_set_ratio, score_cutoff=cutoff, workers=-1, dtype=np.float64)
            if kept
            else None
        )
        for i, q in enumerate(queries):
            best_pos, best = None, 0.0
            if scores is not None:
                j = int(np.argmax(scores[i]))  # first of the best: the earliest kept
                if scores[i, j] > cutoff:
                    best_pos, best = j, float(scores[i, j])
            for j in range(n_before, len(kept)):  # kept earlier in this same block
                s = fuzz.token_set_ratio(q, kept[j])
                if s > cutoff and s > best:
                    best_pos, best = j, s
            if best_pos is None:
                decisions.append(Decision(True))
                kept.append(q)
                kept_pos.append(start + i)
            else:
                decisions.append(Decision(False, kept_pos[best_pos], best / 100))
    return decisions


def _shingles(tokens: list[str]) -> list[bytes]:
    """Token unigrams and bigrams, as bytes for datasketch.

    >>> _shingles(["write", "a", "poem"])
    [b'write', b'a', b'poem', b'write a', b'a poem']
    """
    grams = tokens + [f"{x} {y}" for x, y in pairwise(tokens)]
    return [g.encode() for g in grams]


def minhash_dedup(
    texts: Iterable[str], threshold: float = 0.7, against: Iterable[str] = (), num_perm: int = 128, seed: int = 1
) -> list[Decision]:
    """Greedy dedup by estimated Jaccard of token 1-2-gram sets (datasketch MinHash LSH).

    Approximate twice over: LSH may miss a pair, and the Jaccard is estimated from
    ``num_perm`` hashes. Its threshold is on the Jaccard scale, not ROUGE-L's. Cheap
    in memory and roughly linear, for corpora too big to care about exactness.

    The decisions are those of a datasketch ``MinHashLSH`` fed one ``MinHash`` per kept
    text (its banding, its signatures, the first of the best estimates above the
    threshold), in less memory: the signatures are rows of one array and the bands an
    index of sorted integers (``_BandIndex``). Those objects held about 6.5 KB a kept
    text (traced: 1.9 KB the MinHash, 4.6 KB the LSH's dicts), this about 0.7 KB.
    """
    from itertools import islice

    from datasketch import MinHash, MinHashLSH

    _check_threshold(threshold)
    against = list(against)
    texts = texts if isinstance(texts, list) else list(texts)
    n_against = len(against)
    # An empty MinHashLSH for its banding only: datasketch's bands x rows for this threshold.
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    index = _BandIndex(lsh.b, lsh.r)
    sketch = MinHash(num_perm=num_perm, seed=seed)  # one, cleared per text: a new one draws its permutations again
    # Room for every text, never written for the removed and empty ones: the kernel maps pages as
    # they are first written, so the RSS is the kept rows' and nothing is copied to grow it.
    sigs = np.empty((n_against + len(texts), num_perm), dtype=sketch.hashvalues.dtype)
    kept_pos = np.empty(len(sigs), dtype=np.int64)  # each signature row's text (against first), as sigs
    n_kept = 0
    decisions: list[Decision] = []
    all_tokens = (tokenize(t) for t in _chain(against, texts))
    pos = 0
    while chunk := list(islice(all_tokens, _BandIndex.block)):
        q = np.empty((len(chunk), num_perm), dtype=sigs.dtype)
        for j, tokens in enumerate(chunk):
            if tokens:
                sketch.clear()
                sketch.update_batch(_shingles(tokens))
                q[j] = sketch.hashvalues
        keys = index.keys(q)
        earlier = index.lookup(keys)  # the rows kept before this block that share a band key
        fresh: dict[int, list[int]] = {}  # a band key -> the rows kept in this block
        for j, tokens in enumerate(chunk):
            pos += 1
            if not tokens:
                if pos > n_against:
                    decisions.append(Decision(True))
                continue
            kj = keys[j].tolist()
            if pos > n_against:
                found = np.array([r for k in kj for r in fresh.get(k, ())], dtype=np.int64)
                cands = np.unique(np.concatenate([earlier.get(j, found[:0]), found]))
                best = index.best(sigs[cands], q[j], threshold) if len(cands) else None
                if best is not None:
                    c = int(kept_pos[cands[best[0]]])
                    dup_of = c - n_against if c >= n_against else -(c + 1)
                    decisions.append(Decision(False, dup_of, best[1]))
                    continue
                decisions.append(Decision(True))
            row, n_kept = n_kept, n_kept + 1
            sigs[row], kept_pos[row] = q[j], pos - 1
            for k in kj:
                fresh.setdefault(k, []).append(row)
        index.add(fresh)
    return decisions


class _BandIndex:
    """MinHashLSH's bands as sorted arrays of 64-bit keys and signature rows.

    datasketch keys a band by its values' bytes in one dict per band, each key's rows
    in a set: 4.6 KB a kept text at 14 bands (traced). Here a band is one
    uint64 (a hash of its values and its band number) and a row number, 12 bytes, in
    sorted runs merged as they grow (a block's lookups are then one searchsorted).
    Two bands' hashes may collide: that only adds a candidate, which ``best`` drops
    unless a band is equal value for value, as datasketch's bytes keys would be.
    """

    block = 4096  # texts whose band keys are looked up at once

    def __init__(self, bands: int, rows: int) -> None:
        self.bands, self.rows = bands, rows
        rng = np.random.default_rng(0)
        # Odd multipliers, one per band and row: a band's key is the wrapped sum of its values times them.
        self.mult = rng.integers(0, 2**63, (bands, rows), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys, their rows), larger first

    def keys(self, sigs: np.ndarray) -> np.ndarray:
        """Each signature's band keys: shape (len(sigs), bands), uint64."""
        banded = sigs[:, : self.bands * self.rows].reshape(len(sigs), self.bands, self.rows).astype(np.uint64)
        return (banded * self.mult).sum(axis=2, dtype=np.uint64)

    def lookup(self, keys: np.ndarray) -> dict[int, np.ndarray]:
        """For each signature (a row of ``keys``) that shares a key: the rows holding it, repeats and all."""
        flat = keys.ravel()
        found_q, found_rows = [], []
        for run_keys, run_rows in self.runs:
            lo = np.searchsorted(run_keys, flat, "left")
            n = np.searchsorted(run_keys, flat, "right") - lo
            hit = np.flatnonzero(n)
            if not len(hit):
                continue
            n_hit = n[hit]
            ends = np.cumsum(n_hit)
            at = np.repeat(lo[hit] - (ends - n_hit), n_hit) + np.arange(ends[-1])
            found_q.append(np.repeat(hit // self.bands, n_hit))
            found_rows.append(run_rows[at].astype(np.int64))
        if not found_q:
            return {}
        qs, rows = np.concatenate(found_q), np.concatenate(found_rows)
        order = np.argsort(qs, kind="stable")
        qs, rows = qs[order], rows[order]
        starts = np.flatnonzero(np.r_[True, qs[1:] != qs[:-1]])
        return dict(zip(qs[starts].tolist(), np.split(rows, starts[1:])))

    def add(self, fresh: dict[int, list[int]]) -> None:
        """Index a block's kept rows (a key -> its rows) as a run; merge runs of like size (so a key
        is moved about log2(blocks) times, and a lookup searches as many runs)."""
        if not fresh:
            return
        keys = np.fromiter((k for k, rs in fresh.items() for _ in rs), dtype=np.uint64)
        rows = np.fromiter((r for rs in fresh.values() for r in rs), dtype=np.int32)
        order = np.argsort(keys, kind="stable")
        self.runs.append((keys[order], rows[order]))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (k2, r2), (k1, r1) = self.runs.pop(), self.runs.pop()
            # Two sorted runs merged in place of a sort of both: no argsort's 8 bytes a key.
            at = np.searchsorted(k1, k2, "right") + np.arange(len(k2))
            rest = np.ones(len(k1) + len(k2), dtype=bool)
            rest[at] = False
            keys, rows = np.empty(len(rest), dtype=k1.dtype), np.empty(len(rest), dtype=r1.dtype)
            keys[at], rows[at], keys[rest], rows[rest] = k2, r2, k1, r1
            self.runs.append((keys, rows))

    def best(self, cands: np.ndarray, sig: np.ndarray, threshold: float) -> tuple[int, float] | None:
        """The first candidate of the highest estimated Jaccard above ``threshold``, and that estimate;
        only a candidate sharing a whole band counts (MinHash.jaccard's mean of equal values)."""
        equal = cands == sig
        shares_band = equal[:, : self.bands * self.rows].reshape(len(cands), self.bands, self.rows).all(2).any(1)
        score = np.count_nonzero(equal, axis=1) / equal.shape[1]
        score[~shares_band | ~(score > threshold)] = -1.0
        i = int(np.argmax(score))  # the first of the best: the earliest kept
        return (i, float(score[i])) if score[i] >= 0 else None


# ---------------------------------------------------------------------------
# reading records


class Row(NamedTuple):
    """A record as dedup reads it: written out whole, compared by its instruction (and input)."""

    record: dict
    instruction: str  # an Alpaca row's instruction, or a conversation's first user turn
    input: str = ""
    sibling: bool = False  # a later instance of the task the row before it belongs to (a run's kept record)
    user_turns: tuple[str, ...] = ()  # a conversation's user turns, all of them (decontaminate checks each)


# What dataset_row reads, as a line that is none is told (export's words, less the output Alpaca may leave out).
READS = "a record is a JSON object with instruction (alpaca), conversations (sharegpt) or messages"


def dataset_row(obj, where: str) -> Row:
    """A file's record as a Row: an Alpaca row (``input``/``output`` filled in), or a ShareGPT or
    messages conversation, kept as it is and compared by its first user turn (export's reading of it).

    The one answer to "what is a dataset record" for dedup and decontaminate (a benchmark's
    items are read more loosely, by decontaminate alone): a record of any other shape (a
    ``question`` field alone) is refused by both, with the same line.
    """
    from selfinstruct.datafiles import alpaca_row
    from selfinstruct.decontaminate import refuse_non_finite
    from selfinstruct.export import to_messages

    # A null field is one the record does not have, as the data layer reads parquet and datasets (and
    # so decontaminate and export read every file): a table of Alpaca rows and conversations together
    # holds "instruction": null in each conversation's row, which was refused here as a row missing it.
    given = {k: v for k, v in obj.items() if v is not None} if isinstance(obj, dict) else obj
    if isinstance(given, dict) and "instruction" not in given and ("conversations" in given or "messages" in given):
        users = tuple(m["content"] for m in to_messages(given, where) if m["role"] == "user")
        refuse_non_finite(obj, where)  # NaN or Infinity, kept as read, would make kept.jsonl invalid JSON
        return Row(obj, users[0], user_turns=users)
    row = alpaca_row(obj, where, record=READS)  # anything else must be an Alpaca row: says which field is wrong
    refuse_non_finite(obj, where)
    return Row({**obj, **row}, row["instruction"], row["input"])


def read_records(path: str | Path) -> list[Row]:
    """``iter_rows`` as a list; no row is one line."""
    records = list(iter_rows(path))
    if not records:
        raise UserError(f"{path}: no records")
    return records


def iter_rows(path: str | Path, quiet: bool = False) -> Iterator[Row]:
    """The Rows of a run folder, Alpaca JSON or JSONL, ShareGPT or messages records, parquet or a datasets folder.

    Read through the data layer (``selfinstruct.datafiles``): one policy for encodings,
    cut lines and errors. A run folder's tasks become one row per instance, keeping the
    task's other fields; a file's records keep theirs, with ``input``/``output`` filled in
    for Alpaca rows.
    """
    from selfinstruct.datafiles import (_is_hf_dataset_dir, is_parquet, is_run_folder, iter_json_records, iter_located,
                                        iter_models, kept_instances, refuse_filtered_folder)
    from selfinstruct.records import KeptRecord

    path = Path(path)
    if path.is_dir() and is_run_folder(path):
        from selfinstruct.datafiles import note_if_live
        from selfinstruct.decontaminate import refuse_non_finite

        note_if_live(path)

        for n, rec in enumerate(iter_models(path / "kept.jsonl", KeptRecord), 1):
            task = rec.model_dump(mode="json", exclude={"instances"})
            refuse_non_finite(task, f"{path / 'kept.jsonl'}: record {n}")  # a float field (rouge_l) may read NaN
            for k, inst in enumerate(rec.instances):
                yield Row({**task, "input": inst.input, "output": inst.output}, rec.instruction, inst.input,
                          sibling=k > 0)
    elif path.is_dir() and not _is_hf_dataset_dir(path):
        refuse_filtered_folder(path)
        raise UserError(f"{path}: a folder must be a run folder (made by selfinstruct generate) or a saved "
                        "Hugging Face dataset")
    else:
        # A JSON list or JSONL as it is, its null fields kept; parquet and a datasets folder (what
        # export writes) through the data layer's reader of them, which also names a missing path.
        located = (iter_json_records(path) if path.is_file() and not is_parquet(path)
                   else iter_located(path, True, quiet))
        for where, obj in located:
            if (insts := kept_instances(obj)) is not None:  # a run's kept.jsonl given as a file: as its run gives it
                task = {k: v for k, v in obj.items() if k != "instances"}
                for k, inst in enumerate(insts):
                    row = dataset_row({**task, **inst}, f"{where}: instance {k}")
                    yield row._replace(sibling=k > 0)
                continue
            yield dataset_row(obj, where)


# ---------------------------------------------------------------------------
# the dedup command


class DedupOptions(BaseModel):
    """Options of ``selfinstruct dedup``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # nan failed as "should be less than 1"

    threshold: float = Field(
        0.7, gt=0, lt=1, description="Remove a record whose similarity to an earlier kept one is above this (0-1)."
    )
    method: Literal["rougeL", "fuzzy", "minhash"] = Field(
        "rougeL",
        description="rougeL: exact self-instruct/Alpaca rule; fuzzy: rapidfuzz token_set_ratio; "
        "minhash: approximate Jaccard via LSH.",
    )
    against: list[str] = Field(
        [], description="Datasets whose instructions count as already kept (seed tasks, an earlier dataset)."
    )
    field: Literal["instruction", "instruction+input"] = Field(
        "instruction", description="What is compared: the instruction alone, or the instruction and its input."
    )
    out: str = Field(description="Output folder for kept.jsonl, removed.jsonl and summary.json.")

    _one_is_a_list = field_validator("against", mode="before")(one_item_list)  # `against: seeds.jsonl`, as the flag


def add_arguments(parser) -> None:
    """The dedup command's arguments: a data path, one flag per option, and --config."""
    parser.add_argument("data", metavar="RUN_OR_FILE", help="Alpaca JSON or JSONL, ShareGPT or messages records "
                        "(compared by their first user turn), parquet, a datasets folder (DIR/NAME: its split NAME), or a run folder.")
    # --out is added by hand: add_flags would print "(default: PydanticUndefined)" for a required field.
    config.add_flags(parser, DedupOptions, skip=("out",))
    parser.add_argument("--out", dest="out", default=None, help=DedupOptions.model_fields["out"].description)
    parser.add_argument("--config", action=OneConfig, default=None, help="YAML file of options; flags override it.")


def _texts(path: str, field: str) -> tuple[list[str], list[str], list[int]]:
    """The compared text and the instruction of each row of ``path`` (the same list when only the
    instruction is compared), and for each row the row whose decision it takes (its own, or, for
    the instruction alone, its task's first instance's); no row is one line.

    A self-instruct task's instances share its instruction: compared one by one, every instance
    after the first was a copy of it (score 1.0) and removed, half of such a run. Its first
    instance decides for all of them, as generate decided the task."""
    compared, instructions, decider = [], [], []
    for r in iter_rows(path):
        decider.append(decider[-1] if r.sibling and field == "instruction" else len(decider))
        compared.append(_compared_text(r, field))
        if field != "instruction":
            instructions.append(r.instruction)
    if not compared:
        raise UserError(f"{path}: no records")
    return compared, instructions if field != "instruction" else compared, decider


def _compared_text(row: Row, field: str) -> str:
    if field == "instruction+input" and row.input:
        return f"{row.instruction}\n{row.input}"
    return row.instruction


def dedup_texts(texts: list[str], threshold: float, method: str, against: list[str]) -> list[Decision]:
    """Run the chosen method."""
    if method == "rougeL":
        return greedy_dedup(texts, threshold, against)
    if method == "fuzzy":
        return fuzzy_dedup(texts, threshold, against)
    return minhash_dedup(texts, threshold, against)


def run(args) -> int:
    """``selfinstruct dedup DATA --out DIR``: write kept.jsonl, removed.jsonl, summary.json."""
    opts = config.resolve(DedupOptions, args)
    from selfinstruct.datafiles import check_filtered_name

    check_filtered_name(opts.out, "dedup")  # a file name here is a mistake: said before the input is read
    data_path = str(args.data)
    # Read and check everything before touching the output folder.
    # Only the compared texts are held: the rows are read again to be written (a million rows
    # with their outputs were 5 GB, the texts a tenth of it).
    compared, instructions, decider = _texts(data_path, opts.field)
    against_sets = [(p, _texts(p, opts.field)[:2]) for p in opts.against]
    from selfinstruct.datafiles import filtered_output, write_filtered

    with filtered_output(opts.out, "dedup", [data_path, *opts.against]) as out:
        against_refs = [(p, i, instr) for p, (_, instrs) in against_sets for i, instr in enumerate(instrs)]
        started = time.perf_counter()
        against_texts = [t for _, (texts, _) in against_sets for t in texts]
        deciding = [i for i, d in enumerate(decider) if d == i]  # each task once
        decided = dict(zip(deciding, dedup_texts([compared[i] for i in deciding], opts.threshold, opts.method,
                                                 against_texts)))
        # A dup_of among the deciding rows is a position in that list: the row it names.
        decisions = [d if d.kept or d.dup_of is None or d.dup_of < 0 else replace(d, dup_of=deciding[d.dup_of])
                     for d in (decided[decider[i]] for i in range(len(compared)))]
        seconds = time.perf_counter() - started

        def source_of(dup_of: int) -> dict:
            if dup_of >= 0:
                return {"source": data_path, "index": dup_of, "instruction": instructions[dup_of]}
            p, i, instruction = against_refs[-dup_of - 1]
            return {"source": p, "index": i, "instruction": instruction}

        n_kept = sum(d.kept for d in decisions)
        # rougeL and minhash read rouge_score's a-z/0-9 words only: text in another script gets
        # no verdict worth the name (exact copies kept), so it is counted, not passed over in silence.
        unread = {}
        if opts.method != "fuzzy":
            unread = {"unread": sum(map(rouge.unread, compared)),
                      "against_unread": sum(map(rouge.unread, against_texts))}
        summary = {
            "input": data_path,
            # export's card follows it back to the run, from whatever folder export is run in
            "input_resolved": str(Path(data_path).resolve()),
            "against": list(opts.against),
            "records": len(compared),
            "against_records": len(against_refs),
            "kept": n_kept,
            "removed": len(compared) - n_kept,
            "method": opts.method,
            "threshold": opts.threshold,
            "field": opts.field,
            "seconds": round(seconds, 3),
            **unread,
        }
        again = lambda: zip(decisions, iter_rows(data_path, quiet=True))  # noqa: E731
        write_filtered(out, "dedup", (r.record for d, r in again() if d.kept),
                       ({**r.record, "duplicate_of": source_of(d.dup_of), "score": d.score}
                        for d, r in again() if not d.kept), summary)
    _print_summary(summary, out)
    return 0


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dedup", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    total = summary["records"] or 1
    table.add_row("method", f"{summary['method']}, threshold {summary['threshold']}")
    table.add_row("records", f"{summary['records']:,}")
    if summary["against_records"]:
        table.add_row("against", f"{summary['against_records']:,}")
    table.add_row("kept", f"{summary['kept']:,}")
    table.add_row("removed", f"{summary['removed']:,} ({100 * summary['removed'] / total:.1f}%)")
    for key, what in (("unread", "records"), ("against_unread", "against")):
        if summary.get(key):
            table.add_row(f"  [yellow]{what} not in a-z/0-9[/yellow]",
                          f"{summary[key]:,}: mostly another script, which {summary['method']} cannot compare; "
                          "try --method fuzzy")
    table.add_row("seconds", f"{summary['seconds']:.2f}")
    table.add_row("written to", str(out))
    Console().print(table)
