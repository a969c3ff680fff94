"""The dataset card export writes: its YAML header parsed and checked against the data it describes."""

from __future__ import annotations

import json

import pytest
import yaml

from selfinstruct.card import parse_header, size_category
from selfinstruct.cli import main

from conftest import write_run

ROWS = [{"instruction": t, "input": "", "output": "An answer."} for t in (
    "Describe the old lantern that hangs by the door of the mountain cabin in three short sentences.",
    "Name two animals that live in a meadow.",
    "Explain how a violin makes its sound.",
    "Why do glaciers move downhill?",
    "Suggest a name for a pet otter.")]
STATS = {"candidates": 12, "kept": 5, "rejected": 7, "responses": 4, "rejected_by_reason": {"duplicate": 4, "too_short": 3},
         "prompt_tokens": 3000, "completion_tokens": 1000, "wall_time_s": 1800.0, "teacher_model": "tiny-teacher",
         "mode": "alpaca"}


@pytest.fixture()
def run(tmp_path):
    folder = write_run(tmp_path / "run", ROWS)
    (tmp_path / "run" / "stats.json").write_text(json.dumps(STATS))
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(
        {"mode": "alpaca", "temperature": 0.7, "top_p": 0.95, "max_tokens": 1024, "seeds": [], "seed_examples": 6,
         "machine_examples": 2, "threshold": 0.7, "min_words": 3, "max_words": 150, "blacklist": ["image"]}))
    return folder


def test_hf_export_carries_a_card_the_hub_can_read(run, tmp_path, monkeypatch):
    from datasets import load_dataset, load_from_disk

    out = tmp_path / "hf"
    assert main(["export", run, "--format", "hf", "--out", str(out), "--license", "apache-2.0", "--name", "Demo"]) == 0
    text = (out / "README.md").read_text()
    head = parse_header(text)
    assert head["license"] == "apache-2.0" and head["pretty_name"] == "Demo"
    assert head["task_categories"] == ["text-generation"] and head["size_categories"] == ["n<1K"]
    (cfg,) = head["configs"]
    assert cfg["config_name"] == "default"
    # The path in configs is what the Hub loads: it must name exactly the data, here the arrow shard.
    monkeypatch.chdir(out)
    hub_view = load_dataset("arrow", data_files=cfg["data_files"][0]["path"], split="train")
    assert hub_view.num_rows == len(load_from_disk(str(out))) == len(ROWS)
    # The body states the facts of the run: rows, teacher, sampling, funnel, dedup, teacher-hours.
    assert f"{len(ROWS):,} rows" in text and "`tiny-teacher`" in text and "temperature 0.7" in text
    assert "| `duplicate` | 4 |" in text and "| `too_short` | 3 |" in text
    assert "ROUGE-L F1 > 0.7" in text and "10 kept records per teacher-hour" in text and "800 per kept record" in text
    assert "Not checked against evaluation sets" in text


def test_card_on_request_for_a_file_and_decontamination_figures(run, tmp_path, monkeypatch):
    from datasets import load_dataset

    bench = tmp_path / "eval.jsonl"
    bench.write_text(json.dumps({"question": ROWS[0]["instruction"], "answer": "x"}) + "\n")
    clean = tmp_path / "clean"
    monkeypatch.chdir(tmp_path)  # the run given as a relative path, as users type it
    assert main(["decontaminate", "run", "--against", str(bench), "--out", str(clean)]) == 0
    out = tmp_path / "pub" / "data.jsonl"
    out.parent.mkdir()
    monkeypatch.chdir(out.parent)  # and export run from another folder
    assert main(["export", str(clean / "kept.jsonl"), "--format", "jsonl", "--out", str(out), "--card"]) == 0
    text = (out.parent / "README.md").read_text()
    head = parse_header(text)
    assert head["configs"][0]["data_files"][0]["path"] == "data.jsonl"
    monkeypatch.chdir(out.parent)
    assert load_dataset("json", data_files=head["configs"][0]["data_files"][0]["path"], split="train").num_rows == 4
    assert "4 rows" in text and "1 of 5 rows removed (1 by n-gram, 1 by ROUGE-L)" in text
    assert "`tiny-teacher`" in text  # found through the decontamination summary's input run


