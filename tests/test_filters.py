"""`analyzer filters`: seed 004 eq. 1 on hand-written kernels and on real checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from analyzer.filters import both_directions, dissimilarity, filter_distances
from cli import analyzer
from store.checkpoints import load_checkpoint
from store.errors import InputError
from tests.conftest import run_cli

EPOCHS = 3


def trained_run(tmp_path_factory) -> Path:
    """A 3-epoch run of the default model on the embedded digits, trained once per session
    for this module and tests/test_features.py (which copy it before they change it)."""
    out = tmp_path_factory.getbasetemp() / "filters_and_features" / "demo"
    if not (out / "checkpoints" / f"epoch_{EPOCHS:04d}.safetensors").exists():
        result = run_cli("trainer", "run", "--out", str(out), "--epochs", str(EPOCHS), "-q",
                         "--force")
        assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


def kernels(*grids: list[list[float]]) -> np.ndarray:
    """Single-channel kernels ``[N, 1, kh, kw]`` from 2-D lists."""
    return np.asarray(grids, dtype=np.float32)[:, None]


def loop_dissimilarity(reference: np.ndarray, compared: np.ndarray
                       ) -> tuple[list[float], list[int]]:
    """S_i and its j by a plain float64 loop over filters and weights."""
    values, nearest = [], []
    for f in reference.astype(np.float64):
        distances = [math.sqrt(sum((a - b) ** 2 for a, b in zip(f.ravel(), g.ravel(),
                                                                 strict=True)))
                     for g in compared.astype(np.float64)]
        best = min(range(len(distances)), key=lambda j, d=distances: (d[j], j))
        values.append(distances[best])
        nearest.append(best)
    return values, nearest


def test_distances_and_dissimilarity_of_hand_written_kernels():
    a = kernels([[1, 0], [0, 0]], [[0, 0], [0, 2]])
    b = kernels([[1, 0], [0, 1]], [[0, 0], [0, 0]], [[0, 3], [0, 0]])
    # E_ij worked out on paper: ||(0,0,0,-1)|| = 1, ||(1,0,0,0)|| = 1, ||(1,-3,0,0)|| = √10;
    # ||(-1,0,0,1)|| = √2, ||(0,0,0,2)|| = 2, ||(0,-3,0,2)|| = √13
    expected = np.array([[1, 1, math.sqrt(10)], [math.sqrt(2), 2, math.sqrt(13)]])
    np.testing.assert_allclose(filter_distances(a, b), expected, rtol=1e-15)
    forward, backward = both_directions(a, b)
    np.testing.assert_allclose(forward.dissimilarity, [1, math.sqrt(2)], rtol=1e-15)
    assert forward.nearest.tolist() == [0, 0]  # a tie (1 and 1) goes to the first j
    np.testing.assert_allclose(backward.dissimilarity, [1, 1, math.sqrt(10)], rtol=1e-15)
    assert backward.nearest.tolist() == [0, 0, 0]


def test_a_filter_against_itself_is_zero_and_near_twins_keep_their_small_distance():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    twins = a[::-1] + np.float32(1e-4)  # reordered: filters are unordered
    result = dissimilarity(a, twins)
    assert result.nearest.tolist() == [4, 3, 2, 1, 0]
    np.testing.assert_allclose(result.dissimilarity, 1e-4 * math.sqrt(27), rtol=1e-3)
    assert dissimilarity(a, a).dissimilarity.tolist() == [0.0] * 5


def test_random_filters_match_a_plain_loop():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 2, 3, 3)).astype(np.float32)
    b = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    forward, backward = both_directions(a, b)
    for result, (reference, compared) in ((forward, (a, b)), (backward, (b, a))):
        values, nearest = loop_dissimilarity(reference, compared)
        np.testing.assert_allclose(result.dissimilarity, values, rtol=1e-12)
        assert result.nearest.tolist() == nearest


def test_filters_of_different_shapes_are_refused_with_one_line():
    with pytest.raises(InputError, match="different shapes") as error:
        filter_distances(np.zeros((2, 1, 3, 3)), np.zeros((2, 1, 5, 5)))
    assert "\n" not in str(error.value)


def test_two_checkpoints_as_json_match_a_loop_over_their_weights(trained):
    first = trained / "checkpoints" / "epoch_0001.safetensors"
    last = trained / "checkpoints" / f"epoch_{EPOCHS:04d}.safetensors"
    result = CliRunner().invoke(analyzer, ["filters", str(first), str(last), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    a = load_checkpoint(first)[0]["features.0.weight"].numpy()
    b = load_checkpoint(last)[0]["features.0.weight"].numpy()
    assert len(rows) == 2 * 16
    assert set(rows[0]) == {"reference", "compared", "layer", "filter", "dissimilarity",
                            "nearest"}
    for reference, compared, part in ((a, b, rows[:16]), (b, a, rows[16:])):
        values, nearest = loop_dissimilarity(reference, compared)
        assert [r["filter"] for r in part] == list(range(16))
        assert {r["layer"] for r in part} == {"features.0"}
        np.testing.assert_allclose([r["dissimilarity"] for r in part], values, rtol=1e-12)
        assert [r["nearest"] for r in part] == nearest
    assert rows[0]["reference"] == str(first) and rows[16]["reference"] == str(last)


def test_another_layer_and_a_figure(trained, tmp_path):
    first = trained / "checkpoints" / "epoch_0001.safetensors"
    last = trained / "checkpoints" / f"epoch_{EPOCHS:04d}.safetensors"
    out = tmp_path / "pair.png"
    result = CliRunner().invoke(analyzer, ["filters", str(first), str(last), "--layer",
                                           "features.3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "layer features.3: 32 filters of 16×3×3" in result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_foreign_pt_files_are_read_in_their_order_and_different_shapes_refused(tmp_path):
    small = {"body.conv.weight": torch.ones(4, 2, 3, 3), "body.conv.bias": torch.zeros(4),
             "head.weight": torch.ones(3, 8)}
    large = {"body.conv.weight": torch.ones(4, 2, 5, 5)}
    torch.save(small, tmp_path / "a.pt")
    torch.save(large, tmp_path / "b.pt")
    torch.save({"state_dict": {"body.conv.weight": torch.zeros(2, 2, 3, 3)}}, tmp_path / "c.pt")
    result = CliRunner().invoke(analyzer, ["filters", str(tmp_path / "a.pt"),
                                           str(tmp_path / "b.pt")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: filters of different shapes cannot be compared: a.pt's body.conv are "
        "4 × 2×3×3, b.pt's body.conv 4 × 2×5×5"]
    result = CliRunner().invoke(analyzer, ["filters", str(tmp_path / "a.pt"),
                                           str(tmp_path / "c.pt"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)  # every weight differs by 1: E = √18 (2×3×3 weights)
    np.testing.assert_allclose([r["dissimilarity"] for r in rows], [math.sqrt(18)] * 6)


def test_unknown_layer_and_wrong_arguments_are_one_line(trained):
    first = str(trained / "checkpoints" / "epoch_0001.safetensors")
    for arguments, message in (
            ([first, first, "--layer", "features.2"],
             "Error: 'features.2' is not a conv layer of epoch_0001.safetensors; its conv "
             "layers: features.0, features.3"),
            ([first], "Error: give two checkpoint files A B, or --ckpt-dir DIR --against EPOCH"
                      " (--epochs and --results apply to --ckpt-dir only)"),
            (["--ckpt-dir", str(trained / "checkpoints"), "--against", "99"],
             f"Error: --against 99: no checkpoint of epoch 99 in {trained / 'checkpoints'} "
             f"(epochs 1–{EPOCHS})")):
        result = CliRunner().invoke(analyzer, ["filters", *arguments])
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [message]


def test_every_epoch_against_the_last_is_stored_and_matches_a_loop(trained, tmp_path):
    results = tmp_path / "filters.h5"
    out = tmp_path / "evolution.png"
    result = CliRunner().invoke(analyzer, [
        "filters", "--ckpt-dir", str(trained / "checkpoints"), "--against", str(EPOCHS),
        "--results", str(results), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"stored in {results}:/filters/features.0" in result.output
    weights = {e: load_checkpoint(trained / "checkpoints" / f"epoch_{e:04d}.safetensors")[0]
               ["features.0.weight"].numpy() for e in range(1, EPOCHS + 1)}
    with h5py.File(results, "r") as handle:
        group = handle["filters/features.0"]
        assert group.attrs["against"] == EPOCHS
        assert group["epoch"][()].tolist() == list(range(1, EPOCHS + 1))
        for k, epoch in enumerate(range(1, EPOCHS + 1)):
            values, nearest = loop_dissimilarity(weights[epoch], weights[EPOCHS])
            np.testing.assert_allclose(group["dissimilarity"][k], values, rtol=1e-12)
            assert group["nearest"][k].tolist() == nearest
            values, nearest = loop_dissimilarity(weights[EPOCHS], weights[epoch])
            np.testing.assert_allclose(group["dissimilarity_against"][k], values, rtol=1e-12)
            assert group["nearest_against"][k].tolist() == nearest
        assert group["dissimilarity"][-1].tolist() == [0.0] * 16
    with xr.open_dataset(results, engine="h5netcdf", group="filters/features.0") as labelled:
        assert labelled["dissimilarity"].dims == ("epoch", "filter")
    assert out.stat().st_size > 0


def test_the_evolution_goes_into_the_run_file_beside_the_checkpoints(trained, tmp_path):
    import shutil

    run = tmp_path / "demo"
    shutil.copytree(trained, run)
    result = CliRunner().invoke(analyzer, [
        "filters", "--ckpt-dir", str(run / "checkpoints"), "--against", "1", "--epochs", "1,3",
        "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["epoch"] for r in rows} == {1, 3}
    with h5py.File(run / "run.h5", "r") as handle:
        assert handle["filters/features.0/epoch"][()].tolist() == [1, 3]
        assert handle["filters/features.0"].attrs["against"] == 1
    info = CliRunner().invoke(analyzer, ["info", str(run / "run.h5")])
    assert "filters/features.0: 2 epochs 1–3, 16 filters, against epoch 1" in \
        info.stdout.splitlines()
    summary = json.loads(CliRunner().invoke(analyzer, ["info", str(run / "run.h5"),
                                                       "--json"]).stdout)
    assert summary["filters"] == {"features.0": {"epochs": 2, "first_epoch": 1,
                                                 "last_epoch": 3, "filters": 16, "against": 1}}


def test_report_shows_the_stored_filter_evolution(trained, tmp_path):
    import shutil

    run = tmp_path / "demo"
    shutil.copytree(trained, run)
    stored = CliRunner().invoke(analyzer, ["filters", "--ckpt-dir", str(run / "checkpoints"),
                                           "--against", str(EPOCHS)])
    assert stored.exit_code == 0, stored.output
    result = CliRunner().invoke(analyzer, ["report", str(run / "run.h5"), "--out",
                                           str(tmp_path / "report"), "--no-cam"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report" / "index.html").read_text()
    section = page.split('<h2 id="filters">')[1]
    assert section.startswith("Filter dissimilarity (seed 004 eq. 1)</h2>")
    assert f"layer features.0, against epoch {EPOCHS}" in section
    assert '<figure id="filters_1"><img' in section


def write_as(kind: str, source: Path, folder: Path) -> Path:
    """The checkpoint ``source`` (the small zoo model) rewritten as another kind of file."""
    from trainer.models import ModelSpec, build_model

    weights, metadata = load_checkpoint(source)
    model = build_model(ModelSpec.from_json(metadata["model"]))
    model.load_state_dict(weights)
    model.eval()
    path = folder / {"pt": "epoch_1.pt", "torchscript": "epoch_1.pt", "pt2": "epoch_1.pt2",
                     "onnx": "epoch_0001.onnx"}[kind]
    if kind == "pt":  # as DataParallel saves it, nested as Lightning does
        torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(model), path)
    elif kind == "pt2":
        torch.export.save(torch.export.export(model, (torch.zeros(2, 1, 8, 8),)), path)
    else:
        result = CliRunner().invoke(analyzer, ["export-onnx", "--ckpt-dir", str(source.parent),
                                               "--out", str(folder), "--epochs", "1", "-q"])
        assert result.exit_code == 0, result.output
    return path


@pytest.mark.parametrize("kind", ["pt", "torchscript", "pt2", "onnx"])
def test_every_checkpoint_kind_gives_the_same_rows_as_the_safetensors_file(trained, tmp_path,
                                                                          kind):
    first = trained / "checkpoints" / "epoch_0001.safetensors"
    last = trained / "checkpoints" / f"epoch_{EPOCHS:04d}.safetensors"
    other = write_as(kind, first, tmp_path)
    options = ["--model", "small", "--image-size", "8x8"] if kind == "pt" else []
    expected = CliRunner().invoke(analyzer, ["filters", str(first), str(last), "--json"])
    result = CliRunner().invoke(analyzer, ["filters", str(other), str(last), "--json",
                                           *options])
    assert result.exit_code == 0, result.output
    rows, wanted = json.loads(result.output), json.loads(expected.output)
    for row in rows:  # the same but for the file's name
        row["reference" if row["reference"] == str(other) else "compared"] = str(first)
    assert rows == wanted


def test_without_layer_each_network_gives_its_own_first_conv_layer(trained, tmp_path):
    from analyzer.filter_analysis import compare_pair, format_pair

    last = trained / "checkpoints" / f"epoch_{EPOCHS:04d}.safetensors"
    weights = load_checkpoint(last)[0]["features.0.weight"]
    torch.save({"stem.weight": weights + 0.5, "stem.bias": torch.zeros(16)},
               tmp_path / "other.pt")
    comparison = compare_pair(last, tmp_path / "other.pt")
    assert (comparison.a.layer, comparison.b.layer) == ("features.0", "stem")
    values, nearest = loop_dissimilarity(weights.numpy(), (weights + 0.5).numpy())
    np.testing.assert_allclose(comparison.a_against_b.dissimilarity, values, rtol=1e-12)
    assert comparison.a_against_b.nearest.tolist() == nearest
    assert "layer features.0 (in B: stem): 16 filters of 1×3×3 in A, 16 in B" in \
        format_pair(comparison)


def test_results_into_a_foreign_hdf5_file_are_refused_and_it_stays_as_it_was(trained,
                                                                            tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["x"] = [1, 2, 3]
    before = foreign.read_bytes()
    result = CliRunner().invoke(analyzer, ["filters", "--ckpt-dir", str(trained / "checkpoints"),
                                           "--against", "1", "--results", str(foreign)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {foreign} is not a reaction run or results file: refusing to write it")
    assert foreign.read_bytes() == before
