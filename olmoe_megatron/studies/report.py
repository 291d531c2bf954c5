"""A study's report: one table row per member, PNG plots, Markdown and a self-contained HTML page.

The inputs are data, read by the caller (launcher/commands/study.py): plan.json's content, each
member's metrics records (training records and `"kind": "eval"` records, metrics.jsonl) and each
member's throughput summary (launcher/slurm_sweep.py's LayoutSummary: tokens/s and MFU medians
after warm-up, peak memory). A step written twice (a member killed after its last checkpoint
repeats the steps since) counts once, its last record.

The HTML page embeds its images as base64 data URIs and its style inline: it loads nothing.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
from pathlib import Path
from typing import Any

GIB = 1024**3
#: Steps at the end averaged into the "final train loss" (one step is noisy).
FINAL_LOSS_STEPS = 5


@dataclasses.dataclass(frozen=True)
class MemberSummary:
    """What the report shows of one member."""

    name: str
    recipe: str
    seed: int
    state: str
    params_total: int
    params_active: int
    tokens: int | None
    final_train_loss: float | None
    """Mean LM loss of the last FINAL_LOSS_STEPS steps."""
    val_loss: dict[str, float]
    """Last evaluation's loss per held-out source."""
    task_acc: dict[str, float]
    """Last evaluation's accuracy per task."""
    tokens_per_s: float | None
    mfu: float | None
    peak_mem_bytes: int | None
    busiest_expert_share: float | None
    """Last step's busiest-expert share, the largest over layers (uniform: 1/num_experts)."""
    num_experts: int
    train_curve: tuple[tuple[int, float], ...]
    """(tokens, LM loss) per step."""
    eval_records: tuple[dict, ...]
    expert_curve: tuple[tuple[int, float], ...]
    """(tokens, busiest-expert share, largest over layers) per step."""
    losses_by_step: dict[int, float]


def _by_step(records: list[dict]) -> list[dict]:
    last: dict[int, dict] = {}
    for record in records:
        if "step" in record:
            last[int(record["step"])] = record
    return [last[step] for step in sorted(last)]


def summarize_member(member: dict[str, Any], records: list[dict], throughput: Any, *, state: str) -> MemberSummary:
    """One member's row and curves from its plan entry, metrics records and throughput summary."""
    train = _by_step([r for r in records if r.get("kind", "train") == "train"])
    evals = _by_step([r for r in records if r.get("kind") == "eval"])
    curve = tuple((int(r["tokens"]), float(r["lm_loss"])) for r in train
                  if r.get("lm_loss") is not None and math.isfinite(float(r["lm_loss"])) and not r.get("skipped"))
    tail = [loss for _, loss in curve[-FINAL_LOSS_STEPS:]]
    expert = tuple((int(r["tokens"]), max(r["expert_load"]["busiest_expert_share"])) for r in train
                   if (r.get("expert_load") or {}).get("busiest_expert_share"))
    last_eval = evals[-1] if evals else {}
    val = {key.split("/")[1]: float(value) for key, value in last_eval.items()
           if key.startswith("eval/") and key.endswith("/loss")}
    acc = {key.split("/")[1]: float(value) for key, value in last_eval.items()
           if key.startswith("eval/") and key.endswith("/acc")}
    return MemberSummary(
        name=member["name"], recipe=member["recipe"], seed=member["seed"], state=state,
        params_total=member["params_total"], params_active=member["params_active"],
        tokens=int(train[-1]["tokens"]) if train else None,
        final_train_loss=sum(tail) / len(tail) if tail else None, val_loss=val, task_acc=acc,
        tokens_per_s=getattr(throughput, "tokens_per_s", None), mfu=getattr(throughput, "mfu", None),
        peak_mem_bytes=getattr(throughput, "peak_mem_bytes", None),
        busiest_expert_share=expert[-1][1] if expert else None,
        num_experts=member["config"]["model"]["num_experts"], train_curve=curve, eval_records=tuple(evals),
        expert_curve=expert, losses_by_step={int(r["step"]): float(r["lm_loss"]) for r in train
                                             if r.get("lm_loss") is not None},
    )


