"""mm.utils.host.tune_malloc: after it, CPU inference reuses freed activation pages instead of faulting in fresh ones.

Each measurement runs in a fresh interpreter, because allocator settings are process-wide and one-way.
"""
import os
import platform
import subprocess
import sys

import pytest

import mm.utils.host

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# minor page faults per tiny-clip forward at batch 128 (activations of 6-25 MiB, made and freed every layer),
# counted after two warm-up forwards
FAULTS = """
import resource, sys, torch, mm, mm.utils.host
applied = mm.utils.host.tune_malloc()
torch.manual_seed(0)
model = mm.create_model("tiny-clip").eval()
x = torch.randn(128, 3, 32, 32)
with torch.inference_mode():
    model.encode_image(x); model.encode_image(x)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        model.encode_image(x)
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 3)
"""


def faults_per_forward(tune: bool) -> tuple[bool, float]:
    env = {**os.environ, mm.utils.host.ENV: "1" if tune else "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere tune_malloc is a no-op returning False")
@pytest.mark.slow
def test_tuned_allocator_reuses_pages():
    applied, tuned = faults_per_forward(True)
    not_applied, default = faults_per_forward(False)
    assert applied and not not_applied  # MM_TUNE_MALLOC=0 leaves the allocator alone
    # glibc's defaults hand each multi-MiB activation fresh pages; tuned, the warm heap serves them
    assert default > 1000, default
    assert tuned < 0.05 * default, (tuned, default)


def test_opt_out_and_platform(monkeypatch):
    monkeypatch.setattr(mm.utils.host, "_tuned", False)
    monkeypatch.setenv(mm.utils.host.ENV, "0")
    assert mm.utils.host.tune_malloc() is False
    monkeypatch.setenv(mm.utils.host.ENV, "1")
    assert mm.utils.host.tune_malloc() is GLIBC


def test_mm_command_tunes_its_process(monkeypatch, capsys):
    from mm.cli import main

    monkeypatch.setattr(mm.utils.host, "_tuned", False)
    monkeypatch.delenv(mm.utils.host.ENV, raising=False)
    assert main(["models"]) == 0
    assert "tiny-clip" in capsys.readouterr().out
    assert mm.utils.host._tuned is GLIBC
