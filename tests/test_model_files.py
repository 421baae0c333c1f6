"""Checkpoint files of other trainers (store.model_files) and user models (analyzer.model_factory).

Every test writes real files into ``tmp_path`` with torch's own writers: no mocks.
"""

from __future__ import annotations

import io
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from analyzer.model_factory import default_layer, resolve_model
from analyzer.torch_backend import TorchBackend
from store.checkpoint_files import CheckpointFile, checkpoint_epoch, discover_checkpoints
from store.checkpoints import checkpoint_name, save_checkpoint
from store.errors import InputError
from store.model_files import load_weights_file, strip_common_prefix
from store.spec import ReactionSpec
from trainer.models import ConvNet, ModelSpec, build_model, gradcam_layer

SPEC = ModelSpec("small", 1, (8, 8), 10)
LAYER = gradcam_layer("small")
UNPICKLED: list[str] = []  # what a malicious pickle in these tests would append to


class PickledObject:
    """A custom class: weights_only loading must refuse an instance of it."""

    def __init__(self) -> None:
        self.weights = torch.ones(2)


def record_unpickling(tag: str) -> None:
    """What unpickling a :class:`RecordsWhenUnpickled` calls."""
    UNPICKLED.append(tag)


class RecordsWhenUnpickled:
    """Unpickling this calls :func:`record_unpickling`: proof that a loader ran a pickle."""

    def __reduce__(self) -> tuple:
        return record_unpickling, ("unpickled",)


def small_model() -> ConvNet:
    torch.manual_seed(0)
    return build_model(SPEC).eval()


