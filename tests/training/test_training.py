"""End-to-end training on CPU ranks: golden losses, exact resume, resharded resume, non-finite
losses, atomic checkpoints and the metrics files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from olmoe_megatron.config import ConfigError
from olmoe_megatron.config.base import config_to_dict
from olmoe_megatron.recipes import get_recipe
from olmoe_megatron.testing.checkpoint_checks import optimizer_state_at_start, save_weights_only
from olmoe_megatron.testing.distributed import get_pool, standalone_env
from olmoe_megatron.testing.training_runs import read_metrics, train_run, write_synthetic_corpus
from olmoe_megatron.training.exit_codes import EXIT_NONFINITE, EXIT_OK
from olmoe_megatron.training.schedule import learning_rate

GOLDEN = Path(__file__).parent.parent / "golden" / "olmoe_tiny.json"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus") / "synthetic")


def tiny_run(corpus, root: Path, *, steps: int, layout: dict | None = None, **sections) -> dict:
    run = config_to_dict(get_recipe("olmoe_tiny"))
    run["data"].update(paths=[corpus], demo_corpus=False, cache_dir=str(root / "index"))
    run["train"].update(max_steps=steps)
    run["checkpoint"].update(dir=str(root / "ckpt"), save_interval=1000)
    run["metrics"].update(jsonl=str(root / "metrics.jsonl"))
    run["parallel"].update(layout or {})
    for section, values in sections.items():
        run[section].update(values)
    return run


def losses(root: Path) -> dict[int, float]:
    return {r["step"]: r["lm_loss"] for r in read_metrics(root / "metrics.jsonl")}


@pytest.fixture
def pool1():
    """The live one-rank pool (a failed run closes a pool; the next test gets a new one)."""
    return get_pool(1)


def test_golden_losses(pool1, corpus, tmp_path):
    """olmoe_tiny, 20 steps, fixed synthetic data: losses equal the stored golden values exactly."""
    run = tiny_run(corpus, tmp_path, steps=20, metrics={"tensorboard_dir": str(tmp_path / "tb")})
    assert pool1.run(train_run, run) == [EXIT_OK]
    got = [r["lm_loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert len(got) == 20 and got[-1] < got[0] - 0.5
    # fp32 results differ in the last bits between CPU code paths (MKL and torch's kernels on AVX-512
    # against AVX2): the golden file holds one list per CPU capability.
    capability = torch.backends.cpu.get_cpu_capability()
    golden = json.loads(GOLDEN.read_text())
    if os.environ.get("OLMOE_UPDATE_GOLDEN"):
        golden["lm_loss"][capability] = got
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    assert capability in golden["lm_loss"], (
        f"no golden losses recorded for CPU capability {capability} (have {sorted(golden['lm_loss'])}); "
        "record them with OLMOE_UPDATE_GOLDEN=1 from a commit whose losses are known to be right, in a commit "
        "of their own that says so"
    )
    assert got == golden["lm_loss"][capability]
    record = read_metrics(tmp_path / "metrics.jsonl")[-1]
    for key in ("lm_loss", "lb_loss", "z_loss", "grad_norm", "lr", "tokens", "tokens_per_s", "model_tflops",
                "mfu", "expert_load", "peak_mem_bytes"):
        assert key in record, key
    assert set(record["expert_load"]) == {"busiest_expert_share", "min_tokens_per_expert", "max_tokens_per_expert"}
    assert len(record["expert_load"]["busiest_expert_share"]) == 4
    assert all(m > 0 for m in record["expert_load"]["max_tokens_per_expert"])  # the router hooks counted tokens
    assert record["tokens"] == 20 * 8 * 32 and 0 < record["mfu"] < 1
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"


def test_resume_is_bit_exact(corpus, tmp_path):
    """Stopped at step 3 and resumed: the same losses, bit for bit, as the uninterrupted run (EP2, dist-opt)."""
    pool = get_pool(2)
    layout = {"expert_parallel": 2}
    opt = {"use_distributed_optimizer": True}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert pool.run(train_run, tiny_run(corpus, straight, steps=6, layout=layout, train=opt)) == [0, 0]
    assert pool.run(train_run, tiny_run(corpus, stopped, steps=3, layout=layout, train=opt)) == [0, 0]
    assert (stopped / "ckpt" / "latest").read_text().strip() == "step_0000003"
    assert pool.run(train_run, tiny_run(corpus, stopped, steps=6, layout=layout, train=opt)) == [0, 0]
    assert losses(stopped) == losses(straight)
    assert sorted(losses(stopped)) == [1, 2, 3, 4, 5, 6]


def _saved_model_tensors(step_dir: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = step_dir.parent / f"{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    return {k: v for k, v in torch.load(out, weights_only=True).items() if not k.startswith("optimizer")
            and torch.is_tensor(v)}


def test_overlapped_param_gather_saves_the_current_weights(corpus, tmp_path):
    """With overlapped reduce and gather (the GPU recipes' setting) a step's parameter all-gather runs
    in the next forward; a checkpoint saved after the step must still hold every rank's updated
    shard: its weights equal those of the same run without overlap (DP2 of the dense weights)."""
    pool = get_pool(2)
    layout = {"expert_parallel": 2}
    runs = {}
    for overlap in (False, True):
        root = tmp_path / f"overlap_{overlap}"
        opt = {"use_distributed_optimizer": True, "overlap_grad_reduce": overlap, "overlap_param_gather": overlap}
        assert pool.run(train_run, tiny_run(corpus, root, steps=3, layout=layout, train=opt)) == [0, 0]
        runs[overlap] = (losses(root), _saved_model_tensors(root / "ckpt" / "step_0000003"))
    assert runs[True][0] == runs[False][0]
    assert runs[True][1].keys() == runs[False][1].keys() and len(runs[True][1]) > 10
    for key, value in runs[False][1].items():
        assert torch.equal(runs[True][1][key], value), key


def test_bf16_resume_with_cpu_kernels_is_bit_exact(pool1, corpus, tmp_path):
    """bf16 on one process: the CPU kernels and the one-pass optimizer step (training/cpu_optimizer.py)
    keep torch AdamW's state, so a run stopped at step 2 and resumed gives the same losses, bit for bit."""
    bf16 = {"dtype": "bf16"}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert pool1.run(train_run, tiny_run(corpus, straight, steps=4, precision=bf16)) == [EXIT_OK]
    assert pool1.run(train_run, tiny_run(corpus, stopped, steps=2, precision=bf16)) == [EXIT_OK]
    assert pool1.run(train_run, tiny_run(corpus, stopped, steps=4, precision=bf16)) == [EXIT_OK]
    assert losses(stopped) == losses(straight) and sorted(losses(stopped)) == [1, 2, 3, 4]


def test_anneal_keeps_the_moments_and_restarts_the_trainer_state(pool1, corpus, tmp_path):
    """OLMoE's anneal: a new run from the pretrained checkpoint with its AdamW moments
    (checkpoint.init_optimizer) but step, tokens and data position from 0: the moments after the load
    equal those saved, the lr starts at 0.1 x peak and falls linearly to 0 at anneal_tokens, a new
    data seed reshuffles, and a restart after the anneal has saved resumes the anneal, bit for bit."""
    pre = tmp_path / "pre"
    assert pool1.run(train_run, tiny_run(corpus, pre, steps=3)) == [EXIT_OK]
    tokens_per_step = 8 * 32
    anneal = dict(schedule="anneal", anneal_tokens=4 * tokens_per_step, adam_eps=1e-7)

    def anneal_run(root: Path, steps: int, data_seed: int = 7, keep_moments: bool = True) -> dict:
        run = tiny_run(corpus, root, steps=steps, train=anneal, data={"seed": data_seed})
        run["checkpoint"].update(init_from=str(pre / "ckpt"), init_optimizer=keep_moments)
        return run

    resumed = pool1.run(optimizer_state_at_start, tiny_run(corpus, pre, steps=3))[0]  # the saved state
    kept = pool1.run(optimizer_state_at_start, anneal_run(tmp_path / "view", 4))[0]
    fresh = pool1.run(optimizer_state_at_start, anneal_run(tmp_path / "view", 4, keep_moments=False))[0]
    assert resumed["progress"]["step"] == 3 and kept["progress"] == fresh["progress"] == {
        "step": 0, "consumed_samples": 0, "tokens": 0, "nonfinite_streak": 0}
    assert len(kept["state"]) == len(resumed["state"]) > 10
    for mine, saved in zip(kept["state"], resumed["state"]):
        assert mine.keys() == saved.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(torch.as_tensor(mine[k]), torch.as_tensor(saved[k])) for k in saved)
    assert all(not s for s in fresh["state"])  # init_optimizer=false: a fresh optimizer
    assert {o["eps"] for o in kept["options"]} == {1e-7}  # this run's options, not the checkpoint's

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert pool1.run(train_run, anneal_run(straight, 4)) == [EXIT_OK]
    records = read_metrics(straight / "metrics.jsonl")
    start = 3e-3 * 0.1  # olmoe_tiny's peak lr x anneal_start_ratio
    assert [r["lr"] for r in records] == pytest.approx([start, 0.75 * start, 0.5 * start, 0.25 * start])
    assert [r["tokens"] for r in records] == [k * tokens_per_step for k in (1, 2, 3, 4)]  # schedule from 0
    run = get_recipe("olmoe_tiny").train.replace(**anneal)
    assert learning_rate(run, 4 * tokens_per_step) == 0.0
    assert records[0]["lm_loss"] < losses(pre)[1] - 0.3, "the anneal did not start from the trained weights"

    # The same weights and batch give the same first loss; the moments then change the update.
    fresh_optimizer = tmp_path / "fresh_optimizer"
    assert pool1.run(train_run, anneal_run(fresh_optimizer, 2, keep_moments=False)) == [EXIT_OK]
    assert losses(fresh_optimizer)[1] == records[0]["lm_loss"]
    assert losses(fresh_optimizer)[2] != records[1]["lm_loss"]

    same_order = tmp_path / "same_order"  # the pretraining's data seed: other batches, another loss
    pretrain_seed = get_recipe("olmoe_tiny").data.seed
    assert pretrain_seed != 7
    assert pool1.run(train_run, anneal_run(same_order, 1, data_seed=pretrain_seed)) == [EXIT_OK]
    assert losses(same_order)[1] != records[0]["lm_loss"]

    assert pool1.run(train_run, anneal_run(stopped, 2)) == [EXIT_OK]
    assert pool1.run(train_run, anneal_run(stopped, 4)) == [EXIT_OK]  # resumes its own step 2
    assert [r["step"] for r in read_metrics(stopped / "metrics.jsonl")] == [1, 2, 3, 4]  # not restarted
    assert [r["lr"] for r in read_metrics(stopped / "metrics.jsonl")] == [r["lr"] for r in records]
    assert losses(stopped) == losses(straight)


