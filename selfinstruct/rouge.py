"""ROUGE-L as rouge_score computes it, made fast: exact scores, exact pruning.

Self-instruct and Stanford Alpaca drop a generated instruction when its ROUGE-L F1
against any instruction already kept is above 0.7, scoring pair by pair with
``rouge_score``. This module makes the same decisions, bit for bit:

* ``tokenize`` and ``rouge_l`` mirror rouge_score: its tokens, its LCS, its float F1.
* Each distinct token becomes one character, so a text is a short string and
  rapidfuzz's Indel distance gives the LCS exactly: LCS = (la + lb - indel) / 2.
* ``RougeLIndex`` is the incremental pool the generation loop checks candidates
  against: exact pruning (length window, prefix filtering with a hit count, a Bloom
  overlap bound; the inner loop compiled in ``rouge_jit``), so only a few texts per
  candidate are scored. ``FullScanIndex`` scores every text
  (bit-parallel LCS in numpy); it is the reference the tests compare against.
* ``greedy_dedup`` dedups a whole dataset with the same index, so no decision changes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Indel

# ---------------------------------------------------------------------------
# rouge_score, mirrored

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """rouge_score's tokens (no stemming): lowercase, split on every run outside [a-z0-9].

    >>> tokenize("Write a HAIKU -- about café_life, 2 times!")
    ['write', 'a', 'haiku', 'about', 'caf', 'life', '2', 'times']
    """
    # lower() comes first, as in rouge_score: it can turn a non-ASCII letter into an
    # ASCII one (the Kelvin sign lowers to "k"), which then is part of a token.
    # findall of the runs inside [a-z0-9] gives the same tokens as splitting on the
    # runs outside it and dropping empties, twice as fast.
    return _TOKEN.findall(text.lower())


_ALNUM = re.compile(r"[^\W_]")


def unread(text: str) -> bool:
    """Whether ``tokenize`` reads under half of the text's letters and digits: text in another
    script, of which ROUGE-L says little. With no token such a text is never a duplicate, not
    even of its own copy; with a few (a number, a Latin name) two unrelated ones can be.

    >>> unread("Напишите стихотворение о море"), unread("Назовите 2 реки в Europe"), unread("Write about café life")
    (True, True, False)
    >>> unread("???"), unread("")
    (False, False)
    """
    low = text.lower()
    return 2 * sum(map(len, _TOKEN.findall(low))) < len(_ALNUM.findall(low))


def _f1(lcs: int, len_a: int, len_b: int) -> float:
    """rouge_score's F1 from an LCS length, with its float operations in its order.

    It is 2*lcs/(len_a+len_b) on paper, but the rounding differs in the last bit, and
    the threshold test sees that bit: both pairs below are exactly 0.7 on paper.

    >>> _f1(7, 7, 13), _f1(21, 23, 37)
    (0.7000000000000001, 0.6999999999999998)
    """
    if not len_a or not len_b:
        return 0.0
    precision = lcs / len_b
    recall = lcs / len_a
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _f1_array(lcs: np.ndarray, len_a, len_b) -> np.ndarray:
    """``_f1`` over arrays (lengths may be arrays or numbers); numpy's float64 ops round
    exactly like Python's, and they run in the same order, so every bit agrees."""
    lcs = np.asarray(lcs, dtype=np.float64)
    len_a, len_b = np.asarray(len_a), np.asarray(len_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / len_b
        recall = lcs / len_a
        total = precision + recall
        f = 2 * precision * recall / total
    return np.where((total > 0) & (len_a > 0) & (len_b > 0), f, 0.0)


# ---------------------------------------------------------------------------
# tokens as characters

_SURROGATE_START, _SURROGATE_SIZE = 0xD800, 0x800
_UNICODE_END = 0x110000
_TOP_ID = _UNICODE_END - 1 - _SURROGATE_SIZE  # the last token id whose code is within unicode


def _code(token_id):
    """The code point that stands for a token id (or each of an array of them); surrogates are
    skipped (not valid text).

    >>> _code(7), _code(0xD800), _code(np.array([7, 0xD800])).tolist()
    (7, 57344, [7, 57344])
    """
    return token_id + _SURROGATE_SIZE * (token_id >= _SURROGATE_START)


def _codes_of(ids: list[int]) -> list[int]:
    """``_code`` of each token id."""
    return [i if i < _SURROGATE_START else i + _SURROGATE_SIZE for i in ids]


def _as_sequence(codes: list[int]) -> str | list[int]:
    """A str of these code points, or the list itself past unicode's 1.1M characters.

    rapidfuzz compares a character by its code point and an int by its value, so
    str and list sequences can be mixed freely.

    >>> _as_sequence([119, 104, 121]), _as_sequence([0x110000, 97])
    ('why', [1114112, 97])
    """
    if codes and max(codes) >= _UNICODE_END:
        return codes
    return "".join(map(chr, codes))


def _lcs(seq_a, seq_b) -> int:
    """LCS length of two token sequences: Indel counts insertions and deletions, LCS what is left.

    >>> _lcs("abcd", "acbd")
    3
    """
    return (len(seq_a) + len(seq_b) - Indel.distance(seq_a, seq_b)) // 2


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1, equal bit for bit to rouge_score's ``RougeScorer(["rougeL"]).score(a, b)``.

    >>> rouge_l("Write a poem about the sea.", "Write a short poem about the sea!")
    0.923076923076923
    """
    tokens = Tokens()
    return rouge_l_tokens(tokens(a), tokens(b))


class Tokens:
    """Texts as token sequences over one shared vocabulary, so that many pairs among a few
    texts are scored with each text tokenized once (``rouge_l_tokens``).

    >>> tokens = Tokens()
    >>> rouge_l_tokens(tokens("Write a poem about the sea."), tokens("Write a short poem about the sea!"))
    0.923076923076923
    """

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, tokens: list[str] | None = None) -> str | list[int]:
        """``text`` as a sequence (``tokens``: its ``tokenize``, when the caller has it already)."""
        vocab = self.vocab
        ids = [vocab.setdefault(t, len(vocab)) for t in (tokenize(text) if tokens is None else tokens)]
        return _as_sequence(_codes_of(ids))


def rouge_l_tokens(a: str | list[int], b: str | list[int]) -> float:
    """``rouge_l`` of two sequences from the same ``Tokens``."""
    if not a or not b:
        return 0.0
    return _f1(_lcs(a, b), len(a), len(b))


# _above_by_cdist scores a batch against itself in this many blocks of rows, each against the texts
# from its first on: 5/8 of the pairs of one call over the square, which scored each pair both ways.
_SQUARE_BLOCKS = 4


def rouge_l_matrix(seqs: list, above: float | None = None, others: list | None = None) -> np.ndarray:
    """``rouge_l_tokens(seqs[i], seqs[j])`` at [i, j], every bit the same, from rapidfuzz's
    ``cdist``: for a batch of texts scored against each other (``greedy_dedup``'s batch, the
    generation loop's group), with no Python call per pair. ``others``: scored against these
    instead (``rouge_l_tokens(seqs[i], others[j])``), from the same ``Tokens``.

    ``above``: for a caller that reads only the pairs above it (a threshold, a floor), the
    others are 0. Then a compiled pass (``rouge_jit.overlap_pairs``) bounds each pair's LCS by
    the tokens the two may share, a few popcounts a pair, and rapidfuzz scores only the pairs
    that bound lets through: a generation group's own pairs at a floor of 0.7 in 0.28 ms
    instead of 1.9 (135 of ``bench/scale.py``'s instructions), against 75 others 0.27 instead of 1.4.
    A batch against itself is bounded each pair once (a pair's score is the same both ways).

    >>> tokens = Tokens()
    >>> seqs = [tokens("a poem about the sea"), tokens("a poem about a sea"), tokens("")]
    >>> rouge_l_matrix(seqs).tolist()[0]
    [1.0, 0.8000000000000002, 0.0]
    >>> rouge_l_matrix(seqs + [tokens("the sea")], above=0.7).tolist()[0]
    [1.0, 0.8000000000000002, 0.0, 0.0]
    """
    from selfinstruct.rouge_jit import overlap_pairs

    same = others is None
    others = seqs if same else others
    if not seqs or not others:
        return np.zeros((len(seqs), len(others)))
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    lens_b = lens if same else np.fromiter(map(len, others), dtype=np.int64, count=len(others))
    if above is None:
        dist = process.cdist(seqs, others, scorer=Indel.distance, dtype=np.int64)
        return _f1_array((lens[:, None] + lens_b[None, :] - dist) // 2, lens[:, None], lens_b[None, :])
    codes = _flat_codes(seqs)
    codes_b = codes if same else _flat_codes(others)
    most = (len(seqs) * (len(seqs) + 1) // 2 if same else len(seqs) * len(others)) // 4
    at, at_b = overlap_pairs(codes, np.cumsum(lens), codes_b, np.cumsum(lens_b), same, float(above), most)
    if len(at) > most:  # a low cutoff: many pairs pass the bound
        return _above_by_cdist(seqs, others, same, lens, lens_b, above)
    out = np.zeros((len(seqs), len(others)))
    if len(at):
        dist = process.cpdist([seqs[i] for i in at.tolist()], [others[j] for j in at_b.tolist()],
                              scorer=Indel.distance, dtype=np.int64)
        m, b = lens[at], lens_b[at_b]
        f = _f1_array((m + b - dist) // 2, m, b)
        keep = f > above
        out[at[keep], at_b[keep]] = f[keep]
        if same:
            out[at_b[keep], at[keep]] = f[keep]
    return out


def _above_by_cdist(seqs: list, others: list, same: bool, lens, lens_b, above: float) -> np.ndarray:
    """``rouge_l_matrix`` above a cutoff by rapidfuzz alone, every pair with the cutoff given to it
    (a normalized Indel distance of 1 - above), where most pairs pass the overlap bound: 2-3x
    faster then than scoring the pairs one by one (``cpdist``) at a floor of 0.1."""
    # A hair past 1 - above, so that no pair above is lost to rounding in rapidfuzz's own test of the
    # cutoff (two texts of 10 tokens sharing one, F1 2 / 20 at above=0.1, were dropped with 1e-9 past
    # it, kept from 1e-8); the few at it are computed exactly too, then dropped by their F1 itself.
    cutoff = min(1.0, 1.0 - above + 1e-6)
    if not same:
        norm = process.cdist(seqs, others, scorer=Indel.normalized_distance, score_cutoff=cutoff, dtype=np.float64)
    else:  # a block of rows at a time against the texts from it on; below the diagonal is the same pairs
        norm = np.empty((len(seqs), len(seqs)))
        step = -(-len(seqs) // _SQUARE_BLOCKS)
        for s in range(0, len(seqs), step):
            part = process.cdist(seqs[s : s + step], seqs[s:], scorer=Indel.normalized_distance, score_cutoff=cutoff,
                                 dtype=np.float64)
            rows = len(part)
            norm[s : s + rows, s:] = part
            norm[s + rows :, s : s + rows] = part[:, rows:].T
    total = lens[:, None] + lens_b[None, :]
    dist = np.rint(norm * total).astype(np.int64)  # the integer distance back: exact, for texts this short
    f = _f1_array((total - dist) // 2, lens[:, None], lens_b[None, :])
    return np.where((norm <= cutoff) & (f > above), f, 0.0)  # past the cutoff rapidfuzz answers 1.0, not the distance


def _flat_codes(seqs: list) -> np.ndarray:
    """Sequences' codes one after another (uint32): a str's code points, a list's own codes."""
    if all(isinstance(x, str) for x in seqs):
        return np.frombuffer(bytearray("".join(seqs).encode("utf-32-le")), dtype=np.uint32)  # writable: one signature
    return np.fromiter(chain.from_iterable(x if isinstance(x, list) else map(ord, x) for x in seqs), dtype=np.uint32)


def _check_threshold(threshold: float) -> None:
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")


# ---------------------------------------------------------------------------
# the pool the generation loop checks each candidate against


class Looked(NamedTuple):
    """``RougeLIndex.lookup``'s answer: per text its known ids, its sequence and whether the pool
    had all its tokens; and for ``stale``: the tokens the pool had then, and the lowest id the
    tokens it lacked were given (their codes, in the sequences)."""

    ids: list[list[int]]
    seqs: list
    whole: list[bool]
    known: int = 0
    lowest: int = 0


@dataclass
class Match:
    """A candidate against the pool: is it a duplicate, and its nearest (ref, text, score)."""

    duplicate: bool
    nearest: list[tuple[str, str, float]]


def _top_k(scores: np.ndarray, k: int) -> list[int]:
    """Positions of the k best scores, best first, ties by position (earlier first).

    >>> _top_k(np.array([0.2, 0.5, 0.2, 0.5]), 3)
    [1, 3, 0]
    """
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return []
    if k < n:
        kth = np.partition(scores, n - k)[n - k]
        idx = np.flatnonzero(scores >= kth)  # every tie of the k-th, so ties are settled below
    else:
        idx = np.arange(n)
    order = np.lexsort((idx, -scores[idx]))
    return idx[order[:k]].tolist()


class FullScanIndex:
    """Kept instructions, each scored against a candidate by exact ROUGE-L, all at once.

    The generation loop asks for every candidate: is it within the threshold of
    anything kept, and what are its nearest kept instructions? So every score is
    needed, and they come from one pass of the bit-parallel LCS (Hyyrö 2004) over the
    whole pool in numpy: each kept text is a 64-bit word, and a candidate token only
    touches the texts that contain it. Texts over 64 tokens go through rapidfuzz.

    >>> pool = FullScanIndex(0.7)
    >>> pool.add("Write a poem about the sea.", "seed-1")
    >>> pool.add("List three prime numbers.", "seed-2")
    >>> pool.query("Write a short poem about the sea!", nearest=1)
    Match(duplicate=True, nearest=[('seed-1', 'Write a poem about the sea.', 0.923076923076923)])
    """

    def __init__(self, threshold: float = 0.7):
        _check_threshold(threshold)
        self.threshold = threshold
        self._chars: dict[str, str | int] = {}  # token -> its character (an int past unicode)
        self._refs: list[str] = []
        self._texts: list[str] = []
        self._seqs: list[str | list[int]] = []
        self._lens = np.zeros(16, dtype=np.int64)  # token counts, grown by doubling
        self._low = np.zeros(16, dtype=np.uint64)  # (1 << length) - 1: the bits a text's LCS is counted in
        self._where: dict = {}  # character -> (texts that have it, the bits of its positions there)
        self._long: list[int] = []  # texts over 64 tokens

    def __len__(self) -> int:
        return len(self._refs)

    def add(self, text: str, ref: str, tokens: list[str] | None = None) -> None:
        """Add a kept instruction under an id (``ref`` comes back in ``Match.nearest``);
        ``tokens``: its ``tokenize``, when the caller has it already."""
        chars = self._chars
        seq = []
        for token in tokenize(text) if tokens is None else tokens:
            char = chars.get(token)
            if char is None:
                code = _code(len(chars))
                char = chars[token] = chr(code) if code < _UNICODE_END else code
            seq.append(char)
        n = len(self._refs)
        if n == len(self._lens):
            self._lens = np.concatenate([self._lens, np.zeros_like(self._lens)])
            self._low = np.concatenate([self._low, np.zeros_like(self._low)])
        self._lens[n] = len(seq)
        self._refs.append(ref)
        self._texts.append(text)
        self._seqs.append(_join(seq))
        if len(seq) > 64:
            self._long.append(n)
            return
        self._low[n] = (1 << len(seq)) - 1
        bits: dict = {}
        for i, c in enumerate(seq):
            bits[c] = bits.get(c, 0) | 1 << i
        for c, mask in bits.items():
            where = self._where.get(c)
            if where is None:
                where = self._where[c] = (array("q"), array("Q"))
            where[0].append(n)
            where[1].append(mask)

    def query_many(self, texts: Iterable[str], nearest: int = 3, tokens: list[list[str]] | None = None) -> list[Match]:
        """``query`` for each text (the same interface as ``RougeLIndex``)."""
        texts = list(texts)
        return [self.query(t, nearest, tokens[q] if tokens is not None else None) for q, t in enumerate(texts)]

    def query(self, text: str, nearest: int = 3, tokens: list[str] | None = None) -> Match:
        """Score ``text`` against every kept instruction; duplicate means some score > threshold."""
        n = len(self._refs)
        tokens = tokenize(text) if tokens is None else tokens
        if n == 0:
            return Match(False, [])
        lens = self._lens[:n]
        if not tokens:
            scores = np.zeros(n)
        else:
            # A token the pool never saw matches nothing, so it only counts in the length.
            known = [c for t in tokens if (c := self._chars.get(t)) is not None]
            state = np.full(n, np.iinfo(np.uint64).max, dtype=np.uint64)
            for c in known:  # Hyyrö's step, for the texts holding c (the others are unchanged)
                texts, masks = self._where.get(c, (None, None))
                if texts is None:
                    continue
                texts = np.frombuffer(texts, dtype=np.int64)
                v = state[texts]
                u = v & np.frombuffer(masks, dtype=np.uint64)
                state[texts] = (v + u) | (v - u)
            lcs = np.bitwise_count(~state & self._low[:n]).astype(np.int64)
            if self._long:
                seq = _join(known)
                dist = process.cdist([seq], [self._seqs[i] for i in self._long], scorer=Indel.distance, dtype=np.int64)[
                    0
                ]
                lcs[self._long] = (len(seq) + lens[self._long] - dist) // 2
            scores = _f1_array(lcs, len(tokens), lens)
        duplicate = bool((scores > self.threshold).any())
        top = _top_k(scores, nearest)
        return Match(duplicate, [(self._refs[i], self._texts[i], float(scores[i])) for i in top])


def _join(chars: list) -> str | list[int]:
    """Characters (and, past unicode, ints) into one sequence rapidfuzz can compare."""
    if all(type(c) is str for c in chars):
        return "".join(chars)
    return [c if type(c) is int else ord(c) for c in chars]


# ---------------------------------------------------------------------------
# the whole-dataset greedy pass, with exact pruning


@dataclass(frozen=True, slots=True)
class Decision:
    """One text's fate. ``dup_of`` indexes ``texts``, or is -(i+1) for ``against[i]``.

    ``score`` is the ROUGE-L with ``dup_of`` (the best earlier match, ties to the
    earliest) for a removed text, and 0.0 for a kept one: sub-threshold scores are
    exactly what the pruning avoids computing.
    """

    kept: bool
    dup_of: int | None = None
    score: float = 0.0


def _min_lcs(len_a: int, len_b: int, threshold: float) -> int | None:
    """Fewest common tokens (LCS) that make rouge_l of such texts > threshold; None if none do.

    The float F1 is 2*lcs/(len_a+len_b) within a few units in the last place, so every
    lcs two or more below threshold*(len_a+len_b)/2 scores below it (by 6/(len_a+len_b),
    far more than rounding, for texts under 10^14 tokens); from there up we ask ``_f1``
    itself, so a pair at exactly the threshold goes the way rouge_score sends it.

    >>> _min_lcs(10, 10, 0.7), _min_lcs(7, 13, 0.7), _min_lcs(3, 20, 0.7)
    (8, 7, None)
    """
    start = max(0, int(threshold * (len_a + len_b) / 2) - 2)
    for lcs in range(start, min(len_a, len_b) + 1):
        if _f1(lcs, len_a, len_b) > threshold:
            return lcs
    return None


@dataclass(frozen=True)
class _LengthPlan:
    """For texts of one length a: the LCS a duplicate of each length b needs, and the least of those."""

    need: np.ndarray  # need[b] = _min_lcs(a, b) for b <= the window's top, or _NEVER where no LCS is enough
    least: int  # min over b: the overlap any duplicate pair with this text must reach
    shortest: int  # the shortest length b in the window


_NEVER = 1 << 40  # a "need" no pair can reach


def _length_plan(len_a: int, threshold: float, max_len: int) -> _LengthPlan | None:
    """Which lengths can pair with ``len_a`` above the threshold (None: none can).

    The LCS is at most the shorter text, so F1 <= 2*min(a,b)/(a+b), which is above t
    only for b in about [a*t/(2-t), a*(2-t)/t]; two extra lengths each side absorb
    rounding and ``_min_lcs`` decides each one exactly.

    >>> plan = _length_plan(10, 0.7, 100)
    >>> window = (plan.need < _NEVER).nonzero()[0]
    >>> int(window.min()), int(window.max()), int(plan.need[10]), plan.least
    (6, 18, 8, 6)
    """
    lo = max(1, int(len_a * threshold / (2 - threshold)) - 2)
    # Compared as floats before int(): under a threshold of about 1e-305 the bound is infinite.
    hi = max_len if threshold <= 0 or len_a * (2 - threshold) / threshold >= max_len else \
        int(len_a * (2 - threshold) / threshold) + 3
    hi = min(max_len, hi)
    need = np.full(hi + 1, _NEVER, dtype=np.int64)
    for len_b in range(lo, hi + 1):
        lcs = _min_lcs(len_a, len_b, threshold)
        if lcs is not None:
            need[len_b] = lcs
    least = int(need.min())
    if least == _NEVER:
        return None
    return _LengthPlan(need, least, int(np.argmax(need < _NEVER)))


def greedy_dedup(
    texts: Iterable[str], threshold: float = 0.7, against: Iterable[str] = (), batch: int = 64
) -> list[Decision]:
    """Self-instruct's greedy ROUGE-L dedup, exact: the generation loop's index over a whole dataset.

    In input order, a text is kept iff its rouge_l with every earlier kept text and
    every ``against`` text is <= threshold: the same decisions as the all-pairs loop.
    The kept texts (``against`` first) live in a ``RougeLIndex`` at floor = threshold,
    whose pruning never skips a pair above it (its docstring has the bounds). Texts go
    ``batch`` at a time: one ``query_many`` against the index, every pair within the
    batch scored at once (rapidfuzz ``cdist``), then the greedy rule in order, each kept
    text added to the index. A removed text's ``dup_of`` is its best earlier match; ties
    go to the earliest, as the index's ``nearest`` and the batch's argmax both give them.

    >>> [d.kept for d in greedy_dedup(["Write a poem.", "Write a poem!", "Sum two numbers."])]
    [True, False, True]
    >>> greedy_dedup(["Write a poem."], against=["write a poem"])[0]
    Decision(kept=False, dup_of=-1, score=1.0)
    """
    _check_threshold(threshold)
    index = RougeLIndex(threshold)
    for i, text in enumerate(against):
        index.add(text, -(i + 1))
    texts = texts if isinstance(texts, list) else list(texts)
    decisions: list[Decision] = []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        ids = [index.encode(text) for text in chunk]  # once, for the query, the batch's pairs and the add
        matches = index.query_many(chunk, nearest=1, ids=ids)
        inner = rouge_l_matrix([_sequence(_codes_of(x)) for x in ids], above=threshold)  # read only above it
        kept = []  # offsets in the chunk
        for q, match in enumerate(matches):
            dup_of, score = (match.nearest[0][0], match.nearest[0][2]) if match.duplicate else (None, 0.0)
            if kept:
                row = inner[q, kept]
                k = int(row.argmax())  # the first of the best: the earliest
                if row[k] > threshold and row[k] > score:  # a tie goes to the indexed text: it is earlier
                    dup_of, score = start + kept[k], float(row[k])
            if dup_of is None:
                decisions.append(Decision(True))
                kept.append(q)
                index.add(chunk[q], start + q, ids[q])
            else:
                decisions.append(Decision(False, dup_of, score))
    return decisions


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Where each run of equal values starts in a sorted array.

    >>> _group_starts(np.array([3, 3, 5, 7, 7, 7])).tolist()
    [0, 2, 3]
    """
    change = np.empty(len(sorted_keys), dtype=bool)
    change[:1] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=change[1:])
    return np.flatnonzero(change)


def _chain(*parts: Iterable[str]):
    for part in parts:
        yield from part


# ---------------------------------------------------------------------------
# the incremental pool the generation loop checks candidates against

_LEN_BITS = 12  # a text's length and an element's repeat number each fit here
_MAX_INDEXED = (1 << _LEN_BITS) - 1  # longer texts are not indexed: every query scores them
_MASK = (1 << _LEN_BITS) - 1
# A posting's key is token id << 36 | repeat << 24 | b << 12 | j in an int64, so token ids
# stay under 2**27 (134M distinct tokens; a 1M-instruction pool has a few hundred thousand).
_MAX_TOKENS = 1 << (63 - 3 * _LEN_BITS)
# Bound 3's order ranks a token's first, second and third use apart (and its later ones
# together): a common word's third use ("the", "the", "the") is rarer than many words' first.
_REPS = 4


@dataclass(frozen=True)
class _Plan:
    """``_LengthPlan`` with bound 3's loosened limits (``_reach``): the least of them, and per
    overlap x the longest length b with reach(a, b) <= x (-1: none)."""

    need: np.ndarray
    least_reach: int
    shortest: int
    longest_for: np.ndarray


class RougeLIndex:
    """A growing pool of texts; each query gets the exact ROUGE-L decision and neighbours, fast.

    ``query(text, nearest=k)`` gives ``Match(duplicate, nearest)``:

    * ``duplicate``: some indexed text has rouge_l(text, it) > ``threshold``, with the
      float rouge_score computes (``_f1``), exactly as ``FullScanIndex`` decides.
    * ``nearest``: the k indexed texts scoring above ``floor`` (0 <= floor <= threshold,
      default: the threshold),
      highest first, ties to the earliest added, as (ref, text, score) with the exact
      rouge_score float. Texts at or below the floor are never listed, so with
      floor == threshold ``nearest`` lists duplicates only. A lower floor finds more
      neighbours and costs more (bench/README.md has the figures).

    ``query_many`` does a whole batch at once (each text against the pool as it is); a
    batch with enough postings to read is split over up to ``threads`` threads (default:
    the CPUs this process may use, at most 8), each with its own counters, and the
    answers are the same as on one.

    Only texts that could score above the floor are scored; the rest are skipped by
    bounds that hold for every pair, so no result changes (the bounds are
    ``greedy_dedup``'s, at t = floor):

    1. Length: only lengths b in a window around a can score > t, and each needs
       LCS >= need(a, b) = ``_min_lcs(a, b, t)``; need is symmetric in a and b.
    2. Overlap: LCS <= |A & B| as multisets; repeats are numbered ((tok, k) is the
       k-th "tok"), so they are sets of elements.
    3. Prefix: elements are sorted by one total order, rarest first (an element's
       rank is its token's and repeat number's, ``rouge_jit.elements``). If
       |A & B| >= n, the first shared element is among A's first a - n + 1 and B's
       first b - n + 1 elements. So each B is indexed by its first b - least(b) + 1
       (least(b) = min over a of need(a, b)), and A looks up its i-th element only in
       texts of a length b with need(a, b) <= a - i, and keeps a hit at B's j-th
       element only if need(a, b) <= b - j. Where need >= 2 the first two shared
       elements lie among A's first a - n + 2 and B's first b - n + 2: each test is
       one position looser (``_reach``) and a text needs two hits, so texts that
       share one rare element only are dropped before bound 5 (least(b) is then
       taken over the loosened limits). A text's first hit is its first shared
       element, so a text is counted only from a first hit within the unloosened
       limits.
    4. Count: with k hits on B, the last (in the order) at i in A and j in B, every
       shared element before it passes both position tests (so was hit), and those
       after it number at most min(a-1-i, b-1-j): |A & B| <= k + min(a-1-i, b-1-j).
       Bound 3 implies it, so it is not tested: the last hit passed the loosened limits,
       so min(a-1-i, b-1-j) >= need - 2 where two hits are needed (k >= 2), and
       >= need - 1 where one is (k >= 1); either way k + min(...) >= need.
    5. Bloom: each text keeps 512 bits, one per token (``_bit``), and those that two
       or more of its tokens set; a query's layer l holds the bits more than l of its
       tokens set. For every bit x, [A and B set x] + sum over l >= 1 of [A has over l
       tokens at x][B has two at x] >= min(A's tokens at x, B's), and summing min over
       tokens or over bits only grows, so that count is an upper bound on |A & B|.
       The same count over the bits folded to 64 (x to x mod 64) merges counts, so it
       is a looser bound; it is tested first, on a dense array of two words per text,
       and only texts that pass it read their 512 bits.
    Tokens of A no indexed text has are left out of A's elements (they match nothing),
    or, given by ``encode``, rank rarest and only add empty lookups; F1 uses the true
    lengths. Survivors are scored exactly (bit-parallel LCS, ``rouge_jit.lcs_pairs``; rapidfuzz
    Indel for queries over 512 tokens). Bounds 3 and 5 run compiled
    (``rouge_jit.candidates``): one pass over the postings a batch reaches, prefetching.

    The order must be the same for every indexed text and query. Token ids and their
    elements' ranks are fixed between rebuilds; a token first seen after a rebuild ranks
    rarer than all before it, so no existing text's order changes. When the pool has
    doubled since the last rebuild, elements are re-ranked by frequency and every text
    re-indexed (amortized O(1) per text): rarity only makes the prefixes selective, any
    fixed order is exact. Postings live in numpy arrays sorted by (element, b, j), in runs
    of one element and length b (a table of runs, then 6 bytes a posting: j and the text),
    so that where bound 3 fails the rest of that run is not read, with the texts added
    since the last merge in arrays sorted by element, merged when it reaches 1/16 of the pool.

    >>> pool = RougeLIndex(0.7, floor=0.5)
    >>> pool.add("Write a poem about the sea.", "seed-1")
    >>> pool.add("List three prime numbers.", "seed-2")
    >>> pool.query("Write a short poem about the sea!", nearest=3)
    Match(duplicate=True, nearest=[('seed-1', 'Write a poem about the sea.', 0.923076923076923)])
    >>> pool.query("List three prime numbers and a poem", nearest=3).nearest[0][2]
    0.7272727272727273
    """

    rebuild_at = 1024  # the first re-ranking, at this many texts; then at each doubling
    merge_min = 4096  # the dict of new postings is merged into the arrays from this size

    def __init__(self, threshold: float = 0.7, floor: float | None = None, threads: int | None = None):
        _check_threshold(threshold)
        floor = threshold if floor is None else floor  # measured: 0.5 costs 3-4x more (bench/README.md)
        if not 0 <= floor <= threshold:
            raise ValueError(f"floor must be between 0 and the threshold {threshold}, got {floor}")
        self.threshold, self.floor = threshold, floor
        load_kernels()  # here, not at the first query: see there why
        self._ids: dict[str, int] = {}  # token -> id, for good; its code is _code(id)
        self._bits = array("H")  # token id -> its Bloom bit (_bit), computed once
        self._rank = array("q")  # (token id, repeat) slot -> rank in the order: larger is rarer (_REPS)
        self._refs: list[str] = []
        self._texts: list[str] = []
        self._codes = array("I")  # every text's token codes, one text after another
        self._ends = array("q")  # where each text's codes end
        self._long: list[int] = []  # texts over _MAX_INDEXED tokens: always scored
        self._plans: dict[int, _Plan | None] = {}
        # The postings, in runs of one element and length b (``_set_postings``): each run's
        # element << 12 | b, sorted, where its postings start, and per posting its j (its
        # position in its text's order; ascending within a run) and its text.
        self._run_key = np.zeros(0, dtype=np.int64)
        self._run_at = np.zeros(1, dtype=np.int64)
        self._post_j = np.zeros(0, dtype=np.uint16)
        self._post_id = np.zeros(0, dtype=np.uint32)
        # The postings of the texts added since the last merge: by element (sorted), each as
        # b << 44 | j << 32 | text. An add only stores its text; the next query or merge makes
        # the postings of every text stored since (from _posted on) in one compiled call and
        # sorts them in (_flush), so an add makes no numpy or compiled call of its own.
        self._d_elem = np.zeros(0, dtype=np.int64)
        self._d_packed = np.zeros(0, dtype=np.int64)
        self._posted = 0  # texts before this one have their postings made
        self._least_all = np.full(_MAX_INDEXED + 2, _NEVER, dtype=np.int64)  # _least's table
        self._least_known = np.zeros(_MAX_INDEXED + 2, dtype=bool)
        self._delta_texts = 0
        self._built = 0  # pool size at the last rebuild
        self._sigs = np.zeros((16, 2, _SIG_WORDS), dtype=np.uint64)  # per text: bound 5's words, grown by doubling
        self._folds = np.zeros((16, 2, 1), dtype=np.uint64)  # per text: _sigs folded to one word each
        self._signed = 0  # texts whose _sigs are made (at the next query, all at once)
        # Per thread (by its id), rouge_jit.candidates' scratch: a byte per text (stamped by
        # query), the list of texts a query reached, and the last stamp.
        self._scratch: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.threads = max(1, threads if threads is not None else min(8, _cpus()))
        self._workers = None  # a thread pool, made at the first batch worth splitting

    def __len__(self) -> int:
        return len(self._refs)

    # -- building

    def _plan(self, a: int) -> _Plan | None:
        if a not in self._plans:
            p = _length_plan(a, self.floor, _MAX_INDEXED) if self.floor < 1 else None
            plan = None
            if p is not None:
                # Bound 3 with two shared elements (_reach): lookups, postings and take use it.
                reach = _reach(p.need)
                longest = np.full(a + 1, -1, dtype=np.int64)
                for b in np.flatnonzero(p.need < _NEVER).tolist():
                    x = int(reach[b])
                    longest[x] = max(longest[x], b)
                plan = _Plan(p.need, int(reach.min()), p.shortest, np.maximum.accumulate(longest))
            self._plans[a] = plan
        return self._plans[a]

    def _intern(self, tokens: list[str]) -> list[int]:
        """Token ids, giving new tokens the next id (ranked rarer than every token before it)."""
        ids = self._ids
        seq = list(map(ids.get, tokens))  # most tokens are known: one C-level pass (2x a loop)
        new = seq.count(None)  # the new tokens, found by C-level scans rather than a loop over all
        k = -1
        for _ in range(new):
            k = seq.index(None, k + 1)  # from the last one found: from the start, a long text took minutes
            token = tokens[k]
            i = ids.get(token)  # a new token used twice in the text got its id above
            if i is None:
                if len(ids) >= _MAX_TOKENS:
                    raise ValueError(f"the ROUGE-L index holds at most {_MAX_TOKENS:,} distinct tokens")
                i = ids[token] = len(ids)
                self._rank.extend(range(len(self._rank), len(self._rank) + _REPS))
                self._bits.append(_bit(i))
            seq[k] = i
        return seq

    def add(self, text: str, ref: str, ids: list[int] | None = None, tokens: list[str] | None = None) -> None:
        """Add a text under an id (``ref`` comes back in ``Match.nearest``); ``ids``: its
        ``encode``, or ``tokens``: its ``tokenize``, when the caller has it already."""
        seq = ids if ids is not None else self._intern(tokenize(text) if tokens is None else tokens)
        n = self._store(text, ref, seq)  # its postings are made at the next query or merge (_flush)
        self._delta_texts += 1
        if n + 1 >= max(self.rebuild_at, 2 * self._built):
            self._rebuild()
        elif self._delta_texts >= max(self.merge_min, (n + 1) // 16):
            self._merge()

    def add_many(self, texts: Iterable[str], refs: Iterable) -> None:
        """``add`` each text in order, then index them all in one re-ranking (``_rebuild``)
        instead of building postings text by text: for a pool's seeds, where the queries
        only begin after the last one. The answers are the same either way (any fixed
        order is exact). Measured: 300,000 real-shape seeds in 13 s instead of 32 s."""
        added = 0
        for text, ref in zip(texts, refs):
            self._store(text, ref, self._intern(tokenize(text)))
            added += 1
        if added:
            self._rebuild()

    def prepare(self) -> None:
        """Do now what the next query would do first: the Bloom words of every text added
        (the compiled kernels were loaded when the index was made: ``load_kernels``).
        ``generate`` calls it after loading the pool, so that this lands in its startup, not
        its first reply."""
        if self._refs:
            self.query(self._texts[0], nearest=1)

    def _store(self, text: str, ref, seq: list[int]) -> int:
        """Keep a text and its token ids (not yet in the postings); its number in the pool."""
        n = len(self._refs)
        self._refs.append(ref)
        self._texts.append(text)
        self._codes.extend(_codes_of(seq))
        self._ends.append(len(self._codes))
        if len(seq) > _MAX_INDEXED:
            self._long.append(n)  # never indexed: every query scores it
        return n

    def _rebuild(self) -> None:
        """Re-rank the elements by frequency (most used first) and index every text anew."""
        from selfinstruct.rouge_jit import element_counts, postings

        n = len(self._refs)
        codes = np.frombuffer(self._codes, dtype=np.uint32)
        ends = np.frombuffer(self._ends, dtype=np.int64)
        try:
            counts = element_counts(codes, ends, (_SURROGATE_START, _SURROGATE_SIZE), len(self._ids), _REPS)
            rank = np.empty(len(counts), dtype=np.int64)
            rank[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
            self._rank = array("q")
            self._rank.frombytes(rank.tobytes())
            least = self._least(np.diff(ends, prepend=0))
            keys, post_id = postings(codes, ends, (_SURROGATE_START, _SURROGATE_SIZE), rank, _REPS, least)
        finally:
            del codes, ends  # release the buffers, or the arrays cannot grow
        by_key = np.argsort(keys, kind="stable")
        self._run_key = self._post_j = self._post_id = None  # the old postings' memory goes first
        post_id = post_id[by_key]
        keys = keys[by_key]
        del by_key
        self._set_postings(keys, post_id)
        self._clear_delta()
        self._built = n

    def _set_postings(self, keys: np.ndarray, post_id: np.ndarray) -> None:
        """The postings from their sorted keys (element << 24 | b << 12 | j) and texts: a run
        table instead of a key each, so the pass reads 6 bytes a posting, not 12."""
        heads = keys >> _LEN_BITS
        first = _group_starts(heads)
        self._run_key = heads[first]
        del heads
        self._run_at = np.append(first, len(keys))
        self._post_j = (keys & _MASK).astype(np.uint16)
        self._post_id = post_id

    def _least(self, lengths: np.ndarray) -> np.ndarray:
        """Per length b (to _MAX_INDEXED + 1), how many of a text's first elements are indexed:
        b - least + 1 (``postings``); _NEVER for lengths no plan covers. Filled in for
        ``lengths`` (and earlier calls' lengths) as they first come."""
        lengths = np.minimum(lengths, _MAX_INDEXED + 1)
        if not self._least_known[lengths].all():
            for b in np.unique(lengths[~self._least_known[lengths]]).tolist():
                if 0 < b <= _MAX_INDEXED and (plan := self._plan(b)) is not None:
                    self._least_all[b] = plan.least_reach
                self._least_known[b] = True
        return self._least_all

    def _clear_delta(self) -> None:
        self._d_elem, self._d_packed = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        self._posted, self._delta_texts = len(self._refs), 0

    def _flush(self) -> None:
        """Make the postings of the texts added since the last query or merge, and sort them
        into the delta's arrays: one ``postings`` call for all of them (measured: an add took
        21 us at a 100,000 pool with a compiled call of its own, 8.5 without: bench/merge.py)."""
        from selfinstruct.rouge_jit import merge_sorted, postings

        n = len(self._refs)
        if self._posted == n:
            return
        first, self._posted = self._posted, n
        ends = np.frombuffer(self._ends, dtype=np.int64)
        codes = np.frombuffer(self._codes, dtype=np.uint32)
        try:
            base = int(ends[first - 1]) if first else 0
            new_ends = ends[first:n] - base
            rank = np.frombuffer(self._rank, dtype=np.int64)
            try:
                keys, text = postings(codes[base : int(ends[n - 1])], new_ends,
                                      (_SURROGATE_START, _SURROGATE_SIZE), rank, _REPS,
                                      self._least(np.diff(new_ends, prepend=0)))
            finally:
                del rank
        finally:
            del ends, codes  # release the buffers, or the arrays cannot grow
        if len(keys):
            # postings' keys are element << 24 | b << 12 | j, its texts counted from first; in
            # text order, then j: the order the texts were added in, as the delta keeps them.
            elems = keys >> 2 * _LEN_BITS
            packed = ((keys >> _LEN_BITS) & _MASK) << 44 | (keys & _MASK) << 32 | (text.astype(np.int64) + first)
            by_elem = np.argsort(elems, kind="stable")
            self._d_elem, self._d_packed = merge_sorted(self._d_elem, self._d_packed, elems[by_elem], packed[by_elem])

    def _merge(self) -> None:
        """Move the delta's postings into the run table (the order is unchanged)."""
        from selfinstruct.rouge_jit import merge_runs

        self._flush()
        if len(self._d_elem):
            packed = self._d_packed
            runs, j = self._d_elem << _LEN_BITS | packed >> 44, (packed >> 32) & _MASK
            by_key = np.lexsort((j, runs))
            self._run_key, self._run_at, self._post_j, self._post_id = merge_runs(
                self._run_key, self._run_at, self._post_j, self._post_id, runs[by_key],
                j[by_key].astype(np.uint16), (packed[by_key] & 0xFFFFFFFF).astype(np.uint32))
        self._clear_delta()

    # -- querying

    def query(self, text: str, nearest: int = 3) -> Match:
        """``text`` against the pool: duplicate (> threshold), and its k nearest above the floor."""
        return self.query_many([text], nearest)[0]

    def encode(self, text: str) -> list[int]:
        """A text's token ids, for ``query_many(ids=)`` and ``add(ids=)``: a caller that may add
        what it queries (``greedy_dedup``) tokenizes and looks up each text once. Tokens new to
        the pool get ids now; they are in no indexed text, so they rank rarest and only add
        empty lookups to a query, and every answer is the same."""
        return self._intern(tokenize(text))

    def lookup(self, split: list[list[str]]) -> Looked:
        """For a group of tokenized texts, without adding a token to the pool: each text's ids
        of the tokens the pool has (``query_many(ids=, lengths=)``), each text as a sequence
        for ``rouge_l_matrix`` (codes shared within the group: a token the pool lacks gets a
        code past the pool's), and whether the pool had all of a text's tokens (then its ids
        are its ``encode``, for ``add(ids=)``).

        The tokens the pool lacks get the last ids within unicode, not the next ones: the
        pool's own new tokens take those, and a sequence of a text added since (``sequences``)
        then never shares a code with this group's unless it shares the token (``stale``).

        The generation loop scores a group this way, so each text's tokens are looked up
        once, and the tokens of the candidates it rejects never join the vocabulary.

        >>> pool = RougeLIndex(0.7)
        >>> pool.add("write a poem", "seed-1")
        >>> looked = pool.lookup([["a", "poem"], ["a", "sonnet"]])
        >>> looked.ids, looked.whole, rouge_l_tokens(*looked.seqs)
        ([[1, 2], [1]], [True, False], 0.5)
        """
        get, past = self._ids.get, len(self._ids)
        extra: dict[str, int] = {}  # the tokens the pool lacks, each by -1 - its number
        known, fulls, whole = [], [], []
        for words in split:
            ids = list(map(get, words))
            if None in ids:
                full = [i if i is not None else extra.setdefault(w, ~len(extra)) for i, w in zip(ids, words)]
                ids = [i for i in ids if i is not None]
                whole.append(False)
            else:
                full = ids
                whole.append(True)
            known.append(ids)
            fulls.append(full)
        sizes = np.fromiter(map(len, fulls), dtype=np.int64, count=len(fulls))
        flat = np.fromiter(chain.from_iterable(fulls), dtype=np.int64, count=int(sizes.sum()))
        # From the top down, or past the pool's own where those reach that high (stale: all again).
        lowest = _TOP_ID + 1 - len(extra) if past + len(extra) <= _TOP_ID else past
        if extra:
            lacked = flat < 0
            flat[lacked] = lowest - 1 - flat[lacked]  # the n-th token the pool lacks: lowest + n
        return Looked(known, _decoded(_code(flat), sizes), whole, past, lowest)

    def stale(self, looked: Looked, split: list[list[str]]) -> list[int]:
        """Of a group's ``lookup`` (of ``split``), the texts whose sequences no longer match
        what the pool has added since: those with a token it has added; every text with one
        it lacked where its new ids reached the codes the lookup gave those. Looked up again,
        they score against the texts added since (``sequences``) as if looked up now.

        >>> pool = RougeLIndex(0.7)
        >>> pool.add("write a poem", "seed-1")
        >>> looked = pool.lookup([["a", "poem"], ["a", "sonnet"], ["an", "ode"]])
        >>> pool.add("an ode to joy", "seed-2")
        >>> pool.stale(looked, [["a", "poem"], ["a", "sonnet"], ["an", "ode"]])
        [2]
        """
        if len(self._ids) == looked.known:
            return []
        lacking = [j for j, all_known in enumerate(looked.whole) if not all_known]
        if len(self._ids) > looked.lowest:
            return lacking
        get, known = self._ids.get, looked.known
        return [j for j in lacking if any(get(t, -1) >= known for t in split[j])]

    def query_many(self, texts: Iterable[str], nearest: int = 3, ids: list[list[int]] | None = None,
                   tokens: list[list[str]] | None = None, lengths: list[int] | None = None) -> list[Match]:
        """``query`` for each text, against the pool as it is (the texts do not see each other);
        ``ids``: their ``encode`` (or ``lookup``'s ids with ``lengths``, their lengths in tokens),
        or ``tokens``: their ``tokenize``, when the caller has it already."""
        return self.start_query(texts, nearest, ids, tokens, lengths)()

    def start_query(self, texts: Iterable[str], nearest: int = 3, ids: list[list[int]] | None = None,
                    tokens: list[list[str]] | None = None, lengths: list[int] | None = None) -> Callable[[], list[Match]]:
        """``query_many`` in two steps: this call starts the compiled pass over the postings on
        the index's other threads and returns; the function it returns gives the answers (its
        thread takes the parts of the pass no other thread has begun, then scores).

        In between, the calling thread is free: ``generate`` decides the group before while the
        pass runs. Texts may be added in between: the answers are those of the pool as it was
        when the query started (the pass reads arrays that an add replaces, never one it
        writes into), so a caller that adds also scores the query against what it added.

        >>> pool = RougeLIndex(0.7)
        >>> pool.add("write a poem about the sea", "seed-1")
        >>> answers = pool.start_query(["write a poem about the sea today", "list three prime numbers"])
        >>> pool.add("list three prime numbers", "seed-2")
        >>> [m.duplicate for m in answers()]
        [True, False]
        """
        texts = list(texts)
        if ids is None:  # only the tokens some indexed text has: the others match nothing
            vocab = self._ids
            split = [tokenize(text) for text in texts] if tokens is None else tokens
            lengths = [len(tokens) for tokens in split]
            ids = [[i for t in tokens if (i := vocab.get(t)) is not None] for tokens in split]
        elif lengths is None:
            lengths = [len(x) for x in ids]
        # Batches of 256: all but the last answered now, the last one started.
        out = []
        last = max(0, (len(texts) - 1) // 256 * 256)
        for s in range(0, last, 256):
            out.extend(self._query_batch(texts[s : s + 256], nearest, ids[s : s + 256], lengths[s : s + 256]))
        rest = self._start_batch(texts[last:], nearest, ids[last:], lengths[last:])
        return lambda: out + rest()

    def _query_batch(self, texts: list[str], k: int, id_lists: list[list[int]], lengths: list[int]) -> list[Match]:
        """Queries by their known token ids (ids in no indexed text may be among them: they
        match nothing) and their true lengths in tokens (for F1 and the length window)."""
        return self._start_batch(texts, k, id_lists, lengths)()

    def _start_batch(self, texts: list[str], k: int, id_lists: list[list[int]],
                     lengths: list[int]) -> Callable[[], list[Match]]:
        """``_query_batch`` with its pass started (``start_query``): the function returned answers."""
        n = len(self._refs)
        if not n or not texts:
            return lambda: [Match(False, []) for _ in texts]
        a_of, knowns, plans = [], [], []
        brute = []  # queries too long to plan: scored against everything
        for q, (known, a) in enumerate(zip(id_lists, lengths)):
            a_of.append(a)
            knowns.append(known)
            plans.append(self._plan(a) if 0 < a <= _MAX_INDEXED else None)
            if a > _MAX_INDEXED:
                brute.append(q)
        # The queries' known ids in one array, query q's at ids[starts[q]:starts[q + 1]]:
        # for the compiled pass and for scoring its survivors.
        starts = np.cumsum([0, *map(len, knowns)], dtype=np.int64)
        ids = np.fromiter(chain.from_iterable(knowns), dtype=np.int64, count=int(starts[-1]))
        passed = self._candidates(ids, starts, plans)
        # The texts every query scores (too long to index), of the pool as it is now.
        extra_q, extra_id = [], []
        for q in range(len(texts)):
            if a_of[q] and self._long:
                extra_q += [q] * len(self._long)
                extra_id += self._long
        ends = np.frombuffer(self._ends, dtype=np.int64)
        try:
            for q in brute:
                others = np.flatnonzero(np.diff(ends, prepend=0) > 0)
                others = others[~np.isin(others, self._long)]
                extra_q += [q] * len(others)
                extra_id += others.tolist()
        finally:
            del ends

        def answers() -> list[Match]:
            cand_q, cand_id = passed()
            if extra_q:
                cand_q = np.concatenate((cand_q, np.array(extra_q, dtype=np.int64)))
                cand_id = np.concatenate((cand_id, np.array(extra_id, dtype=np.int64)))
            return self._score(texts, cand_q, cand_id, a_of, knowns, ids, starts, k)

        return answers

    def _candidates(self, ids, starts, plans) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """The (query, text) pairs that pass bounds 3 and 5 (``rouge_jit``), from the function
        returned: each query's prefix elements become lookups (element, i, the lengths b to
        read), which are found in the sorted postings and the delta, then read in one compiled
        pass, begun here on the other threads."""
        from selfinstruct.rouge_jit import STAMPS, candidates, layers, lookups, sorted_search

        i64 = np.int64
        n_q = len(plans)
        m = np.diff(starts)  # known tokens per query
        take, shortest = np.zeros(n_q, dtype=i64), np.zeros(n_q, dtype=i64)
        width = max((len(p.longest_for) for p in plans if p is not None), default=1)
        longest = np.full((n_q, width), -1, dtype=i64)
        for q, plan in enumerate(plans):
            if plan is not None and m[q] >= plan.least_reach:
                take[q], shortest[q] = m[q] - plan.least_reach + 1, plan.shortest
                longest[q, : len(plan.longest_for)] = plan.longest_for
        rank = np.frombuffer(self._rank, dtype=i64)
        try:
            look_q, look_i, look_e, look_lo, look_hi = lookups(ids, starts, rank, _REPS, take, shortest, longest)
        finally:
            del rank  # release the buffer, or the array cannot grow
        e = look_e << _LEN_BITS
        # The runs from (element, lowest b) up to, not including, (element, highest b + 1): added, not
        # or-ed, as highest b + 1 may be 1 << _LEN_BITS (b up to _MAX_INDEXED, at a low threshold), which
        # or-ed onto an odd element's key changed nothing and read no run at all.
        bounds = np.concatenate((e | look_lo, e + (look_hi + 1)))
        by_bound = np.argsort(bounds)  # searched in order, each from the last one: 2.5x fewer misses
        at = sorted_search(self._run_key, bounds, by_bound)
        lo, hi = at[: len(e)], at[len(e) :]  # each lookup's runs
        self._flush()
        # Each lookup's delta postings, its element's: the lower bounds sort as their elements do.
        by_elem = by_bound[by_bound < len(e)]
        d_lo, d_hi = sorted_search(self._d_elem, look_e, by_elem), sorted_search(self._d_elem, look_e + 1, by_elem)
        self._sign()
        bits = np.frombuffer(self._bits, dtype=np.uint16)
        try:
            a_layers, depth, extra, f_layers, f_depth, _ = layers(ids, starts, bits, _SIG_WORDS)
        finally:
            del bits  # release the buffer, or the array cannot grow
        need, need_width = _need_table(plans)
        # The queries split into parts of about equal postings. The other threads take parts
        # from now on (the kernel runs without the GIL), and the thread that asks for the
        # answer takes those still left, then waits for the rest: a caller busy elsewhere in
        # between leaves the whole pass to the others, and one that asks at once shares it.
        reads = self._run_at[hi] - self._run_at[lo] + d_hi - d_lo  # each lookup's postings
        cost = np.cumsum(np.bincount(look_q, weights=reads, minlength=n_q))
        total = float(cost[-1]) if n_q else 0.0
        parts = max(1, min(4 * self.threads, n_q, int(total) // _POSTINGS_PER_PART))
        bounds = [0, *np.searchsorted(cost, total * np.arange(1, parts) / parts, side="right").tolist(), n_q]
        bounds = sorted(set(bounds))  # no empty part (a query with most of the postings spans several cuts)
        parts = len(bounds) - 1
        first_lookup = np.searchsorted(look_q, bounds).tolist()
        found: list = [None] * parts
        order = iter(range(parts))  # next() on it is atomic: each part goes to one thread
        # What the pass reads, as the pool is now: an add replaces these arrays, and writes
        # only the Bloom words of texts past them (_sign), so a pass started before it is unchanged.
        now = (self._run_key, self._run_at, self._post_j, self._post_id, d_lo, d_hi, self._d_packed, need,
               need_width, m, a_layers, depth, extra, self._sigs, f_layers, f_depth, self._folds)
        n = len(self._refs)

        def take_parts() -> None:
            scratch = self._scratch_of(n)
            for w in order:
                found[w] = candidates(bounds[w], bounds[w + 1], first_lookup[w], look_q, look_i, lo, hi, *now,
                                      *scratch, STAMPS)

        def result() -> tuple[np.ndarray, np.ndarray]:
            take_parts()  # the parts no other thread has begun
            for f in others:
                f.result()
            return (found[0][0], found[0][1]) if parts == 1 else tuple(np.concatenate(x) for x in zip(*found))

        # A batch with too few postings to be worth a thread is read here, now; another goes to up
        # to threads - 1 other threads at once, and the caller takes what they have not begun.
        if total < _POSTINGS_PER_PART or self.threads == 1:
            others = []
            take_parts()
            return result
        if self._workers is None:
            from concurrent.futures import ThreadPoolExecutor

            self._workers = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="rouge")
        others = [self._workers.submit(take_parts) for _ in range(min(self.threads - 1, parts))]
        return result

    def _scratch_of(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This thread's scratch for ``rouge_jit.candidates``, for a pool of ``n`` texts: two
        passes may run at once (``start_query``), on two threads, never on one."""
        me = threading.get_ident()
        state, touched, clock = self._scratch.get(me) or (np.zeros(0, dtype=np.uint8), None, np.zeros(1, dtype=np.int64))
        if len(state) < n:
            size = max(n, 2 * len(state))
            state, touched = np.zeros(size, dtype=np.uint8), np.zeros(size, dtype=np.int64)
            self._scratch[me] = (state, touched, clock)
        return state, touched, clock

    def _sign(self) -> None:
        """Make the Bloom words (bound 5) of the texts added since the last query, in one call."""
        from selfinstruct.rouge_jit import sign

        n = len(self._refs)
        if self._signed == n:
            return
        if n > len(self._sigs):
            grown = np.zeros((max(n, 2 * len(self._sigs)), 2, _SIG_WORDS), dtype=np.uint64)
            grown[: self._signed] = self._sigs[: self._signed]
            self._sigs = grown
            folds = np.zeros((len(grown), 2, 1), dtype=np.uint64)
            folds[: self._signed] = self._folds[: self._signed]
            self._folds = folds
        codes, ends = np.frombuffer(self._codes, dtype=np.uint32), np.frombuffer(self._ends, dtype=np.int64)
        bits = np.frombuffer(self._bits, dtype=np.uint16)
        try:
            sign(codes, ends, self._signed, n, bits, (_SURROGATE_START, _SURROGATE_SIZE), self._sigs, self._folds)
        finally:
            del codes, ends, bits  # release the buffers, or the arrays cannot grow
        self._signed = n

    def _spans(self, text_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, stop) of each text's codes in ``_codes``; stop - start is its length in tokens."""
        ends = np.frombuffer(self._ends, dtype=np.int64)
        try:
            return np.where(text_ids > 0, ends[np.maximum(text_ids - 1, 0)], 0), ends[text_ids]
        finally:
            del ends  # release the buffer, or the array cannot grow

    def sequences(self, places: list[int]) -> list:
        """Texts by their place in the pool (the order added, from 0) as sequences in the codes
        ``lookup`` gives: a group looked up before they were added is scored against them.

        >>> pool = RougeLIndex(0.7)
        >>> pool.add("write a poem", "seed-1")
        >>> looked = pool.lookup([["a", "poem"]])
        >>> pool.add("a short poem", "seed-2")
        >>> rouge_l_tokens(looked.seqs[0], pool.sequences([1])[0])
        0.8
        """
        return self._sequences(np.asarray(places, dtype=np.int64))

    def _sequences(self, text_ids: np.ndarray) -> list:
        """Stored texts as token sequences: one gather and one decode for all of them."""
        start, stop = self._spans(text_ids)
        sizes = stop - start
        total = int(sizes.sum())
        at = np.repeat(start - np.cumsum(sizes) + sizes, sizes) + np.arange(total)
        codes = np.frombuffer(self._codes, dtype=np.uint32)
        try:
            flat = codes[at]
        finally:
            del codes  # release the buffer, or the array cannot grow
        return _decoded(flat, sizes)

    def _score(self, texts, cand_q, cand_id, a_of, knowns, ids, starts, k) -> list[Match]:
        """Score the survivors exactly; per query, the duplicate flag and the k best above the floor."""
        from selfinstruct.rouge_jit import lcs_pairs

        out = [Match(False, []) for _ in texts]
        if not len(cand_q):
            return out
        order = np.lexsort((cand_id, cand_q))  # by query (lcs_pairs' grouping), the pool in memory order
        cand_q, cand_id = cand_q[order], cand_id[order]
        slot = np.full(len(self._ids), -1, dtype=np.int32)
        codes, ends = np.frombuffer(self._codes, dtype=np.uint32), np.frombuffer(self._ends, dtype=np.int64)
        try:
            lcs = lcs_pairs(ids, starts, cand_q, cand_id, codes, ends, (_SURROGATE_START, _SURROGATE_SIZE), slot)
        finally:
            del codes, ends  # release the buffers, or the arrays cannot grow
        start, stop = self._spans(cand_id)
        lens = stop - start
        if (rest := np.flatnonzero(lcs < 0)).size:  # queries too long for lcs_pairs
            others = self._sequences(cand_id[rest])
            queries = [_sequence(_codes_of(knowns[q])) for q in cand_q[rest].tolist()]
            dist = process.cpdist(queries, others, scorer=Indel.distance, dtype=np.int64)
            lcs[rest] = (np.diff(starts)[cand_q[rest]] + lens[rest] - dist) // 2
        scores = _f1_array(lcs, np.array(a_of, dtype=np.int64)[cand_q], lens)
        above = scores > self.floor
        cand_q, cand_id, scores = cand_q[above], cand_id[above], scores[above]
        order = np.lexsort((cand_id, -scores, cand_q))
        cand_q, cand_id, scores = cand_q[order], cand_id[order], scores[order]
        for start, stop in zip(*_runs(cand_q)):
            q = int(cand_q[start])
            dup = bool(scores[start] > self.threshold)
            near = [(self._refs[t], self._texts[t], s)
                    for t, s in zip(cand_id[start : min(stop, start + k)].tolist(), scores[start : start + k].tolist())]
            out[q] = Match(dup, near if k > 0 else [])
        return out


_KERNELS_LOADED = False


def load_kernels() -> None:
    """Load every compiled kernel the index calls (``rouge_jit``; compiled and cached on disk
    the first time), once a process, with Ctrl-C held until they are loaded (``interrupts_held``).

    Why all at once, on a tiny index, when the first index is made: a kernel first met later,
    inside a run, opened numba's cache files there (a run at a high --concurrency may have no
    descriptor left), and the compile is the one place where a Ctrl-C broke: numba compiles
    every kernel the first time (about 9 s in all, once an install), and a KeyboardInterrupt
    that lands in llvmlite's ctypes callback is swallowed there, after which numba fails with
    "RuntimeError: no compiled object yet" and a traceback instead of "interrupted". The tiny
    index makes the same calls as a real one with the same argument types, so a real run
    compiles nothing more (tests/test_rouge.py checks each kernel's signatures).
    """
    global _KERNELS_LOADED
    if _KERNELS_LOADED:
        return
    _KERNELS_LOADED = True  # first: the index below calls this too
    with interrupts_held():
        try:
            index = RougeLIndex(0.7, floor=0.5, threads=1)
            texts = ["Write a poem about the sea.", "Write a short poem about the sea.", "List three prime numbers."]
            index.add_many(texts, ["a", "b", "c"])  # _rebuild: element_counts, postings
            index.add("Write a poem about the sea today.", "d")
            index.query_many(texts, nearest=2)  # _flush (postings, merge_sorted), lookups, layers, sign, candidates, lcs_pairs
            index._merge()  # merge_runs
            seqs = index.lookup([tokenize(text) for text in texts]).seqs
            rouge_l_matrix(seqs, above=0.5)  # overlap_pairs, a batch against itself
            rouge_l_matrix(seqs, above=0.5, others=seqs[:1])  # and against others
        except BaseException:
            _KERNELS_LOADED = False
            raise


@contextlib.contextmanager
def interrupts_held():
    """Hold SIGINT (Ctrl-C; a SIGTERM that ``cli`` turns into one) until the block ends, then
    give it to the handler that was set: asyncio's (a first one cancels the run, a second
    raises), Python's (raises KeyboardInterrupt), or the default (ends the process). In the
    main thread only: no other may set a handler, and a signal goes to the main thread anyway.

    >>> seen = []
    >>> before = signal.signal(signal.SIGINT, lambda signum, frame: seen.append("handled"))
    >>> with interrupts_held():
    ...     signal.raise_signal(signal.SIGINT)
    ...     seen.append("the block went on")
    >>> seen
    ['the block went on', 'handled']
    >>> _ = signal.signal(signal.SIGINT, before)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if before is None else before)
        for _ in held[:2]:  # two Ctrl-Cs (a user who pressed again) are two for asyncio's handler
            if callable(before):
                before(signal.SIGINT, None)
            else:  # SIG_IGN: nothing; SIG_DFL: the process ends, as it would have
                signal.raise_signal(signal.SIGINT)


_POSTINGS_PER_PART = 25_000  # a batch's pass is split in parts of about this many postings (~0.25 ms each)


def _cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_SIG_BITS = 512  # Bloom bits per text (bound 5): a few % of a 50-token text's other tokens collide
_SIG_WORDS = _SIG_BITS // 64


def _bit(token_id: int) -> int:
    """The Bloom bit of a token (a multiplicative hash's top 9 bits)."""
    return ((token_id * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> (64 - 9)


def _need_table(plans: list) -> tuple[np.ndarray, int]:
    """need(a, b) per query and length b, flattened (row width returned); _NEVER past the window."""
    width = max((len(p.need) for p in plans if p is not None), default=0) + 1
    need = np.full((len(plans), width), _NEVER, dtype=np.int64)
    for r, p in enumerate(plans):
        if p is not None:
            need[r, : len(p.need)] = p.need
    return need.ravel(), width


def _reach(need: np.ndarray) -> np.ndarray:
    """Bound 3's position limit per length: need - 1 where need >= 2, else need.

    If |A & B| >= n >= 2, the first two shared elements both lie among A's first
    a - n + 2 and B's first b - n + 2 elements; so the prefixes grow by one and a text
    needs two hits there (``rouge_jit.candidates``), which drops the texts that share
    one rare element only before their Bloom check.

    >>> _reach(np.array([1, 2, 5, _NEVER])).tolist()[:3]
    [1, 1, 4]
    """
    return np.where((need >= 2) & (need < _NEVER), need - 1, need)


def _sequence(codes: list[int]) -> str | list[int]:
    """Codes as a str, or as the list itself when one is past unicode."""
    try:
        return "".join(map(chr, codes))
    except ValueError:
        return codes


def _decoded(flat: np.ndarray, sizes: np.ndarray) -> list:
    """Texts' codes, one after another in ``flat`` (``sizes`` of them each), as ``_sequence`` gives
    each: one decode for all of them where every code is within unicode (a few us a text less than a
    ``chr`` a code, measured on a generation group's)."""
    bounds = np.concatenate(([0], np.cumsum(sizes))).tolist()
    if not len(flat) or flat.max() < _UNICODE_END:
        big = flat.astype("<u4").tobytes().decode("utf-32-le")
        return [big[s:e] for s, e in zip(bounds[:-1], bounds[1:])]
    return [_sequence(flat[s:e].tolist()) for s, e in zip(bounds[:-1], bounds[1:])]


def _runs(sorted_keys: np.ndarray) -> tuple[list[int], list[int]]:
    """(starts, stops) of the runs of equal values in a sorted array."""
    if not len(sorted_keys):
        return [], []
    first = _group_starts(sorted_keys)
    return first.tolist(), np.append(first[1:], len(sorted_keys)).tolist()
