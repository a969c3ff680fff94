"""Where the ROUGE-L index's compiled pass spends a candidate, on bench/scale.py's data.

The pass (``rouge_jit.candidates``) reads postings, counts hits on texts, then runs two
Bloom checks (bound 5) on the texts with enough hits. This prints, per candidate, how
many postings the lookups' runs hold, how many are read (the rest of a run past bound 3's
j is skipped), how many texts reach the Bloom checks, how many pass the folded words and
how many come out; then the pass's own CPU time on one thread, and the same with the Bloom
checks left out (a copy of the pass whose answers are discarded), so the split between
reading postings and checking texts is measured, not guessed.

The counting and the split run on copies of the pass made from its source with a few lines
added: the script stops with an error if the source no longer has the lines it hooks into.

    python bench/scale.py --sizes 100000 --skip-old --requests 2000   # builds the data once (cached)
    python bench/kernel_work.py 100000
"""

from __future__ import annotations

import argparse
import inspect
import time

import numpy as np



def _patched(fn, edits: list[tuple[str, str]], extra_arg: str | None = None):
    """A compiled copy of ``fn`` (a numba function of rouge_jit) with each (old, new) edit made to its source."""
    from numba import njit

    from selfinstruct import rouge_jit

    src = inspect.getsource(fn.py_func).replace("@_jit(nogil=True)\n", "")
    for old, new in edits:
        if src.count(old) != 1:
            raise SystemExit(f"rouge_jit.candidates changed: cannot find {old.strip()!r} once; update bench/kernel_work.py")
        src = src.replace(old, new)
    if extra_arg:
        src = src.replace("clock, stamps):", f"clock, stamps, {extra_arg}):", 1)
    space = dict(vars(rouge_jit))
    exec(src, space)  # noqa: S102 - the project's own source, edited above
    return njit(nogil=True)(space["candidates"])


COUNT_EDITS = [
    ("            for r in range(look_lo[lk], look_hi[lk]):\n",
     "            for r in range(look_lo[lk], look_hi[lk]):\n                cnt[0] += run_at[r + 1] - run_at[r]\n"),
    ("                    n_touched = _hit(state, touched, n_touched, np.int64(post_id[p]), b, j, full, room, once, twice)\n",
     "                    cnt[1] += 1\n"
     "                    n_touched = _hit(state, touched, n_touched, np.int64(post_id[p]), b, j, full, room, once, twice)\n"),
    ("                n_touched = _hit(state, touched, n_touched, t, b, j, full, room, once, twice)\n",
     "                cnt[2] += 1\n                n_touched = _hit(state, touched, n_touched, t, b, j, full, room, once, twice)\n"),
    ("        n_left = 0\n", "        n_left = 0\n        cnt[3] += n_touched\n"),
    ("        for s in range(n_left):\n", "        cnt[4] += n_left\n        for s in range(n_left):\n"),
    ("            out_q[n_out] = q\n", "            cnt[5] += 1\n            out_q[n_out] = q\n"),
]
NAMES = ["postings in the runs looked up", "postings read", "delta postings read", "texts to the Bloom checks",
         "texts past the folded words", "texts out (scored exactly)"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pool", type=int, help="pool size bench/scale.py built (its pool-N-0.jsonl)")
    p.add_argument("--requests", type=int, default=None, help="its replies file's count (default: 2000, or 1000 at 1M)")
    p.add_argument("--replies", type=int, default=400, help="replies decided (x15 candidates)")
    a = p.parse_args()

    from decide import decider  # (bench/ is on the path: this script's own folder)

    from selfinstruct import rouge_jit

    counted = _patched(rouge_jit.candidates, COUNT_EDITS, "cnt")
    no_bloom = _patched(rouge_jit.candidates, [("        n_left = 0\n", "        n_left = 0\n        n_touched = 0\n")])
    proc, resps = decider(a.pool, a.requests, a.replies + 5)
    proc.pool.index.threads = 1  # one thread: its CPU time is the pass's
    proc.process_many(resps[:5])  # the compiled code loaded and the pool's Bloom words made, as generate does

    original = rouge_jit.candidates
    cnt = np.zeros(len(NAMES), dtype=np.int64)
    cpu = {"whole": 0.0, "postings": 0.0}
    warm = []

    def measured(*args):
        if not warm:  # each copy compiles at its first call: not timed
            counted(*args, np.zeros_like(cnt))
            no_bloom(*args)
            warm.append(True)
        counted(*args, cnt)
        t = time.thread_time()
        out = original(*args)
        cpu["whole"] += time.thread_time() - t
        t = time.thread_time()
        no_bloom(*args)  # the same postings, cache as warm as the call above left it
        cpu["postings"] += time.thread_time() - t
        return out

    rouge_jit.candidates = measured
    try:
        for s in range(5, len(resps), 20):
            proc.process_many(resps[s : s + 20])
    finally:
        rouge_jit.candidates = original
    n = (len(resps) - 5) * 15
    print(f"pool {a.pool:,}, {n:,} candidates; per candidate:")
    for name, value in zip(NAMES, cnt.tolist()):
        print(f"  {value / n:>12,.1f}  {name}")
    whole, postings = 1e6 * cpu["whole"] / n, 1e6 * cpu["postings"] / n
    print(f"  {whole:>12,.0f}  us of the pass (one thread), of which {postings:,.0f} reading postings "
          f"and {whole - postings:,.0f} the Bloom checks")


if __name__ == "__main__":
    main()
