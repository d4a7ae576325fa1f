"""ilvr.cpu_memory: UNet calls on CPU stop page-faulting their activations, and a user's own glibc
settings win. Each case runs in a fresh interpreter, since the settings are process-wide."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc's")

FAULTS_PER_CALL = """
import json, resource, torch
from ilvr.runtime.cpu_memory import keep_freed_heap
from ilvr.loading import load_model

model = load_model("emoji64", device="cpu", cpu_backend="torch")  # the PyTorch UNet is what is measured
x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
t = torch.tensor([500])
with torch.inference_mode():
    for _ in range(5):
        model.unet(x, t)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        model.unet(x, t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": keep_freed_heap(), "faults_per_call": faults / 20}))
"""


def _run(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "ILVR_KEEP_FREED_HEAP")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env_extra)
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_load_model_on_cpu_keeps_activations_paged_in():
    res = _run({})
    assert res["applied"]
    assert res["faults_per_call"] < 100, res  # glibc's dynamic defaults: about 1,000 on this model


@glibc_only
def test_glibc_settings_from_the_environment_are_left_alone():
    # glibc's static defaults, set by the user: keep_freed_heap must not override them, and the UNet calls
    # then page-fault again (which also shows the first test's measurement can fail)
    res = _run({"MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert not res["applied"]
    assert res["faults_per_call"] > 500, res


@glibc_only
def test_the_setting_can_be_switched_off():
    assert not _run({"ILVR_KEEP_FREED_HEAP": "0"})["applied"]


def test_release_freed_heap_is_safe_anywhere():
    from ilvr.runtime.cpu_memory import release_freed_heap

    release_freed_heap()
