"""Summaries of layout sweeps (slurm/sweep.sbatch): tokens/s, MFU and peak memory per layout, read
from the metrics JSONL files the runs wrote.

Each line of a metrics file is one JSON object; the keys used here are `step`, `tokens_per_s`,
`mfu`, `peak_mem_bytes` and `layout` (a string such as "tp1-ep8-pp1" or a mapping of degrees). A
record without `layout` belongs to the layout named after its file. The first steps of a run
include start-up and warm-up (allocator, kernel selection, first all-to-all), so they are skipped
for throughput and MFU but not for peak memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from olmoe_megatron.config import ConfigError

logger = logging.getLogger(__name__)

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class LayoutSummary:
    """One row of a sweep report."""

    layout: str
    num_steps: int
    """Steps with a throughput value (all of them, warm-up included)."""
    tokens_per_s: float | None
    """Median over the steps after warm-up."""
    mfu: float | None
    """Median model FLOPs utilisation (0-1) over the steps after warm-up."""
    peak_mem_bytes: int | None
    """Largest peak memory any step reported."""
    sources: tuple[str, ...]


def metrics_files(paths: list[Path]) -> list[Path]:
    """The JSONL files named by `paths`, directories searched recursively."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(path.rglob("*.jsonl")))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"metrics path {str(path)!r} does not exist; give the sweep's metrics files or directory")
    if not files:
        raise ConfigError(f"no *.jsonl metrics files under {', '.join(map(str, paths))}; did the sweep runs set --metrics.jsonl?")
    return files


def layout_name(layout: Any) -> str:
    """A layout value as a short label: strings as they are, mappings as `key=value` pairs."""
    if isinstance(layout, dict):
        return " ".join(f"{key}={value}" for key, value in layout.items())
    return str(layout)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of one metrics file. A final line cut short (a run killed mid-write) is
    skipped with a warning; a bad line anywhere else is a ConfigError naming file and line."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                logger.warning("%s:%d: skipping a truncated last line", path, number)
                continue
            raise ConfigError(f"{path}:{number} is not JSON ({exc}); metrics files hold one JSON object per line") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number} is {type(record).__name__}, not a JSON object")
        records.append(record)
    return records


def summarize(files: list[Path], *, num_warmup_steps: int = 1) -> list[LayoutSummary]:
    """One summary per layout over all `files`, fastest first.

    Args:
        files: metrics JSONL files of the sweep runs.
        num_warmup_steps: leading steps of each layout left out of the throughput and MFU medians
            (all steps are used when a layout has no more than this many).
    """
    if num_warmup_steps < 0:
        raise ConfigError(f"num_warmup_steps={num_warmup_steps} must be >= 0; try 1")
    by_layout: dict[str, list[dict[str, Any]]] = {}
    sources: dict[str, list[str]] = {}
    for path in files:
        for record in read_records(path):
            if record.get("kind") == "eval":  # evaluation records carry no step timing
                continue
            name = layout_name(record["layout"]) if "layout" in record else path.stem
            by_layout.setdefault(name, []).append(record)
            if str(path) not in sources.setdefault(name, []):
                sources[name].append(str(path))

    summaries = []
    for name, records in by_layout.items():
        timed = sorted((r for r in records if r.get("tokens_per_s") is not None), key=lambda r: r.get("step", 0))
        steady = timed[num_warmup_steps:] if len(timed) > num_warmup_steps else timed
        throughput = [float(r["tokens_per_s"]) for r in steady]
        mfu = [float(r["mfu"]) for r in steady if r.get("mfu") is not None]
        peaks = [int(r["peak_mem_bytes"]) for r in records if r.get("peak_mem_bytes") is not None]
        summaries.append(
            LayoutSummary(
                layout=name,
                num_steps=len(timed),
                tokens_per_s=statistics.median(throughput) if throughput else None,
                mfu=statistics.median(mfu) if mfu else None,
                peak_mem_bytes=max(peaks) if peaks else None,
                sources=tuple(sources[name]),
            )
        )
    summaries.sort(key=lambda s: (s.tokens_per_s is None, -(s.tokens_per_s or 0.0), s.layout))
    return summaries


def _cells(summary: LayoutSummary) -> list[str]:
    return [
        summary.layout,
        str(summary.num_steps),
        "-" if summary.tokens_per_s is None else f"{summary.tokens_per_s:,.0f}",
        "-" if summary.mfu is None else f"{100 * summary.mfu:.1f}%",
        "-" if summary.peak_mem_bytes is None else f"{summary.peak_mem_bytes / GIB:.2f}",
    ]


HEADER = ["layout", "steps", "tokens/s", "MFU", "peak mem GiB"]


def format_table(summaries: list[LayoutSummary]) -> str:
    """A Markdown table, one row per layout."""
    rows = [HEADER] + [_cells(s) for s in summaries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]

    def line(row: list[str]) -> str:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        return "| " + " | ".join(cells) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), separator, *(line(row) for row in rows[1:])]) + "\n"


def format_json(summaries: list[LayoutSummary]) -> str:
    return json.dumps([dataclasses.asdict(s) for s in summaries], indent=2) + "\n"


def format_csv(summaries: list[LayoutSummary]) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["layout", "steps", "tokens_per_s", "mfu", "peak_mem_bytes"])
    for s in summaries:
        writer.writerow([s.layout, s.num_steps, s.tokens_per_s, s.mfu, s.peak_mem_bytes])
    return out.getvalue()
