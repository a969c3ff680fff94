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
from pydantic import BaseModel, ConfigDict, Field
from rapidfuzz import process

from selfinstruct import config, rouge
from selfinstruct.config import OneConfig, UserError
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
    """
    from datasketch import MinHash, MinHashLSH

    _check_threshold(threshold)
    against = list(against)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sketches: dict[int, MinHash] = {}
    n_against = len(against)
    decisions: list[Decision] = []
    all_tokens = (tokenize(t) for t in _chain(against, texts))
    for pos, tokens in enumerate(all_tokens):
        if not tokens:
            if pos >= n_against:
                decisions.append(Decision(True))
            continue
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch(_shingles(tokens))
        if pos >= n_against:
            best_pos, best = -1, 0.0
            for c in lsh.query(m):
                s = m.jaccard(sketches[c])
                if s > threshold and (s > best or (s == best and c < best_pos)):
                    best_pos, best = c, s
            if best_pos >= 0:
                dup_of = best_pos - n_against if best_pos >= n_against else -(best_pos + 1)
                decisions.append(Decision(False, dup_of, float(best)))
                continue
            decisions.append(Decision(True))
        sketches[pos] = m
        lsh.insert(pos, m)
    return decisions


# ---------------------------------------------------------------------------
# reading records


class Row(NamedTuple):
    """A record as dedup reads it: written out whole, compared by its instruction (and input)."""

    record: dict
    instruction: str  # an Alpaca row's instruction, or a conversation's first user turn
    input: str = ""
    sibling: bool = False  # a later instance of the task the row before it belongs to (a run's kept record)
    user_turns: tuple[str, ...] = ()  # a conversation's user turns, all of them (decontaminate checks each)


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
    row = alpaca_row(obj, where)  # anything else must be an Alpaca row: says which field is wrong
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
        from selfinstruct.decontaminate import refuse_non_finite

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

    model_config = ConfigDict(extra="forbid")

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


def add_arguments(parser) -> None:
    """The dedup command's arguments: a data path, one flag per option, and --config."""
    parser.add_argument("data", help="Alpaca JSON or JSONL, ShareGPT or messages records (compared by their first "
                        "user turn), parquet, a datasets folder (DIR/NAME: its split NAME), or a run folder.")
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
