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

``--resume`` with an ``--out`` folder (or, without ``--out``, the newest run of the study) reloads
the ``config.json`` saved there; flags given alongside it may only change run-time settings
(device, progress bar, threads, where the data lies), never what is trained. The resolved
configuration is written as ``config.json`` by :func:`save_config` (the pattern of Lightning's
examples and timm's ``args.yaml``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

from torch import nn

from harness.models import DEFAULT_SIZES, CollapseModel, build_model

__all__ = [
    "RUNTIME_FIELDS",
    "TrainConfig",
    "arg",
    "check_choices",
    "config_to_dict",
    "load_config",
    "parse_config",
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


def arg(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help text for the command line."""
    return dataclasses.field(default=default, metadata={"help": help})


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
        "Channels (CNN, ResNet) or hidden units (MLP) of the first block (none: the model's "
        "default, CNN 32, MLP 256, ResNet-18 64; resolved in the saved config).",
    )
    feature_dim: int | None = arg(
        None, "Dimension of the features the head reads (none: 32, ResNet-18 512)."
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
        "torch CPU threads per process (none: torch's default); one is fastest for the small "
        "MNIST-1D models and keeps a busy machine from stalling.",
    )
    progress: bool = arg(True, "Progress bar on rank 0.")
    out: str | None = arg(None, "Output folder (default: runs/<study>/<timestamp>).")
    resume: bool = arg(False, "Continue the interrupted run in --out (default: the newest one).")

    def __post_init__(self) -> None:
        default_width, default_dim = DEFAULT_SIZES.get(self.model, (None, None))
        if self.width is None:
            self.width = default_width
        if self.feature_dim is None:
            self.feature_dim = default_dim
        positive = ("width", "feature_dim", "epochs", "batch_size", "eval_every")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Expected argument `{name}` to be positive, but got {value}.")
        for name in ("train_samples", "test_samples"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"Expected argument `{name}` to be at least 2, but got {value}.")
        if not self.seeds:
            raise ValueError("Expected argument `seeds` to hold at least one seed, but got ().")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Expected distinct `seeds`, but got {list(self.seeds)}.")
        if self.lr <= 0:
            raise ValueError(f"Expected argument `lr` to be positive, but got {self.lr}.")
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
    default = field.default
    help_text = f"{help_text} (default: {default!r})"
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
    """Write ``config`` as indented JSON (``config.json`` in a run folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    return path


def load_config(cls: type[C], path: str | Path) -> C:
    """Read a config saved by :func:`save_config` back into ``cls``."""
    values = json.loads(Path(path).read_text())
    return cls(**_coerce(cls, values, str(path)))


def _latest_run(study: str) -> Path:
    root = Path("runs") / study
    runs = (
        sorted(p for p in root.glob("*") if (p / "config.json").is_file()) if root.is_dir() else []
    )
    if not runs:
        raise FileNotFoundError(
            f"Expected a run to resume under {root}/, but found none; pass --out <run folder>."
        )
    return runs[-1]


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
        The resolved config. When ``cls`` has an ``out`` field left unset, it is filled with
        ``runs/<study>/<timestamp>``.
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
        folder = Path(out) if out else _latest_run(getattr(cls, "study", "recipe"))
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
        return dataclasses.replace(saved, **{**runtime, "out": str(folder)})  # type: ignore[type-var]

    values: dict[str, Any] = {}
    if preset is not None:
        values.update(_coerce(cls, presets[preset], f"preset {preset!r}"))
    if config_file is not None:
        from_file = _coerce(cls, json.loads(config_file.read_text()), str(config_file))
        values.update({k: v for k, v in from_file.items() if k not in _RUN_FIELDS})
    values.update(explicit)
    config = cls(**values)
    if any(f.name == "out" for f in dataclasses.fields(cls)) and config.out is None:  # type: ignore[arg-type]
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        config = dataclasses.replace(  # type: ignore[type-var]
            config, out=str(Path("runs") / getattr(cls, "study", "recipe") / stamp)
        )
    return config
