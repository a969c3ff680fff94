"""Dedup: the same decisions as self-instruct's rouge_score loop, on every input.

Every exact claim is checked against ``rouge_score`` itself (the reference the
self-instruct and Alpaca code use), pair by pair and as whole greedy runs.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize

from selfinstruct import dedup, rouge
from selfinstruct.config import UserError
from selfinstruct.rouge import Decision, FullScanIndex, greedy_dedup, rouge_l, tokenize

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@functools.lru_cache(maxsize=1 << 16)  # long texts cost rouge_score ~45 ms a pair; many tests rescore pairs
def reference(target: str, prediction: str) -> float:
    return SCORER.score(target, prediction)["rougeL"].fmeasure


def reference_greedy(texts, threshold, against=()):
    """The self-instruct loop: each text against every kept one with rouge_score."""
    kept = [(-(i + 1), t) for i, t in enumerate(against)]
    out = []
    for i, text in enumerate(texts):
        best_ref, best = None, 0.0
        for ref, other in kept:  # kept in order, so a tie keeps the earlier
            s = reference(other, text)
            if s > threshold and s > best:
                best_ref, best = ref, s
        if best_ref is None:
            out.append(Decision(True))
            kept.append((i, text))
        else:
            out.append(Decision(False, best_ref, best))
    return out


# --- a deterministic supply of texts -------------------------------------------------

WORDS = ["write", "a", "poem", "about", "the", "sea", "explain", "how", "rain", "forms"]
WORDS += ["list", "three", "prime", "numbers", "give", "tips", "for", "sleep"]
UNICODE = ["café", "naïve", "\u212akelvin", "İstanbul", "straße", "日本語", "emoji 🙂 ok", "ǅ", "ﬁne"]


def random_text(rng: random.Random, words=WORDS, max_len=14) -> str:
    seps = [" ", " ", " ", ", ", "-", "!", "  ", "\n", "_", "'"]
    n = rng.randint(0, max_len)
    return "".join(rng.choice(words) + rng.choice(seps) for _ in range(n))


def mutate(rng: random.Random, text: str, words=WORDS) -> str:
    """A near copy: a few token edits, so scores land around the 0.7 threshold."""
    out = " ".join(edit(rng, text.split(), words, rng.randint(0, 4)))
    return out.upper() if rng.random() < 0.1 else out


def generated_pairs(n: int, seed: int = 0):
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        kind = i % 6
        a = random_text(rng)
        if kind == 0:
            b = random_text(rng)
        elif kind in (1, 2):
            b = mutate(rng, a)
        elif kind == 3:
            b = a
        elif kind == 4:
            b = (
                rng.choice(["", "!!!", " -- ", "...", "é è", "日本"])
                if rng.random() < 0.5
                else random_text(rng, UNICODE, 5)
            )
        else:
            small = ["x", "y", "z"]  # a tiny alphabet: long common subsequences everywhere
            a, b = random_text(rng, small, 20), random_text(rng, small, 20)
        pairs.append((a, b))
    long_words = WORDS + [f"w{i}" for i in range(40)]
    for _ in range(4):  # very long
        a = random_text(rng, long_words, 300)
        pairs.append((a, mutate(rng, a, long_words)))
    return pairs


# --- rouge_score, mirrored ----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "!!!", "Hello, World!", "snake_case and CamelCase", "x1 2y 3.14", *UNICODE, "a\u0130b", "tab\tnew\nline"],
)
def test_tokenize_is_rouge_scores_tokenizer(text):
    assert tokenize(text) == rouge_tokenize.tokenize(text, None)


def test_rouge_l_equals_rouge_score_bit_for_bit_on_generated_pairs():
    pairs = generated_pairs(3000)
    near = 0
    for a, b in pairs:
        expected = reference(a, b)
        assert rouge_l(a, b) == expected, (a, b)
        assert rouge_l(b, a) == expected  # F1 is symmetric, in floats too
        near += 0.6 < expected < 0.8
    assert near > 200  # the sample really probes the threshold region


def test_float_f1_decides_exact_threshold_ties_like_rouge_score():
    # Both pairs are exactly 0.7 on paper; rouge_score's rounding sends one each way.
    dup = ("a b c d e f g", "a b c d e f g h i j k l m")  # lcs 7 of 7 and 13 tokens
    kept = (" ".join(f"t{i}" for i in range(23)), " ".join([f"t{i}" for i in range(21)] + [f"u{i}" for i in range(16)]))
    assert reference(*dup) == rouge_l(*dup) == 0.7000000000000001
    assert reference(*kept) == rouge_l(*kept) == 0.6999999999999998
    assert 2 * 7 / 20 == 0.7 and 2 * 21 / 60 == 0.7
    assert [d.kept for d in greedy_dedup(dup)] == [True, False]
    assert [d.kept for d in greedy_dedup(kept)] == [True, True]


# --- the pruning bounds -------------------------------------------------------------

THRESHOLDS = [0.7, math.nextafter(0.7, 0), math.nextafter(0.7, 1), 0.5, 1 / 3, 2 / 3, 0.9, 0.1, 0.05, 0.99]


@pytest.mark.parametrize("t", THRESHOLDS)
def test_min_lcs_and_length_window_match_brute_force(t):
    for a in range(1, 61):
        plan = rouge._length_plan(a, t, 60)
        for b in range(1, 61):
            scores = [rouge._f1(lcs, a, b) for lcs in range(min(a, b) + 1)]
            brute = next((lcs for lcs, s in enumerate(scores) if s > t), None)
            assert rouge._min_lcs(a, b, t) == brute, (a, b)
            in_window = plan is not None and b < len(plan.need) and plan.need[b] < rouge._NEVER
            assert in_window == (brute is not None), (a, b)
            if brute is not None:
                assert plan.need[b] == brute and plan.least <= brute


def test_prefix_lemma_first_shared_element_lies_in_both_prefixes():
    rng = random.Random(1)
    for _ in range(3000):
        a = sorted(rng.sample(range(40), rng.randint(1, 20)))  # sets in one global order
        b = sorted(rng.sample(range(40), rng.randint(1, 20)))
        shared = sorted(set(a) & set(b))
        for n in range(1, len(shared) + 1):
            assert set(a[: len(a) - n + 1]) & set(b[: len(b) - n + 1]), (a, b, n)


def _corpus(rng: random.Random, n: int, alphabet: int) -> list[str]:
    words = [f"w{i}" for i in range(alphabet)]
    texts = []
    for _ in range(n):
        if texts and rng.random() < 0.5:
            texts.append(mutate(rng, rng.choice(texts), words))
        else:
            texts.append(" ".join(rng.choices(words, k=rng.randint(1, 18))))
    return texts


@pytest.mark.parametrize("rebuild_at,merge_min", [(1024, 4096), (16, 4)])  # one posting dict, or merges and re-rankings
def test_candidate_bounds_never_drop_a_pair_above_threshold(monkeypatch, rebuild_at, merge_min):
    """Bounds 1-5 of RougeLIndex directly: every indexed text scoring above t with a probe
    reaches the exact scoring, and the bounds do prune."""
    monkeypatch.setattr(rouge.RougeLIndex, "rebuild_at", rebuild_at)
    monkeypatch.setattr(rouge.RougeLIndex, "merge_min", merge_min)
    rng = random.Random(rebuild_at)
    checked = 0
    for t in [0.7, 0.5, 0.85, math.nextafter(0.7, 1), 0.3]:
        for alphabet in (8, 30):
            texts = _corpus(rng, 200, alphabet)
            index = rouge.RougeLIndex(t)
            half = len(texts) // 2
            for pos in range(half):  # index every text of the first half, duplicates or not
                index.add(texts[pos], pos)
            scored = []
            monkeypatch.setattr(index, "_score", lambda texts, q, ids, *rest: scored.extend(zip(q.tolist(), ids.tolist())))
            probes = texts[half:]
            # as query_many asks (the ids some indexed text has), then as greedy_dedup asks
            # (encode: every token an id, new ones included); each must reach every pair
            known = [[index._ids[w] for w in tokenize(p) if w in index._ids] for p in probes]
            index._query_batch(probes, 1, known, [len(tokenize(p)) for p in probes])
            found = set(scored)
            scored.clear()
            encoded = [index.encode(p) for p in probes]
            index._query_batch(probes, 1, encoded, [len(x) for x in encoded])
            found_encoded = set(scored)
            for q, probe in enumerate(probes):
                for other in range(half):
                    if rouge_l(texts[other], probe) > t:
                        assert (q, other) in found and (q, other) in found_encoded, (texts[other], probe, t)
                        checked += 1
            if t >= 0.7 and alphabet == 30:
                assert len(found) < len(probes) * half / 4  # and the bounds do prune
    assert checked > 300


def test_bloom_bound_is_never_below_the_true_overlap():
    """Bound 5: the Bloom-word count is at least the multiset overlap (so at least the LCS)."""
    from collections import Counter

    from selfinstruct.rouge_jit import layers

    rng = random.Random(4)
    texts = _corpus(rng, 150, 40) + ["a a a a b", "a b b b b c", "c c a"] * 2
    index = rouge.RougeLIndex(0.5)
    for i, text in enumerate(texts):
        index.add(text, i)
    index._sign()
    ids = [[index._ids[t] for t in tokenize(text)] for text in texts]
    starts = np.cumsum([0, *map(len, ids)])
    a_layers, depth, _, f_layers, f_depth, _ = layers(np.array(sum(ids, []), dtype=np.int64), starts,
                                                   np.frombuffer(index._bits, dtype=np.uint16), rouge._SIG_WORDS)
    sigs, folds = index._sigs[: len(texts)], index._folds[: len(texts)]
    pruned = folded_pruned = pairs = 0
    for q, a_ids in enumerate(ids):
        # layer 0 against every text's first word set, deeper layers against its "twice" set
        bound = np.bitwise_count(a_layers[q, 0] & sigs[:, 0]).sum(axis=1)
        for level in range(1, int(depth[q])):
            bound += np.bitwise_count(a_layers[q, level] & sigs[:, 1]).sum(axis=1)
        # the same on the words folded to 64 bits: looser, never below the full count
        folded = np.bitwise_count(f_layers[q, 0] & folds[:, 0]).sum(axis=1)
        for level in range(1, int(f_depth[q])):
            folded += np.bitwise_count(f_layers[q, level] & folds[:, 1]).sum(axis=1)
        a = Counter(a_ids)
        for c, (ub, fb) in enumerate(zip(bound.tolist(), folded.tolist())):
            overlap = sum(min(n, Counter(ids[c])[t]) for t, n in a.items())
            assert fb >= ub >= overlap >= rouge._lcs(a_ids, ids[c])
            pruned += ub < len(a_ids)
            folded_pruned += fb < len(a_ids)
            pairs += 1
    assert pruned > pairs / 2  # and it is far from trivial
    assert folded_pruned > pairs / 10  # the folded words, tested first, prune too


# --- greedy_dedup: property-based against the rouge_score loop ------------------------

token = st.sampled_from(["a", "b", "c", "d", "A", "the", "x1", "é", "ß", "e"])
sep = st.sampled_from([" ", " ", ", ", "-", "!", "\n", "_", "  "])
texts_st = st.lists(st.tuples(token, sep), max_size=9).map(lambda parts: "".join(t + s for t, s in parts))
threshold_st = st.one_of(
    st.floats(0.01, 0.99),
    st.sampled_from([0.7, math.nextafter(0.7, 0), math.nextafter(0.7, 1), 0.5, 2 / 3, 0.75, 0.8, 0.6]),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(texts_st, max_size=28), against=st.lists(texts_st, max_size=4), t=threshold_st)
def test_greedy_dedup_equals_rouge_score_loop(texts, against, t):
    assert greedy_dedup(texts, t, against) == reference_greedy(texts, t, against)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), t=threshold_st, alphabet=st.integers(2, 30), small=st.booleans())
def test_greedy_dedup_equals_rouge_score_loop_on_near_copies(seed, t, alphabet, small):
    texts = _corpus(random.Random(seed), 40, alphabet)
    with pytest.MonkeyPatch.context() as mp:
        if small:  # the index re-ranks and merges its postings every few texts
            mp.setattr(rouge.RougeLIndex, "rebuild_at", 4)
            mp.setattr(rouge.RougeLIndex, "merge_min", 2)
        assert greedy_dedup(texts, t, batch=7) == reference_greedy(texts, t)


def test_greedy_dedup_on_a_realistic_mix_equals_the_naive_loop():
    """A bigger run (5,000 texts, several batches) against the all-pairs loop on rapidfuzz,
    itself checked against rouge_score above."""
    rng = random.Random(5)
    texts = _corpus(rng, 5000, 400) + [t.upper() + "!" for t in _corpus(rng, 200, 400)]
    rng.shuffle(texts)
    kept_seqs, kept_lens, kept_pos, expected = [], [], [], []
    vocab: dict[str, int] = {}
    from rapidfuzz import process
    from rapidfuzz.distance import Indel

    for i, text in enumerate(texts):
        toks = tokenize(text)
        seq = "".join(chr(rouge._code(vocab.setdefault(w, len(vocab)))) for w in toks)
        decision = Decision(True)
        if kept_seqs and toks:
            dist = process.cdist([seq], kept_seqs, scorer=Indel.distance, dtype=np.int64)[0]
            lens = np.array(kept_lens)
            scores = rouge._f1_array((len(seq) + lens - dist) // 2, len(toks), lens)
            best = int(np.argmax(scores))
            if scores[best] > 0.7:
                decision = Decision(False, kept_pos[best], float(scores[best]))
        expected.append(decision)
        if decision.kept:
            kept_seqs.append(seq)
            kept_lens.append(len(toks))
            kept_pos.append(i)
    assert greedy_dedup(texts) == expected
    assert greedy_dedup(texts, batch=500) == expected
    assert 0.2 < sum(not d.kept for d in expected) / len(texts) < 0.9


def test_past_the_surrogates_and_past_unicode(monkeypatch):
    # 60,000 shared tokens: codes run past the surrogate block, which must be skipped.
    texts = [f"v{i} v{i + 1} end" for i in range(0, 120_000, 2)]
    decisions = greedy_dedup(texts + texts[:50])
    assert all(d.kept for d in decisions[:60_000])
    assert decisions[60_000:] == [Decision(False, i, 1.0) for i in range(50)]
    # Past unicode a token is an int and a text a list; shrink "unicode" to check that path.
    monkeypatch.setattr(rouge, "_UNICODE_END", 40)
    rng = random.Random(3)
    corpus = _corpus(rng, 200, 120)
    assert greedy_dedup(corpus) == reference_greedy(corpus, 0.7)
    pool = FullScanIndex()
    for i, text in enumerate(corpus[:60]):
        pool.add(text, str(i))
    assert any(type(s) is list for s in pool._seqs)
    for text in corpus[60:90]:
        expected = [reference(p, text) for p in corpus[:60]]
        assert [s for _, _, s in pool.query(text, 60).nearest] == sorted(expected, reverse=True)


def test_greedy_dedup_reports_best_match_and_against_refs():
    texts = ["Write a poem about the sea.", "write a poem about the blue sea", "Write a poem about the sea!"]
    got = greedy_dedup(texts, against=["Write a short poem about the sea."])
    assert got == reference_greedy(texts, 0.7, ["Write a short poem about the sea."])
    assert got[0].dup_of == -1 and got[2] == Decision(
        False, -1, reference("Write a short poem about the sea.", texts[2])
    )
    assert greedy_dedup([]) == []
    assert greedy_dedup(["", "!!", ""]) == [Decision(True)] * 3
    with pytest.raises(ValueError):
        greedy_dedup(["a"], threshold=1.5)


# --- FullScanIndex ---------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    pool=st.lists(texts_st, max_size=25),
    queries=st.lists(texts_st, min_size=1, max_size=4),
    t=threshold_st,
    k=st.integers(0, 6),
)
def test_index_query_equals_brute_force(pool, queries, t, k):
    index = FullScanIndex(t)
    for i, text in enumerate(pool):
        index.add(text, f"r{i}")
    assert len(index) == len(pool)
    for q in queries:
        scores = [reference(p, q) for p in pool]
        top = sorted(range(len(pool)), key=lambda i: (-scores[i], i))[:k]
        match = index.query(q, nearest=k)
        assert match.duplicate == any(s > t for s in scores)
        assert match.nearest == [(f"r{i}", pool[i], scores[i]) for i in top]


def test_index_nearest_ties_go_to_the_earlier_added():
    index = FullScanIndex()
    for ref in ["first", "second", "third"]:
        index.add("List three prime numbers", ref)
    index.add("Write a poem", "poem")
    match = index.query("list three prime numbers!", nearest=2)
    assert match.duplicate
    assert [r for r, _, _ in match.nearest] == ["first", "second"]
    assert FullScanIndex().query("anything") == rouge.Match(False, [])


# --- long texts: single-element prefixes (> 40 tokens) and the index's rapidfuzz path (> 64) ---

LONG_SEPS = [" ", " ", " ", ", ", "-", "! ", "\n", "_", "... "]


def render(rng: random.Random, toks: list[str]) -> str:
    """Tokens joined by assorted separators, sometimes shouted: the same rouge tokens either way."""
    text = "".join(t + rng.choice(LONG_SEPS) for t in toks)
    return text.upper() if rng.random() < 0.1 else text


def edit(rng: random.Random, toks: list[str], words: list[str], edits: int) -> list[str]:
    """``edits`` random substitutions, insertions and deletions."""
    toks = list(toks)
    for _ in range(edits):
        op = rng.random()
        if op < 0.4 and toks:
            toks[rng.randrange(len(toks))] = rng.choice(words)
        elif op < 0.7:
            toks.insert(rng.randint(0, len(toks)), rng.choice(words))
        elif toks:
            del toks[rng.randrange(len(toks))]
    return toks


def long_corpus(rng: random.Random, n: int, alphabet: int, short_share: float = 0.2) -> list[str]:
    """Mostly 41-300 tokens from a small alphabet, half of them edited copies of earlier texts
    (a few edits to a third of the length, so scores land on both sides of any threshold)."""
    words = [f"w{i}" for i in range(alphabet)]
    token_lists: list[list[str]] = []
    for _ in range(n):
        r = rng.random()
        if token_lists and r < 0.5:
            base = rng.choice(token_lists)
            token_lists.append(edit(rng, base, words, rng.choice([0, 1, 2, rng.randint(0, len(base) // 3 + 1)])))
        elif r < 0.5 + short_share:
            token_lists.append(rng.choices(words, k=rng.randint(1, 40)))
        else:
            hi = rng.choice([80, 80, 150, 300])
            token_lists.append(rng.choices(words, k=rng.randint(41, hi)))
    return [render(rng, toks) for toks in token_lists]


def near(x: float, step: int) -> float:
    """x moved ``step`` (-1, 0 or 1) units in the last place."""
    return x if step == 0 else math.nextafter(x, step)


long_threshold_st = st.one_of(
    st.floats(0.05, 0.95),
    st.sampled_from([0.7, 0.5, 0.9]).flatmap(lambda x: st.sampled_from([near(x, -1), x, near(x, 1)])),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(2, 14),
    alphabet=st.integers(2, 40),
    t=long_threshold_st,
    on_a_score=st.sampled_from([None, -1, 0, 1]),
    against=st.integers(0, 2),
    small=st.booleans(),  # the index re-ranks and merges every few texts
)
# A 280-token text against two 4-token ones at t = 0.028: the lookups' runs up to the longest indexed
# length read nothing for odd elements (test_rouge's test_a_lookup_up_to_the_longest_indexed_length...).
@example(seed=14513, n=2, alphabet=2, t=0.5, on_a_score=-1, against=2, small=True)
def test_greedy_dedup_equals_rouge_score_loop_on_long_texts(seed, n, alphabet, t, on_a_score, against, small):
    rng = random.Random(seed)
    texts = long_corpus(rng, n + against, alphabet)
    against, texts = texts[:against], texts[against:]
    if on_a_score is not None and len(texts) >= 2:
        # The threshold is an actual score in the data, or one unit in the last place either side.
        i, j = sorted(rng.sample(range(len(texts)), 2))
        s = reference(texts[i], texts[j])
        if 0 < s < 1:
            t = near(s, on_a_score)
    with pytest.MonkeyPatch.context() as mp:
        if small:
            mp.setattr(rouge.RougeLIndex, "rebuild_at", 3)
            mp.setattr(rouge.RougeLIndex, "merge_min", 2)
        assert greedy_dedup(texts, t, against, batch=rng.choice([1, 3, 64])) == reference_greedy(texts, t, against)


def _one_token_apart(kind: str, toks: list[str]) -> list[str]:
    mid = len(toks) // 2
    if kind == "identical":
        return list(toks)
    if kind.startswith("sub"):
        at = {"sub-first": 0, "sub-middle": mid, "sub-last": len(toks) - 1}[kind]
        return toks[:at] + ["zz"] + toks[at + 1 :]
    if kind == "insert":
        return toks[:mid] + ["zz"] + toks[mid:]
    if kind == "delete":
        return toks[:mid] + toks[mid + 1 :]
    if kind == "swap":  # two neighbours exchanged: LCS one shorter
        return toks[: mid - 1] + [toks[mid], toks[mid - 1]] + toks[mid + 1 :]
    raise ValueError(kind)


@pytest.mark.parametrize("length", [41, 64, 65, 300])
@pytest.mark.parametrize("kind", ["identical", "sub-first", "sub-middle", "sub-last", "insert", "delete", "swap"])
@pytest.mark.parametrize("vocab", ["distinct", "few"])
def test_long_texts_one_token_apart_decided_on_their_exact_score(length, kind, vocab):
    """The threshold sits on the pair's own score: above it the copy stays, one ulp below it goes."""
    rng = random.Random(length)
    words = [f"w{i}" for i in range(length)] if vocab == "distinct" else ["a", "b", "c", "d", "e"]
    toks = rng.sample(words, length) if vocab == "distinct" else rng.choices(words, k=length)
    a = render(rng, toks)
    b = render(rng, _one_token_apart(kind, toks))
    other = render(rng, rng.choices(["zz", "a", "w1", "q"], k=length))  # "zz" shared, so it is not dropped
    s = reference(a, b)
    assert rouge_l(a, b) == s
    assert (s == 1.0) == (tokenize(a) == tokenize(b))  # a swap of equal neighbours changes nothing
    for t in sorted({near(s, -1), s, near(s, 1), 0.7, near(0.7, 1)} - {math.nextafter(1.0, 2)}):
        texts = [a, other, b, a]
        expected = reference_greedy(texts, t)
        assert expected[2].kept == (s <= t)
        assert greedy_dedup(texts, t) == expected, t
        assert greedy_dedup(texts, t, batch=1) == expected, t
        pool = FullScanIndex(t)
        pool.add(a, "a")
        pool.add(other, "other")
        match = pool.query(b, nearest=2)
        assert match.duplicate == (s > t or reference(other, b) > t)
        assert match.nearest[0] == ("a", a, s) or reference(other, b) >= s


