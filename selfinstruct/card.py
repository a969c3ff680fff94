"""The Hugging Face dataset card ``export`` writes: README.md with the YAML header the Hub reads.

The facts come from the files that made the data: a run folder's ``config.yaml`` and
``stats.json`` (teacher, sampling, seeds, filters, the reject funnel, dedup), and for
a file made by ``decontaminate`` its ``summary.json`` beside it (and, through it, the
run it came from). Nothing is made up: a fact no file holds is left out.
"""

from __future__ import annotations

import math
from pathlib import Path

from selfinstruct.config import UserError, counted

MARK = "<!-- written by selfinstruct export: rewritten on each export -->"

# The Hub's size_categories, by upper bound of rows.
SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]


def size_category(rows: int) -> str:
    """The Hub's size bucket: ``size_category(52002)`` -> ``'10K<n<100K'``."""
    return next((name for bound, name in SIZES if rows < bound), "n>1B")


def _run_facts(run: Path) -> dict:
    from selfinstruct.config import load_yaml
    from selfinstruct.datafiles import load_stats, read_jsonl

    cfg = load_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
    stats = load_stats(run)
    if stats.get("kept") != sum(1 for _ in read_jsonl(run / "kept.jsonl")):
        from selfinstruct.generate import compute_stats

        # stats.json is written when a session ends: a run still generating (or killed and not
        # resumed yet) holds more records than it says. The funnel and the tokens are counted from
        # the files, as every session's end counts them; the seconds only stats.json knows, so
        # the teacher-hours are left out.
        stats = {**{k: v for k, v in stats.items() if k != "wall_time_s"}, **compute_stats(run, {})}
    return {"run": str(run), "config": cfg, "stats": stats}


def gather(source: str | Path) -> dict:
    """What the card can say about ``source``: its run (config, stats) and its decontamination."""
    import json

    from selfinstruct.datafiles import is_run_folder

    src = Path(source)
    facts: dict = {"config": {}, "stats": {}}
    seen = set()
    read = None  # (command, rows) of the step that read src last, the run once the chain ends there
    # A kept.jsonl of dedup or decontaminate: its summary.json names its input, which may be
    # another one's kept.jsonl (run -> dedup -> decontaminate), followed back to the run.
    while src.is_file() and (summary := src.parent / "summary.json").is_file() and summary.resolve() not in seen:
        seen.add(summary.resolve())
        try:
            s = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            break
        if not isinstance(s, dict) or src.name != "kept.jsonl":
            break
        if s.get("decontamination") is True and _decontamination_figures(s):
            facts.setdefault("decontamination", s)
        elif {"method", "threshold", "records", "kept", "removed"} <= set(s) and \
                all(_is_count(s[k]) for k in ("records", "kept", "removed")):
            facts.setdefault("dedup", s)
        else:  # not one of ours as written (a hand-edited figure was a traceback): not stated
            break
        read = ("decontaminate" if s.get("decontamination") is True else "dedup", s.get("records"))
        src = Path(str(s.get("input_resolved") or s.get("input", "")))  # "input" is as given, maybe relative
    # A run's own data file given by name (run/data.json, run/kept.jsonl) holds the run's rows, as
    # every command reads them: the card said there was no run behind them.
    if src.name in ("data.json", "kept.jsonl") and src.is_file() and is_run_folder(src.parent):
        src = src.parent
    if src.is_dir() and is_run_folder(src):
        facts |= _run_facts(src)
        if read is not None and _is_count(read[1]) and (now := _run_rows(src)) != read[1]:
            # Resumed since the step read it: the funnel and tokens count rows this data never held.
            facts["grown"] = (read[0], read[1], now)
    return facts


def _run_rows(run: Path) -> int:
    """The rows a run holds now (one per kept instance), as dedup and decontaminate read it."""
    from selfinstruct.datafiles import read_jsonl

    return sum(len(o.get("instances") or []) for o in read_jsonl(run / "kept.jsonl") if isinstance(o, dict))


# How each mode's rows came to be, for the card's first sentence.
_ORIGIN = {
    "alpaca": "from seed tasks by a teacher model",
    "self-instruct": "from seed tasks by a teacher model",
    "magpie": "by a teacher model writing its own user queries (Magpie, without seeds) and answering them",
    "evolve": "by a teacher model rewriting instructions into harder ones (Evol-Instruct) and answering them",
    "respond": "by a teacher model answering existing instructions again",
}


