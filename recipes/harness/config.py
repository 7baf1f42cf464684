"""Typed recipe configuration: one ``@dataclass`` becomes the command line.

Every field of the dataclass is a flag (``seeds`` -> ``--seeds 0 1 2``, ``amp`` -> ``--amp`` /
``--no-amp``; ``Literal`` types give choices; ``X | None`` accepts ``none``); the help text is the
field's ``metadata["help"]``. Values resolve in this order, later winning:

1. the dataclass defaults,
2. ``--preset NAME`` (a dict of overrides the recipe declares, e.g. ``paper``),
3. ``--config file.json`` (keys are field names; unknown keys are an error; the ``out`` and
   ``resume`` of a saved run's ``config.json`` are ignored, so a run started from it gets a
   folder of its own unless ``--out`` says otherwise),
4. flags given explicitly on the command line.

Every value is checked before anything is trained or written: a value out of range is an
argparse error naming the flag (exit status 2). ``width`` and ``feature_dim`` left unset stay
unset (``null`` in ``config.json``) and mean the chosen model's default sizes, so a saved config
reused with another ``--model`` builds that model at its own sizes.

Without ``--out`` a run gets a new folder ``runs/<study>/<timestamp>``, created here so that two
launches in the same second get two folders (the second one's name ends in ``-2``).
``--resume`` with an ``--out`` folder (or, without ``--out``, the newest run of the study) reloads
the ``config.json`` saved there, which must have been written by the same recipe (its ``study``);
flags given alongside it may only change run-time settings (device, progress bar, threads, where
the data lies), never what is trained. The configuration is written as ``config.json`` by
:func:`save_config` (the pattern of Lightning's examples and timm's ``args.yaml``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

import torch
from torch import nn

from harness.models import DEFAULT_SIZES, CollapseModel, build_model

__all__ = [
    "RUNTIME_FIELDS",
    "TrainConfig",
    "arg",
    "check_choices",
    "check_number",
    "config_to_dict",
    "load_config",
    "parse_config",
    "release_folder",
    "save_config",
]

C = TypeVar("C")

#: Fields that may differ between an interrupted run and its ``--resume``.
#: Where the data lies is one: it does not change what is trained.
RUNTIME_FIELDS = frozenset(
    {"out", "resume", "device", "progress", "threads", "data_root", "cache_dir"}
)

#: Fields a ``--config`` file never sets: where a saved run lives and whether it was resumed.
_RUN_FIELDS = frozenset({"out", "resume"})

#: The key of ``config.json`` that names the recipe (the config class's ``study``).
_STUDY_KEY = "study"

#: Largest seed: numpy's global generator takes seeds in [0, 2**32 - 1].
MAX_SEED = 2**32 - 1

#: Run folders :func:`parse_config` created for this process's launch (:func:`release_folder`).
_CLAIMED: set[Path] = set()


def arg(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help text for the command line.

    ``--help`` adds ``(default: ...)`` unless ``help`` already says ``(default...``.
    """
    return dataclasses.field(default=default, metadata={"help": help})


def check_number(
    name: str, value: float | None, expected: str, accept: Callable[[float], bool]
) -> None:
    """Raise unless ``value`` is None or a finite number that ``accept`` takes.

    The message names the argument: ``Expected argument `{name}` to be {expected}, but got ...``.

    Example:
        >>> check_number("lr", 0.1, "a finite number > 0", lambda v: v > 0)
        >>> check_number("lr", float("nan"), "a finite number > 0", lambda v: v > 0)
        Traceback (most recent call last):
        ...
        ValueError: Expected argument `lr` to be a finite number > 0, but got nan.
    """
    if value is None:
        return
    if isinstance(value, bool) or not math.isfinite(value) or not accept(value):
        raise ValueError(f"Expected argument `{name}` to be {expected}, but got {value!r}.")


