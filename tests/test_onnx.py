"""ONNX export with the gradient graph and the ONNX Runtime backend, on real files (issue 4).

The ONNX backend must give the PyTorch backend's results: per image Reaction within rel. 1e-4,
the same predictions, losses within rel. 1e-4 and the same empty-map counts. Both compute in
float32 in different orders, so a map entry within float32 rounding of zero may legitimately
differ; as in ``test_torch_backend``, a Reaction that is itself such an entry (a lone small
positive among large negatives) is held to NEAR_ZERO · the map's largest |value| instead.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import h5py
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from torch import Tensor, nn

from analyzer.onnx_backend import OnnxBackend, cuda_usable, session_options
from analyzer.onnx_export import ExportSettings, ReactionGraphExporter
from analyzer.reaction import ReactionOptions, compute_reaction
from analyzer.torch_backend import TorchBackend
from store.checkpoint_files import CheckpointFile, discover_checkpoints, sha256_file
from store.checkpoints import load_checkpoint
from store.datasets import open_source
from store.errors import InputError
from store.onnx_files import read_onnx_file
from store.runfile import read_run_info
from store.spec import ReactionSpec
from tests.conftest import run_cli, run_cli_without_torch, write_rgb_classes
from tests.test_reaction_cli import FOREIGN_MODULE
from trainer.models import ModelSpec, build_model, gradcam_layer

REL_TOL = 1e-4
NEAR_ZERO = 1e-6
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory) -> Path:
    """A 3-epoch run of the default model with `trainer run --onnx`."""
    out = tmp_path_factory.mktemp("onnx") / "demo"
    result = run_cli("trainer", "run", "--out", str(out), "--epochs", "3", "--onnx", "-q")
    assert result.returncode == 0, result.stderr
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    subprocess.run(["cp", "-r", str(run), str(target)], check=True)
    return target


def map_extent(model: nn.Module, layer: str, images: Tensor, targets: Tensor) -> np.ndarray:
    """Per image, the largest |Σ_k alpha_k A^k| before the ReLU (float32, batched)."""
    model = model.eval()
    stored = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, output: stored.update(a=output))
    try:
        logits = model(images)
        score = logits.gather(1, targets[:, None]).sum()
        (gradient,) = torch.autograd.grad(score, stored["a"])
    finally:
        handle.remove()
    weighted = torch.einsum("bk,bkhw->bhw", gradient.mean(dim=(2, 3)), stored["a"].detach())
    return weighted.flatten(1).abs().max(dim=1).values.numpy()


def assert_reactions_agree(onnx_values: np.ndarray, torch_values: np.ndarray,
                           extent: np.ndarray) -> int:
    """Rel. 1e-4, or the near-zero floor; returns how many images needed the floor."""
    error = np.abs(onnx_values.astype(np.float64) - torch_values)
    relative = REL_TOL * np.abs(torch_values)
    assert (error <= relative + NEAR_ZERO * extent).all(), np.max(error / (relative + 1e-30))
    floored = int((error > relative).sum())
    assert floored <= max(1, onnx_values.size // 500), "too many near-zero Reactions"
    return floored


def assert_same_results(onnx_file: Path, torch_file: Path, extents: dict[str, np.ndarray]):
    """Every split and epoch: Reaction, predictions, accuracy, loss, empty maps."""
    with h5py.File(onnx_file, "r") as ours, h5py.File(torch_file, "r") as theirs:
        for split in extents:
            onnx_group, torch_group = ours[f"reaction/{split}"], theirs[f"reaction/{split}"]
            assert onnx_group.attrs["backend"] == "onnx"
            assert torch_group.attrs["backend"] == "torch"
            assert onnx_group["computed"][()].all() and torch_group["computed"][()].all()
            assert_reactions_agree(onnx_group["image_reaction"][()],
                                   torch_group["image_reaction"][()], extents[split])
            np.testing.assert_array_equal(onnx_group["prediction"][()],
                                          torch_group["prediction"][()])
            np.testing.assert_array_equal(onnx_group["empty_maps"][()],
                                          torch_group["empty_maps"][()])
            np.testing.assert_array_equal(onnx_group["accuracy"][()],
                                          torch_group["accuracy"][()])
            np.testing.assert_allclose(onnx_group["loss"][()], torch_group["loss"][()],
                                       rtol=REL_TOL)


def digits_split(run: Path, split: str) -> tuple[Tensor, Tensor]:
    info = read_run_info(run / "run.h5")
    pixels = open_source("digits").load(info.split_ids[split], 1, (8, 8), which=(
        "test" if split == "test" else "train"))
    return torch.as_tensor(pixels), torch.as_tensor(info.split_labels[split])


def checkpoint_model(path: Path) -> nn.Module:
    tensors, metadata = load_checkpoint(path)
    model = build_model(ModelSpec.from_json(metadata["model"]))
    model.load_state_dict(tensors)
    return model.eval()


# ---- whole runs: a zoo model and a foreign architecture --------------------------------------

def test_trainer_onnx_files_give_the_torch_backends_results_without_importing_torch(onnx_run,
                                                                                    tmp_path):
    """The pass over ONNX files runs where importing torch fails (`import torch` is 1–3 s of
    every run's start) and stores what the torch backend computes."""
    run = copy_run(onnx_run, tmp_path)
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("epoch_*.onnx")) == [
        "epoch_0001.onnx", "epoch_0002.onnx", "epoch_0003.onnx"]
    result = run_cli_without_torch("analyzer", "reaction", "--ckpt-dir", str(checkpoints), "-q")
    assert result.returncode == 0, result.stderr
    reference = run_cli("analyzer", "reaction", "--ckpt-dir", str(checkpoints), "--backend",
                        "torch", "--out", str(tmp_path / "torch.h5"), "-q")
    assert reference.returncode == 0, reference.stderr
    extents = {}
    for split in SPLITS:
        images, labels = digits_split(run, split)
        extents[split] = np.stack([
            map_extent(checkpoint_model(checkpoints / f"epoch_{epoch:04d}.safetensors"),
                       gradcam_layer("small"), images, labels) for epoch in (1, 2, 3)])
    assert_same_results(run / "run.h5", tmp_path / "torch.h5", extents)
    with h5py.File(run / "run.h5", "r") as handle:
        files = [name.decode() for name in handle["reaction/train/checkpoint_file"][()]]
        assert files == ["epoch_0001.onnx", "epoch_0002.onnx", "epoch_0003.onnx"]
        assert handle["reaction/train/checkpoint_sha256"][0].decode() == sha256_file(
            checkpoints / "epoch_0001.onnx")


