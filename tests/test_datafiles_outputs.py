"""Outputs that are one file (filter's --out, audit's --html, the pipeline's audit.html): a name typed
as a folder, or with a suffix that says another format, is one line and nothing is written."""

from __future__ import annotations

import json
import os

import pytest
from test_audit import cli
from test_judge_probe import judged_file

from selfinstruct.cli import main


def test_filter_out_typed_as_a_folder_is_one_line_and_writes_nothing(tmp_path, capsys):
    """`filter DATA --min-score 4 --out fdir/` wrote a JSON file named fdir: Path dropped the slash."""
    data = judged_file(tmp_path, capsys)
    out = f"{tmp_path / 'fdir'}{os.sep}"
    rc, _, err = cli(capsys, "filter", data, "--min-score", "4", "--out", out)
    assert rc == 2 and err == (f"selfinstruct filter: error: {out}: --out names a folder (the trailing slash), but "
                               "filter writes one file (a JSON list; JSON Lines for a .jsonl name, parquet for "
                               f".parquet): give a file name such as {tmp_path / 'fdir' / 'filtered.json'}\n"), err
    assert not (tmp_path / "fdir").exists()


@pytest.mark.parametrize("name", ["f.csv", "f.arrow"])
def test_filter_out_with_a_data_suffix_it_cannot_write_is_one_line(tmp_path, capsys, name):
    """filter writes the format its --out suffix says, and a JSON list for any other: `--out f.csv` got JSON."""
    data = judged_file(tmp_path, capsys)
    out = tmp_path / name
    rc, _, err = cli(capsys, "filter", data, "--min-score", "4", "--out", out)
    assert rc == 2 and err == (f"selfinstruct filter: error: {out}: a {out.suffix} name for filter, which writes a "
                               f"JSON list; readers take the format by the suffix: name it {tmp_path / 'f.json'}\n"), err
    assert not out.exists()
    rc, _, err = cli(capsys, "filter", data, "--min-score", "4", "--out", tmp_path / "f.json")  # the name it asks for
    assert rc == 0 and len(json.loads((tmp_path / "f.json").read_text())) == 2, err


def test_audit_html_typed_as_a_folder_is_one_line_and_writes_nothing(tmp_path, capsys):
    """`audit DATA --html htmldir/` wrote the HTML report as a file named htmldir."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Name a prime number.", "input": "", "output": "Seven."}]))
    html = f"{tmp_path / 'htmldir'}{os.sep}"
    rc, _, err = cli(capsys, "audit", data, "--html", html)
    assert rc == 2 and err == (f"selfinstruct audit: error: {html}: --html names a folder (the trailing slash), but "
                               f"the report is one HTML file: give a file name such as {tmp_path / 'htmldir' / 'report.html'}\n")
    assert not (tmp_path / "htmldir").exists()


def test_pipeline_audit_html_typed_as_a_folder_is_one_line_before_generating(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    html = f"{tmp_path / 'reports'}{os.sep}"
    cfg.write_text(f"audit: {{html: '{html}'}}\n")
    # A teacher that is not there: were the check late, the run would fail on it instead.
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run"), "--skip-tune",
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert err == (f"selfinstruct pipeline: error: {cfg}: field 'audit.html': {html}: audit.html names a folder (the "
                   "trailing slash), but the report is one HTML file: give a file name such as "
                   f"{tmp_path / 'reports' / 'report.html'}\n"), err
    assert not (tmp_path / "run").exists() and not (tmp_path / "reports").exists()
