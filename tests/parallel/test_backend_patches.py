"""The backend patches: which are chosen on which machine, and one check per patch that megatron-core
still needs it and that it works.

The probes run in a fresh interpreter (the patches change torch process-wide). If a new megatron-core
no longer shows a problem, its `before` probe turns False and the test fails: drop the patch. If a
patch stops applying, its `after` probe stays True and the test fails.
"""

import itertools
import json
import subprocess
import sys

import pytest

from olmoe_megatron.parallel import backend_patches
from olmoe_megatron.parallel.backend_patches import PATCHES, SUPPORTED_MCORE_VERSIONS, Environment, select

NEEDS_A_PROCESS_GROUP = {"gloo_uneven_all_gather"}
NO_CUDA = {"current_device", "streams", "rng", "tensor_cuda", "nvtx", "device_cuda", "type_cuda", "a2a_splits",
           "gloo_uneven_all_gather", "no_compile", "fork_results_queue"}
NO_TE = {"te_gemm_none", "recompute_fp8"}
NO_TE_NO_APEX = {"dist_opt_step_state", "foreach_multi_tensor"}


def _env(*, cuda: bool, te: bool, apex: bool, version: str = SUPPORTED_MCORE_VERSIONS[-1]) -> Environment:
    return Environment(cuda=cuda, transformer_engine=te, apex=apex, megatron_core=version)


@pytest.mark.parametrize("cuda,te,apex", list(itertools.product([False, True], repeat=3)))
def test_patches_chosen_by_what_is_missing(cuda, te, apex):
    expected = set()
    if not cuda:
        expected |= NO_CUDA
    if not te:
        expected |= NO_TE
        if not apex:
            expected |= NO_TE_NO_APEX
    assert {p.name for p in select(_env(cuda=cuda, te=te, apex=apex))} == expected


def test_every_patch_has_one_of_the_known_conditions():
    assert set(PATCHES) == NO_CUDA | NO_TE | NO_TE_NO_APEX
    for name, patch in PATCHES.items():
        assert patch.reason and callable(patch.apply) and callable(patch.probe), name
        assert patch.versions == SUPPORTED_MCORE_VERSIONS, name


def test_gpu_without_te_gets_the_router_fix():
    """The crash the structure issue reported: a GPU run without TE needs te_gemm_none (NameError at the first router)."""
    chosen = {p.name for p in select(_env(cuda=True, te=False, apex=False))}
    assert chosen == NO_TE | NO_TE_NO_APEX
    assert "te_gemm_none" in chosen and not chosen & NO_CUDA


def test_unsupported_megatron_version_is_refused_where_a_patch_is_needed():
    with pytest.raises(RuntimeError, match=r"megatron-core 0\.17\.0 is installed, but the patches .*te_gemm_none"):
        select(_env(cuda=True, te=False, apex=True, version="0.17.0"))
    assert select(_env(cuda=True, te=True, apex=True, version="0.17.0")) == []  # nothing needed, nothing refused


def _probes(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "olmoe_megatron.testing.backend_probes", *args], capture_output=True, text=True,
        timeout=300, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probes():
    return _probes()


def test_this_machine_is_detected_as_it_is():
    env = Environment.detect()
    assert env == _env(cuda=False, te=False, apex=False, version=env.megatron_core)


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_patch_is_needed_and_works(probes, name):
    assert probes["before"][name], f"megatron-core/torch no longer needs the '{name}' patch: remove it"
    assert name in probes["installed"]
    if name not in NEEDS_A_PROCESS_GROUP:
        assert not probes["after"][name], f"the '{name}' patch no longer fixes the problem"


def test_install_applies_only_the_chosen_patches():
    """Installed for a GPU machine without TE or apex (on this CPU): the no-TE fixes apply, the CUDA stand-ins do not."""
    result = _probes("--as", "cuda=1,te=0,apex=0")
    assert set(result["installed"]) == NO_TE | NO_TE_NO_APEX
    for name in NO_TE | NO_TE_NO_APEX:
        assert not result["after"][name], name
    for name in NO_CUDA - NEEDS_A_PROCESS_GROUP:
        assert result["after"][name], f"{name} was applied for a CUDA machine"


def test_gloo_uneven_all_gather_on_two_ranks():
    from olmoe_megatron.testing.backend_probes import gloo_all_gather_check
    from olmoe_megatron.testing.distributed import get_pool

    for result in get_pool(2).run(gloo_all_gather_check):
        assert result == {"unpatched_fails": True, "patched_correct": True}


def test_version_is_pinned():
    import megatron.core

    assert megatron.core.__version__ in SUPPORTED_MCORE_VERSIONS


def test_unknown_disabled_patch_is_an_error(monkeypatch):
    monkeypatch.setenv(backend_patches.DISABLE_ENV, "streams,nope")
    with pytest.raises(ValueError, match=r"unknown patches \['nope'\]"):
        backend_patches._disabled()

