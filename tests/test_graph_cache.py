"""The persistent cache of exported ONNX graphs (store/graph_cache.py) and the per-checkpoint
sessions of `--backend onnx` on PyTorch checkpoints (issue 14), on real files and real ONNX
Runtime sessions.

A hit must give the miss's results bit for bit; a changed computation must miss; a damaged
entry or an unwritable folder must never fail a run.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from analyzer.onnx_backend import OnnxBackend
from analyzer.onnx_export import ExportSettings, ReactionGraphExporter
from analyzer.reaction import ReactionOptions, compute_reaction
from store.graph_cache import CACHE_FORMAT, GraphCache, default_cache_dir
from store.onnx_files import OnnxFile
from store.spec import ReactionSpec
from tests.conftest import run_cli
from tests.test_onnx import assert_same_results, checkpoint_model, digits_split, map_extent
from trainer.models import gradcam_layer


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A 2-epoch run of the default (small) zoo model: PyTorch checkpoints only."""
    out = tmp_path_factory.mktemp("cache") / "run"
    result = run_cli("trainer", "run", "--out", str(out), "--epochs", "2", "-q")
    assert result.returncode == 0, result.stderr
    return out


def entries(folder: Path) -> list[Path]:
    return sorted((folder / "graphs").glob("*.graph"))


def converted(run: Path, out: Path, **options) -> h5py.File:
    compute_reaction(ReactionOptions(ckpt_dir=run / "checkpoints", run=run / "run.h5",
                                     out=out, backend="onnx", splits=["val"], **options),
                     progress=False)
    return h5py.File(out, "r")


RESULTS = ("image_reaction", "prediction", "loss", "empty_maps", "accuracy")


def test_a_cache_hit_gives_the_misses_results_bit_for_bit(digits_run, tmp_path, monkeypatch):
    monkeypatch.setenv("REACTION_CACHE_DIR", str(tmp_path / "cache"))
    with converted(digits_run, tmp_path / "miss.h5") as miss:
        [entry] = entries(tmp_path / "cache")
        written = entry.stat().st_mtime_ns, entry.read_bytes()
        with converted(digits_run, tmp_path / "hit.h5") as hit:
            for name in RESULTS:
                np.testing.assert_array_equal(hit[f"reaction/val/{name}"][()],
                                              miss[f"reaction/val/{name}"][()], err_msg=name)
    assert entries(tmp_path / "cache") == [entry]
    assert (entry.stat().st_mtime_ns, entry.read_bytes()) == written  # read, not rewritten


def test_converted_sessions_give_the_torch_backends_results(digits_run, tmp_path):
    with converted(digits_run, tmp_path / "onnx.h5"):
        pass
    compute_reaction(ReactionOptions(ckpt_dir=digits_run / "checkpoints",
                                     run=digits_run / "run.h5", out=tmp_path / "torch.h5",
                                     backend="torch", splits=["val"]), progress=False)
    images, labels = digits_split(digits_run, "val")
    extents = np.stack([map_extent(checkpoint_model(
        digits_run / "checkpoints" / f"epoch_{epoch:04d}.safetensors"), gradcam_layer("small"),
        images, labels) for epoch in (1, 2)])
    assert_same_results(tmp_path / "onnx.h5", tmp_path / "torch.h5", {"val": extents})


