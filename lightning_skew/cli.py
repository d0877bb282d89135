"""The ``lightning-skew`` command: LightningCLI (fit, validate, test, predict) plus ``bench``, ``profile`` and
``criteo-vocabulary``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from lightning_skew.core.divergence import NonFiniteLossStop
from lightning_skew.core.safe_load import load_data
from lightning_skew.torchrec.atomic import resolve_last

EXTRA_COMMANDS = {
    "bench": "lightning_skew.bench:main",
    "criteo-vocabulary": "lightning_skew.cli:criteo_vocabulary_main",
    "profile": "lightning_skew.profile.command:main",
}


class LoggedSaveConfig(SaveConfigCallback):
    """Saves the run's full config next to its logs and hands it to every logger (wandb shows it as config)."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config.as_dict())


# The run folder rank zero chose, for the processes Lightning starts after it (they parse the same command again).
RUN_DIR_ENV = "LIGHTNING_SKEW_RUN_DIR"


def fresh_run_dir(root: str) -> str:
    """``root`` when it is absent or empty, else the first of ``root-2``, ``root-3``, ... that is: a fit never writes
    into another run's folder (its config, plans, checkpoints and logs stay whole)."""
    def free(path: Path) -> bool:
        return not path.exists() or (path.is_dir() and not any(path.iterdir()))

    if free(Path(root)):
        return root
    n = 2
    while not free(Path(f"{root}-{n}")):
        n += 1
    return f"{root}-{n}"


def _moved(value: Any, old: str, new: str) -> Any:
    """``value`` (a config tree) with every path string under ``old`` moved under ``new``."""
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old.rstrip("/") + "/") else value
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    if hasattr(value, "__dict__") and not callable(value):  # jsonargparse's Namespace
        for key, item in vars(value).items():
            setattr(value, key, _moved(item, old, new))
    return value


