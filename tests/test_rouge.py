"""The incremental RougeLIndex: the same decisions and neighbours as the full scan and rouge_score.

Its pruning must never change a result, so every test compares it with
``FullScanIndex`` (every text scored) and with ``rouge_score`` itself, on texts
built to sit on the bounds: long multi-sentence texts, repeated tokens, pairs
exactly on a threshold, empty and unicode texts, and pools grown across rebuilds.
"""

from __future__ import annotations

import functools
import random
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from selfinstruct.rouge import FullScanIndex, Match, RougeLIndex, rouge_l

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@functools.lru_cache(maxsize=1 << 16)
def reference(target: str, prediction: str) -> float:
    return SCORER.score(target, prediction)["rougeL"].fmeasure


def small_index(threshold: float, floor: float, rebuild_at: int = 8, merge_min: int = 3) -> RougeLIndex:
    """An index that rebuilds and merges after a handful of texts, so tests cross both paths."""
    index = RougeLIndex(threshold, floor=floor)
    index.rebuild_at, index.merge_min = rebuild_at, merge_min
    return index


def expected(full: FullScanIndex, text: str, floor: float, k: int) -> Match:
    """The full scan's answer, restricted to scores above the floor."""
    m = full.query(text, nearest=len(full))
    return Match(m.duplicate, [x for x in m.nearest if x[2] > floor][:k])


# --- texts that sit on the bounds ----------------------------------------------------------

WORDS = ["write", "a", "poem", "about", "the", "sea", "explain", "how", "rain", "forms", "list", "three"]
UNICODE = ["café", "naïve", "\u212akelvin", "İstanbul", "straße", "日本語", "emoji 🙂 ok", "ﬁne", "---", ""]
SEPS = [" ", " ", ", ", ". ", "-", "\n", "! "]


def sentence_text(rng: random.Random, vocab: list[str], lo: int, hi: int) -> str:
    """lo..hi tokens from vocab, in sentences, with assorted separators and case."""
    toks = rng.choices(vocab, k=rng.randint(lo, hi))
    text = "".join(t + rng.choice(SEPS) for t in toks)
    return text.upper() if rng.random() < 0.1 else text