def test_external_initializers_give_the_serialised_files_results_bit_for_bit(digits_run):
    model = checkpoint_model(digits_run / "checkpoints" / "epoch_0002.safetensors")
    exporter = ReactionGraphExporter(model, ExportSettings(ReactionSpec(gradcam_layer("small"))),
                                     channels=1, image_size=(8, 8))
    exporter.load_weights(model.state_dict())
    path = Path("epoch_0002.onnx")
    serialised = OnnxBackend(OnnxFile(path, exporter.model_bytes(), "", exporter.contract))
    external = OnnxBackend(OnnxFile(path, exporter.weightless_template, "", exporter.contract),
                           initializers=exporter.weight_arrays())
    images, labels = digits_split(digits_run, "val")
    want, got = serialised.compute(images, labels), external.compute(images, labels)
    for name in ("logits", "reaction", "empty"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def two_nets(doubled: bool) -> nn.Module:
    """A tiny CNN called ``Net`` either way; ``doubled`` changes its forward only."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu = nn.Conv2d(1, 2, 3), nn.ReLU()
            self.head = nn.Linear(2 * 6 * 6, 3)

        def forward(self, x):
            activation = self.relu(self.conv(x))
            return self.head((activation * 2 if doubled else activation).flatten(1))

    return Net().eval()


def export_with_cache(model: nn.Module) -> ReactionGraphExporter:
    return ReactionGraphExporter(model, ExportSettings(ReactionSpec("relu")), channels=1,
                                 image_size=(8, 8))


def test_a_changed_forward_with_the_same_class_and_weights_misses(tmp_path, monkeypatch):
    monkeypatch.setenv("REACTION_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    plain, doubled = two_nets(False), two_nets(True)
    doubled.load_state_dict(plain.state_dict())
    assert type(plain).__qualname__ == type(doubled).__qualname__
    export_with_cache(plain)
    assert len(entries(tmp_path)) == 1
    exporter = export_with_cache(doubled)  # its self-check compares with the doubled network
    assert len(entries(tmp_path)) == 2
    exporter.load_weights(doubled.state_dict())
    exporter.model_bytes()
    export_with_cache(two_nets(False))  # other weights, same computation: a hit
    assert len(entries(tmp_path)) == 2


def exported_once(folder: Path, monkeypatch) -> tuple[nn.Module, Path, bytes]:
    """A tiny network exported into a graph cache in ``folder``: it, its entry, the bytes."""
    monkeypatch.setenv("REACTION_CACHE_DIR", str(folder))
    torch.manual_seed(0)
    model = two_nets(False)
    export_with_cache(model)
    [entry] = entries(folder)
    return model, entry, entry.read_bytes()


def test_an_entry_that_does_not_reproduce_the_network_is_exported_again(tmp_path, monkeypatch,
                                                                       caplog):
    plain, entry, good = exported_once(tmp_path, monkeypatch)
    export_with_cache(two_nets(True))
    [other] = [path for path in entries(tmp_path) if path != entry]
    entry.write_bytes(other.read_bytes())  # a well-formed entry of another computation
    exporter = export_with_cache(plain)
    assert "does not reproduce this network: exported again" in caplog.text
    assert entry.read_bytes() == good
    exporter.load_weights(plain.state_dict())
    exporter.model_bytes()  # the self-check on the checkpoint's weights passes


def test_a_network_fx_cannot_vouch_for_is_keyed_on_its_trace_and_hits(tmp_path, monkeypatch):
    from analyzer.graph_keys import structure_digest

    monkeypatch.setenv("REACTION_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    hooked = two_nets(False)
    hooked.conv.register_forward_hook(lambda module, inputs, output: output * 3)
    assert structure_digest(hooked, []) is None
    export_with_cache(hooked)
    [entry] = entries(tmp_path)
    written = entry.stat().st_mtime_ns, entry.read_bytes()
    exporter = export_with_cache(hooked)
    assert entries(tmp_path) == [entry]
    assert (entry.stat().st_mtime_ns, entry.read_bytes()) == written  # read, not rewritten
    exporter.load_weights(hooked.state_dict())
    exporter.model_bytes()  # the self-check: the hook's tripling is in the graph
    export_with_cache(two_nets(False))  # the same network without its hook: another key
    assert len(entries(tmp_path)) == 2


@pytest.mark.parametrize("damage", ["garbage", "cut short", "not a graph"])
def test_a_damaged_entry_is_ignored_and_replaced(tmp_path, monkeypatch, damage):
    import hashlib

    model, entry, good = exported_once(tmp_path, monkeypatch)
    junk = b"\x08\x96\x01 not an onnx model"
    entry.write_bytes({"garbage": b"junk", "cut short": good[:len(good) // 2],
                       "not a graph": CACHE_FORMAT + hashlib.sha256(junk).digest() + junk}[damage])
    exporter = export_with_cache(model)
    exporter.load_weights(model.state_dict())
    exporter.model_bytes()  # the self-check passes
    assert entry.read_bytes() == good


def test_an_unwritable_cache_folder_means_no_cache_not_an_error(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("REACTION_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    torch.manual_seed(0)
    model = two_nets(False)
    exporter = export_with_cache(model)
    exporter.load_weights(model.state_dict())
    exporter.model_bytes()
    cache = GraphCache(default_cache_dir())
    cache.put("ab", b"payload")  # logged at debug, nothing raised
    assert cache.get("ab") is None


def test_the_store_round_trips_and_refuses_what_it_did_not_write(tmp_path):
    cache = GraphCache(tmp_path)
    assert cache.get("00ff") is None
    cache.put("00ff", b"graph bytes")
    assert cache.get("00ff") == b"graph bytes"
    assert [p.name for p in (tmp_path / "graphs").iterdir()] == ["00ff.graph"]  # no temp left
    (tmp_path / "graphs" / "00ff.graph").write_bytes(b"graph bytes")
    assert cache.get("00ff") is None
    with pytest.raises(ValueError):
        cache.path("../escape")
    assert GraphCache(None).get("00ff") is None


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("REACTION_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("REACTION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "reaction"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "reaction"
    monkeypatch.setenv("REACTION_GRAPH_CACHE", "0")
    assert default_cache_dir() is None


@pytest.mark.slow
def test_no_graph_cache_exports_without_reading_or_writing_it(digits_run, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("REACTION_CACHE_DIR", str(tmp_path / "cache"))
    export = ["analyzer", "export-onnx", "--ckpt-dir", str(digits_run / "checkpoints"),
              "--epochs", "1", "-q"]
    result = run_cli(*export, "--out", str(tmp_path / "off"), "--no-graph-cache")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "cache").exists()
    result = run_cli(*export, "--out", str(tmp_path / "on"))
    assert result.returncode == 0, result.stderr
    [entry] = entries(tmp_path / "cache")
    assert (tmp_path / "on" / "epoch_0001.onnx").read_bytes() == \
        (tmp_path / "off" / "epoch_0001.onnx").read_bytes()
    written = entry.stat().st_mtime_ns
    result = run_cli(*export, "--out", str(tmp_path / "hit"))  # another process: same key
    assert result.returncode == 0, result.stderr
    assert entries(tmp_path / "cache") == [entry] and entry.stat().st_mtime_ns == written
    assert (tmp_path / "hit" / "epoch_0001.onnx").read_bytes() == \
        (tmp_path / "off" / "epoch_0001.onnx").read_bytes()