@pytest.mark.parametrize(
    "la, lb, lcs, x",
    [(100, 100, 70, 0.7), (70, 130, 70, 0.7), (60, 140, 70, None), (100, 100, 50, 0.5), (50, 150, 50, 0.5),
     (100, 100, 90, 0.9), (45, 55, 45, 0.9), (200, 300, 175, 0.7)],
)  # fmt: skip
@pytest.mark.parametrize("filler", ["unique", "shared"])  # replaced tokens used once (dropped) or repeated
def test_long_pairs_exactly_on_a_paper_threshold(la, lb, lcs, x, filler):
    """F1 = 2*lcs/(la+lb) is exactly 0.5, 0.7 or 0.9 on paper; the float decides, as in rouge_score."""
    common = [f"c{i}" for i in range(lcs)]
    extra_a = [f"a{i}" if filler == "unique" else "xa" for i in range(max(0, la - lcs))]
    extra_b = [f"b{i}" if filler == "unique" else "xb" for i in range(lb - lcs)]
    rng = random.Random(la * lb + lcs)
    toks_a = common[:la] + extra_a  # each extra token sits at the end: the LCS stays `common`
    toks_b = extra_b[: len(extra_b) // 2] + common + extra_b[len(extra_b) // 2 :]
    a, b = render(rng, toks_a), render(rng, toks_b)
    s = reference(a, b)
    assert s == rouge_l(a, b) == rouge_l(b, a)
    if x is not None:
        assert abs(s - x) < 1e-12 and 2 * min(lcs, la) / (la + lb) == x
    for t in [near(x or s, -1), x or s, near(x or s, 1), near(s, -1), s, near(s, 1)]:
        for texts in ([a, b], [b, a], [a, "xa xb", b, a]):
            assert greedy_dedup(texts, t) == reference_greedy(texts, t), (t, texts.index(b))
        pool = FullScanIndex(t)
        pool.add(a, "a")
        assert pool.query(b, nearest=1) == rouge.Match(s > t, [("a", a, s)])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10**6),
    alphabet=st.integers(2, 40),
    n_pool=st.integers(1, 9),
    t=long_threshold_st,
    k=st.integers(0, 10),
)
def test_index_query_equals_rouge_score_on_long_texts(seed, alphabet, n_pool, t, k):
    rng = random.Random(seed)
    texts = long_corpus(rng, n_pool + 3, alphabet, short_share=0.3)
    pool, queries = texts[:n_pool], texts[n_pool:]
    index = FullScanIndex(t)
    for i, text in enumerate(pool):
        index.add(text, f"r{i}")
    unseen = [f"new{i}" for i in range(4)]  # tokens the pool never saw count only in the length
    queries += [rng.choice(pool), render(rng, edit(rng, tokenize(rng.choice(pool)), unseen, rng.randint(1, 12)))]
    for q in queries:
        scores = [reference(p, q) for p in pool]
        top = sorted(range(len(pool)), key=lambda i: (-scores[i], i))[:k]
        match = index.query(q, nearest=k)
        assert match.duplicate == any(s > t for s in scores)
        assert match.nearest == [(f"r{i}", pool[i], scores[i]) for i in top]


