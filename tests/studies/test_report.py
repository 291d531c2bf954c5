"""`olmoe study report` on constructed metrics files: table values, PNGs, a self-contained HTML
page, loss agreement of a layout study; and the page as a browser shows it (headless Chromium)."""

import json
import re
import shutil
import subprocess

import pytest

from olmoe_megatron.launcher.commands.study import build_report
from olmoe_megatron.studies.plan import resolve_study, write_plan
from olmoe_megatron.studies.spec import parse_study

STUDY = """
name: constructed
tokens: 102400
loss_tolerance: 1.0e-4
members:
  - {name: a, recipe: ablation_8e_top1}
  - {name: b, recipe: ablation_64e_top8}
"""


def _records(*, loss_shift: float, busiest: float) -> list[dict]:
    out = []
    for step in range(1, 11):
        out.append({"step": step, "lm_loss": 5.0 - 0.1 * step + (loss_shift if step == 7 else 0.0), "tokens": 1024 * step,
                    "tokens_per_s": 1000.0 * (1 if step > 1 else 0.1), "mfu": 0.25, "peak_mem_bytes": 2 * 1024**3,
                    "layout": "tp=1 pp=1", "expert_load": {"busiest_expert_share": [busiest, busiest / 2]}})
        if step in (5, 10):
            out.append({"kind": "eval", "step": step, "tokens": 1024 * step, "eval/heldout/loss": 6.0 - 0.1 * step,
                        "eval/heldout/ppl": 1.0, "eval/demo-next-line/acc": 0.25 + 0.01 * step})
    # A member killed after its step-5 checkpoint repeats steps 6..7: the last record of a step counts.
    out[6:6] = [dict(out[6], lm_loss=99.0), dict(out[7], lm_loss=99.0)]
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    path = root / "study.yaml"
    path.write_text(STUDY)
    plan = resolve_study(parse_study(path), study_dir=root / "study")
    write_plan(plan)
    for member, shift, busiest in zip(plan.members, (0.0, 1e-3), (0.2, 0.5)):
        member.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in _records(loss_shift=shift, busiest=busiest)))
    (plan.members[0].dir / "done.json").write_text('{"exit_code": 0}')
    paths, members = build_report(root / "study")
    return paths, members, plan


def test_table_values(report):
    paths, members, plan = report
    a, b = members
    assert a.tokens == 10240 and a.final_train_loss == pytest.approx(sum(5.0 - 0.1 * s for s in range(6, 11)) / 5)
    assert a.val_loss == {"heldout": pytest.approx(5.0)} and a.task_acc == {"demo-next-line": pytest.approx(0.35)}
    assert a.tokens_per_s == 1000.0 and a.mfu == 0.25 and a.peak_mem_bytes == 2 * 1024**3
    assert a.busiest_expert_share == 0.2 and b.busiest_expert_share == 0.5
    assert a.params_active == plan.members[0].config.model.num_params(active=True)
    assert a.state == "finished" and b.state == "started"
    md = paths["report.md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| a |"))
    assert "15.74M" in row and "4.73M" in row and "10,240" in row and "5.0000" in row and "0.350" in row
    assert "1,000" in row and "25.0%" in row and "2.00" in row and "0.200 (0.125)" in row
    assert "- b: max |diff| 0.001 at step 7 over 10 steps: **DIFFERS**" in md


def test_pngs_and_self_contained_html(report):
    paths, _, _ = report
    for name in ("loss.png", "task_accuracy.png", "expert_load.png"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["report.html"].read_text()
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == 3
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch
    assert "<script" not in page and "DIFFERS" in page


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.getElementById('check').textContent = JSON.stringify({
    images: imgs.length, widths: imgs.map(i => i.naturalWidth),
    fetched: performance.getEntriesByType('resource').map(e => e.name)});
});</script><pre id="check"></pre></body>"""


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install -y chromium; .ci/run installs it)")
    paths, _, _ = report
    page = tmp_path / "check.html"
    page.write_text(paths["report.html"].read_text().replace("</body>", CHECK))
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--enable-logging=stderr",
         "--v=0", "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    found = re.search(r'<pre id="check">(.*?)</pre>', out.stdout, re.S)
    assert found and found.group(1), out.stdout[-2000:]
    check = json.loads(found.group(1))
    assert check["images"] == 3 and all(w > 0 for w in check["widths"]), check
    assert check["fetched"] == [], check
    console_errors = [line for line in out.stderr.splitlines()
                      if "Uncaught" in line or ("CONSOLE" in line and "error" in line.lower())]
    assert not console_errors, console_errors