@dataclasses.dataclass
class TrainConfig:
    """Settings every recipe shares: data, model, optimisation, evaluation and outputs."""

    study: ClassVar[str] = "recipe"

    dataset: Literal["mnist1d", "cifar10", "cifar100"] = arg("mnist1d", "Dataset.")
    data_root: str | None = arg(None, "Folder holding cifar-10-batches-py or cifar-100-python.")
    cache_dir: str | None = arg(
        None, "Where MNIST-1D is cached (default: $TORCHCOLLAPSE_CACHE or ~/.cache/torchcollapse)."
    )
    train_samples: int | None = arg(None, "Keep only the first N training samples (tiny runs).")
    test_samples: int | None = arg(None, "Keep only the first N test samples (tiny runs).")
    model: Literal["cnn", "mlp", "resnet18"] = arg("cnn", "Feature extractor.")
    width: int | None = arg(
        None,
        "Channels (CNN, ResNet) or hidden units (MLP) of the first block (default: none, the "
        "model's own: CNN 32, MLP 256, ResNet-18 64).",
    )
    feature_dim: int | None = arg(
        None,
        "Dimension of the features the head reads (default: none, the model's own: 32, "
        "ResNet-18 512).",
    )
    neck_batchnorm: bool = arg(True, "End the feature extractor with Linear + BatchNorm.")
    epochs: int = arg(30, "Training epochs.")
    batch_size: int = arg(128, "Global batch size (split over processes under torchrun).")
    optimizer: Literal["sgd", "adamw"] = arg("sgd", "Optimiser.")
    lr: float = arg(0.05, "Peak learning rate.")
    momentum: float = arg(0.9, "SGD momentum.")
    weight_decay: float = arg(0.0, "Weight decay (where the recipe does not set it per run).")
    schedule: Literal["cosine", "step", "constant"] = arg("cosine", "Learning-rate schedule.")
    warmup_epochs: int = arg(0, "Linear warm-up epochs.")
    seeds: tuple[int, ...] = arg((0, 1), "Seeds; each run is repeated once per seed.")
    eval_every: int = arg(5, "Evaluate collapse every N epochs (and after the last).")
    amp: bool = arg(True, "Mixed precision (bfloat16/float16) on GPU; ignored on CPU.")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N.")
    threads: int | None = arg(
        1,
        "torch CPU threads per process (none: torch's own number); one is fastest for the small "
        "MNIST-1D models and keeps a busy machine from stalling.",
    )
    progress: bool = arg(True, "Progress bar on rank 0.")
    out: str | None = arg(None, "Output folder (default: runs/<study>/<timestamp>).")
    resume: bool = arg(False, "Continue the interrupted run in --out (default: the newest one).")

    def __post_init__(self) -> None:
        positive = ("width", "feature_dim", "epochs", "batch_size", "eval_every", "threads")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Expected argument `{name}` to be positive, but got {value}.")
        for name in ("train_samples", "test_samples"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"Expected argument `{name}` to be at least 2, but got {value}.")
        if self.warmup_epochs < 0:
            raise ValueError(
                f"Expected argument `warmup_epochs` to be >= 0, but got {self.warmup_epochs}."
            )
        if not self.seeds:
            raise ValueError("Expected argument `seeds` to hold at least one seed, but got ().")
        if any(not 0 <= s <= MAX_SEED for s in self.seeds):
            raise ValueError(
                f"Expected argument `seeds` to hold integers in [0, {MAX_SEED}], but got "
                f"{list(self.seeds)}."
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Expected distinct `seeds`, but got {list(self.seeds)}.")
        check_number("lr", self.lr, "a finite number > 0", lambda v: v > 0)
        check_number("momentum", self.momentum, "a finite number >= 0", lambda v: v >= 0)
        check_number("weight_decay", self.weight_decay, "a finite number >= 0", lambda v: v >= 0)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(
                    "Expected argument `device` to be auto, cpu, cuda, cuda:N or another torch "
                    f"device, but got {self.device!r}."
                ) from None
        if self.dataset != "mnist1d" and self.model != "resnet18":
            raise ValueError(
                f"Expected argument `model` to be 'resnet18' for dataset {self.dataset!r}, "
                f"but got {self.model!r}."
            )
        if self.dataset == "mnist1d" and self.model == "resnet18":
            raise ValueError(
                "Expected argument `model` to be 'cnn' or 'mlp' for dataset 'mnist1d', "
                "but got 'resnet18'."
            )

    @property
    def sizes(self) -> tuple[int, int]:
        """``(width, feature_dim)`` of the model that is built: the unset ones are the model's
        defaults (:data:`~harness.models.DEFAULT_SIZES`)."""
        default_width, default_dim = DEFAULT_SIZES[self.model]
        return (
            default_width if self.width is None else self.width,
            default_dim if self.feature_dim is None else self.feature_dim,
        )

    def build_model(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        head: Callable[[int, int], nn.Module] | None = None,
    ) -> CollapseModel:
        """The configured model (``model``, ``width``, ``feature_dim``, ``neck_batchnorm``)."""
        return build_model(
            self.model,
            input_shape,
            num_classes,
            width=self.width,
            feature_dim=self.feature_dim,
            neck_batchnorm=self.neck_batchnorm,
            head=head,
        )


def check_choices(name: str, values: Sequence[str], allowed: Iterable[str]) -> None:
    """Raise unless ``values`` is a non-empty sequence of names from ``allowed``."""
    allowed = list(allowed)
    if not values or any(v not in allowed for v in values):
        raise ValueError(
            f"Expected argument `{name}` to be among {allowed}, but got {list(values)}."
        )


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _scalar_parser(tp: Any, optional: bool) -> Any:
    if tp is bool:
        base: Any = _parse_bool
    elif typing.get_origin(tp) is Literal:
        base = type(typing.get_args(tp)[0])
    elif tp in (int, float, str):
        base = tp
    else:
        raise TypeError(f"Unsupported config field type {tp!r}.")

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        return base(text)

    parse.__name__ = getattr(base, "__name__", "value")
    return parse


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field[Any], tp: Any) -> None:
    flag = "--" + field.name.replace("_", "-")
    help_text = field.metadata.get("help", "")
    if "(default" not in help_text:  # said once: where the text states it, it is not repeated
        help_text = f"{help_text} (default: {field.default!r})"
    tp, optional = _strip_optional(tp)
    if tp is bool and not optional:
        parser.add_argument(
            flag,
            dest=field.name,
            action=argparse.BooleanOptionalAction,
            default=argparse.SUPPRESS,
            help=help_text,
        )
        return
    if typing.get_origin(tp) is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        parser.add_argument(
            flag,
            dest=field.name,
            nargs="+",
            type=_scalar_parser(item, False),
            default=argparse.SUPPRESS,
            help=help_text,
        )
        return
    choices = list(typing.get_args(tp)) if typing.get_origin(tp) is Literal else None
    if choices is not None and optional:
        choices.append(None)
    parser.add_argument(
        flag,
        dest=field.name,
        type=_scalar_parser(tp, optional),
        choices=choices,
        default=argparse.SUPPRESS,
        help=help_text,
    )


