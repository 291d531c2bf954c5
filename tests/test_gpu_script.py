"""The prepared GPU script (benchmarks/gpu/olmoe_slice.py) runs end to end on CPU (--cpu-smoke), so the
first GPU session finds it working: the step with expert-load metrics, overlap, and the checkpoint
round trip whose two losses agree."""

import json
import subprocess
import sys
from pathlib import Path

from olmoe_megatron.testing.distributed import standalone_env

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_slice_script_cpu_smoke(tmp_path):
    out = tmp_path / "slice.json"
    env = standalone_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/olmoe_slice.py"), "--cpu-smoke", "--layers", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["spec"] == "local" and result["overlap_grad_reduce_and_param_gather"] is True
    assert result["expert_load_metrics"] and 0 < result["busiest_expert_share_last"] <= 1
    assert "te_gemm_none" in result["backend_patches"]
    checkpoint = result["checkpoint"]
    assert checkpoint["bytes"] > 0 and checkpoint["loaded_step"] == result["steps"] + 1  # cpu-smoke: 1 warmup
    assert checkpoint["loss_after_save"] == checkpoint["loss_after_load"]
    static = result["memory"]["static_bytes"]
    assert static["adam_moments"] == 2 * static["main_weights_fp32"] > 0