def loss_agreement(members: list[MemberSummary], tolerance: float) -> list[dict[str, Any]]:
    """Per member against the first: steps compared, max |train loss difference|, and whether it
    exceeds `tolerance` (the layout study: every layout must train the same losses)."""
    if not members:
        return []
    reference = members[0]
    rows = []
    for member in members[1:]:
        common = sorted(set(reference.losses_by_step) & set(member.losses_by_step))
        diffs = [abs(member.losses_by_step[s] - reference.losses_by_step[s]) for s in common]
        worst = max(diffs) if diffs else None
        worst_step = common[diffs.index(worst)] if diffs else None
        rows.append({"member": member.name, "reference": reference.name, "steps": len(common),
                     "max_abs_diff": worst, "at_step": worst_step,
                     "agrees": worst is not None and worst <= tolerance and not any(map(math.isnan, diffs))})
    return rows


# ------------------------------------------------------------------ table
def _num(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def table_rows(members: list[MemberSummary]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the members' table; sources and tasks are the union over members."""
    sources = sorted({s for m in members for s in m.val_loss})
    tasks = sorted({t for m in members for t in m.task_acc})
    header = (["member", "recipe", "seed", "state", "total params", "active params", "tokens", "final train loss"]
              + [f"val loss {s}" for s in sources] + [f"acc {t}" for t in tasks]
              + ["tokens/s", "MFU", "peak mem GiB", "busiest expert (1/E)"])
    rows = []
    for m in members:
        busiest = "-" if m.busiest_expert_share is None else (
            f"{m.busiest_expert_share:.3f} ({1 / m.num_experts:.3f})" if m.num_experts else f"{m.busiest_expert_share:.3f}")
        rows.append(
            [m.name, m.recipe, str(m.seed), m.state, _params(m.params_total), _params(m.params_active),
             _num(m.tokens, ","), _num(m.final_train_loss, ".4f")]
            + [_num(m.val_loss.get(s), ".4f") for s in sources] + [_num(m.task_acc.get(t), ".3f") for t in tasks]
            + [_num(m.tokens_per_s, ",.0f"), "-" if m.mfu is None else f"{100 * m.mfu:.1f}%",
               "-" if m.peak_mem_bytes is None else f"{m.peak_mem_bytes / GIB:.2f}", busiest])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    tmp.replace(path)


def plot_losses(members: list[MemberSummary], path: Path) -> None:
    """Train LM loss (left) and validation loss per source (right) against tokens, all members."""
    plt = _pyplot()
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.cm.tab10.colors
    styles = ["-", "--", ":", "-."]
    sources = sorted({s for m in members for s in m.val_loss})
    for index, member in enumerate(members):
        color = colors[index % len(colors)]
        if member.train_curve:
            x, y = zip(*member.train_curve)
            train_ax.plot(x, y, color=color, linewidth=1, label=member.name)
        for s_index, source in enumerate(sources):
            points = [(r["tokens"], r[f"eval/{source}/loss"]) for r in member.eval_records if f"eval/{source}/loss" in r]
            if points:
                x, y = zip(*points)
                val_ax.plot(x, y, styles[s_index % len(styles)], color=color, marker="o", markersize=3,
                            label=f"{member.name} {source}")
    train_ax.set_title("train LM loss")
    val_ax.set_title("validation loss")
    for ax in (train_ax, val_ax):
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not sources:
        val_ax.text(0.5, 0.5, "no validation records", ha="center", va="center", transform=val_ax.transAxes)
    _save(fig, path)
    plt.close(fig)


def plot_task_accuracy(members: list[MemberSummary], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = plt.cm.tab10.colors
    tasks = sorted({t for m in members for t in m.task_acc})
    for index, member in enumerate(members):
        for t_index, task in enumerate(tasks):
            points = [(r["tokens"], r[f"eval/{task}/acc"]) for r in member.eval_records if f"eval/{task}/acc" in r]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, ["-", "--", ":"][t_index % 3], color=colors[index % len(colors)], marker="o",
                        markersize=3, label=f"{member.name} {task}")
    ax.set_title("task accuracy")
    ax.set_xlabel("tokens")
    ax.grid(alpha=0.3)
    if tasks:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no task records", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)
    plt.close(fig)


def plot_expert_load(members: list[MemberSummary], path: Path) -> None:
    """Busiest-expert share (largest over layers) against tokens; dotted: each member's uniform 1/E."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = plt.cm.tab10.colors
    any_curve = False
    for index, member in enumerate(members):
        if not member.expert_curve:
            continue
        any_curve = True
        color = colors[index % len(colors)]
        x, y = zip(*member.expert_curve)
        ax.plot(x, y, color=color, linewidth=1, label=member.name)
        if member.num_experts:
            ax.axhline(1 / member.num_experts, color=color, linestyle=":", linewidth=0.8)
    ax.set_title("busiest-expert share (max over layers; dotted: uniform 1/E)")
    ax.set_xlabel("tokens")
    ax.grid(alpha=0.3)
    if any_curve:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no expert-load records (dense members)", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)
    plt.close(fig)


PLOTS = (("loss.png", "Train and validation loss against tokens", plot_losses),
         ("task_accuracy.png", "Task accuracy against tokens", plot_task_accuracy),
         ("expert_load.png", "Expert load over training", plot_expert_load))


# ------------------------------------------------------------------ documents
def _agreement_lines(rows: list[dict], tolerance: float) -> list[str]:
    lines = [f"Per-step train losses against {rows[0]['reference']!r}, tolerance {tolerance:g}:", ""] if rows else []
    for row in rows:
        diff = "no common steps" if row["max_abs_diff"] is None else (
            f"max |diff| {row['max_abs_diff']:.3g} at step {row['at_step']} over {row['steps']} steps")
        lines.append(f"- {row['member']}: {diff}: {'agrees' if row['agrees'] else '**DIFFERS**'}")
    return lines


def write_report(plan: dict[str, Any], members: list[MemberSummary], out_dir: Path) -> dict[str, Path]:
    """Writes report.md, report.html and the PNGs into `out_dir`; returns their paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for filename, _, plot in PLOTS:
        plot(members, out_dir / filename)
        paths[filename] = out_dir / filename
    header, rows = table_rows(members)
    budget = ", ".join(f"{k} {v:,}" for k, v in plan["budget"].items())
    intro = [f"# Study {plan['study']}", "", plan.get("description") or "", "",
             f"Budget: {budget}; data seed {plan['data_seed']} for every member; seeds (train.seed, init): "
             f"{plan['seeds'] or 'from the recipes'}. Final train loss: the mean of the last {FINAL_LOSS_STEPS} "
             "steps; validation and accuracy: the last evaluation; tokens/s and MFU: medians after the first "
             "step; busiest expert: the last step's largest share over layers (uniform 1/E in brackets). "
             + ("Initial weights: shared, every member of a seed started from the study's init/seed<N> (same_init)."
                if plan.get("same_init") else "Initial weights: each member drew its own in its layout."), ""]
    tolerance = plan.get("loss_tolerance")
    agreement = loss_agreement(members, tolerance) if tolerance is not None else []
    agreement_md = (["## Loss agreement", "", *_agreement_lines(agreement, tolerance), ""] if agreement else [])
    md = intro + [markdown_table(header, rows)] + agreement_md
    md += [line for filename, title, _ in PLOTS for line in (f"## {title}", "", f"![{title}]({filename})", "")]
    paths["report.md"] = out_dir / "report.md"
    paths["report.md"].write_text("\n".join(md))
    paths["report.html"] = out_dir / "report.html"
    paths["report.html"].write_text(_html(plan, header, rows, intro[4], agreement, tolerance, out_dir))
    return paths


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;font-size:.85em}
td,th{border:1px solid #bbb;padding:.25em .5em;text-align:right}td:first-child,th:first-child{text-align:left}
th{background:#eee}.differs{color:#b00;font-weight:bold}img{max-width:100%;display:block;margin:.5em 0 1.5em}"""


def _html(plan, header, rows, note, agreement, tolerance, out_dir: Path) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Study {esc(plan['study'])}</title><style>{_STYLE}</style></head><body>",
             f"<h1>Study {esc(plan['study'])}</h1>", f"<p>{esc(plan.get('description') or '')}</p>", f"<p>{esc(note)}</p>",
             "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts.append("</tbody></table>")
    if agreement:
        parts.append(f"<h2>Loss agreement</h2><p>Per-step train losses against {esc(agreement[0]['reference'])}, "
                     f"tolerance {tolerance:g}:</p><ul>")
        for row in agreement:
            diff = "no common steps" if row["max_abs_diff"] is None else (
                f"max |diff| {row['max_abs_diff']:.3g} at step {row['at_step']} over {row['steps']} steps")
            verdict = "agrees" if row["agrees"] else '<span class="differs">DIFFERS</span>'
            parts.append(f"<li>{esc(row['member'])}: {esc(diff)}: {verdict}</li>")
        parts.append("</ul>")
    for filename, title, _ in PLOTS:
        data = base64.b64encode((out_dir / filename).read_bytes()).decode("ascii")
        parts.append(f'<h2>{esc(title)}</h2><img alt="{esc(title)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