@pytest.mark.parametrize("length", [63, 64, 65, 66, 128])
def test_index_bit_parallel_and_rapidfuzz_paths_agree_at_64_tokens(length):
    """Kept texts up to 64 tokens are one 64-bit word each, longer ones go through rapidfuzz."""
    rng = random.Random(length)
    words = ["a", "b", "c", "d"]
    base = rng.choices(words, k=length)
    pool_toks = [base, edit(rng, base, words, 1), edit(rng, base, words, 8), rng.choices(words, k=length)]
    pool_toks += [base[:64], base[:63] + ["e"], base + ["a"]]
    pool = [render(rng, t) for t in pool_toks]
    index = FullScanIndex()
    for i, text in enumerate(pool):
        index.add(text, str(i))
    assert (len(index._long) > 0) == (length >= 64)
    queries = [pool[0], render(rng, base[: length // 2]), render(rng, edit(rng, base, words, 3)), "", "a", pool[-1]]
    queries += [render(rng, edit(rng, base, ["zz", "yy"], 6)), "zz " + pool[0]]  # with tokens the pool never saw
    for q in queries:
        expected = [reference(p, q) for p in pool]
        match = index.query(q, nearest=len(pool))
        assert sorted(s for _, _, s in match.nearest) == sorted(expected)
        assert [s for _, _, s in match.nearest] == [expected[int(r)] for r, _, _ in match.nearest]
        assert match.duplicate == any(s > 0.7 for s in expected)


# --- unicode beyond é and ß ---------------------------------------------------------

# Kelvin sign and dotted capital I lower to ASCII ("k", "i" + a combining dot); the rest
# lower to non-ASCII (separators to rouge_score), some next to ASCII letters that survive.
ADVERSARIAL = [
    "\u212a", "\u212aelvin", "kelvin", "k", "\u0130", "\u0130stanbul", "istanbul", "i", "\u0131", "\u1e9e", "ss",
    "\uff11\uff12\uff13", "123", "\uff21b", "ab", "\U0001f642", "\U0001f44d\U0001f3fd", "e\u0301", "e", "cafe\u0301",
    "caf\u00e9", "\u65e5\u672c\u8a9e", "\u4e2d", "\u01c5", "\ufb01ne", "ne", "\u212b", "x\u00b2", "x2", "\u200d",
    "\ufeff", "\x00", "\udc80", "\u03a3\u03c3\u03c2", "\u0660\u0661", "\u2160", "a\u0308",
]  # fmt: skip
unicode_texts_st = st.one_of(
    st.lists(st.tuples(st.sampled_from(ADVERSARIAL), sep), max_size=10).map(lambda p: "".join(t + s for t, s in p)),
    st.text(st.sampled_from("kKi\u212a\u0130\u0131e\u0301\uff11\uff41\U0001f642\u4e2d ab1-"), max_size=20),
)


@pytest.mark.parametrize("text", ADVERSARIAL + [" ".join(ADVERSARIAL), "".join(ADVERSARIAL)])
def test_tokenize_is_rouge_scores_tokenizer_on_adversarial_unicode(text):
    assert tokenize(text) == rouge_tokenize.tokenize(text, None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(unicode_texts_st, max_size=20), against=st.lists(unicode_texts_st, max_size=3), t=threshold_st)
def test_greedy_dedup_equals_rouge_score_loop_on_adversarial_unicode(texts, against, t):
    assert greedy_dedup(texts, t, against) == reference_greedy(texts, t, against)
    pool = FullScanIndex(t)
    for i, text in enumerate(against):
        pool.add(text, str(i))
    for text in texts[:3]:
        assert pool.query(text).duplicate == any(reference(p, text) > t for p in against)


def test_unicode_that_lowers_to_ascii_is_a_duplicate():
    # rouge_score lowers first: the Kelvin sign is "k" and "İ" is "i" plus a combining dot.
    assert tokenize("\u212aeep \u0130t") == ["keep", "i", "t"]  # the dot splits "İt" in two
    texts = ["\u212aeep \u0130 simple", "keep i simple", "\uff4beep \u0131 simple"]  # fullwidth k, dotless i: not ASCII
    expected = [Decision(True), Decision(False, 0, 1.0), Decision(True)]
    assert greedy_dedup(texts) == reference_greedy(texts, 0.7) == expected


# --- the looser methods --------------------------------------------------------------


def test_fuzzy_and_minhash_remove_exact_and_trivial_copies():
    texts = [
        "Write a poem about the sea.",
        "Sum two numbers.",
        "write a poem about the sea",
        "SUM TWO NUMBERS!",
        "Name a color.",
    ]
    for method in (dedup.fuzzy_dedup, dedup.minhash_dedup):
        got = method(texts, 0.7)
        assert [d.kept for d in got] == [True, True, False, False, True], method.__name__
        assert got[2].dup_of == 0 and got[3].dup_of == 1
        assert [d.kept for d in method(["Name a color."], 0.7, against=["name a color"])] == [False]


def test_minhash_recall_against_exact(capsys):
    rng = random.Random(11)
    texts = _corpus(rng, 1500, 300)
    exact = {i for i, d in enumerate(greedy_dedup(texts)) if not d.kept}
    approx = {i for i, d in enumerate(dedup.minhash_dedup(texts, 0.7)) if not d.kept}
    fuzzy = {i for i, d in enumerate(dedup.fuzzy_dedup(texts, 0.7)) if not d.kept}
    recall = len(exact & approx) / len(exact)
    with capsys.disabled():
        print(
            f"\n[dedup] removed of {len(texts)}: exact rougeL {len(exact)}, minhash {len(approx)} "
            f"(recall vs exact {recall:.2f}), fuzzy {len(fuzzy)} (recall {len(exact & fuzzy) / len(exact):.2f})"
        )
    assert recall > 0.2  # approximate by design; this only guards against a broken method


# --- the dedup command ---------------------------------------------------------------

ALPACA = [
    {"instruction": "Write a poem about the sea.", "input": "", "output": "Waves..."},
    {"instruction": "Give three tips for sleeping well.", "input": "", "output": "1. ..."},
    {"instruction": "Write a poem about the sea!", "input": "", "output": "Blue..."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Translate to French.", "input": "Thank you", "output": "Merci"},
]


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    dedup.add_arguments(parser)
    return dedup.run(parser.parse_args([str(a) for a in argv]))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_alpaca_json(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ALPACA, indent=2))
    out = tmp_path / "out"
    assert run_cli(data, "--out", out) == 0
    kept, removed = read_jsonl(out / "kept.jsonl"), read_jsonl(out / "removed.jsonl")
    assert [r["output"] for r in kept] == ["Waves...", "1. ...", "Bonjour"]
    assert [r["output"] for r in removed] == ["Blue...", "Merci"]
    assert removed[0]["duplicate_of"] == {"source": str(data), "index": 0, "instruction": "Write a poem about the sea."}
    assert removed[0]["score"] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 5 and summary["kept"] == 3 and summary["removed"] == 2
    assert summary["method"] == "rougeL" and summary["threshold"] == 0.7 and summary["seconds"] >= 0
    # No temp files; the lock file stays (removing it would race a second run opening it).
    assert sorted(p.name for p in out.iterdir()) == [".selfinstruct-filtered", ".selfinstruct-lock", "kept.jsonl",
                                                      "removed.jsonl", "summary.json"]


def test_cli_jsonl_with_input_field_against_and_config(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ALPACA) + "\n\n")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "Give 3 tips for sleeping well"}) + "\n")
    cfg = tmp_path / "dedup.yaml"
    cfg.write_text("field: instruction+input\nthreshold: 0.8\n")
    out = tmp_path / "out"
    assert run_cli(data, "--out", out, "--against", seeds, "--config", cfg) == 0
    kept, removed = read_jsonl(out / "kept.jsonl"), read_jsonl(out / "removed.jsonl")
    assert [r["output"] for r in kept] == ["Waves...", "Bonjour", "Merci"]  # inputs differ now
    assert removed[0]["duplicate_of"]["source"] == str(seeds) and removed[0]["duplicate_of"]["index"] == 0
    assert json.loads((out / "summary.json").read_text())["threshold"] == 0.8