@pytest.mark.parametrize("flag, said, unsaid", [
    ("--ngram", "a record whose instruction has ROUGE-L F1 > 0.7 with an item's was removed", "n-gram with"),
    ("--threshold", "a record sharing a 13-word n-gram with an item was removed", "ROUGE-L F1 >"),
])
def test_the_card_names_only_the_decontamination_rules_that_ran(run, tmp_path, flag, said, unsaid):
    bench = tmp_path / "eval.jsonl"
    bench.write_text(json.dumps({"question": ROWS[0]["instruction"], "answer": "x"}) + "\n")
    clean = tmp_path / "clean"
    off = "0" if flag == "--ngram" else "1"
    assert main(["decontaminate", run, "--against", str(bench), "--out", str(clean), flag, off]) == 0
    out = tmp_path / "data.jsonl"
    assert main(["export", str(clean / "kept.jsonl"), "--format", "jsonl", "--out", str(out), "--card"]) == 0
    text = (tmp_path / "README.md").read_text().split("## Decontamination")[1].split("##")[0]
    assert said in text and unsaid not in text, text  # never 'a 0-word n-gram' or 'ROUGE-L F1 > 1.0'


def test_a_readme_we_did_not_write_is_never_replaced(run, tmp_path, capsys):
    out = tmp_path / "mine" / "data.json"
    out.parent.mkdir()
    (out.parent / "README.md").write_text("# my project\n")
    assert main(["export", run, "--out", str(out), "--card"]) == 2
    assert "not a card selfinstruct wrote" in capsys.readouterr().err
    assert (out.parent / "README.md").read_text() == "# my project\n" and not out.exists()
    assert main(["export", run, "--out", str(out)]) == 0  # without --card no card is written
    assert (out.parent / "README.md").read_text() == "# my project\n"


@pytest.mark.parametrize("rows, cat", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (52002, "10K<n<100K"),
                                        (1_000_000, "1M<n<10M")])
def test_size_category(rows, cat):
    assert size_category(rows) == cat


@pytest.mark.parametrize("mode, says", [("alpaca", "from seed tasks"), ("self-instruct", "from seed tasks"),
                                        ("magpie", "its own user queries"), ("evolve", "(Evol-Instruct)"),
                                        ("respond", "answering existing instructions again"), (None, "by a teacher model")])
def test_the_card_says_where_each_mode_s_rows_came_from(mode, says):
    from selfinstruct.card import render

    cfg = {"mode": mode} if mode else {"temperature": 0.7}  # None: a run made before modes (its config has no mode)
    intro = render({"config": cfg, "stats": {}}, 5, "jsonl", "data.jsonl").split("## ")[0]
    assert says in intro and (mode in ("alpaca", "self-instruct") or "seed tasks" not in intro)


