"""A saved DatasetDict's split and a data file beside it keep apart judge files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_audit import cli, server, wide_terminal  # noqa: F401 (fixtures)

SPLIT = [{"instruction": "Write a poem about rain.", "input": "", "output": "Drip."},
         {"instruction": "Summarize the plain paragraph.", "input": "Long text.", "output": "Short."}]
PLAIN = [{"instruction": "Name a prime number.", "input": "", "output": "Seven."}]


def ids_in(path: Path) -> list[str]:
    return sorted(json.loads(line)["id"] for line in path.read_text().splitlines())


def datasetdict_and_file(tmp_path: Path) -> tuple[Path, Path]:
    """dd/ with a test split of SPLIT, and a data file dd.test.jsonl of PLAIN beside it."""
    from datasets import Dataset, DatasetDict

    dd = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(PLAIN), "test": Dataset.from_list(SPLIT)}).save_to_disk(str(dd))
    plain = tmp_path / "dd.test.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in PLAIN))
    return dd, plain


def judge(capsys, server, path) -> tuple[int, str, str]:  # noqa: F811 (the fixture's value)
    return cli(capsys, "audit", path, "--judge", "--base-url", server.url, "--model", "j")


def test_a_split_and_a_data_file_named_like_it_keep_their_own_judge_files(server, tmp_path, capsys):  # noqa: F811
    """dd/test judged into dd.test.judgements.jsonl, the very names of the data file dd.test.jsonl's
    judge files: one's requests, tokens and judged counts were added to the other's."""
    dd, plain = datasetdict_and_file(tmp_path)
    rc, out, err = judge(capsys, server, dd / "test")
    assert rc == 0 and "2 judged" in out, err
    rc, out, err = judge(capsys, server, plain)
    assert rc == 0 and "1 judged" in out and len(server.requests) == 3, err
    split_files = tmp_path / "dd.test.split-judgements.jsonl", tmp_path / "dd.test.split-judge_stats.json"
    plain_files = tmp_path / "dd.test.judgements.jsonl", tmp_path / "dd.test.judge_stats.json"
    assert len(ids_in(split_files[0])) == 2 and len(ids_in(plain_files[0])) == 1
    assert not set(ids_in(split_files[0])) & set(ids_in(plain_files[0]))
    assert json.loads(split_files[1].read_text())["requests"] == 2
    assert (json.loads(plain_files[1].read_text())["requests"], json.loads(plain_files[1].read_text())["judged"]) == (1, 1)
    for given, said in ((dd / "test", "kept 1 of 2 records"), (plain, "kept 1 of 1 record ")):  # scores 5, 2; 4
        rc, out, err = cli(capsys, "filter", given, "--min-score", "4", "--out", tmp_path / "good.json")
        assert rc == 0 and said in out, err


def test_a_splits_judge_files_of_the_old_names_are_moved_when_no_data_file_claims_them(server, tmp_path, capsys):  # noqa: F811
    """An earlier version wrote dd/test's as dd.test.judgements.jsonl: with no data file of that stem
    beside dd, they are the split's, moved to the new names with one line, and nothing is asked again."""
    from datasets import Dataset, DatasetDict

    dd = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(PLAIN), "test": Dataset.from_list(SPLIT)}).save_to_disk(str(dd))
    rc, out, err = judge(capsys, server, dd / "test")
    assert rc == 0 and "2 judged" in out, err
    for name in ("judgements.jsonl", "judge_stats.json"):  # back where the earlier version wrote them
        (tmp_path / f"dd.test.split-{name}").rename(tmp_path / f"dd.test.{name}")
    rc, out, err = judge(capsys, server, dd / "test")
    assert rc == 0 and "all 2 records already judged" in out and len(server.requests) == 2, err
    assert (f"{tmp_path / 'dd.test.judgements.jsonl'}: judgements an earlier version wrote there, moved to "
            f"{tmp_path / 'dd.test.split-judgements.jsonl'}") in err
    assert not (tmp_path / "dd.test.judgements.jsonl").exists() and not (tmp_path / "dd.test.judge_stats.json").exists()
    assert json.loads((tmp_path / "dd.test.split-judge_stats.json").read_text())["requests"] == 2


@pytest.mark.parametrize("claimant", ["file", "dataset folder"])
def test_old_names_a_data_file_claims_give_the_split_only_its_own_judgements(server, tmp_path, capsys, claimant):  # noqa: F811
    """The old dd.test.judgements.jsonl held both datasets' judgements (the split's and dd.test.jsonl's):
    the split copies its own records' from it, and the file keeps its files whole."""
    from datasets import Dataset

    dd, plain = datasetdict_and_file(tmp_path)
    if claimant == "dataset folder":
        plain.unlink()
        plain = tmp_path / "dd.test"
        Dataset.from_list(PLAIN).save_to_disk(str(plain))
    rc, out, err = judge(capsys, server, plain)
    assert rc == 0 and "1 judged" in out, err
    rc, out, err = judge(capsys, server, dd / "test")
    assert rc == 0 and "2 judged" in out, err
    old, new = tmp_path / "dd.test.judgements.jsonl", tmp_path / "dd.test.split-judgements.jsonl"
    split_ids = ids_in(new)
    old.write_text(old.read_text() + new.read_text())  # as the earlier version left it: both datasets' in one
    before = old.read_text(), (tmp_path / "dd.test.judge_stats.json").read_text()
    new.unlink()
    (tmp_path / "dd.test.split-judge_stats.json").unlink()
    rc, out, err = judge(capsys, server, dd / "test")
    assert rc == 0 and "all 2 records already judged" in out and len(server.requests) == 3, err
    assert f"{old}: judgements an earlier version wrote there, copied into {new}" in err
    assert ids_in(new) == split_ids  # not the file's record
    assert (old.read_text(), (tmp_path / "dd.test.judge_stats.json").read_text()) == before
    rc, out, err = judge(capsys, server, plain)
    assert rc == 0 and "all 1 record" in out and len(server.requests) == 3, err