def edited(rng: random.Random, text: str, vocab: list[str]) -> str:
    """A near copy: a few words replaced, inserted or dropped (scores land on both sides of 0.5-0.9)."""
    toks = text.split()
    for _ in range(rng.choice([0, 1, 2, 3, max(1, len(toks) // 4)])):
        op = rng.random()
        if op < 0.4 and toks:
            toks[rng.randrange(len(toks))] = rng.choice(vocab)
        elif op < 0.7:
            toks.insert(rng.randint(0, len(toks)), rng.choice(vocab))
        elif toks:
            del toks[rng.randrange(len(toks))]
    return " ".join(toks)


def corpus(rng: random.Random, n: int, alphabet: int) -> list[str]:
    """Short and long (100-300 token) texts, near copies, repeats, empty and unicode texts."""
    vocab = [f"w{i}" for i in range(alphabet)] + WORDS[: rng.randint(0, len(WORDS))]
    out: list[str] = []
    for _ in range(n):
        r = rng.random()
        if out and r < 0.4:
            out.append(edited(rng, rng.choice(out), vocab))
        elif r < 0.5:
            out.append(rng.choice(UNICODE) + " " + sentence_text(rng, vocab, 0, 4))
        elif r < 0.75:
            out.append(sentence_text(rng, vocab, 1, 20))
        elif r < 0.9:
            out.append(sentence_text(rng, vocab, 100, 300))
        else:
            out.append(" ".join([rng.choice(vocab)] * rng.randint(1, 30)))  # one token, repeated
    return out


threshold_floor = st.sampled_from([0.7, 0.5, 0.9, 0.3]).flatmap(
    lambda t: st.tuples(st.just(t), st.sampled_from(sorted({0.0, t / 2, 0.5 if t >= 0.5 else t, t})))
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(1, 40),
    alphabet=st.integers(2, 60),
    tf=threshold_floor,
    k=st.integers(0, 5),
    rebuild_at=st.sampled_from([4, 16, 1024]),
)
def test_index_equals_full_scan_above_the_floor(seed, n, alphabet, tf, k, rebuild_at):
    """Grown in steps (queries in between, across rebuilds and merges): every answer equals the full scan's."""
    t, floor = tf
    rng = random.Random(seed)
    texts = corpus(rng, n + 6, alphabet)
    pool, queries = texts[:n], texts[n:] + [rng.choice(texts[:n])]
    index, full = small_index(t, floor, rebuild_at), FullScanIndex(t)
    for i, text in enumerate(pool):
        index.add(text, f"r{i}")
        full.add(text, f"r{i}")
        if rng.random() < 0.3:
            q = rng.choice(queries)
            assert index.query(q, nearest=k) == expected(full, q, floor, k)
    assert len(index) == n
    want = [expected(full, q, floor, k) for q in queries]
    assert index.query_many(queries, nearest=k) == want
    for q, m in zip(queries, want):
        for ref, text, score in m.nearest:
            assert score == reference(text, q) == rouge_l(q, text)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(0, 30), alphabet=st.integers(2, 40), tf=threshold_floor,
       room=st.sampled_from([None, 0, 2, 6]))
def test_lookup_answers_like_tokens_and_adds_no_token(seed, n, alphabet, tf, room):
    """``lookup`` (the generation loop's way to score a group) against the plain ways: the same
    query answers as ``query_many(tokens=)``, the same group pairs as ``Tokens``, ids that
    ``add(ids=)`` takes where the pool had every token, and no token added to the pool. Once
    other texts are added, each text ``stale`` does not name scores against them as its tokens
    do. ``room``: the ids within unicode end that many past the pool's (the codes of the tokens
    it lacks then run into the ones it adds, or start past the pool's own)."""
    from selfinstruct import rouge
    from selfinstruct.rouge import Tokens, rouge_l_matrix, rouge_l_tokens, tokenize

    t, floor = tf
    rng = random.Random(seed)
    texts = corpus(rng, n + 12, alphabet + 10)  # a wider alphabet: the group has tokens the pool lacks
    pool, group = texts[:n], texts[n:]
    index, other = small_index(t, floor), small_index(t, floor)
    for i, text in enumerate(pool):
        index.add(text, f"r{i}")
        other.add(text, f"r{i}")
    split = [tokenize(text) for text in group]
    vocab = dict(index._ids)
    top = rouge._TOP_ID if room is None else len(vocab) + room
    with mock.patch.object(rouge, "_TOP_ID", top):
        looked = index.lookup(split)
    ids, seqs, whole = looked.ids, looked.seqs, looked.whole
    assert index._ids == vocab
    assert index.query_many(group, 3, ids=ids, lengths=list(map(len, split))) == index.query_many(group, 3, tokens=split)
    tokens = Tokens()
    assert np.array_equal(rouge_l_matrix(seqs), rouge_l_matrix([tokens(x, w) for x, w in zip(group, split)]))
    assert whole == [all(w in vocab for w in words) for words in split]
    # Texts added after the lookup (the group ahead's, in the loop), with tokens of the group's that
    # the pool lacked and tokens of their own.
    ahead = corpus(rng, rng.randint(0, 6), alphabet + 20)
    for i, text in enumerate(ahead):
        index.add(text, f"a{i}")
        other.add(text, f"a{i}")
    stale = index.stale(looked, split)
    assert set(stale) <= {j for j, all_known in enumerate(whole) if not all_known}
    added = index.sequences(list(range(n, n + len(ahead))))
    for j, words in enumerate(split):
        if j not in stale:
            assert [rouge_l_tokens(seqs[j], b) for b in added] == [rouge_l_tokens(tokens("", words), tokens("", b))
                                                                  for b in map(tokenize, ahead)]
    for i, (text, words) in enumerate(zip(group, split)):  # then kept: by ids where whole, else by tokens
        index.add(text, f"g{i}", ids=ids[i] if whole[i] else None, tokens=words)
        other.add(text, f"g{i}")
    assert index.query_many(texts, nearest=3) == other.query_many(texts, nearest=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(0, 60), alphabet=st.integers(2, 40), tf=threshold_floor)
def test_add_many_answers_like_adding_one_by_one(seed, n, alphabet, tf):
    """The bulk path (one re-ranking at the end) gives the same answers, before and after
    more texts are added one by one on top of it."""
    t, floor = tf
    rng = random.Random(seed)
    texts = corpus(rng, n + 30, alphabet)
    pool, later, queries = texts[:n], texts[n : n + 20], texts[n + 20 :] + texts[: min(n, 5)]
    bulk, one = small_index(t, floor), small_index(t, floor)
    bulk.add_many(pool, [f"r{i}" for i in range(n)])
    for i, text in enumerate(pool):
        one.add(text, f"r{i}")
    assert len(bulk) == n and bulk.query_many(queries, nearest=3) == one.query_many(queries, nearest=3)
    for i, text in enumerate(later):
        bulk.add(text, f"s{i}")
        one.add(text, f"s{i}")
    assert bulk.query_many(queries, nearest=3) == one.query_many(queries, nearest=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(1, 50), alphabet=st.integers(2, 40), tf=threshold_floor,
       threads=st.integers(2, 4), stamps=st.integers(2, 12))
def test_batches_split_over_threads_with_stamps_reused_answer_like_the_full_scan(seed, n, alphabet, tf, threads,
                                                                                 stamps):
    """Every batch split over threads (the split threshold at one posting) and the counters'
    stamps used up every few queries, so they are cleared and reused: batches between adds
    still get the full scan's answers. A stamp left over from an earlier query would make a
    text look already hit, and it would be missed."""
    from selfinstruct import rouge, rouge_jit

    t, floor = tf
    rng = random.Random(seed)
    texts = corpus(rng, n + 30, alphabet)
    index, full = small_index(t, floor), FullScanIndex(t)
    index.threads = threads
    with mock.patch.object(rouge, "_POSTINGS_PER_PART", 1), mock.patch.object(rouge_jit, "STAMPS", stamps):
        for i, text in enumerate(texts[:n]):
            index.add(text, f"r{i}")
            full.add(text, f"r{i}")
            if rng.random() < 0.3 or i == n - 1:
                queries = rng.sample(texts, min(len(texts), rng.randint(1, 8)))
                assert index.query_many(queries, nearest=3) == [expected(full, q, floor, 3) for q in queries]


def test_a_batch_splits_into_parts_covering_every_query_once():
    """The parts the compiled pass runs on (query ranges) cover the batch once, in order,
    four a thread where the batch has the postings, and the answers are the single thread's."""
    from selfinstruct import rouge, rouge_jit

    rng = random.Random(3)
    texts = corpus(rng, 230, 30)
    one, split = RougeLIndex(0.7, floor=0.5, threads=1), RougeLIndex(0.7, floor=0.5, threads=3)
    for index in (one, split):
        index.add_many(texts[:200], range(200))
    ranges, kernel = [], rouge_jit.candidates

    def recorded(first, last, *args):
        ranges.append((first, last))
        return kernel(first, last, *args)

    want = one.query_many(texts[200:], nearest=3)
    with mock.patch.object(rouge, "_POSTINGS_PER_PART", 1), mock.patch.object(rouge_jit, "candidates", recorded):
        assert split.query_many(texts[200:], nearest=3) == want
    parts = sorted(ranges)  # the threads' parts run in any order
    assert 6 <= len(parts) <= 12 and parts[0][0] == 0 and parts[-1][1] == 30
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])) and all(f < last for f, last in parts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_started_query_answers_for_the_pool_as_it_was_though_texts_are_added_while_its_pass_runs(seed):
    """start_query's pass runs on another thread while the caller adds texts (enough to merge the
    delta and to rebuild, which replace every array the pass reads, and to grow the Bloom words):
    its answers are the full scan's of the pool as it was when the query started."""
    from selfinstruct import rouge

    rng = random.Random(seed)
    texts = corpus(rng, 160, 25)
    index, full = small_index(0.7, 0.5, rebuild_at=40, merge_min=4), FullScanIndex(0.7)
    index.threads = 2
    for i, text in enumerate(texts[:40]):
        index.add(text, f"r{i}")
        full.add(text, f"r{i}")
    queries = texts[100:160]
    with mock.patch.object(rouge, "_POSTINGS_PER_PART", 1):
        answers = index.start_query(queries, nearest=3)
        for i, text in enumerate(texts[40:100], 40):  # a merge every 4 adds, a rebuild at 80
            index.add(text, f"r{i}")
        assert answers() == [expected(full, q, 0.5, 3) for q in queries]
        # The texts added count from the next query on.
        for i, text in enumerate(texts[40:100], 40):
            full.add(text, f"r{i}")
        assert index.query_many(queries, nearest=3) == [expected(full, q, 0.5, 3) for q in queries]


def test_pairs_exactly_on_the_threshold_go_the_way_rouge_score_sends_them():
    """7 common tokens, lengths 7 and 13: 0.7 on paper, 0.7000000000000001 as a float: a duplicate."""
    common = " ".join(f"c{i}" for i in range(7))
    longer = common + " " + " ".join(f"x{i}" for i in range(6))
    assert reference(common, longer) == 0.7000000000000001
    for t in (0.7, 0.7000000000000001):
        for floor in (0.5, t):
            index = RougeLIndex(t, floor=floor)
            index.add(common, "a")
            got = index.query(longer, nearest=1)
            above = 0.7000000000000001 > t
            assert got.duplicate == above
            assert got.nearest == ([("a", common, 0.7000000000000001)] if 0.7000000000000001 > floor else [])


def test_long_multi_sentence_texts_one_edit_apart():
    """200-token texts from a small vocabulary (many repeats): prefixes must still find the copy."""
    rng = random.Random(5)
    vocab = ["the", "a", "of", "task", "input", "answer"] + [f"t{i}" for i in range(20)]
    base = sentence_text(rng, vocab, 200, 200)
    index, full = small_index(0.7, 0.5, rebuild_at=4), FullScanIndex(0.7)
    pool = [base] + [sentence_text(rng, vocab, 150, 250) for _ in range(12)]
    for i, text in enumerate(pool):
        index.add(text, str(i))
        full.add(text, str(i))
    for _ in range(10):
        q = edited(rng, base, vocab)
        assert index.query(q, nearest=3) == expected(full, q, 0.5, 3)


def test_ties_go_to_the_earliest_added_and_empty_texts_match_nothing():
    index = RougeLIndex()
    for ref in ["first", "second", "third"]:
        index.add("List three prime numbers", ref)
    index.add("", "empty")
    index.add("---", "no tokens")
    m = index.query("list three prime numbers!", nearest=2)
    assert m.duplicate and [r for r, _, _ in m.nearest] == ["first", "second"]
    assert index.query("", nearest=3) == Match(False, [])
    assert index.query("!!!", nearest=3) == Match(False, [])
    assert RougeLIndex().query("anything") == Match(False, [])
    assert RougeLIndex().query_many(["a", "b"]) == [Match(False, []), Match(False, [])]


def test_query_many_does_not_let_a_batch_see_itself():
    index = RougeLIndex()
    index.add("Write a poem about the sea.", "s")
    got = index.query_many(["Sum two numbers please", "Sum two numbers please", "write a poem about the sea"])
    assert got[0] == got[1] == Match(False, [])
    assert got[2].duplicate and got[2].nearest[0][0] == "s"


def test_unicode_tokens_are_rouge_scores():
    """rouge_score lowercases first: the Kelvin sign becomes 'k' and is part of a token."""
    index = RougeLIndex(0.7, floor=0.0)
    texts = ["\u212aelvin scale café", "kelvin scale cafe", "日本語 only", "naïve straße"]
    for i, text in enumerate(texts):
        index.add(text, str(i))
    m = index.query("KELVIN scale caf", nearest=4)
    assert [(r, s) for r, _, s in m.nearest] == [
        (str(i), reference(texts[i], "KELVIN scale caf")) for i in (0, 1) if reference(texts[i], "KELVIN scale caf") > 0
    ]


def test_token_ids_past_the_surrogate_block_keep_their_own_bloom_bits():
    """Past 55,296 distinct tokens the codes skip the surrogate block; the compiled
    signatures map them back to token ids, so bound 5 must still let every duplicate through."""
    rng = random.Random(4)
    index, full = small_index(0.7, 0.5, rebuild_at=512, merge_min=256), FullScanIndex(0.7)
    texts = [" ".join(f"t{i * 30 + j}" for j in range(30)) for i in range(2_000)]  # 60,000 tokens
    texts += [edited(rng, t, [f"t{j}" for j in range(59_000, 60_000)]) for t in texts[1_850:]]
    for i, text in enumerate(texts[:1_900]):
        index.add(text, str(i))
        full.add(text, str(i))
    assert len(index._ids) > 0xD800
    queries = texts[1_900:] + [edited(rng, t, ["x"]) for t in texts[1_850:1_900]]
    got = index.query_many(queries, nearest=3)
    assert got == [expected(full, q, 0.5, 3) for q in queries]
    assert sum(m.duplicate for m in got) >= 50


def test_a_long_text_of_new_tokens_is_added_in_linear_time():
    """A seed task of a whole document (tens of thousands of words, each new to the index) is
    added in well under a second: each new token was found by a scan from the text's start,
    so a 6 MB seed line held generate in its startup for hours."""
    import time

    index = RougeLIndex(threshold=0.7)
    text = " ".join(f"w{i % 50_000}" for i in range(100_000))  # 50,000 new tokens, each twice
    t0 = time.monotonic()
    index.add_many([text, "w3 w4 w5 w6"], ["doc", "short"])
    assert time.monotonic() - t0 < 5  # minutes before
    assert len(index._ids) == 50_000
    assert index.query("w3 w4 w5 w6", nearest=1).nearest[0][0] == "short"


def test_a_query_longer_than_the_indexed_limit_is_scored_against_everything(monkeypatch):
    import selfinstruct.rouge as rouge

    monkeypatch.setattr(rouge, "_MAX_INDEXED", 6)
    rng = random.Random(2)
    texts = corpus(rng, 30, 8)
    index, full = small_index(0.7, 0.3), FullScanIndex(0.7)
    for i, text in enumerate(texts):
        index.add(text, str(i))
        full.add(text, str(i))
    for q in texts[:10] + ["w1 w2 w3 w4 w5 w6 w7 w1 w2"]:
        assert index.query(q, nearest=4) == expected(full, q, 0.3, 4)


def test_bad_floor_is_refused():
    with pytest.raises(ValueError, match="floor"):
        RougeLIndex(0.7, floor=0.8)
    with pytest.raises(ValueError, match="floor"):
        RougeLIndex(0.7, floor=-0.1)


def test_more_distinct_tokens_than_a_key_holds_is_refused_not_mixed_up(monkeypatch):
    import selfinstruct.rouge as rouge

    monkeypatch.setattr(rouge, "_MAX_TOKENS", 5)
    index = RougeLIndex(0.7)
    index.add("one two three four", "a")
    index.add("one two five", "b")  # five distinct tokens: still fine
    with pytest.raises(ValueError, match="at most 5 distinct tokens"):
        index.add("one six", "c")
    assert index.query("one two five", nearest=1).nearest[0][0] == "b"


def test_prepare_signs_the_pool_and_changes_no_answer():
    rng = random.Random(5)
    texts = corpus(rng, 40, 12)
    prepared, plain = RougeLIndex(0.7, floor=0.3), RougeLIndex(0.7, floor=0.3)
    prepared.add_many(texts, [str(i) for i in range(len(texts))])
    plain.add_many(texts, [str(i) for i in range(len(texts))])
    prepared.prepare()
    assert prepared._signed == len(texts) and plain._signed == 0
    for q in texts[:8]:
        assert prepared.query(q, nearest=3) == plain.query(q, nearest=3)


def test_after_prepare_adds_merges_and_queries_open_no_file():
    """``generate`` prepares the pool before it opens its connections; a run at a high
    --concurrency may then have no file descriptor left, so nothing the loop's adds, merges and
    queries call may still have a compiled kernel to load from numba's disk cache (EMFILE)."""
    import subprocess
    import sys

    code = """
import os, resource
from selfinstruct.rouge import RougeLIndex
index = RougeLIndex(0.7, threads=1)
index.merge_min = 4  # a merge after a few adds, as a big pool's 1/16 comes in a long run
index.add_many([f"write a poem about the number {i} and the sea at night" for i in range(40)],
               [str(i) for i in range(40)])
index.prepare()
free = os.open(os.devnull, os.O_RDONLY)  # the lowest free descriptor: none below it is free
os.close(free)
resource.setrlimit(resource.RLIMIT_NOFILE, (free, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
for i in range(12):
    text = f"list {i} prime numbers under one hundred, then sum them"
    index.query(text, nearest=3)
    index.add(text, f"x{i}")
print(len(index), index.query("list 3 prime numbers under one hundred, then sum them", nearest=1).duplicate)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["52", "True"]


def test_index_works_where_numba_has_nowhere_to_cache():
    """A read-only install with no writable home: numba finds no cache location, and the
    compiled pass must compile in memory instead of failing on import."""
    import subprocess
    import sys

    code = (
        "import numba.core.caching as c\n"
        "(getattr(c, 'CacheImpl', None) or c._CacheImpl)._locator_classes = []\n"
        "from selfinstruct.rouge import RougeLIndex\n"
        "i = RougeLIndex(0.7); i.add('write a poem about the sea', 'a')\n"
        "print(i.query('write a short poem about the sea').duplicate)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"


# The kernels an index calls (rouge_jit's top-level ones; the inlined helpers compile inside them).
KERNELS = ["element_counts", "postings", "merge_sorted", "merge_runs", "lookups", "sorted_search", "layers", "sign",
           "candidates", "lcs_pairs", "overlap_pairs"]


def test_load_kernels_loads_every_kernel_a_real_workload_calls():
    """load_kernels' tiny index must make every compiled call a real one makes, with the same
    argument types: a kernel first met later would compile (or open numba's cache) outside the
    Ctrl-C hold, inside a run. A fresh process, so no earlier test's calls count; the workload
    adds and queries long and templated texts, re-ranks, merges, splits a batch over threads,
    dedups and scores a group's pairs, and no kernel may gain a signature."""
    import json
    import subprocess
    import sys

    code = """
import json, random
from numba.core.registry import CPUDispatcher
from selfinstruct import rouge, rouge_jit
rouge.load_kernels()
kernels = {n: f for n, f in vars(rouge_jit).items() if isinstance(f, CPUDispatcher)}
before = {n: len(f.signatures) for n, f in kernels.items()}
rng = random.Random(7)
words = [f"w{i}" for i in range(3000)]
frames = ["Write a {} about {} for a {} audience, in {} paragraphs.", "Given the {} below, list every {} it names.",
          "Explain {} to a child; then compare it with {}, {} and {}."]
def text():
    if rng.random() < 0.5:
        return rng.choice(frames).replace("{}", "{0}").format(" ".join(rng.choices(words, k=rng.randint(1, 4))))
    return " ".join(rng.choices(words[:400] if rng.random() < 0.5 else words, k=rng.randint(1, 80)))
rouge._POSTINGS_PER_PART = 500  # so that batches are split over the threads
index = rouge.RougeLIndex(0.7, floor=0.5, threads=2)
index.merge_min, index.rebuild_at = 200, 600
texts = [text() for _ in range(3000)] + [" ".join(rng.choices(words, k=5000))]  # one too long to index
index.add_many(texts[:500], [str(i) for i in range(500)])
index.prepare()
for s in range(500, len(texts), 64):
    batch = texts[s : s + 64]
    index.query_many(batch, nearest=3)
    for i, t in enumerate(batch):
        index.add(t, str(s + i))
rouge.greedy_dedup(texts[:800], threshold=0.7)
seqs = index.lookup([rouge.tokenize(t) for t in texts[:64]]).seqs  # a generation group's pairs, and against others
rouge.rouge_l_matrix(seqs, above=0.7)
rouge.rouge_l_matrix(seqs, above=0.7, others=[list(map(ord, x)) for x in seqs[:9]])
after = {n: len(f.signatures) for n, f in kernels.items()}
print(json.dumps([before, after, index._built, len(index)]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after, built, size = json.loads(done.stdout)
    assert all(before[name] >= 1 for name in KERNELS), before
    assert built > 500 and size == 3001  # it re-ranked past the seeds, and kept every text
    assert after == before


def test_a_ctrl_c_during_the_first_compile_is_held_until_the_kernels_are_loaded(tmp_path):
    """With a fresh cache numba compiles the kernels (about 9 s), and a Ctrl-C then could land in
    llvmlite's ctypes callback, be swallowed, and end in numba's "RuntimeError: no compiled object
    yet" and a traceback. Held, it comes once the kernels are whole: a Ctrl-C at the first
    compile's start (a numba event, so the moment is exact) interrupts the index's making after
    every kernel is loaded, and nothing is printed."""
    import os
    import subprocess
    import sys

    code = f"""
import signal
from numba.core import event
from numba.core.registry import CPUDispatcher
class CtrlC(event.Listener):
    sent = 0
    def on_start(self, ev):
        if not CtrlC.sent:
            CtrlC.sent = 1
            signal.raise_signal(signal.SIGINT)
    def on_end(self, ev):
        pass
event.register("numba:compile", CtrlC())
from selfinstruct import rouge, rouge_jit
try:
    rouge.RougeLIndex(0.7)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted", CtrlC.sent, all(len(getattr(rouge_jit, n).signatures) for n in {KERNELS!r}))
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}  # fresh: every kernel compiles
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert done.stdout.split() == ["interrupted", "1", "True"]


@settings(max_examples=300, deadline=None)
@given(hay=st.lists(st.integers(-3, 40), max_size=300), keys=st.lists(st.integers(-5, 45), max_size=60))
def test_sorted_search_is_numpys_searchsorted(hay, keys):
    """The index's galloping search (runs and delta postings of a group's lookups) answers as
    np.searchsorted on the left, for keys in any order given the order that sorts them: repeated
    values, keys below and past the whole array, an empty array, no keys."""
    from selfinstruct.rouge_jit import sorted_search

    hay, keys = np.array(sorted(hay), dtype=np.int64), np.array(keys, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    assert sorted_search(hay, keys, order).tolist() == np.searchsorted(hay, keys, side="left").tolist()
    assert sorted_search(hay, keys + 1, order).tolist() == np.searchsorted(hay, keys, side="right").tolist()


@settings(max_examples=200, deadline=None)
@given(
    queries=st.lists(st.integers(0, 260).flatmap(lambda n: st.lists(st.integers(0, 7), min_size=n, max_size=n)),
                     min_size=1, max_size=4),
    texts=st.lists(st.integers(0, 200).flatmap(lambda n: st.lists(st.integers(0, 9), min_size=n, max_size=n)),
                   min_size=1, max_size=5),
    base=st.sampled_from([0, 0xD7FC]),  # token ids on both sides of the surrogate block
)
def test_lcs_pairs_is_the_lcs_of_every_pair(queries, texts, base):
    """The compiled bit-parallel LCS that scores the index's survivors, against rapidfuzz's, over
    queries of one to five 64-bit words, repeated tokens and text tokens the query lacks."""
    import numpy as np

    from selfinstruct.rouge import _SURROGATE_SIZE, _SURROGATE_START, _as_sequence, _codes_of, _lcs
    from selfinstruct.rouge_jit import lcs_pairs

    q_ids = [[base + x for x in q] for q in queries]
    t_ids = [[base + x for x in t] for t in texts]
    codes = np.array([c for t in t_ids for c in _codes_of(t)], dtype=np.uint32)
    ends = np.cumsum([len(t) for t in t_ids], dtype=np.int64)
    starts = np.cumsum([0, *map(len, q_ids)], dtype=np.int64)
    ids = np.array([x for q in q_ids for x in q], dtype=np.int64)
    pairs = [(q, t) for q in range(len(q_ids)) for t in range(len(t_ids))]
    slot = np.full(base + 10, -1, dtype=np.int32)
    got = lcs_pairs(ids, starts, np.array([q for q, _ in pairs], dtype=np.int64),
                    np.array([t for _, t in pairs], dtype=np.int64), codes, ends, (_SURROGATE_START, _SURROGATE_SIZE), slot)
    want = [_lcs(_as_sequence(_codes_of(q_ids[q])), _as_sequence(_codes_of(t_ids[t]))) for q, t in pairs]
    assert got.tolist() == want
    assert (slot == -1).all()  # left as it came, for the next call


def test_a_query_past_the_compiled_lcs_words_is_scored_all_the_same():
    """A query over LCS_WORDS * 64 tokens (lcs_pairs answers -1) is scored by rapidfuzz instead."""
    from selfinstruct.rouge_jit import LCS_WORDS

    rng = random.Random(5)
    words = [f"w{i}" for i in range(400)]
    long_text = " ".join(rng.choices(words, k=64 * LCS_WORDS + 40))
    near = long_text.split()
    for i in rng.sample(range(len(near)), 60):
        near[i] = "x"
    texts = [long_text, " ".join(near), " ".join(rng.choices(words, k=300))]
    index, full = small_index(0.7, 0.3), FullScanIndex(0.7)
    for i, text in enumerate(texts):
        index.add(text, str(i))
        full.add(text, str(i))
    for q in [" ".join(near[:-5]), long_text + " y", texts[2]]:
        got = index.query(q, nearest=3)
        assert got == expected(full, q, 0.3, 3)
        assert got.duplicate


def test_elements_rank_a_tokens_repeats_apart_rarest_first():
    """An element's rank is its (token, repeat) slot's: a common token's second use can come
    before a rarer token's first; uses from the last slot on share a rank and go by repeat."""
    from selfinstruct.rouge_jit import elements

    # Two slots a token. Token 0: first use the most common (rank 0), later uses the rarest (5).
    rank = np.array([0, 5, 3, 4, 2, 1], dtype=np.int64)  # (0,0) (0,1+) (1,0) (1,1+) (2,0) (2,1+)
    got = elements(np.array([0, 1, 0, 2, 0], dtype=np.int64), rank, 2).tolist()
    assert [(e >> 12, e & 4095) for e in got] == [(0, 1), (0, 2), (1, 0), (2, 0), (0, 0)]


def test_a_rebuild_ranks_each_use_of_a_token_by_its_own_frequency():
    """Ten texts use "the" three times, forty use it once, thirty use "poem" once: the first
    "the" is more common than "poem" (smaller rank), the third rarer (larger)."""
    texts = [f"the cat {i} saw the dog and the bird" for i in range(10)] + [f"the poem {i}" for i in range(30)]
    texts += [f"the song {i}" for i in range(10)]
    index = RougeLIndex(0.7)
    index.add_many(texts, [str(i) for i in range(len(texts))])
    rank, the, poem = np.frombuffer(index._rank, dtype=np.int64), index._ids["the"], index._ids["poem"]
    assert rank[the * 4] < rank[poem * 4] < rank[the * 4 + 2]
    # and the index still answers as rouge_score does
    assert index.query("the cat 3 saw the dog and the bird", nearest=1).nearest[0][:2] == ("3", texts[3])


def test_a_merge_keeps_each_run_sorted_by_j_and_the_runs_by_key():
    """``merge_runs`` puts new postings into their run (a new key makes a new run in its
    place), after the old ones of the same j, and every run stays sorted by j."""
    from selfinstruct.rouge_jit import merge_runs

    runs, run_at = np.array([5, 9], dtype=np.int64), np.array([0, 3, 4], dtype=np.int64)
    post_j, post_id = np.array([0, 2, 4, 1], dtype=np.uint16), np.array([10, 11, 12, 13], dtype=np.uint32)
    new_runs = np.array([3, 5, 5, 9, 12], dtype=np.int64)  # sorted by run, then j
    new_j, new_id = np.array([1, 2, 5, 0, 0], dtype=np.uint16), np.array([20, 21, 22, 23, 24], dtype=np.uint32)
    got_runs, got_at, got_j, got_id = merge_runs(runs, run_at, post_j, post_id, new_runs, new_j, new_id)
    assert got_runs.tolist() == [3, 5, 9, 12] and got_at.tolist() == [0, 1, 6, 8, 9]
    assert got_j.tolist() == [1, 0, 2, 2, 4, 5, 0, 1, 0]
    assert got_id.tolist() == [20, 10, 11, 21, 12, 22, 23, 13, 24]
    # nothing to merge: the same table
    same = merge_runs(runs, run_at, post_j, post_id, new_runs[:0], new_j[:0], new_id[:0])
    assert [x.tolist() for x in same] == [runs.tolist(), run_at.tolist(), post_j.tolist(), post_id.tolist()]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(0, 40), alphabet=st.integers(2, 40),
       above=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0]), lists=st.booleans())
