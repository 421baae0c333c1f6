"""The digests that key the ONNX graph cache (analyzer/graph_keys.py): a network whose
computation differs must get another digest, and a network the cheap structure digest cannot
vouch for must get none (then the make_fx trace keys it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from analyzer import gradcam
from analyzer.graph_keys import structure_digest, trace_digest
from trainer.models import ModelSpec, build_model, default_image_size, model_names

SOURCES = [gradcam]


class Head(nn.Module):
    """conv → activation → linear, the activation and an extra step given."""

    def __init__(self, activation: nn.Module, extra=None) -> None:
        super().__init__()
        self.conv, self.activation = nn.Conv2d(1, 2, 3), activation
        self.linear = nn.Linear(2 * 6 * 6, 3)
        self.extra = extra

    def forward(self, x):
        features = self.activation(self.conv(x))
        if self.extra is not None:
            features = self.extra(features)
        return self.linear(features.flatten(1))


def digest(model: nn.Module) -> bytes | None:
    return structure_digest(model, SOURCES)


@pytest.mark.parametrize("name", model_names())
def test_every_zoo_model_has_a_structure_digest(name):
    spec = ModelSpec(name, 1, default_image_size(name), 10)
    assert digest(build_model(spec)) is not None


def test_the_digest_ignores_the_weights_values_and_the_training_flag():
    torch.manual_seed(0)
    first, second = Head(nn.ReLU()), Head(nn.ReLU())
    assert not torch.equal(first.conv.weight, second.conv.weight)
    second.train()
    assert digest(first.eval()) == digest(second)
    assert second.training  # left as it was


def test_a_leaf_modules_attribute_changes_the_digest():
    assert digest(Head(nn.LeakyReLU(0.01))) != digest(Head(nn.LeakyReLU(0.2)))
    assert digest(Head(nn.ReLU())) != digest(Head(nn.GELU()))


def test_a_forward_that_computes_otherwise_changes_the_digest():
    assert digest(Head(nn.ReLU())) != digest(Head(nn.ReLU(), extra=lambda f: f * 2))
    assert digest(Head(nn.ReLU(), extra=lambda f: f * 2)) != \
        digest(Head(nn.ReLU(), extra=lambda f: f * 3))


def test_a_tensor_constant_is_keyed_by_value_and_a_source_by_content(tmp_path):
    assert digest(Head(nn.ReLU(), extra=lambda f: f + torch.tensor([1.0, 2.0]).view(1, 2, 1, 1))) \
        != digest(Head(nn.ReLU(), extra=lambda f: f + torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)))
    module = type(gradcam)("copied")
    module.__file__ = str(tmp_path / "copied.py")
    (tmp_path / "copied.py").write_text("x = 1\n")
    before = structure_digest(Head(nn.ReLU()), [module])
    (tmp_path / "copied.py").write_text("x = 2\n")
    assert structure_digest(Head(nn.ReLU()), [module]) != before


class Branching(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def with_hook() -> nn.Module:
    model = Head(nn.ReLU())
    model.activation.register_forward_hook(lambda module, inputs, output: output * 2)
    return model


def with_foreign_attribute() -> nn.Module:
    model = Head(nn.ReLU())
    model.activation.scale = object()
    return model


def with_foreign_module_inside_a_leaf() -> nn.Module:
    model = Head(nn.Sequential())
    model.conv.inner = Branching()
    return model


@pytest.mark.parametrize("build", [
    lambda: Head(nn.ReLU(), extra=Branching()),  # fx cannot trace it
    with_hook, with_foreign_attribute, with_foreign_module_inside_a_leaf,
], ids=["data-dependent branch", "forward hook", "non-plain attribute",
        "foreign module inside a leaf"])
def test_what_the_structure_cannot_vouch_for_gets_no_digest(build):
    assert digest(build()) is None


CUSTOM_FUNCTION_MODULE = '''
import torch
from torch import nn


class Doubling(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 3  # not forward's derivative: only a trace of autograd sees it


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return Doubling.apply(self.conv(x)).flatten(1)
'''


def test_a_network_beside_a_custom_autograd_function_gets_no_digest(tmp_path):
    import importlib.util

    (tmp_path / "custom_function_net.py").write_text(CUSTOM_FUNCTION_MODULE)
    spec = importlib.util.spec_from_file_location("custom_function_net",
                                                  tmp_path / "custom_function_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert torch.fx.symbolic_trace(module.Net()).code  # fx itself traces it
    assert digest(module.Net()) is None


FUNCTIONAL_MODULE = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        features = F.relu(self.conv(x))
        return torch.cat([torch.flatten(features, 1), features.mean((2, 3)) + 1], dim=1)
'''

DIGEST_OF_FUNCTIONAL_NET = """
import importlib.util, sys
from analyzer import gradcam
from analyzer.graph_keys import structure_digest
spec = importlib.util.spec_from_file_location("functional_net", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(structure_digest(module.Net(), [gradcam]).hex())
"""


def test_a_forward_calling_torch_functions_gets_the_same_digest_in_another_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "functional_net.py").write_text(FUNCTIONAL_MODULE)
    root = Path(__file__).resolve().parents[1]
    digests = [subprocess.run([sys.executable, "-c", DIGEST_OF_FUNCTIONAL_NET,
                               str(tmp_path / "functional_net.py")], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()
               for _ in range(2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


def test_the_trace_digest_reads_constants_by_value():
    from torch.fx.experimental.proxy_tensor import make_fx

    def traced(offset: float):
        constant = torch.tensor([offset])
        return make_fx(lambda x: x + constant)(torch.ones(2))

    assert trace_digest(traced(1.0)) == trace_digest(traced(1.0))
    assert trace_digest(traced(1.0)) != trace_digest(traced(2.0))
