"""What a kept instruction costs the index after the query: ``RougeLIndex.add`` per text, and
one merge of the texts added since the last one into the run table (every 1/16 of the pool,
during which the generation loop stands still), with its peak RSS.

Real-shape instructions (bench/real_shape.py): the pool, then as many new ones as one merge
takes. To compare two commits, run it from each (``PYTHONPATH=<checkout>``), fresh processes,
interleaved: the figures in bench/README.md ("A merge in one compiled pass") were made so.

    python bench/merge.py                      # a 100,000 pool
    python bench/merge.py --size 1000000
"""

from __future__ import annotations

import argparse
import resource
import time

from real_shape import instructions

from selfinstruct.rouge import RougeLIndex, tokenize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=100_000, help="texts in the pool")
    args = p.parse_args()
    texts = instructions(args.size + args.size // 16, seed=11)
    pool, new = texts[: args.size], texts[args.size :]
    index = RougeLIndex(0.7)
    index.add_many(pool, range(len(pool)))
    index.prepare()
    index.merge_min = 1 << 40  # no merge while the adds are timed
    split = [tokenize(t) for t in new]
    t0 = time.perf_counter()
    for k, (text, words) in enumerate(zip(new, split)):
        index.add(text, f"n{k}", tokens=words)
    add_s = time.perf_counter() - t0
    index.query(new[0])  # what a query does first: the new postings sorted in
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    index._merge()
    merge_s = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"pool {args.size:,}: add {add_s / len(new) * 1e6:.1f} us a text ({len(new):,} texts); "
          f"a merge of them {merge_s * 1e3:.0f} ms; peak RSS {before:,.0f} MB before it, {after:,.0f} MB after")


if __name__ == "__main__":
    main()
