"""setup.py: package data that exists, runtime dependencies without test tools."""

import ast
import importlib.metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _setup_keywords() -> dict:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    return {kw.arg: kw.value for kw in call.keywords}


def test_package_data_patterns_match_files():
    package_data = ast.literal_eval(_setup_keywords()["package_data"])
    for package, patterns in package_data.items():
        for pattern in patterns:
            assert list((ROOT / package.replace(".", "/")).glob(pattern)), f"{package}: {pattern} matches no file"


def test_pytest_is_a_test_extra_not_a_runtime_dependency():
    keywords = _setup_keywords()
    runtime = ast.literal_eval(keywords["install_requires"])
    extras = ast.literal_eval(keywords["extras_require"])
    assert not [r for r in runtime if r.startswith("pytest")]
    assert any(r.startswith("pytest") for r in extras["test"])


def test_gpu_extra_pins_the_transformer_engine_range_megatron_core_declares():
    """megatron-core 0.16.1 declares the TE versions it supports (its own extra); ours is the same range."""
    extras = ast.literal_eval(_setup_keywords()["extras_require"])
    ours = [Requirement(r) for r in extras["gpu"] if Requirement(r).name == "transformer-engine"]
    declared = [Requirement(r) for r in importlib.metadata.requires("megatron-core") or []]
    theirs = [r for r in declared if r.name == "transformer-engine"]
    assert len(ours) == 1 and theirs, (ours, theirs)
    assert {r.specifier for r in theirs} == {ours[0].specifier}, (ours[0].specifier, [str(r.specifier) for r in theirs])
    assert "pytorch" in ours[0].extras
