"""`analyzer reaction --shard K/N` and `analyzer merge`, through the real console scripts.

Every process runs one CPU thread (tests.conftest.run_cli), so results are bitwise reproducible
and the merged shards must equal one process value for value.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest

from tests.conftest import run_cli, tree
from tests.test_follow import assert_same_results


def ok(*args: str) -> str:
    """Run ``analyzer ARGS`` and return its stderr; it must succeed."""
    result = run_cli("analyzer", *args)
    assert result.returncode == 0, result.stderr
    return result.stderr


def refused(*args: str) -> str:
    """Run ``analyzer ARGS``, which must fail with one line; return that line."""
    result = run_cli("analyzer", *args)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """A 7-epoch run, one process's results over it, and its three shards."""
    root = tmp_path_factory.mktemp("shards")
    trained = run_cli("trainer", "run", "--out", str(root / "run"), "--epochs", "7", "-q")
    assert trained.returncode == 0, trained.stderr
    files = {"run": root / "run", "single": root / "single.h5"}
    checkpoints = str(root / "run" / "checkpoints")
    ok("reaction", "--ckpt-dir", checkpoints, "--out", str(files["single"]), "-q")
    for k in (1, 2, 3):
        files[f"{k}/3"] = root / f"shard{k}.h5"
        ok("reaction", "--ckpt-dir", checkpoints, "--shard", f"{k}/3", "--out",
           str(files[f"{k}/3"]), "-q")
    return files


def computed_epochs(path: Path, split: str = "train") -> list[int]:
    with h5py.File(path, "r", locking=False) as handle:
        group = handle[f"reaction/{split}"]
        return group["epoch"][()][group["computed"][()] == 1].tolist()


def test_three_shards_merged_equal_one_process(shards, tmp_path):
    assert [computed_epochs(shards[f"{k}/3"]) for k in (1, 2, 3)] == [[1, 4, 7], [2, 5], [3, 6]]
    merged = tmp_path / "merged.h5"
    stderr = ok("merge", str(merged), *(str(shards[f"{k}/3"]) for k in (3, 1, 2)))
    assert "merged 7 checkpoints from 3 files (0 already there)" in stderr
    assert_same_results(merged, shards["single"])
    with h5py.File(merged, "r") as ours, h5py.File(shards["single"], "r") as reference:
        for split in reference["reaction"]:
            for name in ("epoch", "image", "label", "computed"):
                assert ours[f"reaction/{split}/{name}"][()].tolist() == \
                    reference[f"reaction/{split}/{name}"][()].tolist(), (split, name)
            assert dict(ours[f"reaction/{split}"].attrs) == \
                dict(reference[f"reaction/{split}"].attrs)
    # into the run file itself, as one process writes it by default
    run = tmp_path / "run"
    shutil.copytree(shards["run"], run)
    ok("merge", str(run / "run.h5"), *(str(shards[f"{k}/3"]) for k in (1, 2, 3)))
    assert_same_results(run / "run.h5", shards["single"])


def test_merging_twice_or_in_parts_changes_nothing(shards, tmp_path):
    merged = tmp_path / "merged.h5"
    ok("merge", str(merged), str(shards["1/3"]))
    assert computed_epochs(merged) == [1, 4, 7]
    stderr = ok("merge", str(merged), *(str(shards[f"{k}/3"]) for k in (1, 2, 3)))
    assert "merged 4 checkpoints from 3 files (3 already there)" in stderr
    before = tree(tmp_path)
    stderr = ok("merge", str(merged), *(str(shards[f"{k}/3"]) for k in (1, 2, 3)))
    assert "merged 0 checkpoints from 3 files (7 already there)" in stderr
    assert tree(tmp_path) == before  # byte for byte
    assert_same_results(merged, shards["single"])


