"""Decontamination benchmark: N records against B benchmark items, n-gram and ROUGE-L rules.

Data: B benchmark items and a base of records, both from bench/real_shape.py (long,
templated, like public instruction sets; about 46 words each); the N records are the
base records, each with two words swapped for words of another record (real_shape
makes ~250 instructions a second, too slow to make a million fresh ones). 1 record
in 1,000 is a planted copy of a benchmark item (half exact, half with a word changed
near the end), and must be found. The ROUGE-L rule checks the first --rouge-records records only, and
its time is extrapolated to N (at 1,000,000 x 100,000 it would take far over the
three minutes a benchmark here may run). The records share real_shape's frames with
the benchmark items, so far more of them match than in real data: a hard case.

Reference, in the same run: the obvious script (a Python set of 13-word tuples, each
record's windows looked up one by one) on the first --reference records, and for
ROUGE-L the full scan (``rouge.FullScanIndex``, every item scored) on --full-sample
records; both agree with ours on those records, and the ratios are printed.

    python bench/decontaminate.py                                    # 1,000,000 x 100,000
    python bench/decontaminate.py --records 20000 --bench 5000       # quick
"""

from __future__ import annotations

import argparse
import random
import resource
import time

from real_shape import instructions

from selfinstruct.decontaminate import Benchmark, _strings
from selfinstruct.rouge import FullScanIndex, tokenize


def perturb(texts: list[str], n: int, rng: random.Random) -> list[str]:
    """n records: base texts in turn, each with two words taken from another base text."""
    out = []
    for i in range(n):
        words = texts[i % len(texts)].split()
        donor = texts[rng.randrange(len(texts))].split()
        for _ in range(2):
            words[rng.randrange(len(words))] = donor[rng.randrange(len(donor))]
        out.append(" ".join(words))
    return out


def plain_ngrams(bench: list[str], records: list[str], n: int) -> list[bool]:
    """The script people write: a set of n-word tuples, each window of each record looked up."""
    grams = set()
    for b in bench:
        t = tokenize(b)
        grams.update(tuple(t[j : j + n]) for j in range(len(t) - n + 1))
    return [any(tuple(t[j : j + n]) in grams for j in range(len(t) - n + 1)) for t in map(tokenize, records)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--bench", type=int, default=100_000)
    p.add_argument("--base", type=int, default=20_000, help="distinct records made by the generator")
    p.add_argument("--shape", choices=("long", "short"), default="long",
                   help="records from real_shape (long, sharing frames with the benchmark: a hard case) or "
                        "dedup_data (short teacher-like instructions, what generate writes)")
    p.add_argument("--ngram", type=int, default=13)
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--reference", type=int, default=100_000, help="records the plain n-gram script checks")
    p.add_argument("--rouge-records", type=int, default=5000,
                   help="records the ROUGE-L rule checks (its time is extrapolated to --records)")
    p.add_argument("--full-sample", type=int, default=100, help="records the ROUGE-L full scan checks")
    a = p.parse_args()

    t = time.perf_counter()
    bench = instructions(a.bench, seed=101)
    if a.shape == "short":
        from dedup_data import instructions as short

        base = short(a.base, seed=202)
    else:
        base = instructions(a.base, seed=202)
    rng = random.Random(0)
    records = perturb(base, a.records, rng)
    planted = sorted(rng.sample(range(a.records), a.records // 1000))
    for k, i in enumerate(planted):
        src = bench[rng.randrange(a.bench)]
        if k % 2:
            words = src.split()
            words[-1] = "zzzz"
            src = " ".join(words)
        records[i] = src
    print(f"data: {a.records:,} records, {a.bench:,} benchmark items, {len(planted):,} planted "
          f"({time.perf_counter() - t:.0f} s to make)", flush=True)

    import tempfile
    import json
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.jsonl"
        path.write_text("".join(json.dumps({"question": b}) + "\n" for b in bench))
        t = time.perf_counter()
        ngram_only = Benchmark([str(path)], a.ngram, 1.0)
        t_ngram_index = time.perf_counter() - t
        t = time.perf_counter()
        rouge_only = Benchmark([str(path)], 0, a.threshold)
        t_rouge_index = time.perf_counter() - t
    texts = [(r, r) for r in records]

    t = time.perf_counter()
    ngram_hits = ngram_only.check(texts)
    t_ngram = time.perf_counter() - t
    print(f"n-gram:  index {t_ngram_index:.1f} s, check {t_ngram:.1f} s ({1e6 * t_ngram / a.records:.1f} us/record), "
          f"{sum(map(bool, ngram_hits)):,} found", flush=True)

    r = min(a.rouge_records, a.records)
    t = time.perf_counter()
    rouge_hits = rouge_only.check(texts[:r])
    t_rouge_r = time.perf_counter() - t
    t_rouge = t_rouge_r * a.records / r  # extrapolated: each record is one query against the same index
    print(f"ROUGE-L: index {t_rouge_index:.1f} s, check of {r:,} records {t_rouge_r:.1f} s "
          f"({1e6 * t_rouge_r / r:.0f} us/record; {t_rouge:.0f} s for {a.records:,} extrapolated), "
          f"{sum(map(bool, rouge_hits)):,} found", flush=True)
    seen = [i for i in planted if i < r]
    print(f"planted found by n-gram: {sum(1 for i in planted if ngram_hits[i])} of {len(planted)} (the rest are "
          f"under 14 words); within the ROUGE-L sample, by either rule: "
          f"{sum(1 for i in seen if ngram_hits[i] or rouge_hits[i])} of {len(seen)}")

    m = min(a.reference, a.records)
    t = time.perf_counter()
    plain = plain_ngrams(bench, records[:m], a.ngram)
    t_plain = time.perf_counter() - t
    agree = plain == [bool(h) for h in ngram_hits[:m]]
    ours_m = t_ngram * m / a.records
    print(f"plain set-of-tuples script on {m:,} records: {t_plain:.1f} s, ours {ours_m:.1f} s (pro rata): "
          f"{t_plain / ours_m:.1f}x; same records found: {agree}")

    k = min(a.full_sample, a.records)
    sample = sorted(random.Random(1).sample(range(r), min(k, r)))
    full = FullScanIndex(a.threshold)
    for i, b in enumerate(bench):
        full.add(b, str(i))
    t = time.perf_counter()
    dup = [full.query(records[i], nearest=1).duplicate for i in sample]
    t_full = time.perf_counter() - t
    agree = dup == [bool(rouge_hits[i]) for i in sample]
    per_full, per_ours = t_full / len(sample), t_rouge_r / r
    print(f"ROUGE-L full scan on {len(sample)} records: {1e3 * per_full:.1f} ms/record, ours {1e6 * per_ours:.1f} us/record: "
          f"{per_full / per_ours:.0f}x; same decisions: {agree} ({sum(dup)} contaminated in the sample)")
    total = t_ngram_index + t_rouge_index + t_ngram + t_rouge
    print(f"total for {a.records:,} x {a.bench:,} (index + check, both rules, ROUGE-L extrapolated): {total:.0f} s; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