@pytest.mark.slow
def test_a_foreign_residual_cnn_exported_from_module_callable_matches_torch(tmp_path):
    (tmp_path / "mynets.py").write_text(FOREIGN_MODULE)
    data = write_rgb_classes(tmp_path / "images", ("arabic", "greek", "thai"), 20)
    import importlib.util
    spec = importlib.util.spec_from_file_location("mynets_onnx_copy", tmp_path / "mynets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    checkpoints = tmp_path / "ckpts"
    checkpoints.mkdir()
    models = {}
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        models[epoch] = module.make_cnn(3)
        models[epoch].body[1].running_mean.uniform_(-0.5, 0.5)
        torch.save({"state_dict": {f"model.{k}": v for k, v in
                                   models[epoch].state_dict().items()}},
                   checkpoints / f"run-epoch={epoch}.ckpt")
    export = ["analyzer", "export-onnx", "--ckpt-dir", str(checkpoints), "--model",
              "mynets:make_cnn", "--layer", "body.4", "--image-size", "10x14", "--channels",
              "3", "--out", str(tmp_path / "onnx"), "-q"]
    result = run_cli(*export, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"exported 2 checkpoints to {tmp_path / 'onnx'}"
    again = run_cli(*export, cwd=tmp_path)
    assert "exported 0 checkpoints" in again.stdout and "(2 already there)" in again.stdout

    # No Python model from here on: the ONNX files carry the network.
    common = ["--data", f"train={data}", "-q"]
    result = run_cli("analyzer", "reaction", "--ckpt-dir", str(tmp_path / "onnx"),
                     "--image-size", "10x14", "--channels", "3", "--out",
                     str(tmp_path / "onnx.h5"), *common)
    assert result.returncode == 0, result.stderr
    reference = run_cli("analyzer", "reaction", "--ckpt-dir", str(checkpoints), "--model",
                        "mynets:make_cnn", "--layer", "body.4", "--image-size", "10x14",
                        "--channels", "3", "--out", str(tmp_path / "torch.h5"), *common,
                        cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr
    with h5py.File(tmp_path / "onnx.h5", "r") as handle:
        ids = [name.decode() for name in handle["reaction/train/image"][()]]
        labels = torch.as_tensor(handle["reaction/train/label"][()])
    images = torch.as_tensor(np.stack([
        np.asarray(Image.open(data / i).convert("RGB"), np.float32).transpose(2, 0, 1) / 255
        for i in ids]))
    extents = np.stack([map_extent(models[epoch], "body.4", images, labels)
                        for epoch in (1, 2)])
    assert_same_results(tmp_path / "onnx.h5", tmp_path / "torch.h5", {"train": extents})


# ---- the graph: batch sizes, score and target variants, maps ---------------------------------

def test_the_torch_backend_fails_where_torch_cannot_be_imported(onnx_run, tmp_path):
    """The check above can fail: a pass that needs torch does not run without it."""
    result = run_cli_without_torch("analyzer", "reaction", "--ckpt-dir",
                                   str(onnx_run / "checkpoints"), "--backend", "torch",
                                   "--out", str(tmp_path / "torch.h5"), "-q")
    assert result.returncode != 0
    assert "torch was imported by a command that must not need torch" in result.stderr
    assert not (tmp_path / "torch.h5").exists()


def test_numpy_batches_give_numpy_results_equal_to_those_of_torch_tensors(onnx_run):
    backend = OnnxBackend(read_onnx_file(onnx_run / "checkpoints" / "epoch_0003.onnx"))
    images, labels = digits_split(onnx_run, "train")
    images, labels = images[:32], labels[:32]
    from_tensors = backend.compute(images, labels)
    from_arrays = backend.compute(images.numpy(), labels.numpy())
    for name in ("logits", "reaction", "empty"):
        tensor, array = getattr(from_tensors, name), getattr(from_arrays, name)
        assert isinstance(tensor, torch.Tensor) and isinstance(array, np.ndarray), name
        np.testing.assert_allclose(array, tensor.numpy(), rtol=1e-6, err_msg=name)
    logits = backend.logits(images.numpy())
    assert isinstance(logits, np.ndarray)
    np.testing.assert_allclose(logits, backend.logits(images).numpy(), rtol=1e-6)
    np.testing.assert_allclose(logits, from_tensors.logits.numpy(), rtol=1e-5, atol=1e-6)


def test_any_batch_size_gives_the_same_results(onnx_run):
    file = read_onnx_file(onnx_run / "checkpoints" / "epoch_0003.onnx")
    backend = OnnxBackend(file)
    images, labels = digits_split(onnx_run, "train")
    images, labels = images[:64], labels[:64]
    whole = backend.compute(images, labels)
    for batch_size in (1, 7):
        parts = [backend.compute(i, t) for i, t in zip(images.split(batch_size),
                                                       labels.split(batch_size), strict=True)]
        torch.testing.assert_close(torch.cat([p.logits for p in parts]), whole.logits,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.cat([p.reaction for p in parts]), whole.reaction,
                                   rtol=1e-5, atol=1e-9)
        assert torch.equal(torch.cat([p.empty for p in parts]), whole.empty)


def test_a_session_on_the_shared_arena_gives_its_own_arenas_results_bit_for_bit(onnx_run):
    payload = (onnx_run / "checkpoints" / "epoch_0003.onnx").read_bytes()
    images, labels = digits_split(onnx_run, "train")
    feeds = {"images": images[:64].numpy(), "targets": labels[:64].numpy()}
    shared, own = (onnxruntime.InferenceSession(payload, session_options(shared_arena=shared),
                                                providers=["CPUExecutionProvider"])
                   for shared in (True, False))
    key = "session.use_env_allocators"
    assert shared.get_session_options().get_session_config_entry(key) == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        own.get_session_options().get_session_config_entry(key)
    names = ["logits", "reaction", "empty"]
    for name, ours, theirs in zip(names, shared.run(names, feeds), own.run(names, feeds),
                                  strict=True):
        np.testing.assert_array_equal(ours, theirs, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(("score", "target"), [("softmax", "label"), ("logit", "pred")])
def test_score_and_target_variants_and_maps_match_the_torch_backend(onnx_run, score, target):
    model = checkpoint_model(onnx_run / "checkpoints" / "epoch_0003.safetensors")
    layer = gradcam_layer("small")
    settings = ExportSettings(ReactionSpec(layer, score, target), True)
    exporter = ReactionGraphExporter(model, settings,
                                     channels=1, image_size=(8, 8))
    exporter.load_weights(model.state_dict())
    path = Path("epoch_0003.onnx")
    payload = exporter.model_bytes(epoch=3)
    contract = exporter.contract
    assert (contract.spec.score, contract.spec.target, contract.with_maps) == (score, target, True)
    from store.onnx_files import OnnxFile
    backend = OnnxBackend(OnnxFile(path, payload, "", contract))
    images, labels = digits_split(onnx_run, "train")
    got = backend.compute(images, labels, keep_maps=True)
    want = TorchBackend(model, ReactionSpec(layer, score, target), "cpu").compute(images, labels,
                                                                     keep_maps=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=REL_TOL, atol=1e-5)
    targets = labels if target == "label" else want.logits.argmax(dim=1)
    if score == "logit":
        assert_reactions_agree(got.reaction.numpy(), want.reaction.double().numpy(),
                               map_extent(model, layer, images, targets))
    else:  # softmax: the extent of the softmax score's map, by the same formula
        scale = want.cam.flatten(1).abs().max(dim=1).values.double().numpy()
        assert_reactions_agree(got.reaction.numpy(), want.reaction.double().numpy(), scale)
    assert torch.equal(got.empty, want.empty)
    assert got.cam.shape == want.cam.shape == (len(labels), 4, 4)
    torch.testing.assert_close(got.cam, want.cam, rtol=1e-3,
                               atol=1e-5 * float(want.cam.abs().max()))


# ---- the contract and bad input --------------------------------------------------------------

def test_exported_files_carry_the_documented_contract(onnx_run):
    path = onnx_run / "checkpoints" / "epoch_0002.onnx"
    model = onnx.load(path)
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    source = onnx_run / "checkpoints" / "epoch_0002.safetensors"
    assert metadata["format"] == "reaction-onnx" and metadata["format_version"] == "1.0"
    assert metadata["layer"] == gradcam_layer("small")
    assert (metadata["score"], metadata["target"]) == ("logit", "label")
    assert json.loads(metadata["classes"]) == [str(digit) for digit in range(10)]
    assert metadata["epoch"] == "2" and metadata["image_size"] == "8x8"
    assert metadata["channels"] == "1" and metadata["source_file"] == source.name
    assert metadata["source_sha256"] == sha256_file(source)
    assert ModelSpec.from_json(metadata["model"]).name == "small"

    def described(values):
        return {v.name: (v.type.tensor_type.elem_type,
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in values}
    inputs, outputs = described(model.graph.input), described(model.graph.output)
    batch = inputs["images"][1][0]
    assert isinstance(batch, str) and batch
    assert inputs == {"images": (TensorProto.FLOAT, [batch, 1, 8, 8]),
                      "targets": (TensorProto.INT64, [batch])}
    assert outputs == {"logits": (TensorProto.FLOAT, [batch, 10]),
                       "reaction": (TensorProto.FLOAT, [batch]),
                       "empty": (TensorProto.BOOL, [batch]),
                       "cam": (TensorProto.FLOAT, [batch, 4, 4])}  # the twins carry maps
    assert not any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    assert "features.0.weight" in {t.name for t in model.graph.initializer}


def plain_classifier(path: Path) -> None:
    """An ONNX classifier with logits only, as any exporter writes one."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [64, 10], np.zeros(640, np.float32))
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])], "classifier",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_a_plain_classifier_is_refused_with_how_to_export_it(onnx_run, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    plain_classifier(folder / "epoch_0001.onnx")
    result = run_cli("analyzer", "reaction", "--ckpt-dir", str(folder), "--run",
                     str(onnx_run / "run.h5"), "--out", str(tmp_path / "out.h5"), "-q")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "epoch_0001.onnx" in result.stderr and "analyzer export-onnx" in result.stderr
    assert not (tmp_path / "out.h5").exists()


def test_a_truncated_onnx_file_is_refused_naming_it_and_earlier_results_stay(onnx_run,
                                                                           tmp_path):
    run = copy_run(onnx_run, tmp_path)
    compute_reaction(ReactionOptions(ckpt_dir=run / "checkpoints", epochs="1"), progress=False)
    with h5py.File(run / "run.h5", "r") as handle:
        kept = handle["reaction/train/image_reaction"][0]
    damaged = run / "checkpoints" / "epoch_0003.onnx"
    damaged.write_bytes(damaged.read_bytes()[:20_000])
    result = run_cli("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"), "-q")
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and "epoch_0003.onnx" in line and "truncated" in line
    assert "Traceback" not in result.stderr
    with h5py.File(run / "run.h5", "r") as handle:
        np.testing.assert_array_equal(handle["reaction/train/image_reaction"][0], kept)
        assert handle["reaction/train/computed"][()][:3].tolist() == [1, 1, 0]


def test_a_folder_with_onnx_files_for_some_checkpoints_only_is_not_silently_cut(onnx_run,
                                                                              tmp_path):
    run = copy_run(onnx_run, tmp_path)
    (run / "checkpoints" / "epoch_0003.onnx").unlink()  # e.g. killed between the two writes
    before = (run / "run.h5").read_bytes()
    refused = run_cli("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"), "-q")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"Error: {run / 'checkpoints'} holds ONNX files for only some of its checkpoints "
        "(1 without one: epochs 3): choose --backend torch (every PyTorch checkpoint) or "
        "--backend onnx (the ONNX files only)")
    assert (run / "run.h5").read_bytes() == before
    chosen = run_cli("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"),
                     "--backend", "onnx", "--epochs", "1")  # no -q: it would silence the note
    assert chosen.returncode == 0, chosen.stderr
    assert "note: --backend onnx leaves out 1 PyTorch checkpoints without an ONNX file " \
           "(epochs 3)" in chosen.stderr


@pytest.mark.parametrize(("option", "expected"), [
    ({"score": "softmax"}, "export-onnx --score softmax"),
    ({"target": "pred"}, "export-onnx --target pred"),
    ({"layer": "features.2"}, "export-onnx --layer features.2"),
    ({"image_size": (9, 9)}, "8x8"),
    ({"model": "small"}, "carry their network"),
    ({"backend": "torch"}, "onnx backend")])
def test_options_that_contradict_the_files_are_refused(onnx_run, tmp_path, option, expected):
    folder = tmp_path / "only_onnx"
    folder.mkdir()
    (folder / "epoch_0001.onnx").symlink_to(onnx_run / "checkpoints" / "epoch_0001.onnx")
    options = ReactionOptions(ckpt_dir=folder, run=onnx_run / "run.h5", out=tmp_path / "x.h5",
                              **option)
    with pytest.raises(InputError, match=re.escape(expected)):
        compute_reaction(options, progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../secret.bin")
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["reaction"])], "g", [],
                              [helper.make_tensor_value_info("reaction", TensorProto.FLOAT,
                                                             [1])], [tensor])
    model = helper.make_model(graph)
    model.metadata_props.add(key="format", value="reaction-onnx")
    path = tmp_path / "epoch_0001.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match=r"epoch_0001\.onnx.*outside its folder"):
        read_onnx_file(path)


def test_onnx_exports_beside_checkpoints_leave_the_pytorch_discovery_alone(tmp_path):
    for name in ("epoch_0001.safetensors", "epoch_0001.onnx", "epoch_0002.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert discover_checkpoints(tmp_path)[0] == [
        CheckpointFile(1, tmp_path / "epoch_0001.safetensors"),
        CheckpointFile(2, tmp_path / "epoch_0002.safetensors")]
    assert discover_checkpoints(tmp_path, suffixes=(".onnx",)) == (
        [CheckpointFile(1, tmp_path / "epoch_0001.onnx")], [])


def test_the_onnx_flag_is_kept_in_the_run_config_for_resume(onnx_run):
    assert read_run_info(onnx_run / "run.h5").config["onnx"] is True


def test_cuda_probe_is_silent_and_false_without_a_usable_gpu(capfd):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cuda_usable() is False
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_external_data_inside_the_model_folder_is_read(onnx_run, tmp_path):
    model = onnx.load(onnx_run / "checkpoints" / "epoch_0001.onnx")
    path = tmp_path / "epoch_0001.onnx"
    onnx.save(model, path, save_as_external_data=True, location="epoch_0001.onnx.data")
    file = read_onnx_file(path)
    assert file.payload is None and (tmp_path / "epoch_0001.onnx.data").is_file()
    images, labels = digits_split(onnx_run, "val")
    inline = OnnxBackend(read_onnx_file(onnx_run / "checkpoints" / "epoch_0001.onnx"))
    torch.testing.assert_close(OnnxBackend(file).compute(images, labels).reaction,
                               inline.compute(images, labels).reaction, rtol=0, atol=0)


@pytest.mark.slow
def test_backend_onnx_converts_pytorch_checkpoints_in_memory_to_the_same_results(onnx_run,
                                                                                tmp_path):
    weights_only = tmp_path / "safetensors"
    weights_only.mkdir()
    for epoch in (1, 2):
        name = f"epoch_{epoch:04d}.safetensors"
        (weights_only / name).symlink_to(onnx_run / "checkpoints" / name)
    common = {"run": onnx_run / "run.h5", "splits": ["val"], "epochs": "1:2"}
    converted = compute_reaction(ReactionOptions(ckpt_dir=weights_only, backend="onnx",
                                                 out=tmp_path / "converted.h5", **common),
                                 progress=False)
    from_files = compute_reaction(ReactionOptions(ckpt_dir=onnx_run / "checkpoints",
                                                  out=tmp_path / "files.h5", **common),
                                  progress=False)
    with h5py.File(converted.path, "r") as ours, h5py.File(from_files.path, "r") as files:
        assert ours["reaction/val"].attrs["backend"] == "onnx"
        assert [n.decode() for n in ours["reaction/val/checkpoint_file"][()]] == [
            "epoch_0001.safetensors", "epoch_0002.safetensors"]
        for name in ("image_reaction", "prediction", "loss", "empty_maps"):
            np.testing.assert_array_equal(ours[f"reaction/val/{name}"][()],
                                          files[f"reaction/val/{name}"][()][:2])


def test_the_export_self_check_refuses_a_graph_that_does_not_reproduce_the_model(onnx_run):
    from analyzer.onnx_export import _checked_session, _verify

    payload = (onnx_run / "checkpoints" / "epoch_0003.onnx").read_bytes()
    layer = gradcam_layer("small")
    same = TorchBackend(checkpoint_model(onnx_run / "checkpoints" / "epoch_0003.safetensors"),
                        ReactionSpec(layer))
    _verify(_checked_session(payload), same, 1, (8, 8), 10)
    other = TorchBackend(checkpoint_model(onnx_run / "checkpoints" / "epoch_0001.safetensors"),
                         ReactionSpec(layer))
    with pytest.raises(InputError, match="does not reproduce the PyTorch backend"):
        _verify(_checked_session(payload), other, 1, (8, 8), 10)


def test_a_failed_export_leaves_no_empty_output_folder(onnx_run, tmp_path):
    out = tmp_path / "new" / "onnx"
    result = run_cli("analyzer", "export-onnx", "--ckpt-dir", str(onnx_run / "checkpoints"),
                     "--out", str(out), "--model", "mnist", "--image-size", "28x28", "-q")
    assert result.returncode == 1
    assert "weights do not fit the model" in result.stderr
    assert not out.exists()


def test_cam_on_a_trainer_onnx_folder_shows_exactly_the_stored_reaction(onnx_run, tmp_path):
    from analyzer.cam import CamOptions, compute_cam_grid
    from store.results import read_split_results

    run = copy_run(onnx_run, tmp_path)
    compute_reaction(ReactionOptions(ckpt_dir=run / "checkpoints", splits=["train"]),
                     progress=False)
    stored = read_split_results(run / "run.h5", "train")
    assert stored["settings"]["backend"] == "onnx"
    grid = compute_cam_grid(CamOptions(ckpt_dir=run / "checkpoints", epochs="1,3", images=6))
    rows = [list(stored["epoch"]).index(epoch) for epoch in grid.epochs]
    np.testing.assert_array_equal(grid.reaction,
                                  stored["image_reaction"][rows][:, grid.image_index].T)