class LastValidation(pl.Callback):
    """Remembers the training step at which validation last ran (sanity checks aside), so that the command can
    tell whether the final weights were validated."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


class SkewCLI(LightningCLI):
    """LightningCLI whose model takes its feature shapes from the DataModule (never written twice)."""

    LINKED_FROM_DATA = ("num_embeddings_per_feature", "sparse_feature_names", "dense_in_features")

    def add_arguments_to_parser(self, parser: Any) -> None:
        for name in self.LINKED_FROM_DATA:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """A new fit (not a resume) gets a folder of its own when its recipe's ``default_root_dir`` holds another
        run already: that path is replaced by :func:`fresh_run_dir`'s in every path of the trainer's config."""
        self.run_dir: str | None = None
        if self.subcommand != "fit":
            return
        config = self.config[self.subcommand]
        root = config.trainer.get("default_root_dir") if config.get("trainer") is not None else None
        if not root:
            return
        if config.get("ckpt_path"):  # a resumed run goes on in its own folder
            self.run_dir = str(root)
            return
        started_by_rank_zero = os.environ.get("LOCAL_RANK", "0") != "0"
        chosen = os.environ.get(RUN_DIR_ENV) if started_by_rank_zero else None
        chosen = chosen or fresh_run_dir(str(root))
        os.environ[RUN_DIR_ENV] = chosen
        if chosen != str(root):
            _moved(config.trainer, str(root), chosen)
        self.run_dir = chosen

    def before_fit(self) -> None:
        self._last_validation = LastValidation()
        self.trainer.callbacks.append(self._last_validation)
        # Lightning's ckpt_path="last" finds only last*.ckpt and starts afresh without one (a kill during the first
        # save of last.ckpt, or save_last off): resume from the newest complete checkpoint instead, with a warning.
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            folders = [c.dirpath for c in self.trainer.checkpoint_callbacks
                       if isinstance(c, ModelCheckpoint) and c.dirpath is not None]
            chosen = resolve_last(folders)
            if chosen is not None:
                config["ckpt_path"] = str(chosen)

    def after_fit(self) -> None:
        self._validate_final_weights()
        self._print_quality("val")
        self._print_run_dir()

    @rank_zero_only
    def _print_run_dir(self) -> None:
        if self.run_dir:
            print(f"run folder: {self.run_dir} (config.yaml, plans, checkpoints and logs)", flush=True)

    def _validate_final_weights(self) -> None:
        """Validate once more when no validation ran after the last training step (a run shorter than its
        ``val_check_interval``, or one that validates by batch count), so that every fit ends with the metrics of
        the weights it leaves behind."""
        trainer = self.trainer
        if trainer.interrupted or not trainer.limit_val_batches or trainer.global_step == 0:
            return
        if self._last_validation.step == trainer.global_step:
            return
        if not is_overridden("val_dataloader", self.datamodule) or self.datamodule.val_dataloader() is None:
            return
        rank_zero_info(f"Validating the final weights (step {trainer.global_step}): no validation ran after the "
                       "last training step")
        trainer.validate(self.model, datamodule=self.datamodule, verbose=False)

    def after_validate(self) -> None:
        self._print_quality("val")

    def after_test(self) -> None:
        self._print_quality("test")

    @rank_zero_only
    def _print_quality(self, stage: str) -> None:
        metrics = self.trainer.callback_metrics
        parts = [f"{name} {float(metrics[f'{stage}_{name}']):.4f}" for name in ("auc", "logloss")
                 if f"{stage}_{name}" in metrics]
        data = getattr(self.datamodule, "unwrapped", self.datamodule)  # the data behind any wrappers
        best = getattr(data, "best_attainable_auc", None)
        if callable(best) and parts:
            parts.append(f"(best attainable auc {best(split=stage):.4f})")
        if parts:
            print(f"{stage}: " + ", ".join(parts), flush=True)

    # -- LightningCLI's private state: the one use, here -------------------------------------------------------

    def instantiated(self, key: str) -> Any:
        """The object built for section ``key`` (``"model"``, ``"data"``, ``"trainer"``) of the parsed config, under
        the subcommand when there is one (what LightningCLI's private ``_get`` reads; subclasses that build only
        some sections, such as the bench's, use this instead)."""
        return self.config_init.get(str(self.subcommand), self.config_init).get(key)

    def _parse_ckpt_path(self) -> None:
        # Overrides LightningCLI's private hook (2.6; it has no public one). Lightning merges a checkpoint file's
        # hyperparameters into the model's config, link targets included, and the parser refuses those ("Option
        # 'num_embeddings_per_feature' is not accepted"; Lightning-AI/pytorch-lightning#20801, fix pending in
        # #21116). They come from the DataModule anyway: merge the rest. Sharded checkpoints are directories,
        # which Lightning does not parse.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(load_data(ckpt_path, "checkpoint").get("hyper_parameters", {}))  # nothing in it runs
        for name in ("_instantiator", *self.LINKED_FROM_DATA):
            hparams.pop(name, None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing the hyperparameters of {ckpt_path} failed\n")
            raise


def cli_options() -> dict[str, Any]:
    """The LightningCLI settings that ``fit`` and ``bench`` share: any model and DataModule by class path, the
    optimizers the model configures, and the callbacks every Trainer gets."""
    return {
        "model_class": pl.LightningModule,
        "datamodule_class": pl.LightningDataModule,
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "auto_configure_optimizers": False,
        # Every run stops, with a non-zero exit, when its loss becomes NaN or infinite.
        "trainer_defaults": {"callbacks": [NonFiniteLossStop()]},
    }


def run_cli(args: list[str] | None = None) -> SkewCLI:
    """Run LightningCLI with lightning-skew's defaults (wandb offline unless configured otherwise)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    return SkewCLI(**cli_options(), save_config_callback=LoggedSaveConfig, save_config_kwargs={"overwrite": True},
                   args=args)


def criteo_vocabulary_main(argv: list[str]) -> None:
    """``lightning-skew criteo-vocabulary``: the preprocessing pass that builds a Criteo vocabulary file."""
    import argparse

    from lightning_skew.data.criteo import build_vocabulary

    parser = argparse.ArgumentParser(
        prog="lightning-skew criteo-vocabulary",
        description="Count the categorical values of Criteo TSV files (plain or gzip) and write a vocabulary: "
                    "values seen at least --min-frequency times get their own row, all others row 0. Pass the "
                    "file to CriteoDataModule(vocabulary_path=...).")
    parser.add_argument("paths", nargs="+", help="training TSV files, directories or globs")
    parser.add_argument("--min-frequency", type=int, required=True)
    parser.add_argument("--output", required=True, help="the .npz file to write")
    parser.add_argument("--skip-malformed", action="store_true", help="skip and count malformed lines")
    args = parser.parse_args(argv)
    vocabulary = build_vocabulary(args.paths, args.min_frequency, args.output, skip_malformed=args.skip_malformed)
    rows = vocabulary.num_embeddings_per_feature
    print(f"wrote {args.output}: {len(rows)} tables, {sum(rows)} rows (min_frequency {args.min_frequency})")


def main(argv: list[str] | None = None) -> None:
    """The command. ``argv`` ``None`` reads the command line (``sys.argv``); a list runs it from Python."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        module_name, func = EXTRA_COMMANDS[argv[0]].split(":")
        module = __import__(module_name, fromlist=[func])
        getattr(module, func)(argv[1:])
        return
    # From the command line LightningCLI reads sys.argv itself: handing it the same arguments as ``args`` as
    # well makes it warn that both were given.
    run_cli(None if from_command_line else argv)


if __name__ == "__main__":
    main()