def _coerce(cls: type[Any], values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check the keys of ``values`` against ``cls`` and turn JSON lists back into tuples."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"Expected the keys of {source} to be fields of {cls.__name__}, but got unknown "
            f"{unknown}; known fields: {sorted(names)}."
        )
    out: dict[str, Any] = {}
    for name, value in values.items():
        tp, _ = _strip_optional(hints[name])
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        out[name] = value
    return out


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as a JSON-ready dict (tuples become lists)."""
    return {
        f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
        for f in dataclasses.fields(config)
    }


def save_config(config: Any, path: str | Path) -> Path:
    """Write ``config`` as indented JSON (``config.json`` in a run folder) and return the path.

    The file also names the recipe (``"study"``: the config class's ``study``), so that
    ``--resume`` and ``--config`` can refuse a folder written by another recipe.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = config_to_dict(config)
    study = getattr(type(config), "study", None)
    if study is not None:
        values = {_STUDY_KEY: study, **values}
    path.write_text(json.dumps(values, indent=2) + "\n")
    return path


def _read_values(cls: type[Any], path: str | Path) -> dict[str, Any]:
    """The field values of a JSON config file, checked against ``cls`` (and its recipe)."""
    values = json.loads(Path(path).read_text())
    if not isinstance(values, dict):
        raise ValueError(
            f"Expected {path} to hold a JSON object of field values, but got "
            f"{type(values).__name__}."
        )
    study, expected = values.pop(_STUDY_KEY, None), getattr(cls, "study", None)
    if study is not None and expected is not None and study != expected:
        raise ValueError(
            f"Expected {path} to hold the config of a {expected!r} run, but it was written by "
            f"the {study!r} recipe; use recipes/{study}.py for it."
        )
    return _coerce(cls, values, str(path))


def load_config(cls: type[C], path: str | Path) -> C:
    """Read a config saved by :func:`save_config` back into ``cls``.

    Raises:
        ValueError: when the file was written by another recipe, holds unknown keys or values
            out of range.
    """
    return cls(**_read_values(cls, path))


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key reading digit runs as numbers: ``20250101-000000-10`` after ``...-2``."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part
    )


