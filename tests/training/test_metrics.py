"""MFU peaks by GPU name, the record's timing and memory fields, the console line (no GPU needed)."""

import math
import types

import pytest

from olmoe_megatron.training.metrics import (
    PeakFlops,
    format_line,
    gpu_job_peak,
    gpu_peak,
    peak_memory_fields,
    throughput_fields,
)

T = 1e12


@pytest.mark.parametrize("name, bf16, fp8", [
    ("NVIDIA H100 80GB HBM3", 989 * T, 1979 * T),
    ("NVIDIA H100 SXM5 80GB", 989 * T, 1979 * T),
    ("NVIDIA H100 PCIe", 756 * T, 1513 * T),
    ("NVIDIA H100 NVL", 835 * T, 1671 * T),
    ("NVIDIA H200", 989 * T, 1979 * T),
    ("NVIDIA H200 NVL", 835 * T, 1671 * T),
    ("NVIDIA GH200 480GB", 989 * T, 1979 * T),
    ("NVIDIA H20", 148 * T, 296 * T),
    ("NVIDIA H800", 989 * T, 1979 * T),
    ("NVIDIA B200", 2250 * T, 4500 * T),
    ("NVIDIA B100", 1750 * T, 3500 * T),
    ("NVIDIA GB200", 2500 * T, 5000 * T),
    ("NVIDIA A100-SXM4-80GB", 312 * T, None),
    ("NVIDIA A100 80GB PCIe", 312 * T, None),
    ("NVIDIA L40S", 362 * T, 733 * T),
])
def test_gpu_names_match_the_most_specific_datasheet_entry(name, bf16, fp8):
    _, got_bf16, got_fp8 = gpu_peak(name)
    assert (got_bf16, got_fp8) == (bf16, fp8)


