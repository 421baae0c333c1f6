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


# The torch backend's CPU sub-batch size for Model II at 50x200 before and after the setting.
_SUB_BATCH = """
import torch
from analyzer.torch_backend import TorchBackend, cpu_activation_budget
from store.spec import ReactionSpec
from trainer.allocator import freed_memory_kept, keep_freed_memory
from trainer.models import ModelSpec, build_model, gradcam_layer
backend = TorchBackend(build_model(ModelSpec("model2", 1, (50, 200), 13)),
                       ReactionSpec(gradcam_layer("model2")))
images = torch.zeros(512, 1, 50, 200)
print(freed_memory_kept(), cpu_activation_budget(), backend._sub_batch_size(images))
assert keep_freed_memory()
print(freed_memory_kept(), cpu_activation_budget(), backend._sub_batch_size(images))
print(*backend._bytes_per_image.values())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_the_torch_backend_takes_larger_cpu_sub_batches_where_freed_memory_is_kept():
    done = subprocess.run([sys.executable, "-c", _SUB_BATCH], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    before, after, (image_bytes,) = (line.split() for line in done.stdout.splitlines())
    # Model II's largest activation: its first conv's 32 maps of about 50 x 200 float32
    assert 1_200_000 <= int(image_bytes) <= 1_280_000
    assert before == ["False", str(32 << 20), str((32 << 20) // int(image_bytes))]  # 27
    assert after == ["True", str(128 << 20), str((128 << 20) // int(image_bytes))]  # 110
