"""Studies: sets of training runs (recipes x overrides x seeds) at one token budget, on the same
data order and held-out sets, run locally or as a Slurm array, resumable, and reported side by side.

spec.py parses a study file, plan.py resolves and writes its plan, runner.py runs members,
report.py tabulates and plots them; builtin/*.yaml are the paper's ablation axes and a layout study
(`olmoe study list`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from olmoe_megatron.studies.spec import StudyError

BUILTIN_DIR = Path(__file__).parent / "builtin"


def builtin_studies() -> dict[str, str]:
    """Built-in study name -> its description."""
    out = {}
    for path in sorted(BUILTIN_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        out[path.stem] = str(data.get("description", ""))
    return out


def study_file(name_or_path: str | Path) -> Path:
    """A study file path, or the built-in study of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    raise StudyError(f"study {str(name_or_path)!r} is neither a file nor a built-in study; built-in: "
                     f"{', '.join(builtin_studies())}")


__all__ = ["BUILTIN_DIR", "StudyError", "builtin_studies", "study_file"]