@pytest.mark.parametrize("method", ["fuzzy", "minhash"])
def test_cli_other_methods(tmp_path, method):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ALPACA))
    out = tmp_path / "out"
    assert run_cli(data, "--out", out, "--method", method) == 0
    assert json.loads((out / "summary.json").read_text())["method"] == method
    assert len(read_jsonl(out / "removed.jsonl")) >= 2


def test_text_in_another_script_is_counted_as_unread_and_fuzzy_is_named(tmp_path, capsys):
    # rouge_score's tokenizer reads a-z and 0-9 only: exact Cyrillic copies get no tokens and are
    # never duplicates. The summary and the table say so, and name the method that can compare them.
    poem = "Напишите короткое стихотворение о море и ветре."
    rows = [{"instruction": poem, "input": "", "output": "a"}, {"instruction": poem, "input": "", "output": "b"},
            {"instruction": "Назовите 2 реки в Europe.", "input": "", "output": "c"}, *ALPACA]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    against = tmp_path / "against.jsonl"
    against.write_text(json.dumps({"instruction": "Опишите café"}) + "\n" + json.dumps({"instruction": "Sum 2 and 3"}) + "\n")
    out = tmp_path / "out"
    assert run_cli(data, "--out", out, "--against", against) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["removed"] == 2 and summary["unread"] == 3 and summary["against_unread"] == 1
    assert read_jsonl(out / "kept.jsonl")[:2] == rows[:2]  # the copy stays: what the count warns of
    table = " ".join(capsys.readouterr().out.split())
    assert "records not in a-z/0-9" in table and "try --method fuzzy" in table and "against not in a-z/0-9" in table

    assert run_cli(data, "--out", tmp_path / "fuzzy", "--method", "fuzzy") == 0
    summary = json.loads((tmp_path / "fuzzy" / "summary.json").read_text())
    assert "unread" not in summary and [r["output"] for r in read_jsonl(tmp_path / "fuzzy" / "removed.jsonl")][0] == "b"
    assert "not in a-z/0-9" not in capsys.readouterr().out


def test_cli_run_folder_flattens_instances(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    tasks = [
        {
            "id": "r1-0",
            "instruction": "Sort the numbers.",
            "instances": [{"input": "3 1 2", "output": "1 2 3"}, {"input": "9 8", "output": "8 9"}],
        },
        {"id": "r1-1", "instruction": "Sort these numbers!", "instances": [{"input": "5 4", "output": "4 5"}]},
        {"id": "r2-0", "instruction": "Name a planet.", "instances": [{"output": "Mars"}]},
    ]
    from conftest import provenance

    from selfinstruct.datafiles import mark_run_folder

    mark_run_folder(run)
    (run / "kept.jsonl").write_text("".join(json.dumps(t | {"provenance": provenance().model_dump()}) + "\n" for t in tasks))
    out = tmp_path / "out"
    assert run_cli(run, "--out", out, "--field", "instruction+input") == 0
    kept = read_jsonl(out / "kept.jsonl")
    assert [(r["id"], r["input"], r["output"]) for r in kept] == [
        ("r1-0", "3 1 2", "1 2 3"),
        ("r1-0", "9 8", "8 9"),
        ("r1-1", "5 4", "4 5"),
        ("r2-0", "", "Mars"),
    ]
    assert "instances" not in kept[0]


def _chat(fmt: str, *turns: str, **extra) -> dict:
    """A conversation of alternating user and assistant turns, as ShareGPT or messages."""
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)],
                **extra}
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)],
            **extra}


@pytest.mark.parametrize("fmt, name", [("sharegpt", "data.json"), ("messages", "data.jsonl")])
def test_cli_conversations_are_compared_by_their_first_user_turn_and_kept_whole(tmp_path, fmt, name):
    """ShareGPT and messages files were refused ('field instruction: missing') though dedup takes
    "any dataset". A conversation is compared by its first user turn (an Alpaca instruction's
    analog: export writes an Alpaca row's instruction and input there), and written whole, as it came."""
    from selfinstruct.export import read_conversations

    system = {"from": "system", "value": "Be brief."} if fmt == "sharegpt" else {"role": "system", "content": "Be brief."}
    rows = [
        _chat(fmt, "Write a poem about the sea.", "Waves...", id="a"),
        _chat(fmt, "Give three tips for sleeping well.", "1. ...", "And one more?", "4. ..."),
        _chat(fmt, "Write a poem about the sea!", "Blue...", "Shorter.", "Blue."),  # its later turns differ
        _chat(fmt, "Name a planet.", "Mars", "Write a poem about the sea.", "Waves"),  # a later turn is not compared
        _chat(fmt, "Sleeping well: give three tips.", "Dark room"),
    ]
    key = "conversations" if fmt == "sharegpt" else "messages"
    rows[1][key].insert(0, system)  # a system turn first: the first *user* turn is compared
    data = tmp_path / name
    data.write_text(json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows))
    seeds = tmp_path / "seeds.jsonl"  # Alpaca rows count as kept against conversations
    seeds.write_text(json.dumps({"instruction": "Sleeping well: give three tips."}) + "\n")
    out = tmp_path / "out"
    assert run_cli(data, "--out", out, "--against", seeds) == 0
    kept, removed = read_jsonl(out / "kept.jsonl"), read_jsonl(out / "removed.jsonl")
    assert kept == [rows[0], rows[1], rows[3]]  # whole, in the input's shape, nothing added
    assert [{k: v for k, v in r.items() if k not in ("duplicate_of", "score")} for r in removed] == [rows[2], rows[4]]
    assert removed[0]["duplicate_of"] == {"source": str(data), "index": 0, "instruction": "Write a poem about the sea."}
    assert removed[1]["duplicate_of"]["source"] == str(seeds) and removed[1]["score"] == 1.0
    assert [c["messages"][-1]["content"] for c in read_conversations(out / "kept.jsonl")] == ["Waves...", "4. ...", "Waves"]


