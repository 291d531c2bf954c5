"""`olmoe sweep report` over metrics JSONL files as sweep runs write them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from olmoe_megatron.config import ConfigError
from olmoe_megatron.launcher.cli import main
from olmoe_megatron.launcher.slurm_sweep import format_table, metrics_files, summarize

GIB = 1024**3


def _write(path: Path, records: list[dict], *, tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _run(layout, tokens_per_s, *, mfu=0.4, peak_gib=10.0):
    return [
        {"step": step, "lm_loss": 10.0 - step, "tokens_per_s": tps, "mfu": mfu, "peak_mem_bytes": int(peak_gib * GIB * (1 + step / 100)), "layout": layout}
        for step, tps in enumerate(tokens_per_s, start=1)
    ]


@pytest.fixture
def sweep_dir(tmp_path):
    _write(tmp_path / "sweep" / "0.jsonl", _run("tp1-ep8-pp1", [100.0, 1000.0, 1100.0, 1050.0], mfu=0.40, peak_gib=60))
    _write(tmp_path / "sweep" / "1.jsonl", _run({"tp": 2, "ep": 4}, [50.0, 800.0, 820.0], mfu=0.31, peak_gib=40))
    # A run killed while writing its last line; and a file without layout keys.
    _write(tmp_path / "sweep" / "2.jsonl", _run("tp1-ep4-pp2", [10.0, 900.0]), tail='{"step": 3, "tokens_')
    _write(tmp_path / "sweep" / "nested" / "ep2.jsonl", [{"step": 1, "tokens_per_s": 5.0}, {"step": 2, "tokens_per_s": 7.0}])
    return tmp_path / "sweep"


def test_summary_per_layout_skips_warmup_and_sorts_by_throughput(sweep_dir):
    summaries = summarize(metrics_files([sweep_dir]), num_warmup_steps=1)
    assert [s.layout for s in summaries] == ["tp1-ep8-pp1", "tp1-ep4-pp2", "tp=2 ep=4", "ep2"]
    best = summaries[0]
    assert best.num_steps == 4
    assert best.tokens_per_s == 1050.0  # median of steps 2-4; step 1 (100 tokens/s) is warm-up
    assert best.mfu == pytest.approx(0.40)
    assert best.peak_mem_bytes == int(60 * GIB * 1.04)  # peak memory counts every step
    assert summaries[1].num_steps == 2 and summaries[1].tokens_per_s == 900.0  # truncated line skipped
    assert summaries[3].mfu is None and summaries[3].peak_mem_bytes is None


def test_table_has_one_row_per_layout(sweep_dir):
    table = format_table(summarize(metrics_files([sweep_dir])))
    lines = table.splitlines()
    assert [cell.strip() for cell in lines[0].split("|")[1:-1]] == ["layout", "steps", "tokens/s", "MFU", "peak mem GiB"]
    assert "| tp1-ep8-pp1 |     4 |    1,050 | 40.0% |        62.40 |" in lines
    assert lines[-1].startswith("| ep2") and lines[-1].rstrip().endswith("- |")
    assert len(lines) == 2 + 4


def test_cli_report(sweep_dir, capsys):
    assert main(["sweep", "report", str(sweep_dir), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["layout"] for r in rows][:2] == ["tp1-ep8-pp1", "tp1-ep4-pp2"]


def test_a_corrupt_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [], tail='{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        summarize([path])


def test_missing_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        metrics_files([tmp_path / "nope"])
    with pytest.raises(ConfigError, match="no \\*.jsonl"):
        metrics_files([tmp_path])
