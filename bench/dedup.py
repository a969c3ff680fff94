"""Dedup benchmark: the self-instruct/Alpaca ROUGE-L loop vs a naive rapidfuzz loop vs ours.

All three must keep exactly the same instructions; the table says whether they do.

    python bench/dedup.py            # 2k and 20k
    python bench/dedup.py --big      # and 1M (minutes)

(a) rouge_score, pair by pair, as Alpaca's generate_instruction.py does it (it spreads
    the pairs over a process pool; here it runs in one process, so divide by the cores
    you have for its best case).
(b) the same greedy loop with tokens as characters and rapidfuzz scoring each new text
    against all kept ones in one C call: exact, but still all pairs.
(c) selfinstruct.rouge.greedy_dedup: the generation loop's RougeLIndex (exact pruning, compiled),
    then rapidfuzz on the survivors.

Then the approximate methods (--method fuzzy, minhash) on the 20k set, each against
(c): recall = the share of the records exact ROUGE-L removes that the method removes
too; precision = the share of the method's removals that exact ROUGE-L also removes.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
from dedup_data import instructions
from real_shape import instructions as real_shape_instructions

from selfinstruct import dedup, rouge


def alpaca_loop(texts: list[str], threshold: float = 0.7) -> list[bool]:
    """Alpaca's rule: tokenize once, then rouge_score's _score_lcs against every kept text."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept_tokens, out = [], []
    for text in texts:
        tokens = scorer._tokenizer.tokenize(text)
        keep = all(rouge_scorer._score_lcs(tokens, other).fmeasure <= threshold for other in kept_tokens)
        out.append(keep)
        if keep:
            kept_tokens.append(tokens)
    return out


def rapidfuzz_loop(texts: list[str], threshold: float = 0.7) -> list[bool]:
    """The same greedy loop, each new text scored against all kept ones by one cdist call."""
    from rapidfuzz import process
    from rapidfuzz.distance import Indel

    vocab: dict[str, int] = {}
    kept_seqs: list[str] = []
    kept_lens: list[int] = []
    out = []
    for text in texts:
        tokens = rouge.tokenize(text)
        seq = "".join(chr(rouge._code(vocab.setdefault(t, len(vocab)))) for t in tokens)
        keep = True
        if kept_seqs and tokens:
            dist = process.cdist([seq], kept_seqs, scorer=Indel.distance, dtype=np.int64)[0]
            lens = np.array(kept_lens)
            keep = not (rouge._f1_array((len(seq) + lens - dist) // 2, len(tokens), lens) > threshold).any()
        out.append(keep)
        if keep:
            kept_seqs.append(seq)
            kept_lens.append(len(tokens))
    return out


def ours(texts: list[str], threshold: float = 0.7) -> list[bool]:
    return [d.kept for d in rouge.greedy_dedup(texts, threshold)]


def approximate(texts: list[str], exact_kept: list[bool], methods) -> list[tuple]:
    """(method, threshold, wall s, removed, recall, precision) of each approximate method against exact."""
    exact_removed = {i for i, k in enumerate(exact_kept) if not k}
    rows = []
    for name, fn, threshold in methods:
        kept, wall, _ = timed(lambda t: [d.kept for d in fn(t, threshold)], texts)
        removed = {i for i, k in enumerate(kept) if not k}
        both = len(removed & exact_removed)
        rows.append((name, threshold, wall, len(removed), both / len(exact_removed), both / max(1, len(removed))))
        print(f"done {name} {threshold}: load average {os.getloadavg()[0]:.1f}", flush=True)
    return rows


def timed(fn, texts):
    wall, cpu = time.perf_counter(), time.process_time()
    kept = fn(texts)
    return kept, time.perf_counter() - wall, time.process_time() - cpu


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def describe(texts: list[str]) -> str:
    tokens = [rouge.tokenize(t) for t in texts]
    vocab = len({t for ts in tokens for t in ts})
    return f"{len(texts):,} instructions, {np.mean([len(t) for t in tokens]):.1f} tokens each, vocabulary {vocab:,}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big", action="store_true", help="also dedup 1,000,000 instructions with ours")
    p.add_argument("--reference", type=int, default=2000, help="size for the rouge_score loop (a)")
    p.add_argument("--naive", type=int, default=20000, help="largest size for the rapidfuzz loop (b)")
    p.add_argument("--real", type=int, default=20000, help="size of the realistic set (real_shape.py); 0: skip")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    print(f"cores: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.1f}")
    sizes = [a.reference, 20000] + ([1_000_000] if a.big else [])
    rows = []
    data = instructions(max(sizes[:2]), seed=a.seed)
    print(describe(data))
    for n in sizes:
        texts = data[:n] if n <= len(data) else instructions(n, seed=a.seed)
        results = {}
        if n <= a.reference:
            results["(a) rouge_score loop"] = timed(alpaca_loop, texts)
        if n <= a.naive:
            results["(b) rapidfuzz loop"] = timed(rapidfuzz_loop, texts)
        results["(c) greedy_dedup"] = timed(ours, texts)
        c_kept, c_wall, _ = results["(c) greedy_dedup"]
        for name, (kept, wall, cpu) in results.items():
            same = "-" if name.startswith("(c)") else ("identical" if kept == c_kept else "DIFFERENT")
            rows.append((name, n, wall, cpu, wall / c_wall, n - sum(kept), same, peak_rss_mb()))
        print(f"done {n:,}: load average {os.getloadavg()[0]:.1f}", flush=True)
    if a.real:  # long templated instructions (bench/real_shape.py): the harder case
        texts = real_shape_instructions(a.real, seed=a.seed)
        print(describe(texts))
        results = {"(b) rapidfuzz loop, real shape": timed(rapidfuzz_loop, texts),
                   "(c) greedy_dedup, real shape": timed(ours, texts)}
        c_kept, c_wall, _ = results["(c) greedy_dedup, real shape"]
        for name, (kept, wall, cpu) in results.items():
            same = "-" if name.startswith("(c)") else ("identical" if kept == c_kept else "DIFFERENT")
            rows.append((name, a.real, wall, cpu, wall / c_wall, a.real - sum(kept), same, peak_rss_mb()))

    print()
    print("| method | texts | wall s | cpu s | wall / ours | removed | kept set vs ours | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for name, n, wall, cpu, ratio, removed, same, rss in rows:
        print(
            f"| {name} | {n:,} | {wall:.2f} | {cpu:.2f} | {ratio:.1f} | {removed:,} ({removed / n:.0%}) | {same} | {rss:.0f} |"
        )

    n = 20000
    texts = data[:n]
    exact = ours(texts)
    methods = [("fuzzy", dedup.fuzzy_dedup, 0.7), ("fuzzy", dedup.fuzzy_dedup, 0.9),
               ("minhash", dedup.minhash_dedup, 0.5), ("minhash", dedup.minhash_dedup, 0.7)]
    print(f"\napproximate methods on {n:,} texts, against exact ROUGE-L > 0.7 ({n - sum(exact):,} removed):\n")
    print("| method | threshold | wall s | removed | recall | precision |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, threshold, wall, removed, recall, precision in approximate(texts, exact, methods):
        print(f"| {name} | {threshold} | {wall:.2f} | {removed:,} ({removed / n:.0%}) | {recall:.1%} | {precision:.1%} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
