"""Evaluation in the training loop and of saved checkpoints: training stays bit-identical, the
records reach JSONL/TensorBoard/console, `olmoe eval` reproduces the in-loop values, and the
validation loss equals HF OlmoeForCausalLM's on the exported checkpoint."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from olmoe_megatron.config import ConfigError
from olmoe_megatron.config.base import config_to_dict
from olmoe_megatron.recipes import get_recipe
from olmoe_megatron.testing.distributed import get_pool
from olmoe_megatron.testing.training_runs import read_metrics, train_run, write_synthetic_corpus
from olmoe_megatron.training.exit_codes import EXIT_OK

STEPS = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_training")
    return {"root": root, "corpus": write_synthetic_corpus(root / "synthetic"),
            "val": write_synthetic_corpus(root / "val", num_documents=60, seed=1)}


def _run(files, name: str, eval_section: dict) -> dict:
    run = config_to_dict(get_recipe("olmoe_tiny"))
    root = files["root"] / name
    run["data"].update(paths=[files["corpus"]], demo_corpus=False, cache_dir=str(files["root"] / "index"))
    run["train"].update(max_steps=STEPS)
    run["checkpoint"].update(dir=str(root / "ckpt"), save_interval=1000)
    run["metrics"].update(jsonl=str(root / "metrics.jsonl"), tensorboard_dir=str(root / "tb"))
    run["eval"].update(eval_section)
    return run


EVAL = {"interval": 2, "tokens": 1024, "datasets": [{"name": "val", "paths": None}]}


@pytest.fixture(scope="module")
def runs(files):
    """The same 4 steps without and with evaluation every 2 steps (one pool, one after the other)."""
    pool = get_pool(1)
    try:
        plain = _run(files, "plain", {})
        evaluated = _run(files, "evaluated", {**EVAL, "datasets": [{"name": "val", "paths": [files["val"]]}]})
        assert pool.run(train_run, plain) == [EXIT_OK]
        assert pool.run(train_run, evaluated) == [EXIT_OK]
        yield {"plain": plain, "evaluated": evaluated, "pool": pool}
    finally:
        pool.close()


def test_evaluation_leaves_training_bit_identical(runs):
    keys = ("lm_loss", "lb_loss", "z_loss", "grad_norm", "tokens")
    plain = read_metrics(runs["plain"]["metrics"]["jsonl"])
    evaluated = read_metrics(runs["evaluated"]["metrics"]["jsonl"])
    assert len(plain) == STEPS
    assert [[r[k] for k in keys] for r in evaluated] == [[r[k] for k in keys] for r in plain]


def test_eval_records_reach_jsonl_and_tensorboard(runs, capfd):
    records = read_metrics(runs["evaluated"]["metrics"]["jsonl"], kind="eval")
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert math.isclose(record["eval/val/ppl"], math.exp(record["eval/val/loss"]), rel_tol=1e-12)
        assert record["eval/val/tokens"] == 1024
    assert records[1]["eval/val/loss"] < records[0]["eval/val/loss"]  # it learns
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(runs["evaluated"]["metrics"]["tensorboard_dir"])
    events.Reload()
    assert {"eval/val/loss", "eval/val/ppl"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/val/loss")] == [2, 4]


def _eval_checkpoint(ckpt, overrides):
    from olmoe_megatron.evaluation.checkpoint_eval import evaluate_checkpoint

    return evaluate_checkpoint(ckpt, overrides)


def test_olmoe_eval_reproduces_the_in_loop_value_and_hf(runs, files, tmp_path):
    ckpt = runs["evaluated"]["checkpoint"]["dir"]
    in_loop = read_metrics(runs["evaluated"]["metrics"]["jsonl"], kind="eval")[-1]
    result = runs["pool"].run(_eval_checkpoint, ckpt, [])[0]  # the run's own eval section, from its checkpoint
    assert result["step"] == STEPS and result["metrics"]["eval/val/tokens"] == 1024
    assert result["metrics"]["eval/val/loss"] == pytest.approx(in_loop["eval/val/loss"], rel=1e-12)

    from olmoe_megatron.convert.mcore_to_hf import mcore_to_hf
    from olmoe_megatron.data.config import DataConfig
    from olmoe_megatron.evaluation.config import EvalSourceConfig
    from olmoe_megatron.evaluation.sources import source_windows
    from olmoe_megatron.testing.hf_parity import load_hf

    mcore_to_hf(ckpt, tmp_path / "hf")
    hf = load_hf(tmp_path / "hf")
    windows = source_windows(EvalSourceConfig(name="val", paths=(files["val"],)),
                             DataConfig(paths=(files["val"],), demo_corpus=False), max_tokens=1024, seq_length=32,
                             vocab_size=50304, micro_batch_size=1)
    with torch.no_grad():
        logits = hf(torch.from_numpy(windows.tokens)).logits.double()
    token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   torch.from_numpy(windows.labels).reshape(-1), reduction="none")
    mask = torch.from_numpy(windows.loss_mask).reshape(-1).double()
    hf_loss = float((token_loss * mask).sum() / mask.sum())
    assert result["metrics"]["eval/val/loss"] == pytest.approx(hf_loss, rel=1e-4)


def test_olmoe_eval_in_another_layout_gives_the_same_values(runs, files):
    """The 1-process checkpoint evaluated on 2 ranks with expert parallelism 2 (resharded on load),
    with a task file beside the validation source: every rank agrees and equals one process."""
    import json

    task = files["root"] / "arith.jsonl"
    items = [{"id": i, "context": f"{i} plus {i} is", "choices": [f" {2 * i}", f" {2 * i + 1}", f" {i}"], "label": 0}
             for i in range(7)]
    task.write_text("".join(json.dumps(item) + "\n" for item in items))
    ckpt = runs["evaluated"]["checkpoint"]["dir"]
    flags = [f"--eval.tasks=[{task}]", "--data.tokenizer=olmoe"]
    one = runs["pool"].run(_eval_checkpoint, ckpt, flags)[0]["metrics"]
    pool = get_pool(2)
    try:
        two = pool.run(_eval_checkpoint, ckpt, flags + ["--parallel.expert_parallel=2"])
    finally:
        pool.close()
    values = [{k: v for k, v in r["metrics"].items() if k != "eval/time_s"} for r in two]  # time is per rank
    assert values[0] == values[1] and "ep=2" in two[0]["layout"]
    assert one["eval/arith/items"] == 7 and two[0]["metrics"]["eval/arith/acc"] == one["eval/arith/acc"]
    for key in ("eval/val/loss", "eval/arith/acc_norm"):
        assert two[0]["metrics"][key] == pytest.approx(one[key], rel=1e-5), key


def test_olmoe_eval_with_nothing_to_evaluate_is_a_clear_error(runs, capsys):
    from olmoe_megatron.launcher.cli import main

    plain_ckpt = runs["plain"]["checkpoint"]["dir"]
    assert main(["eval", "--ckpt", plain_ckpt]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a directory"):
        from olmoe_megatron.evaluation.checkpoint_eval import checkpoint_run_config

        checkpoint_run_config(str(Path(plain_ckpt) / "missing"), [])
