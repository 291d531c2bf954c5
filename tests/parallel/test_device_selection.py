"""Which CUDA device a rank takes: LOCAL_RANK among the devices its task sees (torchrun and srun)."""

import os
import subprocess
import sys

import pytest

from parallel.context import local_cuda_device_index


def test_eight_gpus_per_task_each_local_rank_takes_its_own():
    """torchrun, or srun with the node's 8 GPUs visible to every task."""
    assert [local_cuda_device_index(local_rank, 8) for local_rank in range(8)] == list(range(8))


def test_one_gpu_per_task_every_local_rank_takes_device_zero():
    """srun --gpus-per-task=1: each task sees one device (index 0) whatever its LOCAL_RANK."""
    assert [local_cuda_device_index(local_rank, 1) for local_rank in range(8)] == [0] * 8


def test_no_visible_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"device_count\(\)=0 for LOCAL_RANK=3.*--gpus-per-task"):
        local_cuda_device_index(3, 0)


def test_negative_local_rank_is_rejected():
    with pytest.raises(ValueError, match="LOCAL_RANK=-1"):
        local_cuda_device_index(-1, 8)


_NCCL_ONE_GPU_TASK = """
import torch, torch.distributed as dist
from parallel.context import init_distributed
init_distributed(backend="nccl", timeout_minutes=2)
dist.barrier()  # on the bound device: no "devices used by this process are unknown" guess
flag = torch.ones(1, device="cuda")
dist.all_reduce(flag)
print(torch.cuda.current_device(), int(flag.item()))
dist.destroy_process_group()
"""


@pytest.mark.gpu
def test_nccl_rank_with_one_visible_gpu_and_local_rank_3_initialises():
    """A one-rank NCCL world as srun gives it to local rank 3 of a node with one GPU per task."""
    from parallel.context import free_port

    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    result = subprocess.run([sys.executable, "-c", _NCCL_ONE_GPU_TASK], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["0", "1"]