def test_rouge_l_matrix_above_a_cutoff_gives_every_pair_above_it_bit_for_bit(seed, n, alphabet, above, lists):
    """``rouge_l_matrix(seqs, above=)`` (only the pairs its overlap bound lets through scored): every
    pair above the cutoff as without it, bit for bit, and every other pair 0 -- on short, long,
    repeated, empty and near-copy texts, at cutoffs a pair's score can equal (0.1 of two texts of 10
    tokens sharing one, whose F1 rounds to 0.10000000000000002), and with some texts as lists of
    codes (as past unicode) among the strings."""
    from selfinstruct.rouge import Tokens, rouge_l_matrix

    rng = random.Random(seed)
    tokens = Tokens()
    seqs = [tokens(text) for text in corpus(rng, n, alphabet)]
    if lists:
        seqs = [list(map(ord, x)) if rng.random() < 0.5 else x for x in seqs]
    full, cut = rouge_l_matrix(seqs), rouge_l_matrix(seqs, above=above)
    assert cut.shape == full.shape
    assert np.array_equal(cut[full > above], full[full > above])
    assert not cut[full <= above].any()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(0, 25), m=st.integers(0, 25), alphabet=st.integers(2, 40),
       above=st.sampled_from([0.0, 0.1, 0.5, 0.7, 0.9, 1.0]), long=st.integers(0, 3))