# What each mode did to the teacher's text after it came back, for the same sentence: respond answers
# each row of its source as it is, so it filters the answers and dedups nothing (its card said
# "filtered and deduplicated", as every mode's did). A run made before modes was generate's: deduplicated.
_PROCESSED = {"respond": "its answers filtered (not deduplicated: each row of the source is answered as it is)"}


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _decontamination_figures(s: dict) -> bool:
    """Whether a decontaminate summary.json holds the figures the card states, typed as decontaminate writes them."""
    rules = s.get("removed_by_rule", {})
    return (all(_is_count(s.get(k, 0)) for k in ("removed", "records", "benchmark_items"))
            and _strings(s.get("against", [])) and isinstance(rules, dict) and all(map(_is_count, rules.values())))


def _strings(v) -> bool:
    """Whether ``v`` is a list of strings (config.yaml's seeds, blacklist)."""
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _duration(seconds: float) -> str:
    """Wall time in a unit that shows it: ``_duration(0.4)`` -> ``'0.4 s'``, ``_duration(300)`` -> ``'5.0 min'``.

    In hours alone, a short run was "0.00 h"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _filters_line(cfg: dict, mode: str | None) -> str | None:
    """The checks a kept record passed, as the mode that made it runs them (None: not on record)."""
    if mode == "respond":  # no options of its own: filters.clean_instances and the checks respond.process adds
        return ("answers: none empty, cut at max_tokens, a refusal or a placeholder, equal to the input, ending "
                "with a colon, or repeating the instruction; a row with a control or invisible character or an input ending "
                "with a colon is not asked")
    if "min_words" not in cfg:
        return None
    # As the run wrote them (whole numbers, a list of words); a hand-edited value is not stated.
    if not (_is_count(cfg["min_words"]) and _is_count(cfg.get("max_words")) and _strings(cfg.get("blacklist") or [])):
        return None
    line = (f"instruction of more than {cfg['min_words']} and at most {cfg.get('max_words')} words, "
            f"{counted(len(cfg.get('blacklist') or []), 'blacklisted word')}, no refusals, no control "
            "characters, no invisible ones (a bidi control, a zero-width space), no empty or colon-ended outputs")
    if mode == "evolve":  # evolve.screen_rewrite and unhelpful_answer, on top of generate's checks
        if cfg.get("same_threshold") is not None:
            line += (f"; no rewrite with ROUGE-L F1 of {cfg['same_threshold']} or more to the task it rewrote "
                     "(no new information), nor one that leaks the prompt or apologises")
        if _is_count(cfg.get("min_answer_words")):
            line += (f"; no answer that is a refusal, says sorry in under 80 words, holds only stop words, or has "
                     f"fewer than {counted(cfg['min_answer_words'], 'word')}")
        # evolve.unasked_reason, as respond's line says it
        line += "; a record with a control or invisible character or an input ending with a colon is not asked"
    return line


def _seeds_line(cfg: dict) -> str | None:
    if not cfg or cfg.get("mode") in ("respond", "evolve"):  # their instructions come from --source, not seeds
        return None
    seeds = cfg.get("seeds") or []
    if not _strings(seeds):  # a hand-edited value (seeds: [1, 2]) is not on record as the run wrote it
        return None
    return ", ".join(f"`{Path(s).name}`" for s in seeds) if seeds else "the 170 bundled seed tasks (`seeds/seed_tasks.jsonl`)"


_COUNTS = ("candidates", "kept", "rejected", "responses", "prompt_tokens", "completion_tokens")


def _stated(st: dict) -> dict:
    """stats.json's figures the card can state: each count an int >= 0, the wall time a finite number
    above 0, a reason's count a count; any other is left out, as a fact no file holds. A hand-edited
    file's 'x' tokens or a reason counted as a string made the card a traceback once the data was
    written, and 1e400 candidates read 'inf candidates'."""
    out = {k: v for k, v in st.items() if k not in _COUNTS or _is_count(v)}
    wall = out.get("wall_time_s")
    if wall is not None and not (isinstance(wall, (int, float)) and not isinstance(wall, bool)
                                 and math.isfinite(wall) and wall > 0):
        del out["wall_time_s"]
    if "rejected_by_reason" in out:
        reasons = out["rejected_by_reason"]
        out["rejected_by_reason"] = ({str(k): v for k, v in reasons.items() if _is_count(v)}
                                     if isinstance(reasons, dict) else {})
    if not isinstance(out.get("teacher_model"), (str, type(None))):
        del out["teacher_model"]
    return out


def render(facts: dict, rows: int, fmt: str, data_files: str, license: str = "other", name: str = "",
           language: tuple[str, ...] | list[str] = ("en",)) -> str:
    """The card's text: YAML header, then what the data is, how it was made and how to load it.
    ``language``: the header's language codes, as the user gave them (nothing is detected)."""
    import yaml

    cfg, st = facts.get("config") or {}, _stated(facts.get("stats") or {})
    # No run behind the data (a file of the user's, maybe deduplicated or decontaminated by us since):
    # how it was made is not on record, so not on the card.
    made_by_us = bool(cfg or st)
    header = {
        "license": license,
        "task_categories": ["text-generation"],
        "language": list(language),
        "tags": ["synthetic", "self-instruct", "instruction-tuning"] if made_by_us else ["instruction-tuning"],
        "size_categories": [size_category(rows)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}],
    }
    if name:
        header["pretty_name"] = name
    mode = st.get("mode") or cfg.get("mode")
    mode = mode if isinstance(mode, str) else None  # a hand-edited list was a TypeError (a dict key)
    intro = (f"{counted(rows, 'row')} of instruction data ({fmt}), generated with "
             f"selfinstruct {_ORIGIN.get(mode, 'by a teacher model')}, "
             f"{_PROCESSED.get(mode, 'filtered and deduplicated')}. Every output was written by a model: check it "
             "before you trust it."
             if made_by_us else
             f"{counted(rows, 'row')} of instruction data ({fmt}). How they were made is not recorded here: there is no "
             "selfinstruct run behind the file exported.")
    out = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", MARK, "",
           f"# {name or ('Synthetic instruction data' if made_by_us else 'Instruction data')}", "", intro, ""]

    made = []
    teacher = st.get("teacher_model")
    if teacher:
        made.append(("Teacher model", f"`{teacher}`"))
    if mode:
        made.append(("Mode", mode))
    if cfg:
        sampling = {k: cfg[k] for k in ("temperature", "top_p", "max_tokens", "teacher_seed") if cfg.get(k) is not None}
        if cfg.get("stop"):
            sampling["stop"] = cfg["stop"]
        if sampling:
            line = ", ".join(f"{k} {v}" for k, v in sampling.items())
            if mode == "self-instruct" and cfg.get("followup_sampling") == "greedy":  # modes/self_instruct.py
                line += "; the classification and instances requests greedy (temperature 0), as the original asked them"
            made.append(("Sampling", line))
    if (seeds := _seeds_line(cfg)) is not None:
        made.append(("Seeds", seeds + (f", {cfg['seed_examples']} seed + {cfg['machine_examples']} generated "
                                       "examples per prompt" if "seed_examples" in cfg else "")))
    if cfg.get("source") and mode == "evolve":
        made.append(("Instructions from", f"`{cfg['source']}`, evolved by the teacher above for {cfg.get('rounds')} "
                                          "rounds (Evol-Instruct), then answered by it"))
    elif cfg.get("source"):
        made.append(("Instructions from", f"`{cfg['source']}` (answered again by the teacher above)"))
    if (checks := _filters_line(cfg, mode)) is not None:
        made.append(("Filters", checks))
    if "threshold" in cfg and mode != "respond":
        against = "an input or an earlier kept instruction (its own ancestors excepted)" if mode == "evolve" else \
            "a seed or an earlier kept instruction"
        made.append(("Dedup", f"ROUGE-L F1 > {cfg['threshold']} with {against} is a duplicate"))
    if st.get("wall_time_s"):
        seconds = st["wall_time_s"]
        # A rate per hour from under a minute is mostly the teacher's start: "33,657 kept records per
        # teacher-hour" stood beside "0.00 h".
        rate = f", {st.get('kept', 0) / (seconds / 3600):,.0f} kept records per teacher-hour" if seconds >= 60 else ""
        made.append(("Teacher time", _duration(seconds) + rate))
    tokens = (st.get("prompt_tokens") or 0) + (st.get("completion_tokens") or 0)
    if tokens and st.get("kept"):
        made.append(("Teacher tokens", f"{st.get('prompt_tokens', 0):,} prompt + {st.get('completion_tokens', 0):,} "
                                       f"completion, {tokens / st['kept']:,.0f} per kept record"))
    if made:
        out += ["## How it was made", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in made), ""]

    if st.get("candidates"):
        reasons = st.get("rejected_by_reason") or {}
        funnel = (f"{counted(st['candidates'], 'candidate')} parsed from "
                  f"{counted(st.get('responses', 0), 'teacher reply', 'teacher replies')}; {st.get('kept', 0):,} kept, ")
        if reasons:
            out += ["## Reject funnel", "", funnel + f"{st.get('rejected', 0):,} rejected:", "",
                    "| reason | count |", "|---|---|", *(f"| `{k}` | {v:,} |" for k, v in reasons.items()), ""]
        elif st.get("rejected"):  # counted without reasons: the count alone
            out += ["## Reject funnel", "", funnel + f"{st['rejected']:,} rejected.", ""]
        else:  # a table header over no rows said nothing
            out += ["## Reject funnel", "", funnel + "none rejected.", ""]
        dup = (st.get("rejected_by_reason") or {}).get("duplicate")
        if dup is not None:
            out += [f"Dedup removed {counted(dup, 'candidate')} ({100 * dup / st['candidates']:.1f}% of all).", ""]

    if grown := facts.get("grown"):
        step, then, now = grown
        out += [f"The run changed after `selfinstruct {step}` read its {counted(then, 'row')}: it holds "
                f"{now:,} now, and the teacher's time and tokens and the funnel above count the run as it is now.", ""]

    dd = facts.get("dedup")
    if dd:
        out += ["## Dedup after generation", "",
                f"{counted(dd.get('records', 0), 'row')} checked by `selfinstruct dedup` ({dd.get('method')}, threshold "
                f"{dd.get('threshold')} on {dd.get('field', 'instruction')}"
                + (f", against {', '.join(f'`{Path(a).name}`' for a in dd['against'])}" if dd.get("against") else "")
                + f"): {dd.get('removed', 0):,} removed as near-duplicates, {dd.get('kept', 0):,} kept.", ""]

    d = facts.get("decontamination")
    if d:
        rules = d.get("removed_by_rule") or {}
        why = []  # --ngram 0 and --threshold 1 turn a rule off
        if d.get("ngram") != 0:
            why.append(f"sharing a {d.get('ngram')}-word n-gram with an item")
        if not (isinstance(d.get("threshold"), (int, float)) and d["threshold"] >= 1):
            why.append(f"whose instruction has ROUGE-L F1 > {d.get('threshold')} with an item's")
        out += ["## Decontamination", "",
                f"Checked against {', '.join(f'`{Path(b).name}`' for b in d.get('against', []))} "
                f"({counted(d.get('benchmark_items', 0), 'item')}): a record {', or '.join(why)}{',' if len(why) > 1 else ''} "
                "was removed. "
                f"{d.get('removed', 0):,} of {counted(d.get('records', 0), 'row')} removed ({rules.get('ngram', 0):,} by "
                f"n-gram, {rules.get('rougeL', 0):,} by ROUGE-L).", ""]
    else:
        out += ["## Decontamination", "", "Not checked against evaluation sets "
                "(`selfinstruct decontaminate` does it).", ""]

    if fmt == "hf":
        load = 'from datasets import load_from_disk\nds = load_from_disk("path/to/this/folder")'
    elif fmt == "parquet":
        load = f'from datasets import load_dataset\nds = load_dataset("parquet", data_files="{data_files}")["train"]'
    else:
        load = f'from datasets import load_dataset\nds = load_dataset("json", data_files="{data_files}")["train"]'
    out += ["## Loading", "", "```python", load, "```", "",
            "On the Hub, `load_dataset(\"user/name\")` reads it through the `configs` entry above.", ""]
    return "\n".join(out)