def test_cli_a_broken_conversation_is_one_line_naming_its_turn(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(_chat("messages", "Hi.", "Hello.")) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Hi."}, {"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(UserError) as e:
        run_cli(data, "--out", tmp_path / "out")
    assert str(e.value) == f"{data}:2: messages[1]: role 'bot': expected user, assistant or system"
    data.write_text(json.dumps(_chat("sharegpt", "Hi.", "Hello.")) + "\n"
                    + json.dumps({"conversations": [{"from": "gpt", "value": "Hello."}]}) + "\n")
    with pytest.raises(UserError, match=f"^{data}:2: conversation has no user turn$"):
        run_cli(data, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


BAD_INPUTS = [  # file name, content, the error after the path
    ("bad.jsonl", '{"instruction": "ok"}\n{"instruction": oops}\n', ":2: not valid JSON (Expecting value at column 17)"),
    ("bad.json", '[\n  {"instruction": "ok"},\n  {"instruction": }\n]', ":3: not valid JSON (Expecting value at column 19)"),
    ("trail.json", '[{"instruction": "ok"}] x', ":1: not valid JSON (Extra data at column 25)"),
    ("nofield.jsonl", '{"instruction": "ok"}\n\n{"output": "x"}\n', ":3: field 'instruction': missing"),
    ("nofield.json", '[\n {"instruction": "ok"},\n {"input": "x",\n  "output": "y"}\n]',
     ":3: item 1: field 'instruction': missing"),
    ("type.jsonl", '{"instruction": 3}\n', ":1: field 'instruction': must be a string, got int"),
    ("list.jsonl", "[1, 2]\n", ":1: item 0: is a number, not a record: a record is a JSON object with instruction (alpaca), "
     "conversations (sharegpt) or messages"),
    ("object.json", '{\n  "data": [{"instruction": "ok"}]\n}\n', ": one JSON object, not a list of records nor a record a line "
     "(JSONL); its list 'data' may hold the records: give that list alone"),
    ("object2.json", '{\n  "instruction": "ok",\n  "n": [1]\n}\n', ": one JSON object, not a list of records nor a record a line (JSONL)"),
    ("empty.jsonl", "\n  \n", ": file is empty"),
    ("empty.json", "", ": file is empty"),
    ("none.json", "[]", ": no records"),
]  # fmt: skip


@pytest.mark.parametrize("name, content, error", BAD_INPUTS)
def test_cli_bad_input_is_one_line_user_error_and_writes_nothing(tmp_path, name, content, error):
    data = tmp_path / name
    data.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        run_cli(data, "--out", out)
    assert str(e.value) == f"{data}{error}"
    assert not out.exists()


@pytest.mark.parametrize("name, content, error", BAD_INPUTS)
@pytest.mark.parametrize("bad", ["data", "against"])
def test_selfinstruct_dedup_bad_input_exits_2_with_one_line_and_creates_no_folder(
    tmp_path, capsys, name, content, error, bad
):
    from selfinstruct import cli

    path = tmp_path / name
    path.write_text(content)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(ALPACA))
    out = tmp_path / "new" / "out"
    argv = [str(path), "--out", str(out)] if bad == "data" else [str(good), "--out", str(out), "--against", str(path)]
    assert cli.main(["dedup", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"selfinstruct dedup: error: {path}{error}\n"
    assert captured.out == ""
    assert not (tmp_path / "new").exists()


def test_cli_missing_paths_and_bad_options(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(ALPACA))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no such file or folder"):
        run_cli(tmp_path / "missing.json", "--out", out)
    with pytest.raises(UserError, match="missing.jsonl: no such file"):
        run_cli(good, "--out", out, "--against", tmp_path / "missing.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="must be a run folder"):
        run_cli(tmp_path / "folder", "--out", out)
    with pytest.raises(UserError, match="^--out is required: give it as a flag, or as out: in a --config file$"):
        run_cli(good)
    empty = tmp_path / "empty.yaml"
    empty.write_text("threshold: 0.5\n")
    with pytest.raises(UserError, match=f"^--out is required: give it as a flag, or as out: in {empty}$"):
        run_cli(good, "--config", empty)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("treshold: 0.5\n")
    with pytest.raises(UserError, match="treshold.*unknown option"):
        run_cli(good, "--out", out, "--config", cfg)
    with pytest.raises(UserError, match="threshold"):
        run_cli(good, "--out", out, "--threshold", "1.5")
    assert not out.exists()


def test_options_all_have_help():
    for name, field in dedup.DedupOptions.model_fields.items():
        assert field.description, name
    parser = argparse.ArgumentParser()
    dedup.add_arguments(parser)
    assert "PydanticUndefined" not in parser.format_help()


def _two_inputs(tmp_path, command: str, tasks: list[str], first: int):
    """small.json (the first tasks) and big.json (all), the flags a command needs besides
    (decontaminate: a benchmark file), and an --out folder: for two runs into one folder."""
    rows = [{"instruction": t, "input": "", "output": "x"} for t in tasks]
    small, big = tmp_path / "small.json", tmp_path / "big.json"
    small.write_text(json.dumps(rows[:first]))
    big.write_text(json.dumps(rows))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is the boiling point of water at sea level in kelvin?"}) + "\n")
    more = ["--against", str(bench)] if command == "decontaminate" else []
    return small, big, more, tmp_path / "out"


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
def test_a_write_cut_short_never_leaves_an_earlier_summary_beside_new_rows(tmp_path, monkeypatch, command):
    """kept.jsonl, removed.jsonl and summary.json are each replaced atomically, not together:
    a kill after the new kept.jsonl must not leave the earlier run's summary.json (which
    export's card reads) describing it. Here the second write fails, as a kill would stop it."""
    from selfinstruct import cli, datafiles

    small, big, more, out = _two_inputs(tmp_path, command, ["Name the capital of France.",
                                        "Write a haiku about autumn rain.", "Sort these numbers: 3, 1, 2.",
                                        "Explain photosynthesis to a child.", "Translate 'good morning' into Spanish."], 2)
    assert cli.main([command, str(small), *more, "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["records"] == 2

    real = datafiles.write_atomic

    def cut(path, *a, **k):
        if Path(path).name == "removed.jsonl":
            raise KeyboardInterrupt  # stands for the kill
        return real(path, *a, **k)

    monkeypatch.setattr(datafiles, "write_atomic", cut)
    assert cli.main([command, str(big), *more, "--out", str(out)]) == 130  # "interrupted"
    assert len((out / "kept.jsonl").read_text().splitlines()) == 5
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(datafiles, "write_atomic", real)
    # Ours still, by its marker (no summary.json says so now): the next run writes it whole.
    assert cli.main([command, str(small), *more, "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["records"] == 2


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
def test_a_second_run_into_a_folder_in_use_is_refused_and_writes_nothing(tmp_path, capsys, command):
    """Two runs into one --out would each replace kept.jsonl, removed.jsonl and summary.json:
    the set could end as one run's rows beside the other's summary. While another process
    holds the folder's lock, a second run is one line, rc 2, and every file stays as it was."""
    import subprocess
    import sys

    from selfinstruct import cli

    small, big, more, out = _two_inputs(tmp_path, command, ["Name the capital of France.",
                                        "Write a haiku about autumn rain.", "Sort these numbers: 3, 1, 2."], 1)
    assert cli.main([command, str(small), *more, "--out", str(out)]) == 0
    capsys.readouterr()

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from selfinstruct.datafiles import run_lock\n"
         f"with run_lock(sys.argv[1], {command!r}):\n    print('held', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert cli.main([command, str(big), *more, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"in use by pid {holder.pid} (selfinstruct {command}" in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert cli.main([command, str(big), *more, "--out", str(out)]) == 0  # the lock went with its holder
    assert len((out / "kept.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
def test_the_out_folder_is_made_and_locked_before_the_work(tmp_path, monkeypatch, capsys, command):
    """An --out that cannot be made fails before any scoring (not after minutes of it), and
    while the work runs the folder is already locked: a second run is refused at its start."""
    import fcntl
    import os

    from selfinstruct import cli, decontaminate
    from selfinstruct.datafiles import LOCK

    small, _, more, out = _two_inputs(tmp_path, command, ["Name the capital of France.",
                                      "Write a haiku about autumn rain."], 2)
    module, name = (dedup, "dedup_texts") if command == "dedup" else (decontaminate, "decontaminate")
    work = getattr(module, name)
    calls = []

    def locked_work(*a, **kw):
        fd = os.open(out / LOCK, os.O_RDWR)  # a second open file description: flock conflicts with the run's
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        calls.append(1)
        return work(*a, **kw)

    monkeypatch.setattr(module, name, locked_work)
    (tmp_path / "a_file").write_text("x")
    assert cli.main([command, str(small), *more, "--out", str(tmp_path / "a_file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create the folder" in err, err
    assert calls == []  # refused before the work
    assert cli.main([command, str(small), *more, "--out", str(out)]) == 0
    assert calls == [1]
    assert len((out / "kept.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
def test_a_refusal_during_the_work_leaves_no_out_folder_it_made(tmp_path, monkeypatch, capsys, command):
    """--out is made before the work, but a refusal found in it (decontaminate reads its
    benchmarks there) takes back the folders this run made: no empty folder holding a lock
    file is left behind, and an --out that was there stays."""
    from selfinstruct import cli

    small, _, more, _ = _two_inputs(tmp_path, command, ["Name the capital of France."], 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"foo": "bar"}) + "\n")
    if command == "decontaminate":
        more = ["--against", str(bad)]
    else:  # dedup reads its inputs before --out: here its work fails as a benchmark would
        def broken(*a, **kw):
            raise UserError(f"{bad}:1: no instruction")

        monkeypatch.setattr(dedup, "dedup_texts", broken)
    out = tmp_path / "new" / "out"
    assert cli.main([command, str(small), *more, "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "new").exists()
    (tmp_path / "there").mkdir()
    assert cli.main([command, str(small), *more, "--out", str(tmp_path / "there")]) == 2
    assert (tmp_path / "there").is_dir()


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
def test_an_out_folder_holding_the_users_own_kept_jsonl_is_refused(tmp_path, capsys, command):
    """--out names a folder; kept.jsonl, removed.jsonl and summary.json are written inside it.
    A folder of the user's that holds a file of one of those names (not a result of ours) is
    refused with one line and left as it was; a folder an earlier run wrote is replaced."""
    from selfinstruct import cli

    small, big, more, out = _two_inputs(tmp_path, command, ["Name the capital of France.",
                                        "Write a haiku about autumn rain.", "Sort these numbers: 3, 1, 2."], 1)
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("kept.jsonl", "summary.json"):
        (mine / name).write_text('{"mine": 1}\n')
        assert cli.main([command, str(small), *more, "--out", str(mine)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"holds {name}, which dedup or decontaminate did not write" in err, err
        assert (mine / name).read_text() == '{"mine": 1}\n' and not (mine / "removed.jsonl").exists()
        (mine / name).unlink()
    assert cli.main([command, str(small), *more, "--out", str(out)]) == 0
    assert cli.main([command, str(big), *more, "--out", str(out)]) == 0  # our own result: replaced
    assert len((out / "kept.jsonl").read_text().splitlines()) == 3
    for name in (".selfinstruct-lock", ".selfinstruct-filtered"):  # from before either: known by its summary.json
        (out / name).unlink()
    assert cli.main([command, str(small), *more, "--out", str(out)]) == 0
    # From before the marker, and its write cut short by a kill (no summary.json): known by the lock its
    # run held last, as before; a lock that another command took last (filter's) is no such proof.
    (out / ".selfinstruct-filtered").unlink()
    (out / "summary.json").unlink()
    assert cli.main([command, str(big), *more, "--out", str(out)]) == 0
    assert len((out / "kept.jsonl").read_text().splitlines()) == 3
    (out / ".selfinstruct-filtered").unlink()
    (out / "summary.json").unlink()
    (out / ".selfinstruct-lock").write_text('{"pid": 1, "command": "selfinstruct filter", "since": "x"}\n')
    assert cli.main([command, str(small), *more, "--out", str(out)]) == 2
    assert len((out / "kept.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("marker, says", [
    ('{"format": 2, "tool": "selfinstruct", "command": "dedup"}\n',
     "says the dedup or decontaminate output folder is format 2 (a newer selfinstruct's?), but this version reads "
     "and writes format 1 only: use the version that wrote it"),
    ("garbage\n", 'holds "garbage", not a dedup or decontaminate output folder\'s marker; this version writes '
                   '{"format": 1, "tool": "selfinstruct", "command": "dedup"} there ("decontaminate" for its own; '
                   'was it edited?)')])
@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
def test_an_out_folder_whose_filtered_marker_says_another_format_is_refused_by_every_command(tmp_path, capsys,
                                                                                             command, marker, says):
    """The filtered marker's format was written and never read (as the run marker's once): a folder a newer
    selfinstruct wrote, or one whose marker was edited, was written into again, exported and audited as this
    version's. One line naming the marker, what it says and what this version writes; the folder as it was."""
    from selfinstruct import cli

    small, big, more, out = _two_inputs(tmp_path, command, ["Name the capital of France.",
                                        "Write a haiku about autumn rain.", "Sort these numbers: 3, 1, 2."], 1)
    assert cli.main([command, str(small), *more, "--out", str(out)]) == 0
    (out / ".selfinstruct-filtered").write_text(marker)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    for argv in ([command, str(big), *more, "--out", str(out)],
                 ["export", str(out / "kept.jsonl"), "--format", "jsonl", "--out", str(tmp_path / "e.jsonl")],
                 ["audit", str(out / "kept.jsonl")], ["dedup", str(out / "kept.jsonl"), "--out", str(tmp_path / "d")]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"selfinstruct {argv[0]}: error: "), err
        assert err.rstrip("\n").endswith(f"{out / '.selfinstruct-filtered'}: {says}"), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "e.jsonl").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
@pytest.mark.parametrize("inside", ["run/x", "run/a/b"])
def test_an_out_folder_inside_a_run_folder_is_refused_as_respond_refuses_it(tmp_path, capsys, command, inside):
    """`respond d.json --out run/x` is refused (a run's folder is its command's, and what is made in it is
    none of its files); `dedup d.json --out run/x` was written there, a folder of ours that no run command
    knows. One line, respond's, and no folder made inside the run."""
    from selfinstruct import cli

    from conftest import write_run

    small, _, more, _ = _two_inputs(tmp_path, command, ["Name the capital of France.",
                                    "Write a haiku about autumn rain."], 2)
    run = Path(write_run(tmp_path / "run", [{"instruction": "Sort these numbers: 3, 1, 2.", "input": "",
                                              "output": "1, 2, 3"}]))
    out = tmp_path / inside
    capsys.readouterr()
    assert cli.main([command, str(small), *more, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"selfinstruct {command}: error: {out}: --out is inside the run folder {run.resolve()}; "
                   "choose a folder outside it\n"), err
    assert sorted(p.name for p in run.iterdir()) == [".selfinstruct-run", "kept.jsonl"]


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
def test_a_lock_left_by_filter_or_audit_does_not_make_the_users_folder_ours(tmp_path, capsys, command):
    """A probe's sequence: --out holding the user's own kept.jsonl is refused; `filter` of a file in it
    leaves the folder's lock (refused there too, for want of judgements); the lock was taken as proof
    that dedup made the folder, and the next run replaced the user's kept.jsonl."""
    from selfinstruct import cli

    small, _, more, _ = _two_inputs(tmp_path, command, ["Name the capital of France.",
                                    "Write a haiku about autumn rain."], 2)
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "data.json").write_text(small.read_text())
    (mine / "kept.jsonl").write_text('{"instruction": "MY OWN CURATED ROW", "input": "", "output": "precious"}\n')
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    assert cli.main([command, str(small), *more, "--out", str(mine)]) == 2
    assert cli.main(["filter", str(mine / "data.json"), "--min-score", "3", "--out", str(tmp_path / "f.json")]) == 2
    assert (mine / ".selfinstruct-lock").is_file()  # what the filter left
    capsys.readouterr()
    assert cli.main([command, str(small), *more, "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds kept.jsonl, which dedup or decontaminate did not write" in err, err
    assert {p.name: p.read_bytes() for p in mine.iterdir() if p.name != ".selfinstruct-lock"} == before


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
@pytest.mark.parametrize("name", ["kept.jsonl", "removed.jsonl", "summary.json"])
def test_a_folder_in_the_place_of_a_result_file_is_one_line_before_the_work(tmp_path, monkeypatch, capsys, command,
                                                                            name):
    """`mkdir dd/summary.json`, then `dedup run --out dd`: a traceback (IsADirectoryError) after all the
    scoring, and with removed.jsonl a folder, kept.jsonl already replaced and summary.json removed.
    Now one line naming it, before the work, and the folder as it was."""
    from selfinstruct import cli, decontaminate

    small, big, more, out = _two_inputs(tmp_path, command, ["Name the capital of France.",
                                        "Write a haiku about autumn rain.", "Sort these numbers: 3, 1, 2."], 1)
    assert cli.main([command, str(small), *more, "--out", str(out)]) == 0
    (out / name).unlink()
    (out / name).mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".selfinstruct-lock"}
    module, work = (dedup, "dedup_texts") if command == "dedup" else (decontaminate, "decontaminate")
    monkeypatch.setattr(module, work, lambda *a, **k: pytest.fail("the work began"))
    capsys.readouterr()
    assert cli.main([command, str(big), *more, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"selfinstruct {command}: error: {out / name}: is a folder; {command} writes its {name} here: "
                   "move it away, or give another --out\n"), err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".selfinstruct-lock"} == before
    assert (out / name).is_dir()


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_cli_reads_the_parquet_and_hf_datasets_export_writes(tmp_path, capsys, fmt):
    """`export --format parquet` or `hf` writes Alpaca columns (and messages): dedup reads them as
    decontaminate and export do. A parquet file was read as JSON text: 'not UTF-8 text'."""
    from selfinstruct import cli

    data = tmp_path / "data.json"
    data.write_text(json.dumps(ALPACA))
    exported = tmp_path / ("data.parquet" if fmt == "parquet" else "data_hf")
    assert cli.main(["export", str(data), "--format", fmt, "--out", str(exported)]) == 0
    out = tmp_path / "out"
    assert cli.main(["dedup", str(exported), "--out", str(out)]) == 0, capsys.readouterr().err
    kept, removed = read_jsonl(out / "kept.jsonl"), read_jsonl(out / "removed.jsonl")
    assert [r["output"] for r in kept] == ["Waves...", "1. ...", "Bonjour"]
    assert [r["output"] for r in removed] == ["Blue...", "Merci"]
    assert removed[0]["duplicate_of"]["index"] == 0


def test_kept_and_removed_are_written_as_the_rows_come(tmp_path):
    """dedup and decontaminate hand their kept and removed rows over one at a time; each is
    written as it comes (both files were built as one string first: at a million rows, a
    second copy of the data), and the files hold the lines a join gave."""
    from selfinstruct.datafiles import json_line, write_filtered

    out = tmp_path / "out"
    out.mkdir()
    rows = [{"instruction": f"Task {i}.", "output": "x" * 20_000} for i in range(20)]
    written_when_done = []

    def given(rs, name):
        yield from rs
        written_when_done.append(sum(p.stat().st_size for p in out.glob(f".{name}.tmp-*")))

    write_filtered(out, "dedup", given(rows, "kept.jsonl"), given(rows[:3], "removed.jsonl"), {"kept": 20})
    assert written_when_done[0] > 300_000 and written_when_done[1] > 40_000, written_when_done
    assert (out / "kept.jsonl").read_text() == "".join(map(json_line, rows))
    assert (out / "removed.jsonl").read_text() == "".join(map(json_line, rows[:3]))
    assert sorted(p.name for p in out.iterdir()) == [".selfinstruct-filtered", ".selfinstruct-lock", "kept.jsonl",
                                                      "removed.jsonl", "summary.json"]


def test_dedup_holds_the_compared_texts_not_the_rows_while_it_compares(tmp_path, monkeypatch):
    """At a million rows the records with their outputs were 5 GB held through the whole
    comparison; only the compared texts are now, and the rows are read again to be written
    (same kept and removed files)."""
    import tracemalloc

    from selfinstruct import cli, dedup

    asks = ["Write a poem about the sea.", "Translate good morning to French.", "List three prime numbers."]
    rows = [{"instruction": asks[i % 3], "output": f"OUTPUT-{i} " + "x" * 1_000_000} for i in range(6)]
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "warm.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert cli.main(["dedup", str(tmp_path / "warm.jsonl"), "--out", str(tmp_path / "warm")]) == 0  # imports done
    held = []
    compare = dedup.dedup_texts

    def watched(*a, **kw):
        held.append(tracemalloc.get_traced_memory()[0])  # bytes allocated since the start and still alive
        return compare(*a, **kw)

    monkeypatch.setattr(dedup, "dedup_texts", watched)
    tracemalloc.start()
    try:
        assert cli.main(["dedup", str(src), "--out", str(tmp_path / "out")]) == 0
    finally:
        tracemalloc.stop()
    assert held[0] < 2_000_000, held  # the six outputs are 6 MB
    kept = [json.loads(line) for line in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    removed = [json.loads(line) for line in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()]
    assert [r["output"][:9] for r in kept] == ["OUTPUT-0 ", "OUTPUT-1 ", "OUTPUT-2 "]
    assert [(r["output"][:9], r["duplicate_of"]["index"]) for r in removed] == [
        ("OUTPUT-3 ", 0), ("OUTPUT-4 ", 1), ("OUTPUT-5 ", 2)]


@pytest.mark.parametrize("given", ["folder", "kept.jsonl"])
def test_a_tasks_instances_share_its_decision(tmp_path, given):
    """Self-instruct keeps several instances of a task, one row each: compared one by one, every
    instance after the first was a copy of it (score 1.0) and removed, half of such a run. The
    first decides for all of them, for the run folder and for its kept.jsonl given as a file."""
    from conftest import provenance

    from selfinstruct.datafiles import mark_run_folder

    run = tmp_path / "run"
    run.mkdir()
    tasks = [
        {"id": "r1-0", "instruction": "Sort the list of numbers in ascending order.",
         "instances": [{"input": "3 1 2", "output": "1 2 3"}, {"input": "9 8", "output": "8 9"}]},
        {"id": "r1-1", "instruction": "Sort the list of numbers in descending order.",
         "instances": [{"input": "5 4", "output": "5 4"}, {"input": "1 2", "output": "2 1"}]},
        {"id": "r2-0", "instruction": "Name a planet.", "instances": [{"output": "Mars"}]},
    ]
    mark_run_folder(run)
    (run / "kept.jsonl").write_text("".join(json.dumps(t | {"provenance": provenance().model_dump()}) + "\n" for t in tasks))
    out = tmp_path / "out"
    assert run_cli(run if given == "folder" else run / "kept.jsonl", "--out", out) == 0
    kept, removed = read_jsonl(out / "kept.jsonl"), read_jsonl(out / "removed.jsonl")
    assert [(r["id"], r["input"]) for r in kept] == [("r1-0", "3 1 2"), ("r1-0", "9 8"), ("r2-0", "")]
    assert [(r["id"], r["input"], r["duplicate_of"]["index"]) for r in removed] == [("r1-1", "5 4", 0), ("r1-1", "1 2", 0)]
    assert removed[0]["score"] == removed[1]["score"] == pytest.approx(rouge_l(tasks[1]["instruction"], tasks[0]["instruction"]))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["records"], summary["kept"], summary["removed"]) == (5, 3, 2)


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
@pytest.mark.parametrize("name", ["x.json", "x.jsonl", "x.PARQUET", "x.pq"])
def test_an_out_named_as_a_data_file_is_refused(tmp_path, capsys, command, name):
    """--out is a folder of three files: ``--out x.json`` made a folder named x.json, which no
    reader takes for JSON. A name with a data suffix is one line and nothing is made; dedup says
    it before reading its input (a missing one here). A folder that already has such a name is
    the user's choice, and is written into."""
    from selfinstruct import cli

    small, _, more, out = _two_inputs(tmp_path, command, ["Name the capital of France.",
                                      "Write a haiku about autumn rain."], 2)
    data = tmp_path / "missing.json" if command == "dedup" else small
    assert cli.main([command, str(data), *more, "--out", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err == (f"selfinstruct {command}: error: {tmp_path / name}: {command}'s --out is a folder (it writes "
                   f"kept.jsonl, removed.jsonl and summary.json there), not a {Path(name).suffix} file: give a folder "
                   f"such as {tmp_path / 'x'}/ (or {tmp_path / name}/, with the slash, for a folder of that name), "
                   f"then export {tmp_path / 'x' / 'kept.jsonl'} to the format you want\n")
    assert not (tmp_path / name).exists()
    (tmp_path / name).mkdir()
    assert cli.main([command, str(small), *more, "--out", str(tmp_path / name)]) == 0
    assert len((tmp_path / name / "kept.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
@pytest.mark.parametrize("name", ["x.jsonl/", "x.json/"])
def test_an_out_named_as_a_data_file_with_a_trailing_slash_is_a_folder(tmp_path, capsys, command, name):
    """A trailing slash says "a folder": ``--out x.jsonl/`` was refused as a data file name because
    the slash was lost (Path) before the check saw it. Now the folder is made and written; the
    same name without the slash stays refused (the test above)."""
    from selfinstruct import cli

    small, _, more, _ = _two_inputs(tmp_path, command, ["Name the capital of France.",
                                    "Write a haiku about autumn rain."], 2)
    out = str(tmp_path / name.rstrip("/")) + "/"
    assert cli.main([command, str(small), *more, "--out", out]) == 0, capsys.readouterr().err
    assert (tmp_path / name / "kept.jsonl").is_file()
    assert len((tmp_path / name / "kept.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / name / "summary.json").read_text())["kept"] == 2


def test_a_broken_item_early_in_a_huge_json_list_is_said_without_reading_the_rest(tmp_path, capsys):
    """A broken item near the start of a big data.json: the list parser read on (its buffer
    doubling) until it held the rest of the file before it said so, 249 MB for a 113 MB file.
    The error now comes from the text read so far: the same line, file:line and message."""
    import tracemalloc

    from selfinstruct import cli

    src = tmp_path / "data.json"
    row = json.dumps({"instruction": "Write a poem about the sea.", "input": "", "output": "x" * 1000})
    with open(src, "w") as f:
        f.write('[\n{"instruction": "Name a colour.", "output": "red"},\n{"instruction": "Add." "output": "2"},\n')
        f.write(",\n".join([row] * 20_000) + "\n]\n")  # 20 MB after the broken item
    (tmp_path / "warm.json").write_text('[{"instruction": "Add." "output": "2"}]')
    assert cli.main(["dedup", str(tmp_path / "warm.json"), "--out", str(tmp_path / "warm")]) == 2  # imports done
    capsys.readouterr()
    tracemalloc.start()
    try:
        assert cli.main(["dedup", str(src), "--out", str(tmp_path / "out")]) == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert capsys.readouterr().err == f"selfinstruct dedup: error: {src}:3: not valid JSON (Expecting ',' delimiter at column 24)\n"
    assert peak < 8_000_000, peak  # a few pieces of 1 MB; the rest of the file was 40 MB and more
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("made_by", ["dedup", "decontaminate"])
@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
@pytest.mark.parametrize("given_as", ["data", "against"])
def test_an_output_folder_given_as_a_dataset_names_its_kept_jsonl(tmp_path, capsys, made_by, command, given_as):
    """A dedup or decontaminate output folder is not a dataset: every reader names the file to give,
    dedup too (it said the generic 'a folder must be a run folder ... or a saved dataset')."""
    from selfinstruct import cli

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": t, "input": "", "output": "ok"}) + "\n" for t in
                            ["Name the capital of France.", "Write a haiku about autumn rain."]))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is the boiling point of water at sea level?"}) + "\n")
    made = tmp_path / "made"
    assert cli.main([made_by, str(data), *(["--against", str(bench)] if made_by == "decontaminate" else []),
                     "--out", str(made)]) == 0
    capsys.readouterr()
    source, against = (made, bench) if given_as == "data" else (data, made)
    more = ["--against", str(against)] if command == "decontaminate" or given_as == "against" else []
    assert cli.main([command, str(source), *more, "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{made}: is a {made_by} output folder, not a dataset; give {made / 'kept.jsonl'}" in err, err
    assert not (tmp_path / "y").exists()


# --- minhash: datasketch's decisions in less memory -----------------------------------


def reference_minhash(texts, threshold=0.7, against=(), num_perm=128, seed=1):
    """minhash_dedup as it was: a datasketch MinHash per kept text in a MinHashLSH."""
    from datasketch import MinHash, MinHashLSH

    against = list(against)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sketches = {}
    n_against = len(against)
    decisions = []
    for pos, tokens in enumerate(tokenize(t) for t in itertools.chain(against, texts)):
        if not tokens:
            if pos >= n_against:
                decisions.append(Decision(True))
            continue
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch(dedup._shingles(tokens))
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


def _bench_like(rng: random.Random, n: int) -> list[str]:
    """Texts shaped like bench/post_scale.py's: templated long instructions and short ones, with
    near-copies (a word changed, dropped or added), exact copies, and texts with no a-z/0-9 words."""
    words = ("the a of to and in is that for it as with was on be by this are from or an which at have "
             "model data answer step each value result list first then when time number case function table "
             "write example point order water energy light city market history method system error test").split()
    frames = ["Write a short {} about the {} of {} for a {} audience.",
              "Explain step by step how the {} changes the {} when {} meets {}.",
              "Given the table below, list each {} and its {}; then sort the {} by {}."]
    texts = []
    for _ in range(n):
        r = rng.random()
        if texts and r < 0.35:
            t = rng.choice(texts).split()
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(t) + 1)
                rng.choice([lambda: t.insert(at, rng.choice(words)), lambda: t[at:at + 1].clear(),
                            lambda: t[at:at + 1].__setitem__(slice(None), [rng.choice(words)])])()
            texts.append(" ".join(t))
        elif texts and r < 0.42:
            texts.append(rng.choice(texts))
        elif r < 0.45:
            texts.append(rng.choice(["", "!!!", "Напишите стихотворение о море.", " \n"]))
        elif r < 0.75:
            texts.append(rng.choice(frames).format(*rng.choices(words, k=4)))
        else:
            texts.append(" ".join(rng.choices(words, k=rng.choice((3, 8, 12, 40)))))
    return texts


@pytest.mark.parametrize("block", [4096, 97])  # one block; many, so that the index's sorted runs merge
@pytest.mark.parametrize("threshold", [0.7, 0.5, 0.9])
def test_minhash_decisions_equal_datasketch_lsh(monkeypatch, block, threshold):
    monkeypatch.setattr(dedup._BandIndex, "block", block)
    rng = random.Random(block + int(threshold * 10))
    texts = _bench_like(rng, 3000)
    against = [*_bench_like(rng, 300), *rng.sample(texts, 50)]
    got = dedup.minhash_dedup(texts, threshold, against)
    expected = reference_minhash(texts, threshold, against)
    assert got == expected
    removed = [d for d in expected if not d.kept]
    # the corpus reaches every branch: removed for a text, for an against text, scores below 1
    assert len(removed) > 300 and any(d.dup_of < 0 for d in removed) and any(d.score < 1 for d in removed)


def test_minhash_band_key_collisions_change_no_decision(monkeypatch):
    # Every band of every text hashed to one of 3 keys: each lookup brings nearly every kept text,
    # and only those sharing a whole band with the text may count, as in datasketch.
    keys = dedup._BandIndex.keys
    monkeypatch.setattr(dedup._BandIndex, "keys", lambda self, sigs: keys(self, sigs) % np.uint64(3))
    monkeypatch.setattr(dedup._BandIndex, "block", 101)
    rng = random.Random(5)
    texts = _bench_like(rng, 1200)
    against = _bench_like(rng, 100)
    assert dedup.minhash_dedup(texts, 0.5, against) == reference_minhash(texts, 0.5, against)


def test_minhash_holds_under_a_kilobyte_per_kept_text():
    # A datasketch MinHash per kept text (its own permutations) and 14 bands' bytes keys in dicts
    # held ~6 KB each; a signature row (512 bytes) and 14 band entries (12 each) are what stay now.
    # Measured as the growth of the peak from 10,000 texts to 20,000: a block's work is the same in both.
    import tracemalloc

    rng = random.Random(3)
    vocabulary = [f"w{i}" for i in range(5000)]
    texts = [" ".join(rng.choices(vocabulary, k=8)) for _ in range(20_000)]  # unrelated: all kept
    dedup.minhash_dedup(texts[:10])  # imports (datasketch, scipy) outside the measure
    peaks = []
    for n in (10_000, 20_000):
        tracemalloc.start()
        try:
            assert all(d.kept for d in dedup.minhash_dedup(texts[:n]))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    per_text = (peaks[1] - peaks[0]) / 10_000
    assert per_text < 1000, f"{per_text:.0f} bytes per kept text"


def test_one_against_file_in_a_config_file_is_that_one_item(tmp_path):
    """`against: seeds.jsonl` in --config is what `--against seeds.jsonl` gives; it was refused as
    "Input should be a valid list", where generate's `seeds: my_seeds.jsonl` was taken."""
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ALPACA) + "\n")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "Give 3 tips for sleeping well"}) + "\n")
    cfg = tmp_path / "dedup.yaml"
    cfg.write_text(f"against: {seeds}\n")
    out = tmp_path / "out"
    assert run_cli(data, "--out", out, "--config", cfg) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["against"] == [str(seeds)] and summary["against_records"] == 1
    assert read_jsonl(out / "removed.jsonl")[0]["duplicate_of"]["source"] == str(seeds)


@pytest.mark.parametrize("signum, code, line", [(2, 130, "interrupted"), (15, 143, "stopped by SIGTERM")],
                         ids=["ctrl-c", "sigterm"])
def test_a_stop_that_lands_as_a_kernel_returns_is_the_one_line_not_a_system_error(tmp_path, monkeypatch, capsys,
                                                                                  signum, code, line):
    """A Ctrl-C (or a SIGTERM, handled as one) that arrives while a compiled kernel runs is raised in
    the first Python code run after it: numba's own, boxing the arrays the kernel returns, which
    drops the KeyboardInterrupt and fails as "SystemError: CPUDispatcher(<function lookups>)
    returned a result with an exception set", a 40-line traceback and code 1 (dedup of 40,000
    rows, stopped mid-way). Here the kernel sends the signal itself, so it lands there each time."""
    import ctypes
    import os

    from numba import njit

    from selfinstruct import cli

    kill = ctypes.CDLL(None).kill
    kill.argtypes, kill.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int

    @njit
    def kernel(pid, signum):
        kill(pid, signum)  # pending until Python code runs: the boxing of what is returned
        found = np.zeros(3, dtype=np.int64)
        return found, found.copy()

    def dedup_texts(*a, **kw):
        kernel(os.getpid(), signum)
        raise AssertionError("the signal was not raised")

    kernel(os.getpid(), 0)  # compiled before the run
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps({"instruction": "Write a poem about the sea.", "output": "A poem."}) + "\n")
    monkeypatch.setattr(dedup, "dedup_texts", dedup_texts)
    assert cli.main(["dedup", str(src), "--out", str(tmp_path / "out")]) == code
    assert capsys.readouterr().err == f"selfinstruct dedup: {line}\n"
    assert not (tmp_path / "out" / "kept.jsonl").exists()


@pytest.mark.parametrize("signum, code, line", [(2, 130, "interrupted"), (15, 143, "stopped by SIGTERM")],
                         ids=["ctrl-c", "sigterm"])
def test_a_stop_that_lands_in_a_finalizer_still_stops_the_command(tmp_path, monkeypatch, capsys, signum, code, line):
    """A Ctrl-C (or a SIGTERM, handled as one) raised inside a weakref callback or a __del__ (run by
    the garbage collector, anywhere) cannot leave it: Python prints "Exception ignored in: <function
    WeakKeyDictionary...remove>" and its traceback, and the command ran on to the end and exited 0
    (audit --html, stopped one time in three at a certain moment). Now it is raised again where the
    command's own code runs."""
    import os
    import signal
    import time
    import weakref

    from selfinstruct import cli

    class Thing:
        pass

    def dedup_texts(*a, **kw):
        thing = Thing()
        ref = weakref.ref(thing, lambda r: os.kill(os.getpid(), signum))  # the handler runs in the callback
        del thing
        time.sleep(30)  # the stop ends this sleep; lost, the run goes on
        assert ref() is None
        return real(*a, **kw)

    real = dedup.dedup_texts
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps({"instruction": "Write a poem about the sea.", "output": "A poem."}) + "\n")
    monkeypatch.setattr(dedup, "dedup_texts", dedup_texts)
    assert cli.main(["dedup", str(src), "--out", str(tmp_path / "out")]) == code
    assert capsys.readouterr().err == f"selfinstruct dedup: {line}\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("signum", [2, 15, 1], ids=["ctrl-c", "sigterm", "sighup"])
def test_a_stop_after_the_command_ended_does_not_change_how_the_process_ends(tmp_path, signum):
    """Once the command has ended (its line said, its code chosen), Python's teardown takes a few
    tenths of a second: a second Ctrl-C or SIGTERM then, or one just after a run finished, ended the
    process by the signal (-15 after the closing table) or printed a KeyboardInterrupt traceback. A
    process running the command (``main()`` with the process's own argv) now ends with its code."""
    import subprocess
    import sys

    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps({"instruction": "Write a poem about the sea.", "output": "A poem."}) + "\n")
    code = (f"import os, sys, time\nfrom selfinstruct import cli\n"
            f"sys.argv = ['selfinstruct', 'dedup', {str(src)!r}, '--out', {str(tmp_path / 'out')!r}]\n"
            f"code = cli.main()\nos.kill(os.getpid(), {signum})\ntime.sleep(0.2)\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, (done.returncode, done.stderr[-2000:])
    assert (tmp_path / "out" / "kept.jsonl").is_file()
