"""Within-class variability (NC1) as a loss term on a batch of features.

NC1 (Papyan, Han & Donoho, 2020) says the features of each class shrink to their class mean. This
term measures that on the current (global) batch, differentiably, so that adding it to a training
loss with a positive weight induces collapse and with a negative weight holds it back:

- ``form="bounded"`` (default): ``tr Sigma_W / (tr Sigma_W + tr Sigma_B)``, in ``[0, 1]``. Being
  bounded and scale-free, it can be pushed either way without the features blowing up.
- ``form="ratio"``: the plain trace ratio ``tr Sigma_W / tr Sigma_B`` (unbounded above; as a
  penalty with a negative weight it diverges by inflating the within-class spread; capped at
  ``1 / eps`` of the compute dtype, the value of coinciding class means).
- ``form="running"``: the mean squared distance of each feature to its class's *running* mean
  (buffers updated with momentum from the global batch, identical on every rank), the centre loss
  of Wen et al. (2016) with exponential-average centres. For batches too small to hold several
  samples per class. It carries the scale of the features, so weight it accordingly.

Conventions follow ``DESIGN.md``: classes absent from the batch are left out, the global mean is
the mean of the present class means, ``Sigma_W`` is normalised by the number of samples and
``Sigma_B`` by the number of present classes. A batch with fewer than two present classes gives a
zero (for the batch forms) that is still connected to the features in the autograd graph.

References:
    V. Papyan, X. Y. Han, D. L. Donoho, "Prevalence of neural collapse during the terminal phase of
    deep learning training", PNAS 2020.
    Y. Wen, K. Zhang, Z. Li, Y. Qiao, "A discriminative feature learning approach for deep face
    recognition", ECCV 2016.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor

from torchcollapse._autograd import no_autocast
from torchcollapse._buffers import apply_keeping_dtypes
from torchcollapse._distributed import (
    DropsProcessGroupWhenPickled,
    all_reduce_sum,
    is_distributed,
)
from torchcollapse._numbers import check_float_dtype, read_int, read_number
from torchcollapse.losses._batch import (
    BatchClassStatistics,
    check_device,
    check_features_target,
    check_num_classes,
    check_stats,
    check_weight,
    compute_dtype,
    count_classes,
    global_sum,
    label_range_error,
    where_valid,
)
from torchcollapse.losses._fused import (
    WIDE_DTYPES,
    as_tensor,
    collapse_terms,
    host_scalars,
    identity,
    onehot_products,
    with_gradients,
)

__all__ = ["WithinClassVariabilityLoss", "within_class_variability"]

_FORMS = ("bounded", "ratio", "running")


def within_class_variability(
    stats: BatchClassStatistics, form: Literal["bounded", "ratio"] = "bounded"
) -> Tensor:
    """NC1 of a batch from its differentiable class statistics.

    Args:
        stats: statistics from :func:`~torchcollapse.losses.batch_class_statistics`.
        form: ``"bounded"`` for ``tr Sigma_W / (tr Sigma_W + tr Sigma_B)`` or ``"ratio"`` for
            ``tr Sigma_W / tr Sigma_B``.

    Returns:
        A scalar; zero (connected to the graph, with a finite zero gradient) when fewer than two
        classes are present. The bounded form is 0 when all features are identical (0 / 0). The
        ratio divides by ``tr Sigma_B`` clamped below at the dtype's smallest normal number and
        is capped at ``1 / eps`` of the dtype (8.4e6 in float32, 4.5e15 in float64), where its
        gradient is zero: identical class means with some within-class spread give that cap,
        finite also when squared as a target penalty.

    Raises:
        TypeError: ``stats`` is not a :class:`~torchcollapse.losses.BatchClassStatistics`.
        ValueError: ``form`` is neither ``"bounded"`` nor ``"ratio"`` (``"running"`` is a form
            of :class:`WithinClassVariabilityLoss` only: it needs the module's running means).
    """
    check_stats(stats)
    if form not in ("bounded", "ratio"):
        running = ""
        if str(form) == "running":
            running = (
                " ('running' is a form of the module `WithinClassVariabilityLoss` only: it needs "
                "running class means)"
            )
        raise ValueError(
            f"Expected argument `form` to be 'bounded' or 'ratio'{running}, but got {form!r}."
        )
    within, between = stats.trace_within, stats.trace_between
    one = torch.ones_like(between)
    if form == "bounded":
        total = within + between
        denominator = torch.where(total > 0, total, one)
    else:
        finfo = torch.finfo(between.dtype)
        denominator = torch.where(stats.valid, between.clamp_min(finfo.tiny), one)
        return where_valid(stats.valid, (within / denominator).clamp_max(1.0 / finfo.eps))
    return where_valid(stats.valid, within / denominator)


class WithinClassVariabilityLoss(DropsProcessGroupWhenPickled):
    r"""Within-class variability (NC1) of the global batch, times a signed weight.

    ``forward(features, target)`` returns ``weight * nc1`` where ``nc1`` is, by ``form``:

    - ``"bounded"``: :math:`\operatorname{tr}\Sigma_W / (\operatorname{tr}\Sigma_W +
      \operatorname{tr}\Sigma_B) \in [0, 1]`;
    - ``"ratio"``: :math:`\operatorname{tr}\Sigma_W / \operatorname{tr}\Sigma_B`;
    - ``"running"``: :math:`\frac{1}{N}\sum_i \lVert h_i - r_{y_i} \rVert^2` with running class
      means ``r`` (detached buffers).

    A positive weight induces collapse, a negative one holds it back (use ``"bounded"`` for
    negative weights: the features cannot blow up to lower it). Under ``torch.distributed`` the
    statistics are those of the batch concatenated over ranks (features gathered with autograd),
    so the value on every rank equals the single-process value and, once
    ``DistributedDataParallel`` averages gradients, so do the parameter gradients.

    Batch forms: classes absent from the batch are excluded; with fewer than two classes present
    the result is zero, warning-free, and still connected to ``features`` in the graph (zero
    gradient), so DDP sees every parameter used. Running form: in training, the running means of
    the classes in the global batch are updated first (momentum, or a cumulative average with
    ``momentum=None``; a class seen for the first time takes its batch mean), then distances are
    taken to them; samples of classes never seen yet are excluded (zero if none is left). A
    training batch whose class means are not all finite (NaN or infinite features, or an
    overflow, as in a float16 step that ``GradScaler`` skips) leaves the running means and
    counts unchanged, without host synchronisation on accelerators; its own loss is then NaN
    or infinite, and the next finite batch updates the means as if it had not been seen.
    Statistics are computed in at least float32, with autocast disabled.

    Args:
        num_classes: number of classes ``K`` (at least 2).
        weight: signed multiplier of the term.
        form: ``"bounded"``, ``"ratio"`` or ``"running"``.
        momentum: update factor of the running means (``form="running"`` only); ``None`` for a
            cumulative average.
        sync_dist: compute over the global batch when ``torch.distributed`` is initialised. Set
            to ``False`` to compute per process (e.g. when only one rank calls it).
        process_group: process group for ``sync_dist`` (default: the world; copies and
            pickles of the module hold ``None``: process groups cannot be pickled).
        validate_args: check the label range (a ValueError on CPU; a device-side assertion,
            without host synchronisation, on accelerators; skipped under torch.compile).
        in_features: feature dimension ``d``, a positive integer (Python's, numpy's or a 0-dim
            integer tensor; not a bool); required for ``form="running"`` (buffer shape),
            optional for the batch forms, where ``forward`` then checks the features' width.
        device: device of the running buffers (checked whatever the form).
        dtype: floating dtype of the running means (default float32; kept under casts of the
            module to float16 or bfloat16, where their updates would round away; widened by
            ``.double()``; checked whatever the form: integer and complex dtypes raise a
            TypeError).

    Example:
        >>> import torch
        >>> from torchcollapse.losses import WithinClassVariabilityLoss
        >>> _ = torch.manual_seed(0)
        >>> features = torch.randn(32, 8, requires_grad=True)
        >>> target = torch.arange(32) % 4
        >>> reg = WithinClassVariabilityLoss(num_classes=4, weight=0.5)  # bounded NC1, weight 0.5
        >>> loss = reg(features, target)           # a scalar in [0, 0.5]
        >>> bool(0.0 <= loss <= 0.5)
        True
        >>> zero = reg(features, torch.zeros(32, dtype=torch.long))  # one class only: zero,
        >>> zero.item(), zero.requires_grad                          # still in the graph
        (0.0, True)
    """

    running_mean: Tensor
    class_batches: Tensor

    def __init__(
        self,
        num_classes: int,
        weight: float = 1.0,
        *,
        form: Literal["bounded", "ratio", "running"] = "bounded",
        momentum: float | None = 0.1,
        sync_dist: bool = True,
        process_group: Any = None,
        validate_args: bool = True,
        in_features: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        if form not in _FORMS:
            raise ValueError(f"Expected argument `form` to be one of {_FORMS}, but got {form!r}.")
        if momentum is not None:
            momentum = read_number(
                momentum, "momentum", "in (0, 1] or None", lambda value: 0.0 < value <= 1.0
            )
        self.num_classes = num_classes
        self.weight = check_weight(weight)
        self.form = form
        self.momentum = momentum
        self.sync_dist = sync_dist
        self.process_group = process_group
        self.validate_args = validate_args
        # checked whatever the form, so that a mistake does not wait for a switch of form
        check_float_dtype(dtype)
        device = check_device(device)
        if form == "running" and in_features is None:
            raise ValueError(
                "Expected argument `in_features` (the feature dimension) when "
                "`form='running'`, but got None."
            )
        when = " when `form='running'`" if form == "running" else ""
        size = None if in_features is None else read_int(in_features, "in_features", when=when)
        self.in_features = size
        if size is not None and form == "running":
            factory: dict[str, Any] = {"device": device, "dtype": dtype or torch.float32}
            self.register_buffer("running_mean", torch.zeros(num_classes, size, **factory))
            self.register_buffer(
                "class_batches", torch.zeros(num_classes, dtype=torch.long, device=device)
            )

    def reset_running_stats(self) -> None:
        """Forget the running class means (``form="running"``)."""
        if self.form == "running":
            self.running_mean.zero_()
            self.class_batches.zero_()

    def reset_parameters(self) -> None:
        """Forget the running class means (the term has no parameters); as ``BatchNorm``'s, this
        is what deferred initialisation (``to_empty()`` after building on the meta device)
        calls."""
        self.reset_running_stats()

    def _apply(self, fn: Any, recurse: bool = True) -> WithinClassVariabilityLoss:
        # the running means keep at least float32 (in float16 their updates round away); the
        # ``.double()`` of the module widens them
        apply_keeping_dtypes(self, partial(super()._apply, fn, recurse), ("running_mean",))
        return self

    def extra_repr(self) -> str:
        extra = f"num_classes={self.num_classes}, weight={self.weight}, form={self.form!r}"
        if self.form == "running":
            extra += f", in_features={self.in_features}, momentum={self.momentum}"
        return extra

    def forward(self, features: Tensor, target: Tensor) -> Tensor:
        """Weighted NC1 term of ``features`` (``(N, d)``) with labels ``target`` (``(N,)``)."""
        check_features_target(
            features, target, self.num_classes, self.validate_args, defer_cpu_range=True
        )
        if self.in_features is not None and features.shape[1] != self.in_features:
            raise ValueError(
                f"Expected argument `features` to have {self.in_features} columns "
                f"(`in_features`), but got {features.shape[1]}."
            )
        if self.form == "running":
            return self._running(features, target)
        total, _ = collapse_terms(
            features,
            target,
            self.num_classes,
            nc1=self.weight,
            nc1_form=self.form,
            sync_dist=self.sync_dist,
            group=self.process_group,
            validate_args=self.validate_args,
        )
        return total

    def _running(self, features: Tensor, target: Tensor) -> Tensor:
        sync = self.sync_dist and is_distributed(self.process_group)
        dtype = features.dtype if features.dtype in WIDE_DTYPES else compute_dtype(features.dtype)
        hf = features if features.dtype == dtype else features.to(dtype)
        target = target if target.dtype == torch.long else target.long()
        with no_autocast("cpu" if hf.is_cpu else hf.device.type):
            return self._running_distance(hf, target, sync)

    def _running_distance(self, hf: Tensor, target: Tensor, sync: bool) -> Tensor:
        """Update the running means (in training), then the weighted mean squared distance.

        The running means are constants of the distance, so the gradient is
        ``2 weight (h_i - r_{y_i}) / count`` for the counted samples: plain autograd through the
        residuals for small CPU batches (fewest operations), else handed to autograd in closed
        form with one N x d temporary.
        """
        h = hf.detach()
        n, d = h.shape
        host = host_scalars(h) and not sync
        assign = None
        try:
            if host and onehot_products(n, self.num_classes, d):
                assign = identity(self.num_classes, h.dtype).index_select(0, target)
            if self.training:
                self._update(h, target, sync, assign)
            # in training every class of the (global) batch has just been seen
            seen = None if self.training else self.class_batches.index_select(0, target) > 0
        except (IndexError, RuntimeError):
            error = label_range_error(target, self.num_classes) if self.validate_args else None
            if error is not None and h.is_cpu:
                raise error from None
            raise
        running = self.running_mean
        running = running if running.dtype == h.dtype else running.to(h.dtype)
        if assign is not None:  # small CPU batch: plain autograd, fewest operations
            residual = torch.addmm(hf, assign, running, alpha=-1.0)
            if seen is not None:
                residual = residual * seen.unsqueeze(1)
            flat = residual.reshape(-1)
            count = n if seen is None else int(torch.count_nonzero(seen))
            return torch.dot(flat, flat) * (self.weight / max(count, 1))
        # one N x d temporary: the residuals, then in place the gradient 2 r of the local sum
        residual = running.index_select(0, target).neg_().add_(h)
        if seen is not None:
            residual.mul_(seen.unsqueeze(1))
        flat = residual.view(-1)
        local = torch.dot(flat, flat)
        if host:
            count = n if seen is None else int(torch.count_nonzero(seen))
            scale = self.weight / max(count, 1)
            value = local.item() * scale
            return with_gradients(value, h, (hf, h, residual.mul_(2.0 * scale)))
        local = with_gradients(local, h, (hf, h, residual.mul_(2.0)))
        total = global_sum(local, sync_dist=sync, group=self.process_group)
        counted = as_tensor(float(n), h) if seen is None else seen.to(h.dtype).sum()
        if sync:
            counted = all_reduce_sum(counted.clone(), self.process_group)
        return self.weight * where_valid(counted > 0, total / counted.clamp_min(1.0))

    @torch.no_grad()
    def _update(self, h: Tensor, target: Tensor, sync: bool, assign: Tensor | None) -> None:
        num_classes, dim = self.running_mean.shape
        if sync:
            packed = h.new_zeros((num_classes, dim + 1))
            packed[:, :dim].index_add_(0, target, h)
            packed[:, dim] = count_classes(target, num_classes, h.dtype)
            all_reduce_sum(packed, self.process_group)
            counts = packed[:, dim]
            batch_mean = packed[:, :dim].div_(counts.clamp_min(1.0).unsqueeze(1))
            count_list = None
        elif assign is not None:
            counts = assign.sum(0)
            count_list = counts.tolist() if num_classes <= 256 else None
            if count_list is None or 0.0 in count_list:
                batch_mean = (assign / counts.clamp_min(1.0)).T @ h
            else:  # every class present
                batch_mean = (assign / counts).T @ h
        else:
            sums = h.new_zeros((num_classes, dim)).index_add_(0, target, h)
            if host_scalars(h):
                counts = torch.bincount(target, minlength=num_classes).to(h.dtype)
            else:
                counts = count_classes(target, num_classes, h.dtype)
            batch_mean = sums.div_(counts.clamp_min(1.0).unsqueeze(1))
            count_list = None
        # a batch with NaN or infinite class means (NaN or infinite features, or an overflow,
        # as in a float16 step that GradScaler skips) leaves the buffers as they were: the means
        # are global under sync_dist, so every rank skips the same batch
        # (0 * mean is 0 for a finite mean and NaN for any other, and a sum keeps the NaN)
        zero = batch_mean.mul(0.0).sum()
        host = host_scalars(batch_mean)
        if host and zero.item() != 0.0:
            return
        factor, present = self._factors(counts, count_list)
        same = self.running_mean.dtype == h.dtype
        running = self.running_mean if same else self.running_mean.to(h.dtype)
        if not host:  # no host read: a non-finite batch moves the means towards themselves
            finite = zero == 0.0
            batch_mean = torch.where(finite, batch_mean, running)
            present = present & finite
        running.lerp_(batch_mean, factor)  # in place on the buffer when the dtypes agree
        if not same:
            self.running_mean.copy_(running)
        self.class_batches.add_(present)

    def _factors(self, counts: Tensor, count_list: list[float] | None) -> tuple[Tensor, Tensor]:
        """``(K, 1)`` update factors of the running means and the present-class mask: 0 for
        classes absent from the batch, 1 for a class seen for the first time, else the momentum
        (or ``1 / (batches seen + 1)`` for the cumulative average)."""
        if host_scalars(counts) and counts.shape[0] <= 256:  # a few Python floats
            seen = self.class_batches.tolist()
            present = [c > 0 for c in (counts.tolist() if count_list is None else count_list)]
            if self.momentum is None:
                factors = [1.0 / (b + 1.0) if p else 0.0 for p, b in zip(present, seen)]
            else:
                momentum = self.momentum
                factors = [
                    (momentum if b > 0 else 1.0) if p else 0.0 for p, b in zip(present, seen)
                ]
            factor = torch.tensor(factors, dtype=counts.dtype, device=counts.device).unsqueeze(1)
            return factor, torch.tensor(present, device=counts.device)
        present_mask = counts > 0
        present_f = present_mask.to(counts.dtype)
        if self.momentum is None:
            factor = present_f / (self.class_batches + 1)
        else:
            factor = torch.where(self.class_batches > 0, present_f * self.momentum, present_f)
        return factor.unsqueeze(1), present_mask