def write_card(path: Path, text: str, inputs=(), data_file: str | None = None) -> None:
    """Write README.md; one that selfinstruct did not write is never replaced, nor one it wrote for
    another data file still beside it (``check_card_of``; ``data_file``: the one this card is for)."""
    from selfinstruct.datafiles import check_output, read_text, write_atomic

    path = Path(path)
    if path.exists():
        if path.is_dir() or MARK not in read_text(path, "card"):
            raise UserError(f"{path}: exists and is not a card selfinstruct wrote; export to another folder "
                            "or move it away")
    if data_file is not None:
        check_card_of(path, data_file)
    check_output(path, inputs, flag="the card")
    write_atomic(path, text)


def card_data_file(text: str) -> str | None:
    """The data file a card names in its header's ``configs`` (None: it names none, or cannot be read).

    >>> card_data_file(render({}, 3, "jsonl", "a.jsonl"))
    'a.jsonl'
    """
    import yaml

    try:
        path = parse_header(text)["configs"][0]["data_files"][0]["path"]
    except (ValueError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return None
    return path if isinstance(path, str) else None


def check_card_of(path: Path, data_file: str) -> None:
    """Refuse to replace a card selfinstruct wrote (``path``) for another data file that is still in
    its folder: a second ``export --card`` into one folder silently replaced the first dataset's card.
    The same file's card is rewritten, and so is one whose file is gone (it describes nothing there)."""
    from selfinstruct.datafiles import read_text

    path = Path(path)
    if not path.is_file() or MARK not in (text := read_text(path, "card")):
        return
    other = card_data_file(text)
    if other is None or other == data_file:
        return
    # An hf folder's card names its shards as a pattern (data-*.arrow); any other name is one file.
    there = any(path.parent.glob(other)) if "*" in other else (path.parent / other).exists()
    if there:
        raise UserError(f"{path}: the dataset card of {other}, exported into this folder before; a card describes "
                        f"one data file: export {data_file} to another folder, or remove {path} to write its card here")


def parse_header(text: str) -> dict:
    """The YAML header of a card (what the Hub reads)."""
    import yaml

    if not text.startswith("---\n"):
        raise ValueError("no YAML header")
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)])