def test_rouge_l_matrix_above_against_others_is_the_full_matrix_above_it(seed, n, m, alphabet, above, long):
    """``rouge_l_matrix(seqs, above=, others=)`` (the loop's group against the group ahead's kept):
    the pairs above the cutoff are the full matrix's bit for bit, the rest 0, and the same within
    one list; with texts of 520-700 tokens, near copies of each other, that score above it."""
    from selfinstruct.rouge import Tokens, rouge_l_matrix

    rng = random.Random(seed)
    tokens = Tokens()
    texts = corpus(rng, n + m, alphabet)
    vocab = [f"w{i}" for i in range(alphabet)]
    base = sentence_text(rng, vocab, 520, 700)
    texts += [edited(rng, base, vocab) for _ in range(long)] + [base[: len(base) // 3]] * (long > 0)
    rng.shuffle(texts)
    seqs = [tokens(text) for text in texts]
    left, right = seqs[: len(seqs) // 2], seqs[len(seqs) // 2 :]
    for a, b in ((left, right), (seqs, None)):
        full = rouge_l_matrix(a, others=b)
        cut = rouge_l_matrix(a, above=above, others=b)
        assert cut.shape == full.shape
        assert np.array_equal(cut[full > above], full[full > above])
        assert not cut[full <= above].any()


def test_a_lookup_up_to_the_longest_indexed_length_reads_its_runs(monkeypatch):
    """A long query at a low threshold reads the lengths b up to the longest indexed (4,095 tokens;
    at 0.7, a query of 2,205 tokens or more). Its runs ended at the key (element, b + 1) or-ed
    together, which for b + 1 = 4,096 left an odd element's key (a token's second use) as it was,
    so the lookup read nothing: two short texts in the run table were missed (hypothesis found it
    in test_dedup). Against the full scan, with the texts merged into the runs and in the delta."""
    from selfinstruct import rouge

    t = 0.028
    rng = random.Random(1)
    x = " ".join(rng.choice(["w0", "w1"]) for _ in range(280))
    for merge_min in (2, 4096):  # the run table, then the delta (which was right)
        monkeypatch.setattr(RougeLIndex, "rebuild_at", 1 << 20)
        monkeypatch.setattr(RougeLIndex, "merge_min", merge_min)
        index, full = RougeLIndex(t), FullScanIndex(t)
        for k in range(2):
            index.add("w0 w1 w1 w0", f"a{k}")
            full.add("w0 w1 w1 w0", f"a{k}")
        assert (len(index._run_key) > 0) == (merge_min == 2)
        assert index._plan(len(rouge.tokenize(x))).longest_for.max() == rouge._MAX_INDEXED  # the case
        assert index.query(x, nearest=2) == expected(full, x, t, 2)
        assert index.query(x).duplicate  # 2 * 4 / (4 + 280) > 0.028


@pytest.mark.parametrize("t", [1e-320, 1e-305, 5e-324])
def test_a_threshold_or_floor_near_zero_answers_as_the_full_scan(t):
    """Under about 1e-305 the length window's upper end, a * (2 - t) / t, is infinite: int() of it was
    an OverflowError traceback (`dedup --threshold 1e-320`). A helper's fuzzing found it."""
    from selfinstruct.rouge import greedy_dedup

    full = FullScanIndex(t)
    full.add("a b", "x")
    for index in (RougeLIndex(t), RougeLIndex(0.7, floor=t)):
        index.add("a b", "x")
        assert index.query("a c", nearest=1) == Match(index.threshold < 0.5, expected(full, "a c", t, 1).nearest)
    assert [d.kept for d in greedy_dedup(["a b"] * 65, threshold=t)] == [True] + [False] * 64