def test_init_optimizer_needs_a_training_checkpoint(pool1, corpus, tmp_path):
    """A weights-only checkpoint (a conversion) has no moments to keep: a clear error, not a silent
    fresh optimizer."""
    pre = tmp_path / "pre"
    assert pool1.run(train_run, tiny_run(corpus, pre, steps=1)) == [EXIT_OK]
    weights_only = tmp_path / "weights_only"
    pool1.run(save_weights_only, str(pre / "ckpt" / "step_0000001"), str(weights_only))
    run = tiny_run(corpus, tmp_path / "anneal", steps=1, train={"schedule": "anneal"})
    run["checkpoint"].update(init_from=str(weights_only), init_optimizer=True)
    with pytest.raises(Exception, match=r"checkpoint.init_optimizer=true needs the optimizer state"):
        pool1.run(train_run, run)
    with pytest.raises(ConfigError, match=r"checkpoint.init_optimizer=true takes the optimizer state of "
                                          r"checkpoint.init_from, which is not set"):
        get_recipe("olmoe_tiny").with_overrides(["checkpoint.init_optimizer=true"])


def test_non_finite_losses_skip_then_stop(pool1, corpus, tmp_path):
    poisoned = {"OLMOE_FAULT_NAN_STEPS": "2"}
    run = tiny_run(corpus, tmp_path / "once", steps=4)
    assert pool1.run(train_run, run, env=poisoned) == [EXIT_OK]
    records = read_metrics(tmp_path / "once" / "metrics.jsonl")
    assert [r["skipped"] for r in records] == [False, True, False, False]
    assert all(r["lm_loss"] == r["lm_loss"] for r in records[2:])  # finite again after the skip

    run = tiny_run(corpus, tmp_path / "streak", steps=6, train={"max_nonfinite_steps": 1})
    assert pool1.run(train_run, run, env={"OLMOE_FAULT_NAN_STEPS": "2,3,4"}) == [EXIT_NONFINITE]
    assert (tmp_path / "streak" / "ckpt" / "latest").read_text().strip() == "step_0000003"

    # A streak from step 1: no update was ever applied, so no checkpoint is written (one without
    # optimizer state could not be resumed), and the run starts over cleanly.
    run = tiny_run(corpus, tmp_path / "from_start", steps=3, train={"max_nonfinite_steps": 1})
    assert pool1.run(train_run, run, env={"OLMOE_FAULT_NAN_STEPS": "1,2"}) == [EXIT_NONFINITE]
    assert not (tmp_path / "from_start" / "ckpt" / "latest").exists()
    assert pool1.run(train_run, run) == [EXIT_OK]
    assert (tmp_path / "from_start" / "ckpt" / "latest").read_text().strip() == "step_0000003"


