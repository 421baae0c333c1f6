"""Run file, HDF5 helpers and checkpoint files: real files on disk, no mocks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save

from store.checkpoint_files import sha256_file
from store.checkpoints import (
    checkpoint_name,
    load_checkpoint,
    load_resume_state,
    read_checkpoint_metadata,
    safetensors_parts,
    save_checkpoint,
    save_resume_state,
)
from store.errors import InputError
from store.files import write_atomically
from store.h5io import open_for_reading, replace_atomically, writer_lock
from store.runfile import (
    FORMAT_NAME,
    EpochRecord,
    create_run_file,
    read_provenance,
    read_run_info,
    read_training_curves,
    update_provenance,
    write_epoch,
)

CLASSES = ["cat", "dog", "émeu"]


def make_run_file(path: Path, epochs: int = 5) -> Path:
    create_run_file(
        path, config={"epochs": epochs, "seed": 3}, model_json='{"name": "small"}',
        class_names=CLASSES,
        split_ids={"train": ["cat/a.png", "dog/b.png"], "val": ["émeu/c.png"], "test": []},
        split_labels={"train": np.array([0, 1]), "val": np.array([2]), "test": np.array([])},
        data_description="folder x", provenance={"command": "trainer run", "seed": "3"})
    return path


def record(epoch: int) -> EpochRecord:
    return EpochRecord(epoch, 1.0 / epoch, 0.5, 2.0 / epoch, 0.25,
                       np.array([0.1, 0.2, np.nan]) * epoch, np.array([1.0, 0.0, 0.5]),
                       1.5, 0.01, 1e9 + epoch, checkpoint_name(epoch), f"{epoch:064x}")


def test_new_run_file_has_format_config_splits_and_no_complete_epoch(tmp_path):
    path = make_run_file(tmp_path / "run.h5")
    info = read_run_info(path)
    assert info.config == {"epochs": 5, "seed": 3}
    assert info.class_names == CLASSES
    assert info.split_ids == {"train": ["cat/a.png", "dog/b.png"], "val": ["émeu/c.png"],
                              "test": []}
    assert info.split_labels["train"].tolist() == [0, 1]
    assert (info.epochs, info.completed_epochs) == (5, 0)
    with h5py.File(path, "r") as handle:
        assert handle.attrs["format"] == FORMAT_NAME
        assert np.isnan(handle["training/train_loss"][()]).all()
        for split in ("train", "val", "test"):  # text, the empty test split's ids too
            assert h5py.check_string_dtype(handle[f"splits/{split}/image"].dtype), split


def test_written_epochs_are_read_back_and_only_completed_rows_are_returned(tmp_path):
    path = make_run_file(tmp_path / "run.h5")
    write_epoch(path, record(1))
    write_epoch(path, record(2))
    curves = read_training_curves(path)
    assert curves["epoch"].tolist() == [1, 2]
    np.testing.assert_allclose(curves["train_loss"], [1.0, 0.5])
    np.testing.assert_allclose(curves["val_class_loss"][1], [0.2, 0.4, np.nan])
    assert curves["checkpoint_file"].tolist() == ["epoch_0001.safetensors",
                                                  "epoch_0002.safetensors"]
    assert curves["checkpoint_sha256"][1] == f"{2:064x}"
    assert read_run_info(path).completed_epochs == 2


def test_epoch_record_survives_json_round_trip():
    original = record(7)
    copy = EpochRecord.from_json(original.to_json())
    assert copy.epoch == 7 and copy.checkpoint_sha256 == original.checkpoint_sha256
    np.testing.assert_array_equal(copy.val_class_loss, original.val_class_loss)


def test_xarray_sees_labelled_epoch_and_class_coordinates(tmp_path):
    xarray = pytest.importorskip("xarray")
    path = make_run_file(tmp_path / "run.h5")
    write_epoch(path, record(1))
    dataset = xarray.open_dataset(path, engine="h5netcdf", group="training")
    assert dataset["val_class_accuracy"].dims == ("epoch", "class")
    assert dataset["epoch"].values.tolist() == [1, 2, 3, 4, 5]
    assert dataset["class"].values.tolist() == CLASSES
    assert float(dataset["train_loss"].sel(epoch=1)) == 1.0
    assert dataset["train_loss"].attrs["units"] == "nat"
    splits = xarray.open_dataset(path, engine="h5netcdf", group="splits/train")
    assert splits["image"].values.tolist() == ["cat/a.png", "dog/b.png"]


def test_provenance_update_keeps_the_rest(tmp_path):
    path = make_run_file(tmp_path / "run.h5")
    write_epoch(path, record(1))
    update_provenance(path, finished="now")
    assert read_provenance(path)["finished"] == "now"
    assert read_provenance(path)["command"] == "trainer run"
    assert read_run_info(path).completed_epochs == 1


def test_failed_structural_change_leaves_the_file_untouched(tmp_path):
    path = make_run_file(tmp_path / "run.h5")
    before = path.read_bytes()
    with pytest.raises(RuntimeError), replace_atomically(path) as handle:
        del handle["training"]
        raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_run_file_is_one_clear_error(tmp_path, damage):
    path = make_run_file(tmp_path / "run.h5")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"not hdf5 at all" * 100)
    else:
        path.unlink()
    with pytest.raises(InputError, match=r"run\.h5"):
        read_run_info(path)


def test_hdf5_file_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as handle:
        handle["x"] = 1
    with pytest.raises(InputError, match="not a reaction run file"):
        read_run_info(path)


def test_second_writer_waits_for_the_lock(tmp_path):
    path = tmp_path / "run.h5"
    events: list[str] = []

    def second_writer() -> None:
        with writer_lock(path, on_wait=lambda _: events.append("waited")):
            events.append("second")

    with writer_lock(path):
        thread = threading.Thread(target=second_writer)
        thread.start()
        time.sleep(0.3)
        events.append("first done")
    thread.join(5)
    assert events == ["waited", "first done", "second"]


def test_writer_lock_times_out_with_a_clear_error(tmp_path):
    path = tmp_path / "run.h5"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, '.');"
        "from store.h5io import writer_lock;"
        f"cm = writer_lock(__import__('pathlib').Path({str(path)!r})); cm.__enter__();"
        "print('held', flush=True); time.sleep(30)")], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match="locked by another writer"), \
                writer_lock(path, timeout=0.2, on_wait=lambda _: None):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_reader_sees_a_run_file_while_a_writer_holds_the_lock(tmp_path):
    path = make_run_file(tmp_path / "run.h5")
    with writer_lock(path), open_for_reading(path) as handle:
        assert handle.attrs["format"] == FORMAT_NAME


def test_checkpoint_round_trip_keeps_weights_metadata_and_hash(tmp_path):
    state = {"conv.weight": torch.randn(4, 1, 3, 3), "bn.running_mean": torch.randn(4),
             "bn.num_batches_tracked": torch.tensor(12)}
    path = tmp_path / checkpoint_name(3)
    digest = save_checkpoint(path, state, {"epoch": "3", "model": "{}"})
    assert digest == sha256_file(path)
    tensors, metadata = load_checkpoint(path)
    assert metadata["epoch"] == "3" and metadata["format"] == "reaction-checkpoint"
    for name, tensor in state.items():
        assert torch.equal(tensors[name], tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_0003.safetensors"]


def test_checkpoint_is_written_without_pickles(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(2)}, {})
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_size])
    assert set(header) == {"w", "__metadata__"}


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing"])
def test_damaged_checkpoint_is_named_in_one_line(tmp_path, damage):
    path = tmp_path / "epoch_0001.safetensors"
    save_checkpoint(path, {"w": torch.randn(100)}, {"epoch": "1"})
    payload = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(payload[: len(payload) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 8 + b"junk")
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(InputError, match=r"epoch_0001\.safetensors") as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)


def test_checkpoint_metadata_from_the_header_alone_equals_the_full_read(tmp_path):
    path = tmp_path / "epoch_0002.safetensors"
    save_checkpoint(path, {"w": torch.randn(1000)}, {"epoch": "2", "classes": '["a", "b"]'})
    assert read_checkpoint_metadata(path) == load_checkpoint(path)[1]
    payload = path.read_bytes()
    path.write_bytes(payload[:-100])  # tensors cut short: the header still reads (the load
    assert read_checkpoint_metadata(path)["epoch"] == "2"  # of the weights refuses it)
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["header cut", "garbage", "empty", "missing", "huge size"])
def test_a_damaged_checkpoint_header_is_named_in_one_line(tmp_path, damage):
    path = tmp_path / "epoch_0001.safetensors"
    save_checkpoint(path, {"w": torch.randn(100)}, {"epoch": "1"})
    payload = path.read_bytes()
    header_size = int.from_bytes(payload[:8], "little")
    damaged = {"header cut": payload[:8 + header_size // 2], "garbage": b"\x00" * 8 + b"junk",
               "empty": b"", "huge size": (2**40).to_bytes(8, "little") + payload[8:]}
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(damaged[damage])
    with pytest.raises(InputError, match=r"epoch_0001\.safetensors") as error:
        read_checkpoint_metadata(path)
    assert "\n" not in str(error.value)


def test_resume_state_restores_adam_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).sum().backward()
        optimizer.step()
    save_resume_state(tmp_path / "resume.safetensors", model.state_dict(),
                      optimizer.state_dict(), {"epoch": "3"})
    model_state, optimizer_state, metadata = load_resume_state(tmp_path / "resume.safetensors")
    assert metadata["epoch"] == "3"
    copy = torch.nn.Linear(3, 2)
    copy.load_state_dict(model_state)
    copy_optimizer = torch.optim.Adam(copy.parameters(), lr=1e-3)
    copy_optimizer.load_state_dict(optimizer_state)
    batch = torch.randn(5, 3)
    for net, opt in ((model, optimizer), (copy, copy_optimizer)):
        opt.zero_grad()
        net(batch).sum().backward()
        opt.step()
    for a, b in zip(model.parameters(), copy.parameters(), strict=True):
        assert torch.equal(a, b)


def sorted_safetensors(payload: bytes) -> bytes:
    """safetensors' own bytes with the header's keys sorted (the reference of our writer)."""
    size = int.from_bytes(payload[:8], "little")
    text = json.dumps(json.loads(payload[8:8 + size]), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + payload[8 + size:]


def test_checkpoint_bytes_are_safetensors_own_with_a_sorted_header(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    mixed = {"z.half": torch.randn(7).half(), "a.bf16": torch.randn(2, 3).bfloat16(),
             "flag": torch.tensor([True, False]), "f64": torch.randn(5, dtype=torch.float64),
             "i8": torch.arange(3, dtype=torch.int8), "scalar": torch.tensor(2.5),
             "empty": torch.zeros(0, 3), **dict(model.state_dict())}
    metadata = {"format": "x", "model": '{"name":"m"}', "épée": "é", "epoch": "12"}
    assert b"".join(safetensors_parts(mixed, metadata)) == sorted_safetensors(
        save(mixed, metadata=metadata))

    path = tmp_path / "epoch_0001.safetensors"
    digest = save_checkpoint(path, model.state_dict(), {"epoch": "1"})
    expected = sorted_safetensors(save(dict(model.state_dict()),
                                       metadata={"format": "reaction-checkpoint", "epoch": "1"}))
    assert path.read_bytes() == expected and digest == hashlib.sha256(expected).hexdigest()
    save_resume_state(tmp_path / "resume.safetensors", model.state_dict(),
                      optimizer.state_dict(), {"epoch": "1"})
    tensors = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{index}.{name}": value for name, value in state.items()})
    header = {"format": "reaction-resume", "epoch": "1", "optimizer_param_groups":
              json.dumps(optimizer.state_dict()["param_groups"])}
    assert (tmp_path / "resume.safetensors").read_bytes() == sorted_safetensors(
        save(tensors, metadata=header))


def test_an_atomic_write_of_several_parts_holds_them_in_turn(tmp_path):
    parts = [b"head", memoryview(np.arange(5, dtype=np.uint8)), b"", b"tail"]
    write_atomically(tmp_path / "f", *parts)
    assert (tmp_path / "f").read_bytes() == b"head\x00\x01\x02\x03\x04tail"
    assert [path.name for path in tmp_path.iterdir()] == ["f"]


def test_equal_weights_give_byte_identical_checkpoints_across_processes(tmp_path):
    code = ("import sys, torch; sys.path.insert(0, '.');"
            "from store.checkpoints import save_checkpoint;"
            "print(save_checkpoint(__import__('pathlib').Path(sys.argv[1]),"
            " {'w': torch.arange(6.0), 'n': torch.tensor(3)},"
            " {'epoch': '1', 'model': '{}', 'classes': '[]', 'z': 'é'}))")
    digests = {subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")],
                              capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parents[1]).stdout for i in range(3)}
    assert len(digests) == 1
    tensors, metadata = load_checkpoint(tmp_path / "0.safetensors")
    assert tensors["w"].tolist() == [0, 1, 2, 3, 4, 5] and metadata["z"] == "é"


@pytest.fixture
def group_umask():
    previous = os.umask(0o027)
    yield 0o640
    os.umask(previous)


def test_atomic_writes_give_files_the_umask_permissions_not_mkstemps_0600(tmp_path,
                                                                          group_umask):
    checkpoint = tmp_path / "epoch_0001.safetensors"
    save_checkpoint(checkpoint, {"w": torch.ones(2)}, {"epoch": "1"})
    with replace_atomically(tmp_path / "run.h5") as handle:
        handle.attrs["x"] = 1
    for written in (checkpoint, tmp_path / "run.h5"):
        assert written.stat().st_mode & 0o777 == group_umask, written
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "epoch_0001.safetensors", "run.h5", "run.h5.lock"]  # no temporary left behind
