"""retain_freed_memory: after it, re-allocating a large freed block (in steady state) no longer page-faults it in
again."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from comlora.cpu_memory import retain_freed_memory

def faults_of_reallocating():
    for _ in range(10):            # steady state first: the heap settles (a small one, right after start-up, takes ~8)
        torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)    # 64 MiB: above glibc's largest mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_reallocating()
applied = retain_freed_memory()
print(default, faults_of_reallocating(), applied)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    default, retained, applied = out.stdout.split()
    pages = 10 * 64 * 2**20 // 4096
    assert applied == "True"
    assert int(default) >= pages * 9 // 10     # glibc default: every re-allocation is faulted in afresh
    assert int(retained) <= pages // 4         # retained: the heap block is reused (the heap may still settle once)
