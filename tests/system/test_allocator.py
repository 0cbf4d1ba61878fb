"""keep_freed_memory: a training step reuses freed memory instead of page-faulting it back in from the kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest

LOOP = """
import resource, sys, torch
from freqtag.system.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                          torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
x = torch.randn(32, 1, 128, 224)  # each activation 59 MB: above glibc's largest mmap threshold (32 MB)
def step():
    net(x).sum().backward()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):  # the heap grows to what a step needs (and its holes), then stays
    step()
before = faults()
for _ in range(10):
    step()
print(applied, (faults() - before) // 10)
"""


def faults_per_step(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings exist on Linux only")
def test_training_steps_reuse_memory_instead_of_page_faulting():
    applied, kept = faults_per_step("keep")
    _, default = faults_per_step("default")
    if not applied:
        pytest.skip("this C library has no mallopt (not glibc)")
    activation_pages = (32 * 16 * 128 * 224 * 4) // 4096
    assert default >= 2 * activation_pages  # glibc's default: big buffers mapped afresh and faulted in every step
    # kept: the memory of the steps before (a step now and then still takes one new buffer: 0-3.7k faults measured)
    assert kept * 4 < default