def test_a_card_written_while_the_run_still_generates_counts_its_funnel_from_the_records(run, tmp_path):
    # stats.json (kept 5 of 12) is written when a session ends; a resumed session, still running
    # or killed, has written more records since: the card must not say both 7 rows and "5 kept".
    folder = tmp_path / "run"
    last = json.loads((folder / "kept.jsonl").read_text().splitlines()[-1])
    with open(folder / "kept.jsonl", "a") as f:
        for n in range(2):
            f.write(json.dumps({**last, "id": f"late-{n}", "instruction": f"Explain what a kettle number {n} does."}) + "\n")
    rejected = {**last, "id": "late-r", "stage": "filter", "reason": "too_long: 200 words"}
    (folder / "rejected.jsonl").write_text(json.dumps(rejected) + "\n")
    assert main(["export", run, "--format", "jsonl", "--out", str(tmp_path / "d.jsonl"), "--card"]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "7 rows" in text and "8 candidates" in text and "7 kept, 1 rejected" in text
    assert "| `too_long` | 1 |" in text and "| `duplicate`" not in text
    assert "teacher-hour" not in text  # stats.json's seconds are those of 5 records
    # The tokens are counted from the log, as the records are (the fixture logged none).
    assert "Teacher tokens" not in text
    (folder / "responses.jsonl").write_text(json.dumps({"replies": [{"usage": {"prompt_tokens": 30,
                                                                              "completion_tokens": 40}}]}) + "\n")
    assert main(["export", run, "--format", "jsonl", "--out", str(tmp_path / "d.jsonl"), "--card"]) == 0
    assert "30 prompt + 40 completion, 10 per kept record" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("chain", [["dedup"], ["dedup", "decontaminate"], ["decontaminate", "dedup"]])
def test_a_card_after_dedup_follows_the_chain_back_to_the_run_and_counts_each_step(run, tmp_path, monkeypatch, chain):
    """run -> dedup -> decontaminate -> export --card: the card found the run only through a
    decontamination summary whose input was the run itself, so after a dedup it named no teacher and
    no funnel, and said nothing of the rows dedup removed. Each step's summary is followed back to
    the run, and each step's figures are on the card; the rows add up to what was exported."""
    bench = tmp_path / "eval.jsonl"
    bench.write_text(json.dumps({"question": ROWS[0]["instruction"], "answer": "x"}) + "\n")
    copies = [{**ROWS[2], "instruction": ROWS[2]["instruction"].replace("violin", "violin really")}]
    run2 = write_run(tmp_path / "run2", ROWS + copies)  # one near copy for dedup to remove
    (tmp_path / "run2" / "stats.json").write_text(json.dumps({**STATS, "kept": 6, "candidates": 13}))
    (tmp_path / "run2" / "config.yaml").write_bytes((tmp_path / "run" / "config.yaml").read_bytes())
    monkeypatch.chdir(tmp_path)  # relative paths, as users type them; export runs from another folder
    source = "run2"
    for i, step in enumerate(chain):
        out = f"step{i}"
        extra = ["--against", str(bench)] if step == "decontaminate" else []
        assert main([step, source, *extra, "--out", out]) == 0
        source = f"{out}/kept.jsonl"
    pub = tmp_path / "pub"
    pub.mkdir()
    monkeypatch.chdir(pub)
    assert main(["export", str(tmp_path / source), "--format", "jsonl", "--out", "data.jsonl", "--card"]) == 0
    text = (pub / "README.md").read_text()
    rows = 6 - 1 - ("decontaminate" in chain)
    assert f"{rows} rows" in text and "`tiny-teacher`" in text and "| `duplicate` | 4 |" in text, text
    dedup_rows = 6 if chain[0] == "dedup" else 5
    assert f"{dedup_rows} rows checked by `selfinstruct dedup` (rougeL, threshold 0.7 on instruction): 1 removed" in text
    if "decontaminate" in chain:
        assert "1 of 6 rows removed" in text if chain[0] == "decontaminate" else "1 of 5 rows removed" in text


@pytest.mark.parametrize("step", ["dedup", "decontaminate"])
def test_a_card_of_a_run_resumed_after_its_dedup_or_decontamination_says_the_run_changed(run, tmp_path, step):
    """run (5 rows) -> decontaminate -> the run resumed to 6 rows -> export the decontaminated file
    --card: the card said '5 rows', '0 of 5 rows removed' beside the run's funnel of 6 kept and its
    tokens per kept record over all 6, with nothing to tell which figure counted what."""
    bench = tmp_path / "eval.jsonl"
    bench.write_text(json.dumps({"question": "What is the boiling point of water at sea level?"}) + "\n")
    extra = ["--against", str(bench)] if step == "decontaminate" else []
    assert main([step, run, *extra, "--out", str(tmp_path / "c")]) == 0
    more = {"instruction": "List three rivers of Europe and the seas they reach.", "input": "", "output": "An answer."}
    write_run(tmp_path / "run", ROWS + [more])  # the run resumed: one more row
    (tmp_path / "run" / "stats.json").write_text(json.dumps({**STATS, "kept": 6, "candidates": 13}))
    out = tmp_path / "pub" / "d.jsonl"
    out.parent.mkdir()
    assert main(["export", str(tmp_path / "c" / "kept.jsonl"), "--format", "jsonl", "--out", str(out), "--card"]) == 0
    text = (out.parent / "README.md").read_text()
    assert "5 rows of instruction data" in text and "6 kept" in text, text
    assert f"The run changed after `selfinstruct {step}` read its 5 rows: it holds 6 now" in text, text
    # Not resumed: nothing said.
    assert main([step, run, *extra, "--out", str(tmp_path / "c")]) == 0
    assert main(["export", str(tmp_path / "c" / "kept.jsonl"), "--format", "jsonl", "--out", str(out), "--card"]) == 0
    assert "The run changed" not in (out.parent / "README.md").read_text()


@pytest.mark.parametrize("name", ["data.json", "kept.jsonl"])
def test_a_runs_own_data_file_given_by_name_has_the_run_behind_it(run, tmp_path, name):
    """`export run/data.json --format hf` (data.json is the Alpaca file every run writes) and
    `export run/kept.jsonl --card` read the run's rows, as from the run folder; the card said
    'there is no selfinstruct run behind the file exported', with no teacher, no funnel and the
    `synthetic` tag left off. So did a `decontaminate run/kept.jsonl` whose kept.jsonl was exported."""
    (tmp_path / "run" / "data.json").write_text(json.dumps(ROWS))
    out = tmp_path / "pub" / "d.jsonl"
    out.parent.mkdir()
    assert main(["export", str(tmp_path / "run" / name), "--format", "jsonl", "--out", str(out), "--card"]) == 0
    text = (out.parent / "README.md").read_text()
    assert "no selfinstruct run" not in text and "synthetic" in parse_header(text)["tags"], text
    assert "`tiny-teacher`" in text and "| `duplicate` | 4 |" in text, text
    bench = tmp_path / "eval.jsonl"
    bench.write_text(json.dumps({"question": ROWS[0]["instruction"], "answer": "x"}) + "\n")
    assert main(["decontaminate", str(tmp_path / "run" / name), "--against", str(bench), "--out", str(tmp_path / "c")]) == 0
    assert main(["export", str(tmp_path / "c" / "kept.jsonl"), "--format", "jsonl", "--out", str(out), "--card"]) == 0
    text = (out.parent / "README.md").read_text()
    assert "`tiny-teacher`" in text and "1 of 5 rows removed" in text and "no selfinstruct run" not in text, text


def test_a_sampling_option_left_unset_is_not_on_the_card(run, tmp_path):
    """config.yaml saves an unset --teacher-seed as null: the card said 'teacher_seed None'."""
    cfg = tmp_path / "run" / "config.yaml"
    cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "teacher_seed": None}))
    out = tmp_path / "data.jsonl"
    assert main(["export", run, "--format", "jsonl", "--out", str(out), "--card"]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "| Sampling | temperature 0.7, top_p 0.95, max_tokens 1024 |" in text and "None" not in text, text


def test_a_card_for_a_file_with_no_run_behind_it_claims_nothing_about_how_it_was_made(tmp_path):
    """A card is made from what the files record: a hand-made file with no run behind it was
    called 'synthetic', 'generated with selfinstruct by a teacher model, filtered and deduplicated'."""
    data = tmp_path / "mine.jsonl"
    data.write_text('{"instruction": "翻译这句话。", "output": "好"}\n')
    assert main(["export", str(data), "--format", "jsonl", "--out", str(tmp_path / "d.jsonl"), "--card"]) == 0
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    header = parse_header(card)
    assert "synthetic" not in header["tags"] and "self-instruct" not in header["tags"]
    for claim in ("generated with", "teacher model", "filtered", "deduplicated", "Synthetic"):
        assert claim not in card, claim
    assert "1 row of instruction data (jsonl)" in card and "no selfinstruct run" in card
    # Decontaminated by us, it is still not ours: the card tells the check, and nothing more.
    (tmp_path / "bench.jsonl").write_text('{"question": "What is 2 + 2?"}\n')
    assert main(["decontaminate", str(data), "--against", str(tmp_path / "bench.jsonl"), "--out", str(tmp_path / "c")]) == 0
    assert main(["export", str(tmp_path / "c" / "kept.jsonl"), "--format", "jsonl", "--out", str(tmp_path / "d.jsonl"),
                 "--card"]) == 0
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "Checked against `bench.jsonl`" in card and "generated with" not in card and "synthetic" not in card


def test_a_folder_named_readme_md_beside_the_output_is_one_line(run, tmp_path, capsys):
    """--card writes README.md beside the file; a folder of that name was an IsADirectoryError traceback."""
    out = tmp_path / "pub" / "data.json"
    (out.parent / "README.md").mkdir(parents=True)
    assert main(["export", run, "--out", str(out), "--card"]) == 2
    assert capsys.readouterr().err == (f"selfinstruct export: error: {out.parent / 'README.md'}: is a folder, not a "
                                       "card selfinstruct wrote; export to another folder or move it away\n")
    assert not out.exists()


@pytest.mark.parametrize("name", ["README.md", "./README.md"])
def test_an_out_named_readme_md_with_card_is_one_line_and_writes_nothing(run, tmp_path, capsys, name):
    """`export RUN --out pub/README.md --card`: the data went to README.md, then the card, whose
    place that is, was refused as 'exists and is not a card selfinstruct wrote', exit 2 with the
    data written under the card's name. One line before anything is written."""
    (tmp_path / "pub").mkdir()
    out = f"{tmp_path / 'pub'}/{name}"
    assert main(["export", run, "--out", out, "--card"]) == 2
    assert capsys.readouterr().err == (f"selfinstruct export: error: {out}: --card writes the dataset card there "
                                       "(README.md, beside the output): give the data another name, such as "
                                       f"{tmp_path / 'pub' / 'data.json'}\n")
    assert list((tmp_path / "pub").iterdir()) == []


@pytest.mark.parametrize("n", [1, 2])
def test_a_count_of_one_is_said_in_the_singular(n):
    """'1 rows of instruction data', '(1 items)': each count on the card agrees with its noun."""
    import re

    from selfinstruct.card import render

    st = {"candidates": n, "kept": n, "rejected": 0, "responses": n, "rejected_by_reason": {"duplicate": n},
          "mode": "alpaca", "teacher_model": "t"}
    cfg = {"mode": "alpaca", "seeds": [], "threshold": 0.7, "min_words": 3, "max_words": 150, "blacklist": ["image"] * n}
    facts = {"config": cfg, "stats": st, "dedup": {"records": n, "removed": n, "kept": 0, "method": "rouge-l", "threshold": 0.7},
             "decontamination": {"against": ["b.jsonl"], "benchmark_items": n, "ngram": 8, "threshold": 0.9,
                                 "removed": 0, "records": n, "removed_by_rule": {}}}
    text = render(facts, n, "jsonl", "data.jsonl")
    s = "" if n == 1 else "s"
    for said in (f"{n} row{s} of instruction data", f"{n} candidate{s} parsed from {n} teacher repl{'y' if n == 1 else 'ies'}",
                 f"{n} blacklisted word{s},", f"Dedup removed {n} candidate{s} (", f"{n} row{s} checked by",
                 f"({n} item{s}):", f"0 of {n} row{s} removed"):
        assert said in text, said
    assert not re.search(r"\b1 (rows|items|candidates|replies|words)\b", text), text


@pytest.mark.parametrize("option", [["--license", "apache-2.0"], ["--name", "Demo"], ["--language", "fr"]])
def test_a_card_option_without_the_card_is_one_line_naming_it(run, tmp_path, capsys, option):
    """--license, --name and --language fill the card, which export writes with --card (always for
    hf): without it they were taken and did nothing, and the user looked for a card never written."""
    out = tmp_path / "data.json"
    assert main(["export", run, "--out", str(out), *option]) == 2
    flag = option[0]
    assert capsys.readouterr().err == (f"selfinstruct export: error: {flag} sets a field of the dataset card, which "
                                       f"export writes with --card (always for --format hf): add --card, or leave "
                                       f"{flag} out\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written, no card
    assert main(["export", run, "--out", str(out), "--card", *option]) == 0
    assert main(["export", run, "--format", "hf", "--out", str(tmp_path / "hf"), *option]) == 0
    for card in (tmp_path / "README.md", tmp_path / "hf" / "README.md"):
        head = parse_header(card.read_text())
        assert {"--license": head["license"], "--name": head.get("pretty_name"),
                "--language": head["language"]}[flag] in (option[1], [option[1]])


@pytest.mark.parametrize("fmt", ["jsonl", "hf"])
@pytest.mark.parametrize("flag, value, said", [
    ("--name", "Demo\n# Not the title", "has a control character (U+000A)"),
    ("--name", "Demo\r\nlicense: mit", "has a control character (U+000D)"),
    ("--name", "Tab\tin it", "has a control character (U+0009)"),
    ("--name", "Line\u2028break", "has a control character (U+2028)"),
    ("--license", "apache-2.0\npretty_name: x", "has a control character (U+000A)"),
    ("--license", "Apache 2.0", "is not a license id"),
    ("--license", "mit; see LICENSE", "is not a license id"),
    ("--license", "Apache-2.0", "is not a license id: the Hub's ids are lower case, give 'apache-2.0'"),
])
def test_a_card_name_or_license_that_would_break_the_card_is_one_line_and_nothing_written(run, tmp_path, capsys,
                                                                                           fmt, flag, value, said):
    """A newline in --name split the card's title line (`# Demo` then a second heading); the Hub reads
    the header's license as an id from its list, so one with a space or a newline is no license at all."""
    out = tmp_path / ("hf" if fmt == "hf" else "data.jsonl")
    assert main(["export", run, "--format", fmt, "--out", str(out), "--card", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"selfinstruct export: error: {flag}: {value!r} {said}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written, no card


def test_a_license_id_with_a_plus_or_a_dot_goes_on_the_card_as_given(run, tmp_path):
    assert main(["export", run, "--format", "jsonl", "--out", str(tmp_path / "d.jsonl"), "--card",
                 "--license", "openrail++", "--name", "Démo: data, v1.0"]) == 0
    head = parse_header((tmp_path / "README.md").read_text())
    assert head["license"] == "openrail++" and head["pretty_name"] == "Démo: data, v1.0"


@pytest.mark.parametrize("mode", ["alpaca", "self-instruct", "magpie", "evolve", "respond"])
def test_the_card_says_deduplicated_only_for_a_mode_that_deduplicates(mode):
    """respond answers each row of its source as it is, and dedups nothing: its card said
    'filtered and deduplicated', as every mode's did."""
    from selfinstruct.card import render

    cfg = {"mode": mode, "threshold": 0.7, "min_words": 3, "max_words": 150, "blacklist": []}
    if mode == "respond":  # its config has no filter options of its own
        cfg = {"mode": mode, "source": "data.json", "max_tokens": 1024}
    text = render({"config": cfg, "stats": {"mode": mode}}, 5, "jsonl", "data.jsonl")
    intro = text.split("## ")[0]
    assert "filtered" in intro
    if mode == "respond":
        assert "deduplicated" not in intro.replace("not deduplicated", "") and "| Dedup |" not in text, intro
        assert "not deduplicated" in intro
        assert "| Filters | answers:" in text  # it filters the answers, with no option of its own to show
    else:
        assert "filtered and deduplicated" in intro and "| Dedup |" in text


def test_an_evolve_card_names_the_checks_evolve_adds():
    from selfinstruct.card import render

    cfg = {"mode": "evolve", "threshold": 0.7, "same_threshold": 0.9, "min_words": 3, "max_words": 150,
           "blacklist": [], "min_answer_words": 2, "source": "data.json", "rounds": 1}
    (filters,) = [l for l in render({"config": cfg, "stats": {}}, 5, "jsonl", "d.jsonl").splitlines()
                  if l.startswith("| Filters |")]
    assert "ROUGE-L F1 of 0.9 or more to the task it rewrote" in filters and "fewer than 2 words" in filters
    # evolve.unasked_reason: such records get no rewrite (the line said nothing of them)
    assert filters.endswith("a record with a control or invisible character or an input ending with a colon is not asked |")


def test_a_funnel_with_nothing_rejected_says_so_rather_than_an_empty_table():
    from selfinstruct.card import render

    stats = {**STATS, "rejected": 0, "rejected_by_reason": {}, "candidates": 5}
    text = render({"config": {}, "stats": stats}, 5, "jsonl", "d.jsonl")
    funnel = text.split("## Reject funnel")[1].split("## ")[0]
    assert "5 kept, none rejected." in funnel and "| reason |" not in funnel, funnel


@pytest.mark.parametrize("seconds, shown, rate", [
    (0.4, "0.4 s", None),  # was "0.00 h, 45,000 kept records per teacher-hour"
    (42.0, "42 s", None),
    (300.0, "5.0 min", "60 kept records per teacher-hour"),
    (5400.0, "1.50 h", "3 kept records per teacher-hour"),
])
def test_teacher_time_is_said_in_a_unit_that_shows_it(seconds, shown, rate):
    from selfinstruct.card import render

    text = render({"config": {}, "stats": {**STATS, "wall_time_s": seconds}}, 5, "jsonl", "d.jsonl")
    (line,) = [l for l in text.splitlines() if l.startswith("| Teacher time |")]
    assert line.startswith(f"| Teacher time | {shown}") and "0.00 h" not in line
    assert (rate in line) if rate else "per teacher-hour" not in line, line


def test_a_second_dataset_exported_with_a_card_into_one_folder_does_not_replace_the_firsts_card(run, tmp_path,
                                                                                                 capsys):
    """export a.jsonl --card --name A, then b.jsonl --card --name B into the same folder left README.md
    naming only b.jsonl: the first dataset's card was lost without a word. Now the second is one
    line, before its data is written; the same file's card is still rewritten, and a card whose
    file is gone is replaced."""
    pub = tmp_path / "pub"
    pub.mkdir()
    card = pub / "README.md"
    assert main(["export", run, "--format", "jsonl", "--out", str(pub / "a.jsonl"), "--card", "--name", "A"]) == 0
    first = card.read_text()
    capsys.readouterr()
    assert main(["export", run, "--format", "jsonl", "--out", str(pub / "b.jsonl"), "--card", "--name", "B"]) == 2
    err = capsys.readouterr().err
    assert err == (f"selfinstruct export: error: {card}: the dataset card of a.jsonl, exported into this folder "
                   f"before; a card describes one data file: export b.jsonl to another folder, or remove {card} to "
                   "write its card here\n")
    assert card.read_text() == first and not (pub / "b.jsonl").exists()
    # The same output again: its card is rewritten, as before.
    assert main(["export", run, "--format", "jsonl", "--out", str(pub / "a.jsonl"), "--card", "--name", "A2"]) == 0
    assert parse_header(card.read_text())["pretty_name"] == "A2"
    # a.jsonl gone: its card describes nothing here, and b.jsonl's takes its place.
    (pub / "a.jsonl").unlink()
    assert main(["export", run, "--format", "jsonl", "--out", str(pub / "b.jsonl"), "--card", "--name", "B"]) == 0
    head = parse_header(card.read_text())
    assert head["pretty_name"] == "B" and head["configs"][0]["data_files"][0]["path"] == "b.jsonl"


def test_a_card_export_into_an_hf_folder_does_not_replace_its_card(run, tmp_path, capsys):
    """The card of an hf export names its shards (data-*.arrow): a file exported with --card into
    that folder would have replaced it."""
    hf = tmp_path / "hf"
    assert main(["export", run, "--format", "hf", "--out", str(hf), "--name", "H"]) == 0
    capsys.readouterr()
    assert main(["export", run, "--format", "jsonl", "--out", str(hf / "x.jsonl"), "--card"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the dataset card of data-*.arrow" in err, err
    assert parse_header((hf / "README.md").read_text())["pretty_name"] == "H"


def test_a_card_written_meanwhile_for_another_file_is_not_replaced_at_the_write(tmp_path):
    """Checked again when the card is written: another export may have written its own since the check."""
    from selfinstruct.card import render, write_card
    from selfinstruct.config import UserError

    (tmp_path / "a.jsonl").write_text("{}\n")
    card = tmp_path / "README.md"
    write_card(card, render({}, 1, "jsonl", "a.jsonl"), data_file="a.jsonl")
    with pytest.raises(UserError, match="the dataset card of a.jsonl"):
        write_card(card, render({}, 1, "jsonl", "b.jsonl"), data_file="b.jsonl")
    assert parse_header(card.read_text())["configs"][0]["data_files"][0]["path"] == "a.jsonl"


@pytest.mark.parametrize("followup", ["greedy", "run"])
def test_a_self_instruct_runs_greedy_follow_ups_are_on_the_card(run, tmp_path, followup):
    """The card named the run's sampling alone, though self-instruct's follow-ups are asked greedily."""
    cfg = tmp_path / "run" / "config.yaml"
    cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "mode": "self-instruct",
                                   "followup_sampling": followup}))
    stats = tmp_path / "run" / "stats.json"
    if stats.exists():
        stats.write_text(json.dumps({**json.loads(stats.read_text()), "mode": "self-instruct"}))
    out = tmp_path / "data.jsonl"
    assert main(["export", run, "--format", "jsonl", "--out", str(out), "--card"]) == 0
    text = (tmp_path / "README.md").read_text()
    said = "the classification and instances requests greedy (temperature 0)"
    assert (said in text) == (followup == "greedy"), text


def test_a_stats_json_with_counts_that_are_not_counts_gives_a_card_without_them(run, tmp_path, capsys):
    """A hand-edited stats.json ('x' tokens, a reason counted as a string, -3, 1e400 candidates):
    export wrote the data, then the card was a traceback, or said 'inf candidates'. A count that
    is not one is not a fact the card states; the others still are. (A NaN wall_time_s, a figure
    each session adds to, is refused by every reader of stats.json: test_datafiles_damaged.)"""
    from pathlib import Path

    run = Path(run)
    bad = {**{k: v for k, v in STATS.items() if k != "wall_time_s"}, "prompt_tokens": "x", "completion_tokens": -3,
           "rejected_by_reason": {"duplicate": "x", "too_short": 3}}
    (run / "stats.json").write_text(json.dumps(bad))
    out = tmp_path / "d.jsonl"
    assert main(["export", str(run), "--format", "jsonl", "--out", str(out), "--card"]) == 0, capsys.readouterr().err
    text = (tmp_path / "README.md").read_text()
    assert "| `too_short` | 3 |" in text and "`duplicate`" not in text and "Teacher tokens" not in text, text
    assert "Teacher time" not in text and "nan" not in text
    (run / "stats.json").write_text(json.dumps({**STATS, "candidates": 1e400, "mode": ["alpaca"]}))
    assert main(["export", str(run), "--format", "jsonl", "--out", str(out), "--card"]) == 0, capsys.readouterr().err
    text = (tmp_path / "README.md").read_text()
    assert "inf" not in text and "Reject funnel" not in text and "`tiny-teacher`" in text, text


@pytest.mark.parametrize("config, gone", [({"seeds": [1, 2]}, "| Seeds |"),
                                          ({"blacklist": 5}, "| Filters |"),
                                          ({"min_words": "three"}, "| Filters |")])
def test_a_config_yaml_option_of_the_wrong_type_is_left_off_the_card_not_a_traceback(run, tmp_path, capsys, config, gone):
    """A hand-edited config.yaml (seeds: [1, 2], blacklist: 5): export wrote the data, then the card was a
    TypeError traceback. What the file does not state as the run wrote it is not on the card."""
    from pathlib import Path

    cfg = Path(run) / "config.yaml"
    cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), **config}))
    out = tmp_path / "d.jsonl"
    assert main(["export", str(run), "--format", "jsonl", "--out", str(out), "--card"]) == 0, capsys.readouterr().err
    text = (tmp_path / "README.md").read_text()
    assert gone not in text and "| Sampling | temperature 0.7" in text, text


@pytest.mark.parametrize("summary", [
    {"method": "exact", "threshold": 0.7, "records": "many", "kept": 1, "removed": None, "input": "x"},
    {"decontamination": True, "removed": "x", "records": [1], "against": 5, "ngram": 13, "threshold": 0.8,
     "benchmark_items": "n", "removed_by_rule": 3},
])
def test_a_summary_json_whose_figures_are_not_counts_is_not_stated(tmp_path, capsys, summary):
    """A dedup or decontaminate folder's summary.json, hand-edited: the card was a traceback (a count as
    a string, an int where a list goes). Such a summary is not stated, as any fact no file holds."""
    folder = tmp_path / "deduped"
    folder.mkdir()
    (folder / "kept.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (folder / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "out").mkdir()
    rc = main(["export", str(folder / "kept.jsonl"), "--format", "jsonl", "--out", str(tmp_path / "out" / "d.jsonl"),
               "--card"])
    assert rc == 0, capsys.readouterr().err
    text = (tmp_path / "out" / "README.md").read_text()
    assert "Dedup after generation" not in text and "Not checked against evaluation sets" in text, text
