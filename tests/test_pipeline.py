"""One command from seeds to a tuned adapter, on the real embedded teacher and the offline student."""

import html
import json

import pytest

from selfinstruct.cli import main

pytestmark = pytest.mark.slow


def test_pipeline_seeds_to_adapter(tmp_path, capsys):
    out = tmp_path / "all"
    code = main([
        "pipeline", "--num", "3", "--out", str(out), "--seed", "4", "--no-progress", "--max-requests", "200",  # the embedded defaults "--tune-model", "smollm2", "--tune-max-steps", "2",
    ])
    assert code == 0, capsys.readouterr().err[-2000:]
    kept = (out / "kept.jsonl").read_text().splitlines()
    assert len(kept) == 3
    report = (out / "report.html").read_text()
    assert "<img" in report and html.escape(json.loads(kept[0])["instruction"][:20], quote=True) in report
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists()
    assert any(adapter.glob("adapter_model.*"))


def test_pipeline_checks_tune_options_before_generating(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("generate:\n  num: 2\ntune:\n  lora_rank_typo: 8\n")
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "field 'lora_rank_typo': unknown option" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    cfg.write_text("generat:\n  num: 2\n")
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "unknown section" in capsys.readouterr().err
