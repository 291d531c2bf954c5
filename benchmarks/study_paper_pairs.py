"""Two of the paper's ablation pairs as one study on this machine, through the study machinery:
granularity (8 experts top-1 against 64 experts top-8, equal active and total parameters) and the
load-balancing loss on and off (64 experts top-8), on the embedded demo corpus, in fp32.

    python benchmarks/study_paper_pairs.py                       # default budget: 15-30 min on 2 cores
    python benchmarks/study_paper_pairs.py --tokens 20480 --study-dir /tmp/pairs --out /tmp/pairs-out   # a smoke run

It writes the study (runs/studies/paper_pairs by default: resumable, a rerun continues), its report
(benchmarks/results/study_paper_pairs/report.md, report.html, PNGs) and
benchmarks/results/study_paper_pairs.json: each member's numbers, whether the paper's direction holds
at this scale (finer experts reach a lower validation loss; without the LB loss the busiest expert
is busier), and the commit and machine. fp32, because bf16 matmuls on a CPU without bf16
instructions run about 80x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import provenance  # benchmarks/provenance.py (this folder is on sys.path)

#: The members: granularity pair (coarse, fine) and LB pair (fine, lb_off); `fine` is in both.
MEMBERS = (("coarse_8e_top1", "ablation_8e_top1"), ("fine_64e_top8", "ablation_64e_top8"),
           ("lb_off_64e_top8", "ablation_no_lb"))
#: 102,400 tokens = 100 steps of 4 x 256 per member, the ablation recipes' own length (their cosine
#: ends there). On a 2-core AVX2 EPYC shared with other work these models trained at 100-650 tokens/s
#: in fp32 and one evaluation took 12-120 s (a 20-step smoke run: 643 s for the three members), so
#: three members with evaluations every 50 steps take roughly 15-30 minutes.
DEFAULT_TOKENS = 102_400


def study_yaml(tokens: int, *, eval_interval: int | None) -> str:
    members = "\n".join(f"  - {{name: {name}, recipe: {recipe}}}" for name, recipe in MEMBERS)
    interval = "null" if eval_interval is None else eval_interval
    return f"""name: paper_pairs
description: "Granularity (8 experts top-1 vs 64 top-8, equal active and total parameters) and the LB loss on/off (64 top-8) on the demo corpus, fp32 (benchmarks/study_paper_pairs.py)."
tokens: {tokens}
seeds: [1234]
data_seed: 6198
overrides:
  precision.dtype: fp32
  train.log_interval: 25
  checkpoint.save_interval: 100
eval:
  interval: {interval}
  datasets: [{{name: stdlib-heldout, demo_heldout: true}}]
  tokens: 16384
  micro_batch_size: 16
  tasks: [demo-next-line]
  task_limit: 200
members:
{members}
"""


def verdicts(by_name: dict) -> dict:
    coarse, fine, lb_off = (by_name[name] for name, _ in MEMBERS)

    def val(m):
        return m.val_loss.get("stdlib-heldout")

    granularity = {"coarse_val_loss": val(coarse), "fine_val_loss": val(fine),
                   "holds": None if None in (val(coarse), val(fine)) else val(fine) < val(coarse),
                   "paper": "finer experts (64 top-8) reach a lower validation loss than 8 top-1"}
    lb = {"lb_on_busiest_expert_share": fine.busiest_expert_share,
          "lb_off_busiest_expert_share": lb_off.busiest_expert_share,
          "holds": None if None in (fine.busiest_expert_share, lb_off.busiest_expert_share)
          else lb_off.busiest_expert_share > fine.busiest_expert_share,
          "paper": "without the load-balancing loss the busiest expert takes a larger share (collapse)"}
    return {"granularity": granularity, "load_balancing": lb}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="token budget of every member")
    parser.add_argument("--eval-interval", type=int, default=50, help="steps between evaluations (0: only at the end)")
    parser.add_argument("--study-dir", type=Path, default=Path("runs/studies/paper_pairs"))
    parser.add_argument("--out", type=Path, default=Path(provenance.REPOSITORY) / "benchmarks" / "results",
                        help="where study_paper_pairs.json and study_paper_pairs/ (the report) go")
    args = parser.parse_args(argv)

    from olmoe_megatron.launcher.commands.study import build_report, load_or_plan
    from olmoe_megatron.studies.runner import run_local

    load_before = os.getloadavg()
    threads = provenance.set_threads()
    args.study_dir.parent.mkdir(parents=True, exist_ok=True)
    study_path = args.study_dir.parent / f"{args.study_dir.name}.yaml"
    study_path.write_text(study_yaml(args.tokens, eval_interval=args.eval_interval or None))
    start = time.perf_counter()
    plan, study_dir = load_or_plan(str(study_path), args.study_dir)
    outcomes = run_local(plan)
    seconds = time.perf_counter() - start
    failed = [o for o in outcomes if o.state == "failed"]
    paths, members = build_report(study_dir, args.out / "study_paper_pairs")
    by_name = {m.name: m for m in members}
    cpu = provenance.cpu_description()
    dirty = provenance.dirty_paths()
    result = {
        "benchmark": "study_paper_pairs",
        "tokens_per_member": args.tokens,
        "study_dir": str(study_dir),
        "seconds": seconds,
        "members": {m.name: {"recipe": m.recipe, "state": m.state, "params_total": m.params_total,
                             "params_active": m.params_active, "tokens": m.tokens,
                             "final_train_loss": m.final_train_loss, "val_loss": m.val_loss, "task_acc": m.task_acc,
                             "tokens_per_s": m.tokens_per_s, "mfu": m.mfu, "peak_mem_bytes": m.peak_mem_bytes,
                             "busiest_expert_share": m.busiest_expert_share, "num_experts": m.num_experts}
                    for m in members},
        "paper_direction": verdicts(by_name),
        "outcomes": [{"member": o.name, "state": o.state, "exit_code": o.exit_code, "seconds": o.seconds}
                     for o in outcomes],
        "report": {name: str(path) for name, path in paths.items()},
        "provenance": {"commit": provenance.git(provenance.REPOSITORY, "rev-parse", "HEAD").strip() or "unknown",
                       "dirty": bool(dirty), "dirty_paths": dirty},
        "machine": {"cpu": cpu["cpu"], "cores": cpu["cores"], "threads": threads, "cpu_capability": cpu["cpu_capability"],
                    "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())},
        "versions": provenance.versions("torch", "megatron-core", "numpy"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study_paper_pairs.json").write_text(json.dumps(result, indent=2) + "\n")
    for pair, verdict in result["paper_direction"].items():
        print(f"{pair}: paper's direction {'holds' if verdict['holds'] else 'does not hold' if verdict['holds'] is False else 'unknown'}"
              f" ({', '.join(f'{k}={v:.4f}' for k, v in verdict.items() if isinstance(v, float))})")
    print(f"{seconds:.0f} s; {args.out / 'study_paper_pairs.json'}; report {paths['report.html']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
