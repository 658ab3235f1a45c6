"""keep_freed_memory: a tensor allocated again after being freed costs no page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from zhtune.allocator import keep_freed_memory

CHURN = """
import resource, sys, torch
from zhtune.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(10):  # a training step's pattern: the same activations, allocated and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # 8-40 MB each and one of 113 MB (SmolLM2's fp32 output-layer gradient), 237 MB in all
    held = [torch.ones(n << 20) for n in (2, 3, 8, 8, 10)] + [torch.ones(49152, 576)]
    del held
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""
PAGES = ((124 << 20) + 49152 * 576 * 4) // 4096


def faults_of_last_round(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_tensor_memory_is_reused_without_page_faults():
    default = faults_of_last_round("default")
    if default < PAGES // 2:
        pytest.skip(f"this allocator already keeps freed memory ({default} faults)")
    assert faults_of_last_round("keep") < PAGES // 100


def test_idempotent():
    first = keep_freed_memory()
    assert keep_freed_memory() == first
