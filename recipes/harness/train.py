"""The training loop every recipe shares: DDP, AMP, schedules, checkpoints, ``--resume``.

:class:`Experiment` owns one study's output folder and process group. A recipe asks it to
:meth:`~Experiment.run` one configuration at one seed; the experiment builds the model under that
seed, trains it with SGD or AdamW and a per-step schedule (cosine, step or constant, with linear
warm-up), evaluates every ``eval_every`` epochs, writes a checkpoint after every epoch and rewrites
``metrics.csv`` from the histories stored in the checkpoints. An interrupted study restarted with
``--resume`` skips finished runs and continues the interrupted one from its last finished epoch;
because the batch order depends only on (seed, epoch) and the checkpoint holds the model,
optimiser, schedule, gradient scaler and random states, the resumed run matches an uninterrupted
one.

Nothing is written into (or deleted from) the output folder before the data has loaded and the
recipe's own checks have passed: the folder is prepared by :meth:`Experiment.start`, which the
first :meth:`~Experiment.run` calls. A run whose training loss or evaluated features stop being
finite is recorded as *diverged*: its row of that epoch gets ``diverged = 1`` and no metrics,
its training stops there, and the study goes on with the other runs (``--resume`` leaves it as
it is); the reports list it (:func:`harness.outputs.write_report`).

Distributed training: under ``torchrun`` the process group is initialised from the environment
(nccl on GPU, gloo on CPU); each rank trains on its slice of every global batch
(:class:`~harness.data.ShardedBatchSampler`). Per-sample losses are summed and divided by the
*global* batch size times the world size, so that DDP's gradient averaging yields the gradient of
the global-batch mean even when the slices differ in size; batch-level losses (collapse
regularizers) see the global batch themselves. BatchNorm layers become ``SyncBatchNorm`` on GPU and
:class:`GatheredBatchNorm` on CPU, so one process and N processes train the same model.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from harness.config import TrainConfig, release_folder, save_config
from harness.data import Dataset, ShardedBatchSampler, load_dataset
from harness.models import CollapseModel
from torchcollapse._distributed import all_reduce_sum, gather_with_grad

__all__ = [
    "Diverged",
    "Experiment",
    "GatheredBatchNorm",
    "Objective",
    "Runtime",
    "build_optimizer",
    "build_scheduler",
    "cross_entropy",
    "seed_everything",
    "sync_batchnorm",
]


@dataclass
class Runtime:
    """Where this process runs: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable default

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str = "auto") -> Runtime:
        """Join the ``torchrun`` process group when the environment names one (else one process).

        ``device="auto"`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; the
        backend is nccl on GPU and gloo on CPU.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda":  # this process's GPU (set_device needs an index)
            device = f"cuda:{local_rank}"
        target = torch.device(device)
        if target.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(
                    f"Expected a CUDA device for `--device {device}`, but torch sees no GPU (torch"
                    f" {torch.__version__}); use `--device cpu` or `auto`."
                )
            torch.cuda.set_device(target)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), target)
        return cls(0, 1, target)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


class Diverged(FloatingPointError):
    """Raised by an evaluation whose features or logits are not finite: the run has diverged.

    Every process raises it together (the check is reduced over processes).
    """


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the global generator is what user code reads
    torch.manual_seed(seed)


class GatheredBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics come from the global batch, on any device.

    ``torch.nn.SyncBatchNorm`` only runs on accelerators; this layer gathers the batch from every
    rank with autograd (:func:`torchcollapse._distributed.gather_with_grad`), normalises it and
    keeps this rank's rows, so running statistics and gradients equal those of one process on the
    global batch. Outside a process group, or in eval mode, it is a plain BatchNorm. It costs an
    all-gather of the activations, which is fine for the small CPU models it is meant for.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"Expected at least a 2-D input, but got shape {tuple(input.shape)}.")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        sizes = gather_with_grad(torch.tensor([input.shape[0]], device=input.device))
        start = int(sizes[: dist.get_rank()].sum())
        out = super().forward(gather_with_grad(input))
        return out[start : start + input.shape[0]]


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm use global-batch statistics (SyncBatchNorm on GPU, else gathered)."""
    if device.type == "cuda":
        converted: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return converted
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            gathered = GatheredBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            gathered.load_state_dict(child.state_dict())
            setattr(model, name, gathered.to(device))
        else:
            sync_batchnorm(child, device)
    return model


