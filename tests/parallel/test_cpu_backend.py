"""One check per CPU-backend patch: megatron-core still needs it, and with it the problem is gone.

The probes run in a fresh interpreter (the backend patches torch process-wide). If a new
megatron-core no longer shows a problem, its `before` probe turns False and the test fails: drop
the patch. If a patch stops applying, its `after` probe stays True and the test fails.
"""

import json
import subprocess
import sys

import pytest

from olmoe_megatron.parallel.cpu_backend import PATCHES, SUPPORTED_MCORE_VERSION

NEEDS_A_PROCESS_GROUP = {"gloo_uneven_all_gather"}


@pytest.fixture(scope="module")
def probes():
    out = subprocess.run(
        [sys.executable, "-m", "olmoe_megatron.testing.backend_probes"], capture_output=True, text=True, timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_patch_is_needed_and_works(probes, name):
    assert probes["before"][name], f"megatron-core/torch no longer needs the '{name}' patch: remove it"
    assert name in probes["installed"]
    if name not in NEEDS_A_PROCESS_GROUP:
        assert not probes["after"][name], f"the '{name}' patch no longer fixes the problem"


def test_gloo_uneven_all_gather_on_two_ranks():
    from olmoe_megatron.testing.backend_probes import gloo_all_gather_check
    from olmoe_megatron.testing.distributed import get_pool

    for result in get_pool(2).run(gloo_all_gather_check):
        assert result == {"unpatched_fails": True, "patched_correct": True}


def test_version_is_pinned():
    import megatron.core

    assert megatron.core.__version__ == SUPPORTED_MCORE_VERSION


def test_unknown_disabled_patch_is_an_error(monkeypatch):
    from olmoe_megatron.parallel import cpu_backend

    monkeypatch.setenv("OLMOE_CPU_BACKEND_DISABLE", "streams,nope")
    with pytest.raises(ValueError, match=r"unknown patches \['nope'\]"):
        cpu_backend._disabled()