@pytest.mark.parametrize("name", ["NVIDIA L40", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", "NVIDIA H1000"])
def test_unknown_gpus_give_nan_and_say_how_to_fix_it(name):
    assert gpu_peak(name) is None
    peak = gpu_job_peak(name, world=8, fp8=False)
    assert math.isnan(peak.flops) and peak.bf16_flops is None
    assert peak.source == f"unknown GPU {name}: set metrics.peak_flops"


def test_fp8_runs_divide_by_the_fp8_peak_and_say_so():
    bf16 = gpu_job_peak("NVIDIA H100 80GB HBM3", world=16, fp8=False)
    assert (bf16.flops, bf16.kind, bf16.bf16_flops) == (16 * 989 * T, "bf16", 16 * 989 * T)
    fp8 = gpu_job_peak("NVIDIA H100 80GB HBM3", world=16, fp8=True)
    assert (fp8.flops, fp8.kind, fp8.bf16_flops) == (16 * 1979 * T, "fp8", 16 * 989 * T)
    assert "dense fp8 peak x 16" in fp8.source
    a100 = gpu_job_peak("NVIDIA A100-SXM4-80GB", world=1, fp8=True)  # no fp8 peak: the bf16 one, said
    assert (a100.flops, a100.kind) == (312 * T, "bf16") and "no fp8 peak" in a100.source


def test_step_time_includes_data_wait_and_mfu_against_both_peaks():
    peak = PeakFlops(flops=4e15, kind="fp8", bf16_flops=2e15, source="test")
    got = throughput_fields(tokens_per_step=1000, data_wait_s=0.5, compute_s=1.5, flops_per_token=1e12, peak=peak)
    assert got == {"step_time_s": 2.0, "data_wait_s": 0.5, "tokens_per_s": 500.0, "model_tflops": 500.0,
                   "mfu": 0.125, "mfu_peak": "fp8", "mfu_bf16": 0.25}
    cpu = PeakFlops(flops=1e11, kind="fp32", bf16_flops=None, source="measured")
    got = throughput_fields(tokens_per_step=100, data_wait_s=0.0, compute_s=1.0, flops_per_token=1e8, peak=cpu)
    assert got["mfu"] == pytest.approx(0.1) and got["mfu_peak"] == "fp32" and got["mfu_bf16"] is None


class _Allocator:
    """Stands in for torch.cuda's allocator statistics."""

    def __init__(self):
        self.allocated, self.reserved, self.resets = 3 << 30, 5 << 30, 0

    def max_memory_allocated(self):
        return self.allocated

    def max_memory_reserved(self):
        return self.reserved

    def reset_peak_memory_stats(self):
        self.resets += 1
        self.allocated, self.reserved = 1 << 30, 2 << 30


def test_cuda_peak_memory_is_per_record_with_reserved_bytes():
    cuda = _Allocator()
    assert peak_memory_fields(uses_cuda=True, cuda=cuda) == {"peak_mem_bytes": 3 << 30, "peak_reserved_bytes": 5 << 30}
    assert peak_memory_fields(uses_cuda=True, cuda=cuda) == {"peak_mem_bytes": 1 << 30, "peak_reserved_bytes": 2 << 30}
    assert cuda.resets == 2


def test_cpu_peak_memory_is_the_process_peak_rss():
    got = peak_memory_fields(uses_cuda=False, cuda=types.SimpleNamespace())  # never touches the allocator
    assert got["peak_mem_bytes"] > 0 and got["peak_reserved_bytes"] is None


RECORD = {"step": 3, "lm_loss": 10.5, "lb_loss": 0.01, "z_loss": 0.002, "grad_norm": 1.25, "lr": 3e-4,
          "tokens": 1024, "tokens_per_s": 1234.0, "model_tflops": 0.5, "mfu": 0.2, "mfu_peak": "bf16",
          "mfu_bf16": 0.2, "expert_load": {"busiest_expert_share": [0.25, 0.5]}}


def test_console_line_unchanged_for_bf16_and_names_the_fp8_peak():
    assert format_line(RECORD) == (
        "step      3 | loss 10.5000 | lb 0.0100 | z 0.00200 | gnorm 1.250 | lr 3.00e-04 | tok 1,024 | "
        "1,234 tok/s | 0.500 TFLOP/s | MFU 20.0% | busiest expert 50%")
    fp8 = format_line({**RECORD, "mfu_peak": "fp8", "mfu": 0.1})
    assert "MFU 10.0% of fp8 peak (20.0% of bf16) |" in fp8


def test_console_line_gives_the_expert_bias_range():
    """model.router_expert_bias: the range of every layer's bias after the step, over all layers."""
    load = {"busiest_expert_share": [0.25, 0.5], "expert_bias_min": [-0.002, -0.003], "expert_bias_max": [0.001, 0.002]}
    assert format_line({**RECORD, "expert_load": load}).endswith("busiest expert 50% | expert bias -0.0030..+0.0020")


def test_bf16_speed_is_told_by_the_cpu_flags():
    from olmoe_megatron.training.metrics import x86_bf16_instructions

    assert x86_bf16_instructions("processor : 0\nflags : fpu sse avx2 fma\n") is False
    assert x86_bf16_instructions("flags\t\t: fpu avx512f avx512_bf16 amx_tile\n") is True
    assert x86_bf16_instructions("flags : fpu amx_bf16\n") is True
    assert x86_bf16_instructions("Features : fp asimd bf16\n") is None  # an ARM cpuinfo: measure instead


def test_an_unwritable_metrics_file_is_a_config_error(tmp_path):
    from olmoe_megatron.config import ConfigError
    from olmoe_megatron.training.metrics import MetricsWriter

    (tmp_path / "file").write_text("")
    for target in (tmp_path, tmp_path / "file" / "metrics.jsonl"):  # a directory; a path under a file
        with pytest.raises(ConfigError, match=r"metrics.jsonl='.*' cannot be written \(.*\); give a writable file path"):
            MetricsWriter(enabled=True, jsonl=str(target), tensorboard_dir=None, log_interval=1)


class _FakeWandb:
    """Stands in for the wandb module: records init's arguments and every log call."""

    def __init__(self):
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            id = kwargs["id"] or "fresh"

            def log(self, values, step):
                fake.logs.append((step, dict(values)))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_gets_the_tensorboard_scalars_and_the_run_config(tmp_path, monkeypatch):
    import sys

    from olmoe_megatron.config.base import config_to_dict
    from olmoe_megatron.recipes import get_recipe
    from olmoe_megatron.training.metrics import MetricsWriter, WandbRun, scalars

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no credentials, so 'auto' is offline
    run = get_recipe("olmoe_tiny").with_overrides(["metrics.wandb_project=olmoe", "metrics.wandb_tags=[a,b]",
                                                   f"checkpoint.dir={tmp_path / 'ckpt'}"])

    def build():
        return WandbRun(run.metrics, run_config=config_to_dict(run), run_name=run.name,
                        checkpoint_dir=run.checkpoint.dir)

    writer = MetricsWriter(enabled=True, jsonl=None, tensorboard_dir=None, log_interval=100, wandb_run=build)
    writer.write(RECORD)
    writer.write_eval(step=3, tokens=1024, metrics={"eval/stdlib/loss": 3.5, "eval/stdlib/ppl": 33.1})
    writer.close()
    (init,) = fake.inits
    assert init["project"] == "olmoe" and init["name"] == "olmoe_tiny" and init["tags"] == ["a", "b"]
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path / "ckpt") and init["resume"] == "allow"
    assert init["config"] == config_to_dict(run) and init["entity"] is None
    assert fake.logs == [(3, scalars(RECORD)), (3, {"eval/stdlib/loss": 3.5, "eval/stdlib/ppl": 33.1})] and fake.finished == 1
    assert fake.logs[0][1]["train/lm_loss"] == 10.5 and fake.logs[0][1]["expert_load/busiest_expert_share/layer1"] == 0.5
    WandbRun(run.metrics, run_config={}, run_name="x", checkpoint_dir=run.checkpoint.dir)
    assert fake.inits[1]["id"] == init["id"] is not None  # a resumed run continues the same W&B run
    monkeypatch.setenv("WANDB_API_KEY", "k")
    WandbRun(run.metrics, run_config={}, run_name="x", checkpoint_dir=None)
    assert fake.inits[2]["mode"] == "online" and fake.inits[2]["id"] is None
    disabled = MetricsWriter(enabled=False, jsonl=None, tensorboard_dir=None, log_interval=1, wandb_run=build)
    disabled.write(RECORD)
    assert len(fake.inits) == 3  # only the logging rank starts a W&B run


def test_wandb_settings_are_checked(monkeypatch):
    import sys

    from olmoe_megatron.config import ConfigError
    from olmoe_megatron.recipes import get_recipe
    from olmoe_megatron.training.metrics import WandbRun

    with pytest.raises(ConfigError, match=r"metrics.wandb_entity/wandb_name/wandb_tags are set but "
                                          r"metrics.wandb_project is not"):
        get_recipe("olmoe_tiny").with_overrides(["metrics.wandb_entity=me"])
    with pytest.raises(ConfigError, match=r"metrics.wandb_project='' is empty"):
        get_recipe("olmoe_tiny").with_overrides(["metrics.wandb_project="])
    run = get_recipe("olmoe_tiny").with_overrides(["metrics.wandb_project=p"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match=r"wandb is not installed: pip install 'olmoe-megatron\[wandb\]'"):
        WandbRun(run.metrics, run_config={}, run_name="x", checkpoint_dir=None)


def test_wandb_offline_run_writes_its_files(tmp_path, monkeypatch):
    """The real wandb package, offline: the run directory and its .wandb file hold the logged step."""
    wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")
    from olmoe_megatron.recipes import get_recipe
    from olmoe_megatron.training.metrics import MetricsWriter, WandbRun

    monkeypatch.setenv("WANDB_SILENT", "true")
    run = get_recipe("olmoe_tiny").with_overrides(["metrics.wandb_project=olmoe-test", "metrics.wandb_mode=offline",
                                                   f"metrics.wandb_dir={tmp_path}"])
    writer = MetricsWriter(enabled=True, jsonl=None, tensorboard_dir=None, log_interval=100,
                           wandb_run=lambda: WandbRun(run.metrics, run_config={"name": run.name}, run_name=run.name,
                                                      checkpoint_dir=None))
    writer.write(RECORD)
    writer.close()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (data,) = run_dir.glob("run-*.wandb")
    assert data.stat().st_size > 0 and b"train/lm_loss" in data.read_bytes()
    assert wandb.run is None  # finished