def _latest_run(cls: type[Any]) -> Path:
    """The newest run folder of ``cls.study`` that a launch got to start (holding config.json).

    A launch writes config.json only once its config and data were checked, so a launch that
    failed before that is never picked; nor is a folder whose config.json names another recipe.
    """
    study = getattr(cls, "study", "recipe")
    root = Path("runs") / study

    def started(folder: Path) -> bool:
        file = folder / "config.json"
        if not file.is_file():
            return False
        try:
            saved = json.loads(file.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(saved, dict) and saved.get(_STUDY_KEY, study) == study

    runs = [p for p in root.glob("*") if p.is_dir() and started(p)] if root.is_dir() else []
    if not runs:
        raise FileNotFoundError(
            f"Expected a run to resume under {root}/, but found none; pass --out <run folder>."
        )
    return max(runs, key=lambda p: _natural_key(p.name))


def _claim_new_folder(base: Path) -> Path:
    """Create ``base`` (or, when it exists, ``base-2``, ``base-3``, ...) and return it.

    ``mkdir`` without ``exist_ok`` is atomic: two launches never get the same folder.
    """
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, suffix = base, 1
    while True:
        try:
            candidate.mkdir()
        except FileExistsError:
            suffix += 1
            candidate = base.with_name(f"{base.name}-{suffix}")
            continue
        _CLAIMED.add(candidate.resolve())
        return candidate


def release_folder(folder: str | Path) -> bool:
    """Remove ``folder`` if :func:`parse_config` created it for this launch and it is still empty.

    A launch that fails before its run starts (missing data, a recipe's own check) leaves no
    empty run folder behind. Returns whether the folder was removed.
    """
    path = Path(folder).resolve()
    if path not in _CLAIMED:
        return False
    _CLAIMED.discard(path)
    try:
        path.rmdir()  # only succeeds on an empty folder
    except OSError:
        return False
    return True


def _flag_message(cls: type[Any], message: str) -> str:
    """``message`` with each `field` name spelled as its flag, `--field-name`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return re.sub(
        r"`([a-z_][a-z0-9_]*)`",
        lambda m: f"`--{m.group(1).replace('_', '-')}`" if m.group(1) in names else m.group(0),
        message,
    )


def parse_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    *,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    description: str | None = None,
) -> C:
    """Build ``cls`` from the command line (see the module docstring for the precedence).

    Args:
        cls: a dataclass whose fields are all typed and defaulted.
        argv: arguments to parse (default: ``sys.argv[1:]``).
        presets: named override dicts selectable with ``--preset NAME``.
        description: help text shown by ``--help`` (usually the recipe's module docstring).

    Returns:
        The resolved config. When ``cls`` has an ``out`` field left unset, it is filled with a
        new folder ``runs/<study>/<timestamp>`` (``-2``, ``-3``, ... appended when that exists),
        created here.

    Raises:
        SystemExit: (argparse's error, status 2) for a flag's value that is out of range, naming
            the flag.
        FileNotFoundError: for ``--resume`` without a run to resume.
        ValueError: for a ``--config`` file with unknown keys or written by another recipe, and
            for ``--resume`` with changes to what is trained.
    """
    presets = dict(presets or {})
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="JSON file of field values (a saved config.json: its out and resume are ignored).",
    )
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="Named set of overrides.")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        _add_field(parser, field, hints[field.name])
    namespace = vars(parser.parse_args(argv))
    config_file = namespace.pop("config")
    preset = namespace.pop("preset", None)
    explicit = _coerce(cls, namespace, "the command line")

    if explicit.get("resume"):
        out = explicit.get("out")
        folder = Path(out) if out else _latest_run(cls)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"Expected --resume --out {folder} to name a run folder (holding config.json),"
                " but it holds none; drop --resume to start a run there."
            )
        saved = load_config(cls, folder / "config.json")
        changed = {
            k: v for k, v in explicit.items() if k not in RUNTIME_FIELDS and getattr(saved, k) != v
        }
        if changed or config_file is not None or preset is not None:
            raise ValueError(
                "Expected --resume to reuse the saved config of "
                f"{folder}, but got changes to {sorted(changed) or ['--config/--preset']}; "
                "start a new run instead."
            )
        runtime = {k: v for k, v in explicit.items() if k in RUNTIME_FIELDS}
        try:
            return dataclasses.replace(saved, **{**runtime, "out": str(folder)})  # type: ignore[type-var]
        except ValueError as error:
            parser.error(_flag_message(cls, str(error)))

    values: dict[str, Any] = {}
    if preset is not None:
        values.update(_coerce(cls, presets[preset], f"preset {preset!r}"))
    if config_file is not None:
        from_file = _read_values(cls, config_file)
        values.update({k: v for k, v in from_file.items() if k not in _RUN_FIELDS})
    values.update(explicit)
    try:
        config = cls(**values)
    except ValueError as error:  # a value out of range: an argparse error naming the flag
        parser.error(_flag_message(cls, str(error)))
    has_out = any(f.name == "out" for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    if has_out and getattr(config, "out", None) is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = Path("runs") / getattr(cls, "study", "recipe") / stamp
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0's folder is used
            folder = _claim_new_folder(folder)
        config = dataclasses.replace(config, out=str(folder))  # type: ignore[type-var]
    return config
