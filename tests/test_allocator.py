"""The trainer's allocator settings: freed buffers are reused instead of page-faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Minor page faults of the third of three rounds of ten 50 MB buffers, each written and freed.
_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "kept":
    from trainer.allocator import keep_freed_memory
    assert keep_freed_memory()
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(50 << 18).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(setting: str) -> int:
    done = subprocess.run([sys.executable, "-c", _FAULTS, setting], capture_output=True,
                          text=True, cwd=ROOT, check=True)
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_kept_memory_spares_the_page_faults_of_reallocating_a_buffer():
    default, kept = faults("default"), faults("kept")
    assert default > 10 * (50 << 20) // 4096 // 2  # each 50 MB buffer faulted in anew
    assert kept < default / 20
