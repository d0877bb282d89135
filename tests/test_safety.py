"""Files that cannot hurt you: loading a checkpoint, a plan or a profile runs no code from the file, corruption is
refused naming the file, and cleanup deletes only the staging folders this package made."""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_skew import TorchRecStrategy
from lightning_skew.core.safe_load import UnsafeFileError
from lightning_skew.torchrec.atomic import (
    COMPLETE_FILE,
    SAVE_HOOKS,
    IncompleteCheckpointError,
    complete_checkpoints,
    resolve_for_loading,
    seal,
    staging_dir,
)
from lightning_skew.torchrec.checkpoint import load_sharded_checkpoint

from _support.cli import Command, start_command
from _support.small import make_data, make_model

ROOT = Path(__file__).resolve().parents[1]


class CreatesMarker:
    """Unpickling this creates the file ``marker`` (as ``os.system("touch ...")`` would, without a shell)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _fit(ckpt_path: str | None = None, root: Path | None = None, epochs: int = 1, checkpoints: Path | None = None,
         **strategy_args) -> pl.Trainer:
    data = make_data(1)
    callbacks = [ModelCheckpoint(dirpath=checkpoints, save_last=True)] if checkpoints else []
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(**strategy_args), max_epochs=epochs,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=bool(checkpoints), callbacks=callbacks, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=str(root) if root else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(make_model(data, "rowwise_adagrad"), data, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A folder of real sharded checkpoints (two epochs: last.ckpt replaced once), beside a user's backup folder
    whose name looks like a staging folder of last.ckpt."""
    root = tmp_path_factory.mktemp("saved")
    checkpoints = root / "checkpoints"
    backup = checkpoints / ".last.ckpt.my-backup"
    backup.mkdir(parents=True)
    (backup / "notes.txt").write_text("mine")
    _fit(root=root, epochs=2, checkpoints=checkpoints)
    return checkpoints


def _copy(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "epoch=1-step=16.ckpt"
    shutil.copytree(saved / "last.ckpt", copy)
    return copy


def test_the_crafted_payload_runs_code_when_unpickled_without_restriction(tmp_path):
    # The files below are dangerous only if this is: an unrestricted load creates the marker.
    marker = tmp_path / "marker"
    torch.save({"epoch": CreatesMarker(marker)}, tmp_path / "meta.pt")
    torch.load(tmp_path / "meta.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("crafted", ["meta.pt", ".metadata"])
def test_a_crafted_sharded_checkpoint_is_refused_by_fit_and_runs_nothing(crafted, saved, tmp_path):
    checkpoint = _copy(saved, tmp_path)
    marker = tmp_path / "marker"
    with open(checkpoint / crafted, "wb") as file:
        pickle.dump({"epoch": CreatesMarker(marker)}, file) if crafted == ".metadata" else \
            torch.save({"epoch": CreatesMarker(marker)}, file)
    seal(checkpoint)  # sealed anew: the seal finds corruption, not a file made to harm
    with pytest.raises(UnsafeFileError, match=f"{checkpoint / crafted}: refused.*io.open is not admitted"):
        _fit(ckpt_path=str(checkpoint), root=tmp_path)
    assert not marker.exists()


def test_a_crafted_value_in_the_shards_is_refused_and_runs_nothing(tmp_path):
    # torch's own load planner unpickles non-tensor values without restriction; ours reads them as data.
    checkpoint = tmp_path / "crafted.ckpt"
    marker = tmp_path / "marker"
    dcp.save({"weights": torch.ones(3), "extra": CreatesMarker(marker)}, checkpoint_id=str(checkpoint))
    torch.save({"epoch": 0}, checkpoint / "meta.pt")
    seal(checkpoint)
    template = {"weights": torch.zeros(3), "extra": None}
    with pytest.raises(UnsafeFileError, match=f"{checkpoint}: refused to load this value 'extra'.*io.open"):
        load_sharded_checkpoint(checkpoint, template)
    assert not marker.exists()
    dcp.save({"weights": torch.ones(3), "extra": "rowwise_adagrad"}, checkpoint_id=str(checkpoint))
    seal(checkpoint)
    assert load_sharded_checkpoint(checkpoint, template) == {"epoch": 0}  # plain values still load
    assert template["extra"] == "rowwise_adagrad" and torch.equal(template["weights"], torch.ones(3))


def test_a_crafted_checkpoint_file_is_refused_by_fit_and_runs_nothing(tmp_path):
    from lightning_skew.torchrec.strategy import read_checkpoint_file  # HotColdStrategy's file loads too

    marker = tmp_path / "marker"
    torch.save({"state_dict": {}, "hyper_parameters": CreatesMarker(marker)}, tmp_path / "crafted.ckpt")
    with pytest.raises(UnsafeFileError, match="crafted.ckpt: refused to load this checkpoint"):
        _fit(ckpt_path=str(tmp_path / "crafted.ckpt"), root=tmp_path)
    with pytest.raises(UnsafeFileError, match="crafted.ckpt"):
        read_checkpoint_file(tmp_path / "crafted.ckpt", weights_only=None)
    assert not marker.exists()


def test_a_saved_plan_is_json_and_a_crafted_plan_runs_nothing(tmp_path):
    plan_path = tmp_path / "plan.json"
    first = _fit(root=tmp_path, plan_path=str(plan_path), sharding_types=["column_wise"])
    assert plan_path.read_text().lstrip().startswith("{")  # data, not a pickle
    again = _fit(root=tmp_path, plan_path=str(plan_path))
    assert again.strategy.dmp.plan.plan == first.strategy.dmp.plan.plan  # the same plan, shards and all
    marker = tmp_path / "marker"
    torch.save({"plan": CreatesMarker(marker), "world_size": 1}, plan_path)  # as older versions wrote plans
    with pytest.raises(ValueError, match="plan.json is not a sharding plan.*delete it"):
        _fit(root=tmp_path, plan_path=str(plan_path))
    assert not marker.exists()


def test_a_crafted_profile_is_refused_and_runs_nothing(tmp_path):
    from lightning_skew.profile import AccessProfile

    marker = tmp_path / "marker"
    torch.save({"feature_names": CreatesMarker(marker)}, tmp_path / "profile.pt")
    with pytest.raises(ValueError, match="profile.pt cannot be read .UnsafeFileError"):
        AccessProfile.load(tmp_path / "profile.pt")
    assert not marker.exists()


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict[str, tuple[Command, Path, Path]]:
    """``lightning-skew validate`` from a crafted sharded checkpoint and from a crafted checkpoint file, each in its
    own folder beside the marker its payload would create: both commands started together, side by side."""
    small = ["--data.init_args.max_rows_per_table", "500", "--data.init_args.num_val_samples", "2048",
             "--data.init_args.batch_size", "1024", "--trainer.enable_progress_bar", "false"]
    started = {}
    for kind in ("sharded", "file"):
        folder = tmp_path_factory.mktemp(kind)
        checkpoint = folder / "crafted.ckpt"
        marker = folder / "marker"
        if kind == "sharded":
            checkpoint.mkdir()
            torch.save({"epoch": CreatesMarker(marker)}, checkpoint / "meta.pt")
            seal(checkpoint)
            crafted = checkpoint / "meta.pt"
        else:
            torch.save({"hyper_parameters": CreatesMarker(marker)}, checkpoint)
            crafted = checkpoint
        command = start_command("validate", "--config", str(ROOT / "recipes" / "dlrm_synthetic.yaml"), *small,
                                "--ckpt_path", str(checkpoint), cwd=folder)
        started[kind] = (command, crafted, marker)
    yield started
    for command, _, _ in started.values():
        command.result(check=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sharded", "file"])
def test_the_command_refuses_a_crafted_checkpoint_with_a_clear_error_and_runs_nothing(kind, refusals):
    command, crafted, marker = refusals[kind]
    run = command.result(check=False)
    assert run.returncode != 0
    assert f"{crafted}: refused to load" in run.stderr, run.stderr[-3000:]
    assert not marker.exists()


# -- corruption --------------------------------------------------------------------------------------------------

def _flip(file: Path, count: int = 32) -> None:
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + count, len(data))):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["__0_0.distcp", ".metadata", "meta.pt"])
def test_flipped_bytes_in_any_checkpoint_file_are_refused_naming_the_file(kind, saved, tmp_path):
    checkpoint = _copy(saved, tmp_path)
    _flip(checkpoint / kind)
    with pytest.raises(IncompleteCheckpointError, match=f"{checkpoint.name} is not a complete checkpoint: its file "
                                                        f"{kind} is corrupt"):
        _fit(ckpt_path=str(checkpoint), root=tmp_path)


