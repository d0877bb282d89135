"""Checkpoints that survive a change: another world size and sharding plan on resume, and an unsharded export
as the start of a new run (Python and the command line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_skew import TorchRecStrategy
from lightning_skew.torchrec.atomic import resolve_last

from _support.launch import launch, launch_until_killed
from _support.small import make_data, make_model

WORKER = Path(__file__).parent / "strategy_worker.py"
ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, world_size: int, epochs: int, resume: Path | None = None, sharding: str | None = None) -> dict:
    args = ["--out", str(out), "--epochs", str(epochs), "--embedding-optimizer", "adagrad"]
    args += ["--resume", str(resume)] if resume is not None else []
    args += ["--sharding-types", sharding] if sharding else []
    launch(WORKER, world_size, args)
    return {"losses": json.loads((out / "losses.json").read_text()),
            "weights": torch.load(out / "export.ckpt", weights_only=False)["state_dict"],
            "fused": torch.load(out / "fused_state.pt"), "out": out}


def _assert_same_run(resumed: dict, full: dict) -> None:
    steps = len(resumed["losses"])
    assert 0 < steps < len(full["losses"])  # only the epoch after the checkpoint ran
    assert resumed["losses"] == pytest.approx(full["losses"][-steps:], abs=1e-5)
    for part in ("weights", "fused"):
        assert sorted(resumed[part]) == sorted(full[part])
        for key, value in full[part].items():
            torch.testing.assert_close(resumed[part][key], value, atol=1e-5, rtol=0, msg=key)


@pytest.mark.slow
def test_a_checkpoint_resumes_at_another_world_size_and_under_another_sharding_plan(tmp_path):
    # One process and two give the same run (tests/test_torchrec_strategy.py), so either is the reference.
    full = _run(tmp_path / "full", 1, 2)
    one_rank_table_wise = _run(tmp_path / "first1", 1, 1, sharding="table_wise")
    two_ranks = _run(tmp_path / "first2", 2, 1)
    checkpoint = next((one_rank_table_wise["out"] / "checkpoints").iterdir())
    # 1 rank, table-wise -> 2 ranks, column-wise: every table's shards differ from the saved ones.
    _assert_same_run(_run(tmp_path / "to2", 2, 2, resume=checkpoint, sharding="column_wise"), full)
    checkpoint = next((two_ranks["out"] / "checkpoints").iterdir())
    _assert_same_run(_run(tmp_path / "to1", 1, 2, resume=checkpoint), full)  # 2 ranks -> 1


def _fit(tmp_path: Path, ckpt_path: str | None, record: list) -> pl.Trainer:
    data = make_data(1)
    model = make_model(data, "rowwise_adagrad")

    class FirstWeights(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            record.append(trainer.strategy.unsharded_state_dict())

    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path),
                         callbacks=[FirstWeights()])
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def test_an_unsharded_export_starts_a_new_run_from_its_weights(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first: list = []
        trainer = _fit(tmp_path / "a", None, first)
        trainer.strategy.export_unsharded_checkpoint(tmp_path / "export.ckpt")
        exported = torch.load(tmp_path / "export.ckpt", weights_only=False)["state_dict"]
        second: list = []
        restarted = _fit(tmp_path / "b", str(tmp_path / "export.ckpt"), second)
    start = second[0]
    tables = [k for k in exported if "embedding_bags" in k]
    assert tables
    for key in exported:
        torch.testing.assert_close(start[key], exported[key], msg=key)  # it started from the export's weights
    assert any(not torch.equal(first[0][k], exported[k]) for k in tables)  # not from a fresh initialisation
    assert restarted.current_epoch == 1 and restarted.global_step == trainer.global_step  # a whole new epoch
    assert any("holds weights only" in str(w.message) for w in caught)


def test_the_command_starts_a_run_from_an_export(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK",
                                                             "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"}}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore")
    small = ["--data.init_args.max_rows_per_table", "500", "--data.init_args.num_train_samples", "4096",
             "--data.init_args.num_val_samples", "2048", "--data.init_args.batch_size", "1024",
             "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    # A recipe run exports; a second run of the same recipe starts from that file.
    first = subprocess.run([sys.executable, "-c", (
        "import sys; from lightning_skew.cli import run_cli; cli = run_cli(sys.argv[1:]); "
        "cli.trainer.strategy.export_unsharded_checkpoint('export_recipe.ckpt')"),
        "fit", "--config", str(ROOT / "recipes" / "dlrm_synthetic.yaml"), *small],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([sys.executable, "-m", "lightning_skew.cli", "fit", "--config",
                             str(ROOT / "recipes" / "dlrm_synthetic.yaml"), *small, "--ckpt_path",
                             str(tmp_path / "export_recipe.ckpt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "val: auc" in second.stdout


# -- a kill at any moment of a save never leaves a checkpoint that resumes wrongly ---------------------------------

CRASH_WORKER = Path(__file__).parent / "checkpoint_worker.py"
EPOCHS = 2


def _crash_run(out: Path, world_size: int, resume: str | None = None, kill: tuple[str, int] | None = None) -> dict:
    args = ["--out", str(out), "--checkpoints", str(out / "checkpoints"), "--epochs", str(EPOCHS)]
    args += ["--resume", resume] if resume else []
    if kill is not None:
        launch_until_killed(CRASH_WORKER, world_size, args + ["--kill-at", kill[0], "--kill-on", str(kill[1])])
        return {}
    launch(CRASH_WORKER, world_size, args)
    return {**json.loads((out / "run.json").read_text()), "weights": torch.load(out / "weights.pt")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return _crash_run(tmp_path_factory.mktemp("uninterrupted"), 1)


# (stage, n-th time rank zero reaches it): each epoch end saves "epoch=E-step=S.ckpt" and then "last.ckpt".
KILLS = [
    ("tensors_written", 2, 1),  # during the first write of last.ckpt
    ("meta_written", 4, 2),  # two ranks, rewriting last.ckpt
]
if os.environ.get("LIGHTNING_SKEW_FULL_TESTS"):  # the other moments (about a minute more)
    KILLS += [("sealed", 4, 1),  # rewriting last.ckpt: sealed, not yet in place
              ("published", 3, 1)]  # the second step checkpoint in place, last.ckpt not yet rewritten


@pytest.mark.slow
@pytest.mark.parametrize("stage,occurrence,world_size", KILLS, ids=[f"{s}{n}-{w}rank" for s, n, w in KILLS])
def test_a_kill_during_a_save_leaves_checkpoints_that_resume_exactly_or_are_refused(stage, occurrence, world_size,
                                                                                     uninterrupted, tmp_path):
    killed = tmp_path / "killed"
    _crash_run(killed, world_size, kill=(stage, occurrence))
    visible = sorted((killed / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in visible if p.name.startswith("epoch=")]  # an earlier complete save is always there
    # last.ckpt is missing only when the kill came during its very first write; otherwise it is complete.
    first_last_write = (stage, occurrence) == ("tensors_written", 2)
    assert (killed / "checkpoints" / "last.ckpt").exists() != first_last_write
    if first_last_write:  # ckpt_path="last" (the command) takes the newest complete checkpoint, saying why
        with pytest.warns(UserWarning, match=r"no last.ckpt .*left only \.last\.ckpt\..*resuming from the newest"):
            assert resolve_last([killed / "checkpoints"]) == max(visible, key=lambda p: p.stat().st_mtime)
    steps_per_epoch = len(uninterrupted["losses"]) // EPOCHS
    for checkpoint in visible:
        resumed = _crash_run(tmp_path / f"resumed-{checkpoint.name}", 1, resume=str(checkpoint))
        start = resumed["start_step"]
        assert start > 0 and start % steps_per_epoch == 0, checkpoint.name  # an epoch end, never a mixed state
        assert resumed["losses"] == pytest.approx(uninterrupted["losses"][start:], abs=1e-5), checkpoint.name
        for key, value in uninterrupted["weights"].items():
            torch.testing.assert_close(resumed["weights"][key], value, atol=1e-5, rtol=0,
                                       msg=f"{checkpoint.name}: {key}")


def test_an_incomplete_checkpoint_is_refused_by_name_and_last_falls_back(tmp_path, uninterrupted):
    from lightning_skew.torchrec.atomic import IncompleteCheckpointError, resolve_for_loading

    run = tmp_path / "run"
    _crash_run(run, 1)
    checkpoints = run / "checkpoints"
    newest = max((p for p in checkpoints.glob("epoch=*.ckpt")), key=lambda p: p.stat().st_mtime)
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(b"")  # a truncated shard, as a kill in an in-place rewrite left
    with pytest.raises(IncompleteCheckpointError, match=f"{newest.name}.*__0_0.distcp has 0 bytes"):
        resolve_for_loading(newest)
    shard_last = next((checkpoints / "last.ckpt").glob("*.distcp"))
    shard_last.write_bytes(b"")
    with pytest.warns(UserWarning, match="last.ckpt is not a complete checkpoint.*resuming from the newest"):
        chosen = resolve_for_loading(checkpoints / "last.ckpt")
    assert chosen != newest and chosen.name.startswith("epoch=")


def test_the_command_resumes_last_from_the_newest_complete_checkpoint_when_no_last_was_completed(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_skew.cli import SkewCLI
    from lightning_skew.torchrec.atomic import seal

    folder = tmp_path / "checkpoints"
    for name in ("epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", ".last.ckpt.0123456789ab"):
        (folder / name).mkdir(parents=True)
        (folder / name / "__0_0.distcp").write_bytes(b"shards")
        if not name.startswith("."):  # the staging folder of last.ckpt's first save, killed before its seal
            seal(folder / name)
    (folder / "epoch=1-step=8.ckpt" / "__0_0.distcp").write_bytes(b"")  # truncated since its seal
    trainer = pl.Trainer(logger=False, callbacks=[ModelCheckpoint(dirpath=folder)])
    command = SimpleNamespace(subcommand="fit", trainer=trainer, config_init={"fit": {"ckpt_path": "last"}})
    with pytest.warns(UserWarning) as caught:
        SkewCLI.before_fit(command)  # type: ignore[arg-type]
    assert command.config_init["fit"]["ckpt_path"] == str(folder / "epoch=0-step=4.ckpt")
    message = str(caught[0].message)
    assert ".last.ckpt.0123456789ab" in message and "epoch=1-step=8.ckpt (its file __0_0.distcp has 0 bytes" in message
    (folder / "last.ckpt").mkdir()  # a last.ckpt, complete or not, is Lightning's to find (and to fall back from)
    assert resolve_last([folder]) is None


def test_a_stream_position_resumes_at_another_global_batch_size_only_where_its_batches_end():
    from lightning_skew.data.position import StreamPosition

    saved = StreamPosition()
    assert saved.skip(0, 10, global_batch_size=64) == 0  # a fresh run skips nothing
    for _ in range(3):
        saved.taken(0)
    state = saved.state_dict()  # 3 global batches of 64 inputs: 192 inputs of epoch 0 trained

    def resumed(epoch: int, epoch_length: int | None, global_batch_size: int) -> int:
        position = StreamPosition()
        position.load_state_dict(state)
        return position.skip(epoch, epoch_length, global_batch_size)

    assert resumed(0, None, 64) == 3
    assert resumed(0, 20, 32) == 6  # twice the ranks (or half the batch): the same 192 inputs
    assert resumed(0, 6, 32) == 0  # the checkpoint ended the epoch
    assert resumed(1, None, 64) == 0  # a loader for another epoch
    with pytest.raises(ValueError, match="after 3 global batches of 64 inputs in epoch 0 .192 inputs.*128 inputs"):
        resumed(0, None, 128)


def test_a_synthetic_run_resumed_mid_epoch_goes_on_as_the_uninterrupted_run(tmp_path):
    from _support.resume_fit import assert_resumes_mid_epoch

    assert_resumes_mid_epoch(lambda: make_data(1), tmp_path, steps_per_epoch=8, stop_at=3)


def test_a_mid_epoch_resume_is_resumable_in_lightnings_terms(tmp_path):
    # The training loaders follow Lightning's stateful-dataloader protocol: no "not resumable" warning, and the
    # loader's state (the stream's position) travels in the fit loop's state as well.
    from lightning.pytorch.callbacks import ModelCheckpoint

    from _support.small import make_model

    def run(root: Path, **fit_args) -> pl.Trainer:
        data = make_data(1)
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_epochs=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, default_root_dir=str(root), max_steps=fit_args.pop("max_steps", -1),
                             callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=3)])
        trainer.fit(make_model(data, "rowwise_adagrad"), data, **fit_args)
        return trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(tmp_path / "first", max_steps=3)
    (checkpoint,) = (tmp_path / "first" / "checkpoints").glob("*step=3.ckpt")
    meta = torch.load(checkpoint / "meta.pt", weights_only=True)
    assert meta["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["position"]["position"] == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run(tmp_path / "resumed", ckpt_path=str(checkpoint))
    assert resumed.global_step == 8  # the 5 steps left of the epoch
    assert not [w for w in caught if "not resumable" in str(w.message)]