def test_conflicting_shards_are_refused_and_nothing_is_written(shards, tmp_path):
    run, first = shards["run"], shards["1/3"]
    softmax = tmp_path / "softmax.h5"
    ok("reaction", "--ckpt-dir", str(run / "checkpoints"), "--shard", "2/3", "--out",
       str(softmax), "--score", "softmax", "--splits", "train", "-q")
    other = tmp_path / "other"  # another seed: other validation split, so other train images
    trained = run_cli("trainer", "run", "--out", str(other), "--epochs", "2", "--seed", "1",
                      "-q")
    assert trained.returncode == 0, trained.stderr
    other_images = tmp_path / "other-images.h5"
    ok("reaction", "--ckpt-dir", str(other / "checkpoints"), "--out", str(other_images),
       "--splits", "train", "-q")
    replaced = tmp_path / "replaced"  # epoch 4's checkpoint is another file now
    shutil.copytree(run / "checkpoints", replaced)
    shutil.copyfile(other / "checkpoints" / "epoch_0002.safetensors",
                    replaced / "epoch_0004.safetensors")
    other_hash = tmp_path / "other-hash.h5"
    ok("reaction", "--ckpt-dir", str(replaced), "--run", str(run / "run.h5"), "--shard",
       "2/2", "--out", str(other_hash), "--splits", "train", "-q")  # epochs 2, 4, 6
    existing = tmp_path / "target.h5"
    shutil.copyfile(first, existing)
    before = tree(tmp_path)

    line = refused("merge", str(tmp_path / "new.h5"), str(first), str(softmax))
    assert line == f"Error: {softmax}: train score is 'softmax', but {first} holds 'logit': " \
                   "nothing merged"
    line = refused("merge", str(existing), str(other_images))
    given, stored = _train_images(other_images), _train_images(existing)
    index = next(i for i, (a, b) in enumerate(zip(given, stored, strict=False)) if a != b)
    assert line == f"Error: {other_images}: train image #{index} is {given[index]!r}, but " \
                   f"{existing} holds {stored[index]!r}: nothing merged"
    line = refused("merge", str(existing), str(other_hash))
    assert line.startswith(f"Error: {other_hash}: the SHA-256 of the checkpoint of epoch 4 "
                           "(train) is '"), line
    assert line.endswith(f"but {existing} holds '{_sha(existing, 4)}': nothing merged"), line
    line = refused("merge", str(existing), str(existing))
    assert line == f"Error: {existing} is the target itself: give the shards after TARGET"
    assert tree(tmp_path) == before
    assert not (tmp_path / "new.h5").exists()


def _train_images(path: Path) -> list[str]:
    with h5py.File(path, "r") as handle:
        return [value.decode() for value in handle["reaction/train/image"][()]]


def _sha(path: Path, epoch: int) -> str:
    with h5py.File(path, "r") as handle:
        group = handle["reaction/train"]
        row = group["epoch"][()].tolist().index(epoch)
        return group["checkpoint_sha256"][row].decode()


def test_shard_options_are_checked(tmp_path):
    folder = str(tmp_path)
    assert refused("reaction", "--ckpt-dir", folder, "--shard", "0/3", "--out", "x.h5") == \
        "Error: --shard must be K/N with 1 <= K <= N (e.g. 3/32), got '0/3'"
    assert refused("reaction", "--ckpt-dir", folder, "--shard", "2/3") == \
        "Error: --shard needs --out SHARD.h5: each shard writes its own results file, " \
        "joined afterwards by 'analyzer merge'"
    assert refused("reaction", "--ckpt-dir", folder, "--shard", "2/3", "--out", "x.h5",
                   "--follow") == "Error: --shard applies to a post-hoc pass, not to --follow"


def test_a_reader_holding_hdf5_file_locks_does_not_block_a_merge(shards, tmp_path):
    """What a shared file system sees: the writers open files with HDF5's own locking off and
    serialise on the flock side file; a reader with HDF5's locks on does not stop them."""
    merged = tmp_path / "merged.h5"
    ok("merge", str(merged), str(shards["1/3"]))
    with h5py.File(merged, "r", locking=True) as reader:  # HDF5 takes its lock on the file
        ok("merge", str(merged), str(shards["2/3"]), str(shards["3/3"]))
        assert reader["reaction/train/computed"][()].sum() == 7  # rows written in place
    assert_same_results(merged, shards["single"])
    assert (tmp_path / "merged.h5.lock").exists()
