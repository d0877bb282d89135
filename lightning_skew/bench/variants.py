"""Benchmark variants as configuration: a name plus LightningCLI arguments that override the recipe.

A variant is what ``lightning-skew fit`` would run with the recipe and some more arguments: YAML fragments
(``--config fragment.yaml``, or a preset under ``recipes/variants/``) and overrides (``--trainer.*``,
``--model.*``, ``--data.*``). Two conveniences make a fragment written once apply to any recipe:

- a fragment's ``data`` whose class wraps a DataModule (it takes a ``datamodule`` argument) and gives none wraps
  the recipe's data (at the innermost wrapper of a chain);
- a fragment's ``trainer.callbacks`` are added to the recipe's callbacks (in LightningCLI a list in a later
  config replaces the earlier one).

The fragment so completed is written to a temporary file; the variant's arguments (:attr:`Variant.args`) are
exactly what ``fit`` takes after ``--config recipe.yaml``.
"""

from __future__ import annotations

import importlib
import inspect
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: Where the named presets live: ``recipes/variants/<name>.yaml`` of the repository.
PRESETS_DIR = Path(__file__).resolve().parents[2] / "recipes" / "variants"

#: The code baseline: a hand-written TorchRec loop, no Lightning (the only variant that is not configuration).
HANDWRITTEN = "handwritten"


@dataclass(frozen=True)
class Variant:
    """A named way of training the recipe: LightningCLI arguments after the recipe's, or the hand-written loop.

    Attributes:
        name: the name the report uses.
        args: arguments after ``--config recipe.yaml`` (fragments as ``--config path``, then overrides).
        description: one line for ``--help`` and the report.
        fragments: the YAML fragments given (their paths), before completion.
    """

    name: str
    args: tuple[str, ...] = ()
    description: str = ""
    fragments: tuple[str, ...] = field(default=())

    @property
    def handwritten(self) -> bool:
        return self.name == HANDWRITTEN and not self.args


def presets() -> dict[str, str]:
    """Every named preset, ``{name: description}`` (the first comment line of its YAML), the hand-written
    baseline first."""
    found = {HANDWRITTEN: "TorchRec DMP and a plain PyTorch loop, no Lightning (the code baseline)"}
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        first = path.read_text().split("\n", 1)[0]
        found[path.stem] = first.lstrip("# ").strip() if first.startswith("#") else ""
    return found


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name``; a clear error listing the presets for an unknown one."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not name.replace("_", "").replace("-", "").isalnum() or not path.is_file():
        raise ValueError(f"unknown benchmark variant or preset {name!r}; presets: {', '.join(presets())} "
                         f"(in {PRESETS_DIR}). Give your own as --variant NAME=FILE.yaml or "
                         "--variant NAME=\"--trainer.X v ...\"")
    return path


def parse_variant(text: str) -> Variant:
    """A variant from ``NAME=SPEC`` (``--variant``) or a bare preset name (``--variants a,b``).

    ``SPEC`` is shell words: an optional first word naming a preset or a YAML file (``*.yaml``/``*.yml``), then
    LightningCLI arguments (``--trainer.X v``, ``--config more.yaml``). ``NAME=`` alone is the recipe as it is.
    """
    name, has_spec, spec = text.partition("=")
    name = name.strip()
    if not name or any(c in name for c in " ,/"):
        raise ValueError(f"a variant needs a name without spaces, commas or slashes: NAME=SPEC, got {text!r}")
    if not has_spec:
        if name == HANDWRITTEN:
            return Variant(HANDWRITTEN, description=presets()[HANDWRITTEN])
        return Variant(name, ("--config", str(preset_path(name))), presets().get(name, ""), (str(preset_path(name)),))
    words = shlex.split(spec)
    args: list[str] = []
    if words and not words[0].startswith("-"):
        first = words.pop(0)
        path = Path(first) if first.endswith((".yaml", ".yml")) else preset_path(first)
        if not path.is_file():
            raise ValueError(f"variant {name!r}: no YAML file {first}")
        args += ["--config", str(path)]
    args += words
    fragments = tuple(args[i + 1] for i, word in enumerate(args[:-1]) if word == "--config")
    return Variant(name, tuple(args), spec.strip() or "the recipe as it is", fragments)


def variants_from(names: str | None, specs: Sequence[str]) -> list[Variant]:
    """The variants of ``--variants a,b`` (presets) followed by those of each ``--variant NAME=SPEC``; at least
    one, no name twice."""
    chosen = [parse_variant(n.strip()) for n in (names or "").split(",") if n.strip()]
    chosen += [parse_variant(spec) for spec in specs]
    if not chosen:
        raise ValueError("no benchmark variant given: --variants a,b (presets) or --variant NAME=SPEC")
    seen = [v.name for v in chosen]
    if len(set(seen)) != len(seen):
        raise ValueError(f"variants repeat a name: {seen}")
    return chosen


def _takes_datamodule(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"data class_path {class_path!r} cannot be imported: {error}") from error
    return "datamodule" in inspect.signature(cls.__init__).parameters


def _wrap(data: dict[str, Any], recipe_data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``recipe_data`` put in as the ``datamodule`` of its innermost wrapper that lacks one."""
    if not isinstance(data, dict) or "class_path" not in data or not _takes_datamodule(data["class_path"]):
        return data
    init_args = dict(data.get("init_args") or {})
    inner = init_args.get("datamodule")
    init_args["datamodule"] = recipe_data if inner is None else _wrap(inner, recipe_data)
    return {**data, "init_args": init_args}


def complete_fragment(fragment: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """A variant's YAML fragment completed against the recipe's full config (``recipe``, as LightningCLI dumps
    it): its data wrappers wrap the recipe's data, its callbacks follow the recipe's."""
    out = dict(fragment)
    if isinstance(out.get("data"), dict) and recipe.get("data") is not None:
        out["data"] = _wrap(out["data"], recipe["data"])
    trainer = out.get("trainer")
    if isinstance(trainer, dict) and trainer.get("callbacks"):
        own = trainer["callbacks"] if isinstance(trainer["callbacks"], list) else [trainer["callbacks"]]
        before = (recipe.get("trainer") or {}).get("callbacks") or []
        out["trainer"] = {**trainer, "callbacks": [*before, *own]}
    return out


def completed_args(variant: Variant, recipe: dict[str, Any], folder: Path) -> list[str]:
    """``variant.args`` with each ``--config`` fragment replaced by its completed copy written under ``folder``
    (a second fragment completes against the recipe as the first left it: its wrapper wraps the first's data)."""
    args = list(variant.args)
    recipe = {"data": recipe.get("data"), "trainer": {"callbacks": (recipe.get("trainer") or {}).get("callbacks")}}
    for i, word in enumerate(args[:-1]):
        if word == "--config":
            source = Path(args[i + 1])
            fragment = yaml.safe_load(source.read_text()) or {}
            if not isinstance(fragment, dict):
                raise ValueError(f"variant {variant.name!r}: {source} is not a YAML mapping")
            target = folder / f"{variant.name}-{i}-{source.name}"
            done = complete_fragment(fragment, recipe)
            target.write_text(yaml.safe_dump(done, sort_keys=False))
            if isinstance(done.get("data"), dict):
                recipe["data"] = done["data"]
            callbacks = (done.get("trainer") or {}).get("callbacks") if isinstance(done.get("trainer"), dict) else None
            if callbacks:
                recipe["trainer"]["callbacks"] = callbacks
            args[i + 1] = str(target)
    return args