def test_reshard_checkpoint_into_other_layouts(pool1, corpus, tmp_path):
    """Saved by TP2+EP2+PP2 (4 ranks) at step 3 of a 5-step run; loaded with its optimizer state by
    EP4 and PP2+VPP2+EP2, the next steps' losses equal that run's steps 4 and 5. A single process (no
    expert parallelism: Megatron puts experts in the dense optimizer) refuses the optimizer state
    with a clear error and loads the weights alone."""
    pool4 = get_pool(4)
    source = {"tensor_parallel": 2, "expert_parallel": 2, "expert_tensor_parallel": 1, "pipeline_parallel": 2,
              "sequence_parallel": True}
    straight = tmp_path / "straight"
    step3 = straight / "ckpt" / "step_0000003"
    try:
        run = tiny_run(corpus, straight, steps=5, layout=source)
        run["checkpoint"].update(save_interval=3)  # saves at step 3, and at the end
        assert pool4.run(train_run, run) == [0] * 4
        assert (straight / "ckpt" / "latest").read_text().strip() == "step_0000005" and step3.is_dir()
        expected = losses(straight)
        targets = {
            "ep4": {"expert_parallel": 4},
            "pp2_vpp2_ep2": {"pipeline_parallel": 2, "virtual_pipeline_parallel": 2, "expert_parallel": 2},
        }
        for name, layout in targets.items():
            run = tiny_run(corpus, tmp_path / name, steps=5, layout=layout,
                           checkpoint={"load": str(step3)})
            assert pool4.run(train_run, run) == [0] * 4
            got = losses(tmp_path / name)
            assert list(got) == [4, 5], f"{name} did not resume at step 4"
            for step in (4, 5):  # step 5 shows the optimizer state (moments, step count) came along
                assert got[step] == pytest.approx(expected[step], rel=1e-5), (name, step)
    finally:
        pool4.close()
    with pytest.raises(Exception, match=r"checkpoint.load_optimizer=false"):
        pool1.run(train_run, tiny_run(corpus, tmp_path / "single", steps=4, checkpoint={"load": str(step3)}))
    pool1 = get_pool(1)
    run = tiny_run(corpus, tmp_path / "single_weights", steps=1,
                   checkpoint={"load": str(step3), "load_optimizer": False})
    assert pool1.run(train_run, run) == [0]
    # weights only: training restarts at step 1 on the first batch, from the step-3 weights
    assert losses(tmp_path / "single_weights")[1] < expected[1] - 0.1


def test_killed_during_save_leaves_previous_checkpoint(corpus, tmp_path):
    """A process that dies inside a save leaves `latest` on the previous checkpoint, which resumes."""
    run = tiny_run(corpus, tmp_path, steps=4, checkpoint={"save_interval": 2, "dir": str(tmp_path / "ckpt")})
    config = tmp_path / "run.yaml"
    import yaml

    config.write_text(yaml.safe_dump(run))
    # a fresh single-process job, without the rendezvous variables of a world this process holds
    env = standalone_env(OLMOE_FAULT_DIE_DURING_SAVE="4", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "olmoe_megatron.launcher.cli", "train", "--config", str(config)]
    # its own process group: the fault hook kills the whole group, as a node failure would
    died = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert died.returncode == -9, died.stderr[-2000:]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_0000002"
    assert (ckpt / ".step_0000004.tmp").is_dir() and not (ckpt / "step_0000004").exists()
    env.pop("OLMOE_FAULT_DIE_DURING_SAVE")
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (ckpt / "latest").read_text().strip() == "step_0000004"
    assert not (ckpt / ".step_0000004.tmp").exists()
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 3, 4]  # the second run resumed from step 2