def images(count: int) -> torch.Tensor:
    return torch.randn(count, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported_file(tmp_path_factory) -> Path:
    """A .pt2 of the small model with a dynamic batch dimension."""
    path = tmp_path_factory.mktemp("pt2") / "epoch_0001.pt2"
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(small_model(), (images(3),),
                                  dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, path)
    return path


def rewrite_archive(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """Copy a zip archive, swapping the entries whose name ends with a key of ``replace``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            payload = old.read(info.filename)
            for ending, replacement in replace.items():
                if info.filename.endswith(ending):
                    payload = replacement
            new.writestr(info, payload)
    return target


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


# --- epoch numbers and discovery ---------------------------------------------------------

@pytest.mark.parametrize(("name", "epoch"), [
    ("epoch_0012.safetensors", 12),
    ("model-epoch=7-step=100.ckpt", 7),
    ("epoch12", 12),
    ("Epoch-3.pth", 3),
    ("checkpoint_epoch5_acc0.91.pt", 5),
    ("ckpt_33.pt", 33),
    ("resnet18_run2_40.pth", 40),
    ("epoch_0004.pt2", 4),
    ("model.pt2", None),
    ("best.pt", None),
    ("resume.safetensors", None),
])
def test_checkpoint_epoch_reads_the_number_after_epoch_else_the_last_number(name, epoch):
    assert checkpoint_epoch(name) == epoch


def test_discovery_sorts_by_epoch_and_lists_what_it_passed_over(tmp_path):
    kept = ["epoch_0010.safetensors", "epoch_0002.pt", "model-epoch=3-step=9.ckpt"]
    passed_over = [".epoch_0005.pt", "epoch_0004.safetensors.x1y2.tmp", "notes.txt",
                   "best.pt", "resume.safetensors"]
    for name in kept + passed_over:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "epoch_0007").mkdir()

    checkpoints, ignored = discover_checkpoints(tmp_path)

    assert checkpoints == [CheckpointFile(2, tmp_path / "epoch_0002.pt"),
                           CheckpointFile(3, tmp_path / "model-epoch=3-step=9.ckpt"),
                           CheckpointFile(10, tmp_path / "epoch_0010.safetensors")]
    assert sorted(path.name for path in ignored) == sorted(passed_over)


def test_discovery_refuses_two_files_for_one_epoch_naming_both(tmp_path):
    (tmp_path / "epoch_0003.pt").write_bytes(b"")
    (tmp_path / "model-epoch=3.ckpt").write_bytes(b"")
    with pytest.raises(InputError, match=r"epoch 3.*epoch_0003\.pt.*model-epoch=3\.ckpt"):
        discover_checkpoints(tmp_path)


@pytest.mark.parametrize("content", [[], ["notes.txt", "best.pt"]])
def test_discovery_refuses_a_folder_without_checkpoints(tmp_path, content):
    for name in content:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(InputError, match="no checkpoint files"):
        discover_checkpoints(tmp_path)


def test_discovery_refuses_a_missing_folder_and_a_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        discover_checkpoints(tmp_path / "absent")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(InputError, match="not a folder"):
        discover_checkpoints(tmp_path / "file")


# --- pickled state dicts -----------------------------------------------------------------

def test_our_safetensors_checkpoint_gives_weights_and_metadata(tmp_path):
    model = small_model()
    path = tmp_path / checkpoint_name(1)
    save_checkpoint(path, model.state_dict(), {"epoch": "1"})
    loaded = load_weights_file(path)
    assert_same_tensors(loaded.state_dict, model.state_dict())
    assert loaded.module is None
    assert loaded.metadata["epoch"] == "1"


def test_plain_state_dict_loads_as_is(tmp_path):
    model = small_model()
    torch.save(model.state_dict(), tmp_path / "epoch_1.pt")
    loaded = load_weights_file(tmp_path / "epoch_1.pt")
    assert_same_tensors(loaded.state_dict, model.state_dict())
    assert loaded.module is None
    assert loaded.metadata == {}


def test_lightning_checkpoint_gives_its_state_dict_and_the_prefix_strips_to_fit(tmp_path):
    model = small_model()
    weights = {f"model.{key}": value for key, value in model.state_dict().items()}
    optimizer_state = {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                       "param_groups": [{"lr": 0.1, "params": [0]}]}
    torch.save({"state_dict": weights, "epoch": 3, "global_step": 30,
                "hyper_parameters": {"lr": 0.1, "name": "small"},
                "optimizer_states": [optimizer_state]}, tmp_path / "epoch=3-step=30.ckpt")

    loaded = load_weights_file(tmp_path / "epoch=3-step=30.ckpt")
    assert_same_tensors(loaded.state_dict, weights)

    fitted = strip_common_prefix(loaded.state_dict, set(model.state_dict()))
    assert_same_tensors(fitted, model.state_dict())
    small_model().load_state_dict(fitted)


def test_data_parallel_module_prefix_strips_to_fit(tmp_path):
    model = small_model()
    torch.save({"epoch": 2, "model_state_dict": nn.DataParallel(model).state_dict()},
               tmp_path / "ckpt_2.pth")
    loaded = load_weights_file(tmp_path / "ckpt_2.pth")
    assert all(key.startswith("module.") for key in loaded.state_dict)
    assert_same_tensors(strip_common_prefix(loaded.state_dict, set(model.state_dict())),
                        model.state_dict())


def test_strip_common_prefix_strips_several_components_or_leaves_the_dict_alone():
    weights = {"a.b.conv.weight": torch.ones(1), "a.b.conv.bias": torch.zeros(1)}
    assert set(strip_common_prefix(weights, {"conv.weight", "conv.bias"})) == {
        "conv.weight", "conv.bias"}
    assert strip_common_prefix(weights, {"fc.weight", "fc.bias"}) is weights
    assert strip_common_prefix(weights, set(weights)) is weights


@pytest.mark.parametrize(("saved", "refused_global"), [
    (PickledObject(), "PickledObject"),
    (nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
])
def test_pickled_objects_are_refused_with_the_global_they_need(tmp_path, saved, refused_global):
    path = tmp_path / "epoch_1.pt"
    torch.save(saved, path)
    with pytest.raises(InputError, match="weights_only") as refusal:
        load_weights_file(path)
    message = str(refusal.value)
    assert str(path) in message and refused_global in message and "\n" not in message


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    torch.save({"weights": torch.ones(2), "payload": RecordsWhenUnpickled()},
               tmp_path / "epoch_1.pt")
    UNPICKLED.clear()
    with pytest.raises(InputError, match="weights_only"):
        load_weights_file(tmp_path / "epoch_1.pt")
    assert UNPICKLED == []


def test_a_dict_without_tensors_has_no_weights(tmp_path):
    torch.save({"epoch": 3, "hyper_parameters": {"lr": 0.1}}, tmp_path / "epoch_3.pt")
    with pytest.raises(InputError, match=r"no weights found in .*epoch_3\.pt"):
        load_weights_file(tmp_path / "epoch_3.pt")


def test_torchscript_archive_gives_the_scripted_model_weights(tmp_path):
    model = small_model()
    torch.jit.script(model).save(str(tmp_path / "epoch_1.pt"))
    loaded = load_weights_file(tmp_path / "epoch_1.pt")
    assert_same_tensors(loaded.state_dict, model.state_dict())
    assert loaded.module is None


# --- torch.export programs ---------------------------------------------------------------

def test_exported_program_runs_like_the_eager_model_for_any_batch_size(exported_file):
    loaded = load_weights_file(exported_file)
    assert loaded.state_dict is None
    batch = images(5)
    torch.testing.assert_close(loaded.module(batch), small_model()(batch))


def test_hook_on_an_exported_submodule_fires_and_its_output_replaces_the_layer(exported_file):
    module = load_weights_file(exported_file).module
    layer = dict(module.named_modules())[LAYER]
    seen: list[tuple[int, ...]] = []

    def zero_the_layer(_module, _inputs, output):
        seen.append(tuple(output.shape))
        return torch.zeros_like(output)

    batch = images(4)
    original = module(batch)
    handle = layer.register_forward_hook(zero_the_layer)
    try:
        zeroed = module(batch)
    finally:
        handle.remove()
    assert seen == [(4, 32, 4, 4)]
    assert not torch.allclose(zeroed, original)
    # With the layer zeroed, each logit depends on the classifier's biases only.
    torch.testing.assert_close(zeroed, zeroed[:1].expand_as(zeroed))


def test_grad_cam_backend_gives_the_same_reaction_on_the_exported_program(exported_file):
    batch, labels = images(6), torch.arange(6)
    eager = TorchBackend(small_model(), ReactionSpec(LAYER)).compute(batch, labels, keep_maps=True)
    exported = TorchBackend(load_weights_file(exported_file).module, ReactionSpec(LAYER)).compute(
        batch, labels, keep_maps=True)
    torch.testing.assert_close(exported.logits, eager.logits)
    torch.testing.assert_close(exported.cam, eager.cam)
    torch.testing.assert_close(exported.reaction, eager.reaction)


def pickled_payload(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def archive_entry(path: Path, ending: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith(ending)))


@pytest.mark.parametrize(("tampering", "complaint"), [
    ("sample inputs", "sample inputs that weights_only loading refuses"),
    ("weight", "pickled tensors"),
])
def test_exported_program_that_would_unpickle_code_is_refused_unexecuted(
        exported_file, tmp_path, tampering, complaint):
    """torch.export.load itself would run both payloads (it unpickles them unrestricted)."""
    if tampering == "sample inputs":
        replace = {"data/sample_inputs/model.pt": pickled_payload(((RecordsWhenUnpickled(),), {}))}
    else:
        config = archive_entry(exported_file, "data/weights/model_weights_config.json")
        replace = {"data/weights/model_weights_config.json": config.replace(
                       b'"use_pickle": false', b'"use_pickle": true', 1),
                   "data/weights/weight_0": pickled_payload(RecordsWhenUnpickled())}
    tampered = rewrite_archive(exported_file, tmp_path / "epoch_0002.pt2", replace)
    UNPICKLED.clear()
    with pytest.raises(InputError, match=complaint):
        load_weights_file(tampered)
    assert UNPICKLED == []


def test_exported_program_guard_code_is_never_executed(exported_file, tmp_path):
    program_json = archive_entry(exported_file, "models/model.json")
    # ExportedProgram.module() would exec this as `torch._assert(False, ...)` on every call.
    guarded = program_json.replace(b'"guards_code": []', b'"guards_code": ["False"]')
    assert guarded != program_json
    tampered = rewrite_archive(exported_file, tmp_path / "epoch_0003.pt2",
                               {"models/model.json": guarded})
    module = load_weights_file(tampered).module
    module(images(2))


# --- damaged and unsupported files -------------------------------------------------------

def write_truncated(tmp_path: Path, suffix: str, exported_file: Path) -> Path:
    source = tmp_path / f"whole{suffix}"
    if suffix == ".pt2":
        source = exported_file
    elif suffix == ".safetensors":
        save_checkpoint(source, small_model().state_dict(), {"epoch": "1"})
    else:
        torch.save(small_model().state_dict(), source)
    payload = source.read_bytes()
    target = tmp_path / f"epoch_0001{suffix}"
    target.write_bytes(payload[: len(payload) // 2])
    return target


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".pt2"])
def test_truncated_files_are_refused_naming_the_file(tmp_path, exported_file, suffix):
    path = write_truncated(tmp_path, suffix, exported_file)
    with pytest.raises(InputError, match="corrupt or truncated") as refusal:
        load_weights_file(path)
    assert str(path) in str(refusal.value) and "\n" not in str(refusal.value)


@pytest.mark.parametrize(("payload", "suffix"), [
    (b"", ".pt"), (b"not a checkpoint at all", ".pth"), (b"", ".pt2")])
def test_empty_and_garbage_files_are_refused_naming_the_file(tmp_path, payload, suffix):
    path = tmp_path / f"epoch_1{suffix}"
    path.write_bytes(payload)
    with pytest.raises(InputError, match="corrupt or truncated") as refusal:
        load_weights_file(path)
    assert str(path) in str(refusal.value)


@pytest.mark.parametrize(("name", "complaint"), [
    ("epoch_1.onnx", "is corrupt or truncated"), ("epoch_1.bin", "unsupported checkpoint type"),
    ("absent_epoch_1.pt", "not found")])
def test_other_files_are_refused(tmp_path, name, complaint):
    if name.endswith((".onnx", ".bin")):
        (tmp_path / name).write_bytes(b"\0")
    with pytest.raises(InputError, match=complaint):
        load_weights_file(tmp_path / name)


# --- model factory -----------------------------------------------------------------------

USER_MODULE = textwrap.dedent("""
    from torch import nn

    class Net(nn.Module):
        gradcam_layer = "body.1"

        def __init__(self, in_channels, num_classes):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU())
            self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

        def forward(self, images):
            return self.head(self.body(images))

    def make(in_channels, num_classes, *, image_size, extra="unused", **options):
        assert not options
        height, width = image_size
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * height * width, num_classes))

    def fixed():
        return nn.Linear(3, 2)

    def broken(num_classes):
        raise ValueError(f"cannot build {num_classes} classes\\nsecond line")

    def not_a_model():
        return 42

    ANSWER = 42