def cross_entropy(logits: Tensor, features: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy (the default sample loss)."""
    return F.cross_entropy(logits.float(), target, reduction="none")


@dataclass
class Objective:
    """What a run minimises: a per-sample loss plus an optional loss on the global batch.

    Args:
        sample_loss: ``(logits, features, target) -> (n,)`` per-sample losses on this rank's slice.
        batch_loss: ``(features, logits, target) -> scalar`` on the batch (a collapse regularizer
            that gathers the global batch itself), or None. ``features`` are the ones the head's
            linear map reads (``forward_head(..., pre_logits=True)``).
    """

    sample_loss: Callable[[Tensor, Tensor, Tensor], Tensor] = cross_entropy
    batch_loss: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None


class _FeaturesAndLogits(nn.Module):
    """One forward returning ``(pre_logits features, logits)``, so DDP sees a single call."""

    def __init__(self, model: CollapseModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.forward_features(x)
        return self.model.forward_head(features, pre_logits=True), self.model.forward_head(features)


def build_optimizer(
    model: nn.Module, config: TrainConfig, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD (momentum ``config.momentum``) or AdamW over every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=weight_decay
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up, then cosine to 0, /10 steps at 1/2 and 3/4, or flat."""
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if config.schedule == "step":
            return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


EvalFn = Callable[[CollapseModel], dict[str, float]]


class Experiment:
    """One study: its process group, data, output folder, runs, ``metrics.csv`` and resume.

    Use as a context manager; it tears the process group down on exit::

        with Experiment(config) as experiment:
            model, history = experiment.run("linear", seed, build, evaluate=...)

    Args:
        config: the resolved recipe config (``out`` must be set).
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.runtime = Runtime.from_environment(config.device)
        out = self.runtime.broadcast(config.out)
        if out is None:
            raise ValueError("Expected argument `out` to be set, but got None.")
        self.out = Path(out)
        self.checkpoints = self.out / "checkpoints"
        self.rows: list[dict[str, Any]] = []
        self.started = False
        try:
            data = load_dataset(
                config.dataset,
                data_root=config.data_root,
                cache=config.cache_dir,
                train_samples=config.train_samples,
                test_samples=config.test_samples,
            )
        except BaseException:
            self._release()
            raise
        self.data: Dataset = data.to(self.runtime.device)

    #: What a run leaves at the top of its folder (with the plots its report links), cleared
    #: when a new run of the same recipe starts over there.
    OUTPUTS = ("config.json", "metrics.csv", "metrics.csv.tmp", "report.md")

    def start(self) -> None:
        """Prepare the output folder, once: the first :meth:`run` calls it.

        Called after the data has loaded and the recipe's checks have passed, so a launch that
        fails before leaves the folder as it was. Without ``--resume``, a folder that holds an
        earlier run of the same recipe is cleared first (its checkpoints, ``config.json``,
        ``metrics.csv``, ``report.md`` and the plots the report links; nothing else), so no file
        of the earlier run is left next to the new ones; a folder whose ``config.json`` is not a
        run of this recipe is refused (a ``ValueError``), as the user's files there are not the
        recipe's to delete. Then ``config.json`` is written.
        """
        if self.started:
            return
        earlier = not self.config.resume and (
            self.checkpoints.is_dir() or (self.out / "config.json").is_file()
        )
        # checked on every process (the same folder), so that a refusal stops all of them
        stale = self._earlier_run_outputs() if earlier else []
        if self.runtime.is_main:
            if self.config.resume:
                print(f"resuming the run in {self.out}", file=sys.stderr)
            elif earlier:
                print(
                    f"{self.out} holds an earlier run; starting over (use --resume to continue)",
                    file=sys.stderr,
                )
                for path in stale:
                    path.unlink()
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.out / "config.json")
        self.runtime.barrier()
        self.started = True

    def _earlier_run_outputs(self) -> list[Path]:
        """The files of the earlier run of this recipe in the output folder; a ``ValueError``
        when its ``config.json`` is not the run config of this recipe."""
        config = self.out / "config.json"
        if config.is_file():
            study = getattr(type(self.config), "study", None)
            try:
                saved = json.loads(config.read_text())
            except (OSError, ValueError):
                saved = None
            # a run config names its recipe (runs from before the "study" key: by their fields)
            is_run = isinstance(saved, dict) and (
                saved["study"] == study
                if "study" in saved
                else {"dataset", "epochs", "seeds"} <= saved.keys()
            )
            if not is_run:
                raise ValueError(
                    f"Expected --out {self.out} to be empty or to hold a run of the {study!r} "
                    f"recipe, but its config.json is not one; choose another folder (nothing was "
                    "changed there)."
                )
        stale = [*self.checkpoints.glob("*.pt"), *self.checkpoints.glob("*.pt.tmp")]
        stale += [self.out / name for name in self.OUTPUTS if (self.out / name).is_file()]
        report = self.out / "report.md"
        if report.is_file():  # the plots the earlier report links (write_report: ![name](file))
            for name in re.findall(r"!\[[^\]]*\]\(([^)/\\]+\.png)\)", report.read_text()):
                if (self.out / name).is_file():
                    stale.append(self.out / name)
        return stale

    def _release(self) -> None:
        """Remove the output folder if it was created for this launch and nothing was written."""
        if self.runtime.is_main and not self.started:
            release_folder(self.out)

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Leave the process group (when this experiment joined one); a launch that never started
        a run removes the empty folder made for it (see :func:`harness.config.release_folder`)."""
        self._release()
        if dist.is_initialized():
            self.runtime.barrier()
            dist.destroy_process_group()

    # ----------------------------------------------------------------------------------- outputs

    @property
    def csv_path(self) -> Path:
        return self.out / "metrics.csv"

    def write_csv(self) -> None:
        """Rewrite ``metrics.csv`` from every row so far (rank 0; atomic)."""
        if not self.runtime.is_main or not self.rows:
            return
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv_path)

    def _checkpoint_path(self, name: str, seed: int) -> Path:
        return self.checkpoints / f"{name}-seed{seed}.pt"

    def _save(self, path: Path, state: dict[str, Any]) -> None:
        if self.runtime.is_main:
            tmp = path.with_suffix(".pt.tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)

    # -------------------------------------------------------------------------------------- runs

    def run(
        self,
        name: str,
        seed: int,
        build: Callable[[], tuple[CollapseModel, Objective]],
        *,
        evaluate: EvalFn,
        weight_decay: float | None = None,
    ) -> tuple[CollapseModel, list[dict[str, Any]]]:
        """Train (or resume, or reload) run ``name`` at ``seed``; return the model and its rows.

        Args:
            name: run name (a column of the CSV and the checkpoint's file name).
            seed: seed for the model's initialisation, the batch order and augmentation.
            build: makes the model and objective; called after seeding, so the initialisation
                depends on ``seed`` only.
            evaluate: ``model -> {column: value}``, called every ``eval_every`` epochs and after
                the last one, in eval mode under ``torch.no_grad``.
            weight_decay: overrides ``config.weight_decay`` for this run.

        Returns:
            The model (eval mode) and one row per epoch: ``run``, ``seed``, ``epoch``, ``lr``
            (the learning rate after the epoch's last step, i.e. the one the next epoch starts
            with: 0 after the last epoch of a cosine schedule), ``loss`` (the epoch's mean
            training loss), ``train_time``, ``train_images_per_s`` and, on evaluated epochs,
            ``evaluate``'s columns and ``eval_time``. When the training loss is not finite, or
            ``evaluate`` raises :class:`Diverged`, the run has diverged: that epoch's row gets
            ``diverged = 1`` (and no ``evaluate`` columns), it is the last row and the model is
            the diverged one.
        """
        self.start()
        config, runtime = self.config, self.runtime
        seed_everything(seed)
        model, objective = build()
        model.to(runtime.device)
        train_module: nn.Module = _FeaturesAndLogits(model)
        if runtime.world_size > 1:
            sync_batchnorm(model, runtime.device)
            train_module = DistributedDataParallel(
                train_module,
                device_ids=[runtime.device] if runtime.device.type == "cuda" else None,
            )
        decay = config.weight_decay if weight_decay is None else weight_decay
        optimizer = build_optimizer(model, config, decay)
        sampler = ShardedBatchSampler(
            self.data.train.targets,
            config.batch_size,
            seed=seed,
            rank=runtime.rank,
            world_size=runtime.world_size,
        )
        scheduler = build_scheduler(optimizer, config, len(sampler))
        use_amp = config.amp and runtime.device.type == "cuda"
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

        path = self._checkpoint_path(name, seed)
        history: list[dict[str, Any]] = []
        start = 1
        if config.resume and path.is_file():
            # read onto the CPU: torch.set_rng_state takes only a CPU ByteTensor, and
            # load_state_dict copies the model's and optimiser's tensors to their device
            state = torch.load(path, map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"]["torch"])
            history = state["history"]
            start = state["epoch"] + 1
            if history and history[-1].get("diverged"):
                start = config.epochs + 1  # stopped where it diverged
        self.rows.extend(history)

        bar = tqdm(
            range(start, config.epochs + 1),
            desc=f"{name} seed {seed}",
            initial=start - 1,
            total=config.epochs,
            disable=not (runtime.is_main and config.progress),
            file=sys.stderr,
            leave=False,
        )
        for epoch in bar:
            sampler.set_epoch(epoch)
            tic = time.perf_counter()
            train_stats = train_one_epoch(
                train_module, objective, optimizer, scheduler, scaler, self.data, sampler,
                runtime, amp_dtype if use_amp else None, seed=seed, epoch=epoch,
            )  # fmt: skip
            train_time = time.perf_counter() - tic
            row: dict[str, Any] = {
                "run": name,
                "seed": seed,
                "epoch": epoch,
                "lr": scheduler.get_last_lr()[0],
                "loss": train_stats["loss"],
                "train_time": train_time,
                "train_images_per_s": train_stats["samples"] / train_time,
            }
            diverged = not math.isfinite(train_stats["loss"])
            if not diverged and (epoch % config.eval_every == 0 or epoch == config.epochs):
                tic = time.perf_counter()
                model.eval()
                try:
                    with torch.no_grad(), _autocast(runtime.device, amp_dtype if use_amp else None):
                        row.update(evaluate(model))
                except Diverged:
                    diverged = True
                else:
                    row["eval_time"] = time.perf_counter() - tic
                model.train()
            if diverged:
                row["diverged"] = 1
                if runtime.is_main:
                    bar.clear()
                    print(
                        f"{name} seed {seed} diverged at epoch {epoch} (training loss "
                        f"{train_stats['loss']:.3g}); it stops there and the study goes on "
                        "(a lower --lr may help)",
                        file=sys.stderr,
                    )
            history.append(row)
            self.rows.append(row)
            self._save(
                path,
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": {"torch": torch.get_rng_state()},
                    "history": history,
                },
            )
            self.write_csv()
            if diverged:
                break
            bar.set_postfix(
                {k: f"{row[k]:.3g}" for k in ("loss", "train_acc", "test_acc") if k in row}
            )
        bar.close()
        self.write_csv()
        runtime.barrier()
        model.eval()
        return model, history


@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def train_one_epoch(
    module: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    data: Dataset,
    sampler: ShardedBatchSampler,
    runtime: Runtime,
    amp_dtype: torch.dtype | None,
    *,
    seed: int,
    epoch: int,
) -> dict[str, float]:
    """One pass over ``sampler``'s global batches.

    Returns the mean over the epoch's samples of the global-batch loss (the same on every rank)
    and the number of samples seen by all ranks together.
    """
    module.train()
    # the same augmentation stream on every rank: each draws for the global batch (see
    # augment_cifar), so one process and N augment every image alike
    generator = torch.Generator(device=runtime.device)
    generator.manual_seed(seed * 100_003 + epoch * 1_009)
    sample_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    batch_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    total_samples = 0
    for batch in sampler.global_batches():
        local = batch[runtime.rank :: runtime.world_size]
        positions = torch.arange(runtime.rank, len(batch), runtime.world_size)
        inputs, target = data.train.batch(local)
        inputs = data.preprocess(
            inputs, train=True, generator=generator, positions=positions, batch_size=len(batch)
        )
        with _autocast(runtime.device, amp_dtype):
            features, logits = module(inputs)
            per_sample = objective.sample_loss(logits, features, target)
        # sum / global size, times world size: DDP's averaging then gives the global-batch mean
        loss = per_sample.sum() * (runtime.world_size / len(batch))
        sample_sum += per_sample.detach().sum()
        if objective.batch_loss is not None:
            extra = objective.batch_loss(features.float(), logits.float(), target)
            loss = loss + extra
            batch_sum += extra.detach() * len(batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_samples += len(batch)
    all_reduce_sum(sample_sum)
    mean_loss = float(sample_sum + batch_sum) / max(1, total_samples)
    return {"loss": mean_loss, "samples": float(total_samples)}