def test_a_corrupt_last_falls_back_to_a_verified_checkpoint(saved, tmp_path):
    folder = tmp_path / "checkpoints"
    shutil.copytree(saved, folder)
    _flip(next((folder / "last.ckpt").glob("*.distcp")))
    with pytest.warns(UserWarning, match=r"last.ckpt is not a complete checkpoint \(its file __0_0.distcp is corrupt"):
        chosen = resolve_for_loading(folder / "last.ckpt")
    assert chosen.name.startswith("epoch=1-")


def test_a_checkpoint_without_a_seal_loads_as_unverified_and_is_not_listed_as_complete(saved, tmp_path):
    checkpoint = _copy(saved, tmp_path)
    (checkpoint / COMPLETE_FILE).unlink()  # as lightning-skew wrote them before checkpoints were sealed
    assert checkpoint not in complete_checkpoints(tmp_path)
    with pytest.warns(UserWarning, match="is loaded unverified: it has no complete.json"):
        assert resolve_for_loading(checkpoint) == checkpoint


# -- cleanup -----------------------------------------------------------------------------------------------------

def test_cleanup_removes_only_staging_folders_this_package_made(saved, tmp_path):
    backup = saved / ".last.ckpt.my-backup"
    assert (backup / "notes.txt").read_text() == "mine"  # two saves of last.ckpt beside it left it alone
    assert [p.name for p in saved.glob(".*")] == [".last.ckpt.my-backup"]  # and no staging folder of their own
    folder = tmp_path / "checkpoints"
    leftover = staging_dir(folder / "last.ckpt")  # as a save killed before its publish leaves it
    mine = folder / ".last.ckpt.0123456789ab"
    shutil.copytree(leftover, mine)  # a copy of a staging folder under another name is the user's
    fresh = staging_dir(folder / "last.ckpt")
    assert not leftover.exists() and mine.exists() and fresh.is_dir()


# -- errors that name the cause ----------------------------------------------------------------------------------

@pytest.mark.parametrize("file", ["meta.pt", "__0_0.distcp"])
def test_a_full_disk_during_a_save_says_so_naming_the_folder(file, tmp_path):
    # A real ENOSPC from the kernel: the file the save is about to write is /dev/full.
    def full_disk(stage: str, where: Path) -> None:
        if stage == "staged":
            (where / file).symlink_to("/dev/full")

    SAVE_HOOKS.append(full_disk)
    folder = tmp_path / "checkpoints"
    try:
        with pytest.raises(OSError, match=rf"no space left on {folder} \(the device is full\) while saving the "
                                          r"checkpoint epoch=0-step=8.ckpt"):
            _fit(root=tmp_path, checkpoints=folder)
    finally:
        SAVE_HOOKS.remove(full_disk)
    assert list(folder.iterdir()) == []  # the partial staging folder went too
