"""The compiled inner loop of ``rouge.RougeLIndex``: bounds 3 and 5 over every posting a batch
of queries reaches, in one pass and without materializing the hits.

Written with numba because the work is a scan over tens of thousands of postings per
query with per-text counters, and numpy can only do it by building arrays of every hit,
sorting them and gathering signatures for each surviving pair: at a 100,000 pool that
was ~4 ms a query in array temporaries (bench/README.md). numba is a wheel on PyPI (vLLM
depends on it too); the functions compile on first use and are cached on disk.

Imported only by ``RougeLIndex`` queries, so ``selfinstruct --help`` does not pay for
numba's import.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


def _jit(**options):
    """``njit(cache=True)``; where numba finds no writable place for its disk cache (a
    read-only install and no writable home), plain ``njit``: each process then compiles
    at its first index build and query (about 9 s) instead of failing on import."""

    def decorate(fn):
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError as e:
            if "no locator available" not in str(e):
                raise
            return njit(**options)(fn)

    return decorate


@intrinsic
def _prefetch(typingctx, array, index):
    """Start loading ``array[index]`` (1-D) into the cache, without waiting for it (llvm.prefetch).

    The kernel's costly reads are random ones into per-text arrays too big for the
    cache (``state``, ``sigs``); it knows those addresses a few texts ahead, and asking
    for them early lets the loads overlap: 1.6-2x on ``candidates`` at a 100,000 pool.
    numba has no prefetch of its own, hence the LLVM intrinsic.
    """

    def codegen(context, builder, signature, args):
        kind = signature.args[0]
        values = context.make_array(kind)(context, builder, args[0])
        at = cgutils.get_item_pointer(context, builder, kind, values, [args[1]], wraparound=False)
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        # read (0), keep in all cache levels (3), data cache (1)
        builder.call(fn, [builder.bitcast(at, byte_ptr), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, types.intp), codegen


_AHEAD = 32  # texts prefetched ahead in the passes over the touched (8: 1.14x slower at a 1,000,000 pool)
_TEXT = np.int64((1 << 40) - 1)  # a text's number in a packed touched entry
STAMPS = 1 << 7  # candidates' query stamps run below this (a stamp and a bit in a byte)
_AHEAD_POSTINGS = 16  # postings ahead whose text's counter is prefetched (~15% at a 1,000,000 pool)


@_jit(inline="always")
def _popcount(x):
    # SWAR popcount (LLVM turns it into one popcnt where the CPU has it).
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int64((x * _H01) >> np.uint64(56))  # int64, so a sum with int64 stays an integer


@_jit(inline="always")
def _overlap(a_layers, q, depth, extra, sigs, t, need):
    """Bound 5 of ``RougeLIndex``: does the Bloom count of |A & B| reach need?

    Inlined where it is called: as a call (numba compiles each function apart) it cost
    the folded test over 20,000 texts a query at a 1,000,000 pool a tenth of the pass."""
    words = sigs.shape[2]
    bound = 0
    for w in range(words):
        bound += _popcount(a_layers[q, 0, w] & sigs[t, 0, w])
    if depth > 1:
        if bound + extra < need:  # even all of A's deeper bits would not reach
            return False
        for level in range(1, depth):
            for w in range(words):
                bound += _popcount(a_layers[q, level, w] & sigs[t, 1, w])
    return bound >= need


@_jit(inline="always")
def _folded_bound(f_layers, q, depth, folds, t):
    """Bound 5's count on the folded words (``_overlap``'s), every layer summed, with no
    branch on the text: the same answer to ``>= need`` as ``_overlap``, whose early exit
    says no only where the sum cannot reach need."""
    bound = 0
    for w in range(folds.shape[2]):
        bound += _popcount(f_layers[q, 0, w] & folds[t, 0, w])
        for level in range(1, depth):
            bound += _popcount(f_layers[q, level, w] & folds[t, 1, w])
    return bound


@_jit(inline="always")
def _hit(state, touched, n_touched, t, b, j, full, room, once, twice):
    """Count a hit that passed bound 3 on text t (length b, at j in its order); ``room`` is
    m - i, the query's elements from this lookup's on. Returns the new ``n_touched``."""
    old = state[t]
    if old == twice:
        return n_touched
    if old != once:
        # A text's first hit is its first shared element, which bound 3 places within the
        # unloosened limits: one past them shares too little (at a 1,000,000 pool, a sixth
        # of the texts a query reached).
        if full > room or full > b - j:
            return n_touched
        if full >= 2:  # two hits needed (rouge._reach)
            state[t] = once
            return n_touched
    state[t] = twice
    touched[n_touched] = b << np.int64(40) | t
    return n_touched + 1


@_jit(nogil=True)
def candidates(first, last, lk, look_q, look_i, look_lo, look_hi, runs, run_at, post_j, post_id, d_lo, d_hi, d_packed,
               need, width, m_of, a_layers, depth_of, extra_of, sigs, f_layers, f_depth_of, folds,
               state, touched, clock, stamps):
    """The (query, text) pairs that pass bounds 3 and 5 of ``RougeLIndex``'s docstring (bound 4
    follows from bound 3), for queries ``first``..``last - 1``, whose lookups start at ``lk``.

    Lookup k (sorted by query, then by i) reads the main postings' runs [look_lo[k],
    look_hi[k]) (``runs``: element << 12 | b, sorted; run r's postings are
    [run_at[r], run_at[r + 1]), their j in ``post_j``, ascending, and their texts in
    ``post_id``) and the delta's postings d_packed[d_lo[k]:d_hi[k]] (b << 44 | j << 32 |
    text). Each posting that passes bound 3 is counted on its text; a text with enough hits
    goes on to bound 5 (Bloom: first the text's two folded words ``folds``, then its full
    words ``sigs`` for the few that pass). Within a run the postings go by j, so where
    bound 3 fails the rest of the run fails too and is not read.

    ``state`` has one byte per text and ``touched`` one int64 (scratch given, so that the
    hot loop never grows an array: that cost 1.5-2x). A text's byte is its query's stamp
    << 1 | whether it has two hits: a hit costs one random read and write, in an array
    small enough to stay in the cache (8 bytes a text, with the last hit's positions for
    bound 4, was 1.1-1.2x slower at a 1,000,000 pool). Each query takes the next stamp from
    ``clock[0]`` (1 to ``stamps`` - 1, then ``state`` is cleared and they start again), and a
    byte with another stamp counts as no hit, so nothing is zeroed after a query. A text
    joins ``touched`` (as b << 40 | text) at its second hit, or its first where one is
    enough: at a 1,000,000 pool three texts in five that a query reaches share one element
    only, and the pass after the postings never reads them.

    It runs without the GIL: ``RougeLIndex`` splits a batch's queries over threads, each
    with its own ``state``, ``touched`` and ``clock``.
    """
    mask = np.int64(4095)
    flat_sigs, stride = sigs.reshape(-1), sigs.shape[1] * sigs.shape[2]
    flat_folds = folds.reshape(-1)
    out_q = np.empty(1024, dtype=np.int64)
    out_t = np.empty(1024, dtype=np.int64)
    n_out = 0
    for q in range(first, last):
        clock[0] += 1
        if clock[0] >= stamps:
            state[:] = 0
            clock[0] = 1
        once = np.uint8(clock[0] << 1)  # this query's stamp, one hit
        twice = once | np.uint8(1)
        n_touched = 0
        m = m_of[q]
        row = q * width
        while lk < len(look_q) and look_q[lk] == q:
            room = m - look_i[lk]
            ahead_end = run_at[look_hi[lk]]
            for r in range(look_lo[lk], look_hi[lk]):
                b = runs[r] & mask
                full = need[row + min(b, width - 1)]
                nd = full - 1 if full >= 2 else full  # two shared elements, one position further (rouge._reach)
                if nd > room:  # bound 3, for the whole run
                    continue
                last_j = b - nd  # bound 3: j <= b - nd
                for p in range(run_at[r], run_at[r + 1]):
                    j = np.int64(post_j[p])
                    if j > last_j:
                        break  # the rest of the run is further on
                    if p + _AHEAD_POSTINGS < ahead_end:
                        _prefetch(state, np.int64(post_id[p + _AHEAD_POSTINGS]))
                    n_touched = _hit(state, touched, n_touched, np.int64(post_id[p]), b, j, full, room, once, twice)
            for p in range(d_lo[lk], d_hi[lk]):
                packed = d_packed[p]
                b, j, t = packed >> np.int64(44), (packed >> np.int64(32)) & mask, packed & np.int64(0xFFFFFFFF)
                full = need[row + min(b, width - 1)]
                nd = full - 1 if full >= 2 else full
                if nd > room or nd > b - j:  # bound 3
                    continue
                n_touched = _hit(state, touched, n_touched, t, b, j, full, room, once, twice)
            lk += 1
        # Two passes over the texts with enough hits: the folded words (dense, small) keep a
        # few in touched[:n_left], each as need << 40 | text; only those read their full
        # words, which are the random reads that miss the cache at a large pool.
        n_left = 0
        f_depth = f_depth_of[q]
        for s in range(n_touched):
            if s + _AHEAD < n_touched:
                _prefetch(flat_folds, (touched[s + _AHEAD] & _TEXT) * 2)
            t, b = touched[s] & _TEXT, touched[s] >> np.int64(40)
            nd = need[row + min(b, width - 1)]
            # bound 5 on the words folded to 64 bits (``layers``, ``sign``): one cache line
            # of a dense array, where the 512 bits are two lines of a far larger one. Every
            # text is written and the count moves by the test (no branch on it, nor an early
            # exit: each mispredicts on about one text in five): 3-5% of the pass at 1,000,000.
            touched[n_left] = nd << np.int64(40) | t
            n_left += _folded_bound(f_layers, q, f_depth, folds, t) >= nd
        for s in range(n_left):
            if s + _AHEAD < n_left:
                ahead = touched[s + _AHEAD] & _TEXT
                _prefetch(flat_sigs, ahead * stride)  # its layer 0 and layer 1: a cache line each
                _prefetch(flat_sigs, ahead * stride + sigs.shape[2])
            t, nd = touched[s] & _TEXT, touched[s] >> np.int64(40)
            if not _overlap(a_layers, q, depth_of[q], extra_of[q], sigs, t, nd):
                continue
            if n_out == len(out_q):
                out_q = np.concatenate((out_q, np.empty_like(out_q)))
                out_t = np.concatenate((out_t, np.empty_like(out_t)))
            out_q[n_out] = q
            out_t[n_out] = t
            n_out += 1
    return out_q[:n_out], out_t[:n_out]


@_jit()
def elements(known, rank, reps):
    """A text's elements (token id << 12 | repeat number) from its token ids, rarest first:
    the order of bound 3's prefixes, for a query's lookups and an added text's postings alike.

    An element's rank is its token's and repeat number's: ``rank[token * reps + min(repeat,
    reps - 1)]``, larger is rarer (``RougeLIndex._rebuild``), so a token's second or third
    use can come before a rarer token's first. Elements of one rank (a token's repeats from
    ``reps - 1`` on) go by repeat number, so the order is total."""
    n = len(known)
    by_token = np.argsort(known)  # a token's uses adjacent; repeats are interchangeable
    key = np.empty(n, dtype=np.int64)
    elems = np.empty(n, dtype=np.int64)
    prev, rep = -1, 0
    for k in range(n):
        token = known[by_token[k]]
        rep = rep + 1 if token == prev else 0
        prev = token
        key[k] = rep - (rank[token * reps + min(rep, reps - 1)] << np.int64(12))
        elems[k] = token << np.int64(12) | rep
    return elems[np.argsort(key)]


@_jit()
def element_counts(codes, ends, surrogates, vocab, reps):
    """How many times each (token, repeat number) slot of ``elements`` occurs in the texts
    (codes, one text after another, ending at ``ends``): the frequencies they are ranked by."""
    counts = np.zeros(vocab * reps, dtype=np.int64)
    seen = np.zeros(vocab, dtype=np.int64)  # per token: its uses so far in this text
    lo = 0
    for text in range(len(ends)):
        for k in range(lo, ends[text]):
            token = _token_id(codes[k], surrogates)
            counts[token * reps + min(seen[token], reps - 1)] += 1
            seen[token] += 1
        for k in range(lo, ends[text]):
            seen[_token_id(codes[k], surrogates)] = 0
        lo = ends[text]
    return counts


@_jit()
def postings(codes, ends, surrogates, rank, reps, least):
    """The postings of every text (codes, one text after another, ending at ``ends``): each
    text's first b - least[b] + 1 elements (``elements``'s order; none where least[b] > b),
    as keys element << 24 | b << 12 | j (j: the element's place in the text's order) and
    their texts."""
    total = 0
    for text in range(len(ends)):
        b = ends[text] - (ends[text - 1] if text > 0 else 0)
        if b < len(least):
            total += max(0, min(b, b - least[b] + 1))
    keys = np.empty(total, dtype=np.int64)
    texts = np.empty(total, dtype=np.uint32)
    n = 0
    for text in range(len(ends)):
        lo = ends[text - 1] if text > 0 else 0
        b = ends[text] - lo
        if b >= len(least) or b - least[b] + 1 <= 0:
            continue
        ids = np.empty(b, dtype=np.int64)
        for k in range(b):
            ids[k] = _token_id(codes[lo + k], surrogates)
        elems = elements(ids, rank, reps)
        for j in range(min(b, b - least[b] + 1)):
            keys[n] = elems[j] << np.int64(24) | b << np.int64(12) | j
            texts[n] = text
            n += 1
    return keys, texts


@_jit()
def merge_runs(runs, run_at, post_j, post_id, new_runs, new_j, new_id):
    """The run table (``candidates``' runs, run_at, post_j, post_id) with new postings merged
    in: ``new_runs`` (element << 12 | b), ``new_j`` and ``new_id``, sorted by run and j. Within
    a run the postings stay sorted by j, a new one after the old ones of its j.

    One pass that writes each posting once: numpy did it by rebuilding every posting's
    full key, searching and inserting (at a 100,000 pool about 150 ms a merge, and at a
    1,000,000 pool 140 MB of keys at the peak)."""
    n_runs, n_new = len(runs), len(new_runs)
    out_runs = np.empty(n_runs + n_new, dtype=np.int64)
    out_at = np.empty(n_runs + n_new + 1, dtype=np.int64)
    out_j = np.empty(len(post_j) + n_new, dtype=np.uint16)
    out_id = np.empty(len(post_id) + n_new, dtype=np.uint32)
    r = k = o = nr = 0
    while r < n_runs or k < n_new:
        if k == n_new or (r < n_runs and runs[r] < new_runs[k]):
            key = runs[r]
        else:
            key = new_runs[k]
        out_runs[nr] = key
        out_at[nr] = o
        nr += 1
        p, stop = 0, 0
        if r < n_runs and runs[r] == key:
            p, stop = run_at[r], run_at[r + 1]
            r += 1
        while p < stop or (k < n_new and new_runs[k] == key):
            if k < n_new and new_runs[k] == key and (p == stop or new_j[k] < post_j[p]):
                out_j[o] = new_j[k]
                out_id[o] = new_id[k]
                k += 1
            else:
                out_j[o] = post_j[p]
                out_id[o] = post_id[p]
                p += 1
            o += 1
    out_at[nr] = o
    return out_runs[:nr].copy(), out_at[: nr + 1].copy(), out_j, out_id


@_jit()
def merge_sorted(keys, values, new_keys, new_values):
    """Two arrays sorted by key (``values`` beside ``keys``) merged into one: the index's delta
    and the postings of the texts added since (``RougeLIndex._flush``), a new entry after the
    old ones of its key. One pass; numpy's ``insert`` took several (a search, a mask, copies)."""
    n, m = len(keys), len(new_keys)
    out_k = np.empty(n + m, dtype=keys.dtype)
    out_v = np.empty(n + m, dtype=values.dtype)
    i = k = 0
    for o in range(n + m):
        if k == m or (i < n and keys[i] <= new_keys[k]):
            out_k[o], out_v[o] = keys[i], values[i]
            i += 1
        else:
            out_k[o], out_v[o] = new_keys[k], new_values[k]
            k += 1
    return out_k, out_v


@_jit()
def sorted_search(hay, keys, order):
    """``np.searchsorted(hay, keys)`` (side left) for keys that ``order`` sorts: each search
    gallops on from the answer before it (steps 1, 2, 4, ... then a binary search within the
    last step). numpy's starts each key from the last answer too, but then bisects all the
    rest of ``hay``: at a 100,000 pool, a group's 6,000 lookups into 400,000 runs (and 3,000
    into the delta, unsorted before) took 0.6-0.8 ms that way, 0.25-0.4 ms this way. (No
    doctest: pytest imports this file as a module of its own, and numba's cache then names
    that module, which a process importing the package cannot load.)
    """
    n = len(hay)
    out = np.empty(len(keys), dtype=np.int64)
    lo = 0  # every key before this one's is at or above hay[lo - 1]
    for k in range(len(order)):
        x = keys[order[k]]
        step, hi = 1, lo
        while hi < n and hay[hi] < x:
            lo = hi + 1
            hi = lo + step
            step <<= 1
        hi = min(hi, n)
        while lo < hi:  # the answer is in [lo, hi]: hay[hi] >= x, or hi == n
            mid = (lo + hi) >> 1
            if hay[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        out[order[k]] = lo
    return out


@_jit()
def lookups(ids, starts, rank, reps, take, shortest, longest):
    """The lookups of a batch of queries (bound 3's prefix, ``RougeLIndex``): query q's known
    token ids ``ids[starts[q]:starts[q + 1]]`` become elements (id << 12 | repeat number),
    rarest first (``elements``); its first ``take[q]`` each read the lengths b from
    ``shortest[q]`` to ``longest[q, m - i]`` (the longest b whose need fits in what is left),
    and stop where that falls below the shortest. Returns (query, i, element, lowest b,
    highest b) per lookup, sorted by query, then i."""
    total = 0
    for q in range(len(take)):
        total += take[q]
    look_q = np.empty(total, dtype=np.int64)
    look_i = np.empty(total, dtype=np.int64)
    look_e = np.empty(total, dtype=np.int64)
    look_lo = np.empty(total, dtype=np.int64)
    look_hi = np.empty(total, dtype=np.int64)
    n = 0
    for q in range(len(take)):
        if take[q] <= 0:
            continue
        known = ids[starts[q] : starts[q + 1]]
        m = len(known)
        elems = elements(known, rank, reps)
        for i in range(take[q]):
            hi = longest[q, m - i]
            if hi < shortest[q]:
                break  # the bound only shrinks further on
            look_q[n], look_i[n], look_e[n] = q, i, elems[i]
            look_lo[n], look_hi[n] = shortest[q], hi
            n += 1
    return look_q[:n], look_i[:n], look_e[:n], look_lo[:n], look_hi[:n]


@_jit()
def _stack(counts, words):
    """Layers of per-bit counts (n, words * 64): layer l holds the bits counted more than l
    times. Returns (layers, depth = the largest count, bits past layer 0 = sum of count - 1)."""
    n = len(counts)
    depth = np.zeros(n, dtype=np.int64)
    extra = np.zeros(n, dtype=np.int64)
    for q in range(n):
        for bit in range(words * 64):
            c = counts[q, bit]
            depth[q] = max(depth[q], c)
            extra[q] += max(c - 1, 0)
    out = np.zeros((n, max(1, depth.max() if n else 1), words), dtype=np.uint64)
    for q in range(n):
        for bit in range(words * 64):
            word, one = bit >> 6, np.uint64(1) << np.uint64(bit & 63)
            for level in range(counts[q, bit]):
                out[q, level, word] |= one
    return out, depth, extra


@_jit()
def layers(ids, starts, bits, words):
    """Each query's Bloom layers for bound 5 (``RougeLIndex``), from its known token ids
    ``ids[starts[q]:starts[q + 1]]`` and each token's bit: layer l holds the bits that more
    than l of the query's tokens set. Returns (layers, depth per query, bits past layer 0),
    then the same three for the bits folded to one word (bit x to x mod 64, as ``sign``'s
    ``folds``): folding adds counts, so the folded bound is looser but never below |A & B|."""
    n = len(starts) - 1
    counts = np.zeros((n, words * 64), dtype=np.int64)
    folded = np.zeros((n, 64), dtype=np.int64)
    for q in range(n):
        for k in range(starts[q], starts[q + 1]):
            bit = bits[ids[k]]
            counts[q, bit] += 1
            folded[q, bit & 63] += 1
    out, depth, extra = _stack(counts, words)
    f_out, f_depth, f_extra = _stack(folded, 1)
    return out, depth, extra, f_out, f_depth, f_extra


@_jit(inline="always")
def _token_id(code, surrogates):
    """A token's id from its code point (``rouge._code`` skips the surrogate block)."""
    start_of_skip, skip = surrogates
    code = np.int64(code)
    return code - skip if code >= start_of_skip + skip else code


@_jit()
def sign(codes, ends, first, last, bits, surrogates, sigs, folds):
    """Bloom words of texts ``first``..``last - 1`` into ``sigs``: [0] the bits their tokens set,
    [1] those set by two tokens or more (bound 5 of ``RougeLIndex``); codes are token ids with the
    surrogate block skipped (``rouge._code``). ``folds`` gets the same two sets with bit x
    moved to x mod 64: [0] set by one token or more, [1] by two or more."""
    words = sigs.shape[2]
    counts = np.zeros(words * 64, dtype=np.int64)
    for text in range(first, last):
        lo = ends[text - 1] if text > 0 else 0
        for w in range(words):
            sigs[text, 0, w] = 0
            sigs[text, 1, w] = 0
        for k in range(lo, ends[text]):
            bit = bits[_token_id(codes[k], surrogates)]
            counts[bit] += 1
            word, one = bit >> 6, np.uint64(1) << np.uint64(bit & 63)
            sigs[text, 0, word] |= one
            if counts[bit] == 2:
                sigs[text, 1, word] |= one
        for k in range(lo, ends[text]):
            counts[bits[_token_id(codes[k], surrogates)]] = 0
        once, twice = np.uint64(0), np.uint64(0)
        for w in range(words):
            twice |= (once & sigs[text, 0, w]) | sigs[text, 1, w]
            once |= sigs[text, 0, w]
        folds[text, 0, 0], folds[text, 1, 0] = once, twice


_PAIR_LAYERS, _PAIR_WORDS = 4, 8  # overlap_pairs' signatures: a token's 1st..4th copy, 512 bits each


@_jit(inline="always")
def _pair_bit(code):
    """A code's bit in ``_layered``'s 512 (a multiplicative hash's top 9 bits, as ``rouge._bit`` makes a
    token id's for the pool's own words: these are codes, hashed anew within one call)."""
    return (np.uint64(code) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(55)


@_jit()
def _layered(codes, ends):
    """Per text, the layers of ``overlap_pairs``: layer l holds the bits (``_pair_bit``) set by more
    than l of its tokens, for l under ``_PAIR_LAYERS``; with how many layers
    are not empty, and how many tokens went past the last layer."""
    n = len(ends)
    sig = np.zeros((n, _PAIR_LAYERS, _PAIR_WORDS), dtype=np.uint64)
    depth = np.zeros(n, dtype=np.int64)
    excess = np.zeros(n, dtype=np.int64)
    counts = np.zeros(_PAIR_WORDS * 64, dtype=np.int64)
    for t in range(n):
        lo = ends[t - 1] if t > 0 else 0
        for k in range(lo, ends[t]):
            bit = _pair_bit(codes[k])
            c = counts[bit]
            if c < _PAIR_LAYERS:
                sig[t, c, bit >> np.uint64(6)] |= np.uint64(1) << (bit & np.uint64(63))
                depth[t] = max(depth[t], c + 1)
            else:
                excess[t] += 1
            counts[bit] = c + 1
        for k in range(lo, ends[t]):
            counts[_pair_bit(codes[k])] = 0
    return sig, depth, excess


@_jit(nogil=True)
def overlap_pairs(codes, ends, codes_b, ends_b, same, above, most):
    """The pairs (i, j) of texts (``codes`` split at ``ends``) and others (``codes_b``, ``ends_b``;
    with ``same`` the texts themselves, j >= i) that may score above ``above``: those whose bound on
    the tokens they share reaches the LCS such a score needs, less 2 (``rouge._min_lcs``: every LCS two
    below ``above * (m + n) / 2`` scores below it).

    The bound is the sum over the 512 bits of the fewer of the two texts' tokens on each bit (the
    layers of ``_layered`` and-ed, a layer at a time, plus the fewer of their tokens past the last
    layer): at least the tokens they share, so at least their LCS. A generation group's pairs at a
    floor of 0.7 are mostly far apart: 171 of 199,000 pass (164 score above it), each of the others
    for a few popcounts instead of rapidfuzz's LCS. Past ``most`` pairs it stops (``most + 1`` returned):
    the caller scores every pair another way."""
    sig, depth, excess = _layered(codes, ends)
    if same:
        sig_b, depth_b, excess_b = sig, depth, excess
    else:
        sig_b, depth_b, excess_b = _layered(codes_b, ends_b)
    n, n_b = len(ends), len(ends_b)
    cap = max(64, n + n_b)
    out_i = np.empty(cap, dtype=np.int64)
    out_j = np.empty(cap, dtype=np.int64)
    found = 0
    for i in range(n):
        m = ends[i] - (ends[i - 1] if i > 0 else 0)
        if m == 0:
            continue
        for j in range(i if same else 0, n_b):
            b = ends_b[j] - (ends_b[j - 1] if j > 0 else 0)
            if b == 0:
                continue
            need = np.int64(above * (m + b) / 2) - 2
            if need > min(m, b):
                continue
            bound = min(excess[i], excess_b[j])
            for level in range(min(depth[i], depth_b[j])):
                for w in range(_PAIR_WORDS):
                    bound += _popcount(sig[i, level, w] & sig_b[j, level, w])
            if bound < need:
                continue
            if found == cap:
                cap *= 2
                grown_i, grown_j = np.empty(cap, dtype=np.int64), np.empty(cap, dtype=np.int64)
                grown_i[:found], grown_j[:found] = out_i[:found], out_j[:found]
                out_i, out_j = grown_i, grown_j
            out_i[found], out_j[found] = i, j
            found += 1
            if found > most:
                return out_i[:found].copy(), out_j[:found].copy()
    return out_i[:found].copy(), out_j[:found].copy()


LCS_WORDS = 8  # lcs_pairs takes queries of up to 64 * this many tokens
_AHEAD_PAIRS = 4  # texts whose codes lcs_pairs fetches ahead


@_jit(nogil=True)
def lcs_pairs(ids, starts, pair_q, pair_t, codes, ends, surrogates, slot):
    """LCS length of each (query, text) pair: query q's token ids are ``ids[starts[q]:starts[q + 1]]``,
    text t's codes those of ``sign``; pairs come grouped by query. -1 where the query is longer
    than ``LCS_WORDS`` * 64 tokens (the caller scores those otherwise).

    Bit-parallel LCS (Hyyrö 2004): one bit per query position, V = (V + U) | (V & ~U) with
    U = V & positions of the text's next token, and the LCS is the zeros among V's m bits.
    A text token that is not in the query leaves V as it is, so it costs one lookup:
    ``slot`` (one int32 per token id, -1 outside the query at hand, and -1 again on return)
    gives the query's own numbering of its distinct tokens. Written here, not with
    rapidfuzz, because rapidfuzz needs each text as a Python string, and gathering and
    decoding the survivors cost as much as scoring them; here the texts' codes are fetched a
    few pairs ahead instead. At a 1,000,000 pool (87 survivors a query) that halved the
    scoring: about 45 us a query instead of 100 (same answers).
    """
    n = len(pair_q)
    out = np.full(n, -1, dtype=np.int64)
    masks = np.zeros((LCS_WORDS * 64, LCS_WORDS), dtype=np.uint64)  # per distinct query token: its positions
    v = np.empty(LCS_WORDS, dtype=np.uint64)
    one, ones = np.uint64(1), ~np.uint64(0)
    k = 0
    while k < n:
        q = pair_q[k]
        stop = k
        while stop < n and pair_q[stop] == q:
            stop += 1
        lo, m = starts[q], starts[q + 1] - starts[q]
        words = (m + 63) >> 6
        if words > LCS_WORDS:
            k = stop
            continue
        distinct = 0
        for pos in range(m):
            token = ids[lo + pos]
            s = slot[token]
            if s < 0:
                s = distinct
                slot[token] = s
                distinct += 1
                for w in range(words):
                    masks[s, w] = 0
            masks[s, pos >> 6] |= one << np.uint64(pos & 63)
        for p in range(k, stop):
            if p + 2 * _AHEAD_PAIRS < n:  # where its codes start, further ahead still
                _prefetch(ends, max(pair_t[p + 2 * _AHEAD_PAIRS] - 1, 0))
            if p + _AHEAD_PAIRS < n:  # the texts are random reads in a large array: ask early
                ahead = pair_t[p + _AHEAD_PAIRS]
                at, end = ends[ahead - 1] if ahead > 0 else 0, ends[ahead]
                for line in range(at, end, 16):  # 16 codes a cache line
                    _prefetch(codes, line)
            t = pair_t[p]
            for w in range(words):
                v[w] = ones
            for c in range(ends[t - 1] if t > 0 else 0, ends[t]):
                s = slot[_token_id(codes[c], surrogates)]
                if s < 0:
                    continue
                carry = np.uint64(0)
                for w in range(words):  # V + U carries from word to word
                    x = v[w]
                    u = x & masks[s, w]
                    total = x + u
                    out_carry = total < x
                    total += carry
                    if total < carry:
                        out_carry = True
                    v[w] = total | (x & ~u)
                    carry = one if out_carry else np.uint64(0)
            zeros = np.int64(0)
            for w in range(words):
                bits = min(64, m - 64 * w)
                x = v[w] if bits == 64 else v[w] & ((one << np.uint64(bits)) - one)
                zeros += bits - _popcount(x)
            out[p] = zeros
        for pos in range(m):
            slot[ids[lo + pos]] = -1
        k = stop
    return out