""")


@pytest.fixture
def user_folder(tmp_path, monkeypatch) -> Path:
    """tmp_path as the current folder, holding ``user_nets_<id>.py``; sys.path restored after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    module_name = f"user_nets_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module_name}.py").write_text(USER_MODULE)
    yield tmp_path
    sys.modules.pop(module_name, None)


def user_module(folder: Path) -> str:
    return next(folder.glob("user_nets_*.py")).stem


def build(spec: str) -> nn.Module:
    return resolve_model(spec, in_channels=1, image_size=(8, 8), num_classes=10)


def test_zoo_name_builds_the_zoo_model_with_its_layer():
    model = build("small")
    assert isinstance(model, ConvNet)
    assert default_layer(model, "small") == LAYER


def test_module_callable_is_imported_from_the_current_folder(user_folder):
    spec = f"{user_module(user_folder)}:make"
    model = build(spec)
    assert model(images(2)).shape == (2, 10)
    assert default_layer(model, spec) is None


def test_file_callable_is_loaded_and_its_gradcam_layer_is_the_default(user_folder):
    (user_folder / "nets").mkdir()
    (user_folder / "nets" / "custom.py").write_text(USER_MODULE)
    model = build("nets/custom.py:Net")
    assert model(images(2)).shape == (2, 10)
    assert default_layer(model, "nets/custom.py:Net") == "body.1"


def test_callable_without_arguments_is_called_bare(user_folder):
    assert isinstance(build(f"{user_module(user_folder)}:fixed"), nn.Linear)


@pytest.mark.parametrize(("spec", "complaint"), [
    ("resnet1000", "unknown model 'resnet1000'"),
    ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
    ("{module}:missing", "has no attribute 'missing'"),
    ("{module}:ANSWER", "not a callable"),
    ("{module}:broken", "ValueError: cannot build 10 classes$"),
    ("{module}:not_a_model", "returned int, not a torch.nn.Module"),
    ("absent/net.py:make", "model file not found"),
])
def test_bad_model_specs_are_refused_in_one_line(user_folder, spec, complaint):
    with pytest.raises(InputError, match=complaint):
        build(spec.format(module=user_module(user_folder)))
