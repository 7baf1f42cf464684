"""A simplex-ETF head that follows the features: the ETF nearest the running class means.

A fixed simplex ETF imposes an arbitrary orientation that the features must rotate to. Markou et
al. (2024) instead use, at every step, the simplex ETF *nearest* the current class means, so the
classifier meets the features where they are; they find it by an iterative Riemannian solver and
differentiate through it. :class:`NearestETFHead` keeps the idea and replaces the solver by its
closed form (:func:`~torchcollapse.frames.nearest_simplex_etf`, an orthogonal Procrustes step: one
thin SVD of a ``(K-1) x d`` matrix), applied to running means of the normalized features:

1. in training, when ``forward`` gets the targets, the per-class sums of the batch's normalized
   features and the class counts are summed over processes (one all-reduce of ``K x (d+1)``
   numbers), and the running means move towards the batch means by ``momentum`` (a class seen
   for the first time takes its batch mean);
2. the frame becomes the simplex ETF nearest the running means (with a small proximal pull to
   the current frame that only breaks ties, e.g. before every class has been seen);
3. the logits use the new frame, as a constant (no gradient flows into the frame).

In evaluation (or without targets) the frame stays fixed. Frame, running means and the record of
seen classes are persistent buffers; the running means are kept in at least float32 (also after
``.half()``/``.bfloat16()``, as batch statistics), so that small momentum steps do not round away.

References:
    Markou, Ajanthan & Gould (2024), *Guiding neural collapse: optimising towards the nearest
    simplex equiangular tight frame*, NeurIPS.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor

from torchcollapse._buffers import apply_keeping_dtypes
from torchcollapse._distributed import DropsProcessGroupWhenPickled, all_reduce_sum
from torchcollapse._fx import check_traceable_group, is_proxy
from torchcollapse._numbers import read_int, read_number
from torchcollapse.frames import _nearest_simplex_etf, simplex_etf
from torchcollapse.heads._common import (
    check_features,
    check_target,
    note_training_call,
)
from torchcollapse.heads.fixed_frame import FixedFrameHead, _FrameBuilder, check_simplex_features

__all__ = ["NearestETFHead"]


class NearestETFHead(DropsProcessGroupWhenPickled, FixedFrameHead):
    """A simplex-ETF head that rotates, each training step, to the ETF nearest the class means.

    Use it where the targets reach the head, e.g. with a backbone that returns features::

        model.fc = torch.nn.Identity()
        head = NearestETFHead(512, num_classes)
        logits = head(model(images), labels)  # training: updates the frame, then the logits
        logits = head(model(images))  # or in eval mode: the frame is fixed

    Without ``target`` the frame does not move: a head put in place by
    :func:`~torchcollapse.heads.replace_head` and called as ``model(x)`` stays the initial,
    fixed ETF. So a second call in training mode without ``target`` before any call with one
    (outside ``torch.compile``) warns, once per head; a single unlabelled call before the
    labelled one of a semi-supervised step does not. Code that runs a model in training mode on
    purpose without labels, as ``torch.optim.swa_utils.update_bn`` does to recompute BatchNorm
    statistics, may silence it: ``warnings.filterwarnings("ignore", ".*called in training mode
    without")``.

    Limitations: as :class:`FixedFrameHead`, with ``normalize_features=True`` (the default) the
    backward is first-order only: no double backward (``create_graph=True``) and no forward-mode
    AD (``jvp``, ``jacfwd``, ``hessian``).

    Activation checkpointing: keep the head outside the checkpointed region. The frame update is
    a side effect of ``forward``, as batch norm's running statistics are:
    :func:`torch.utils.checkpoint.checkpoint` recomputes the forward during the backward pass, so
    a checkpointed head folds each batch into the running means twice per step, and the
    recomputed logits (whose graph the backward differentiates) use the frame after the second
    update, not the one the forward pass used.

    EMA of the weights (a teacher, an evaluation copy): average the parameters and *copy* the
    buffers (``frame``, ``running_means``, ``class_seen``), as
    :class:`torch.optim.swa_utils.AveragedModel` does by default (``use_buffers=False``; its
    ``update_parameters`` leaves the buffers of the copy to you: copy them from the live head,
    e.g. ``ema.module.fc.frame.copy_(model.fc.frame)``). An EMA that averages every
    ``state_dict`` entry (``AveragedModel(use_buffers=True)``, timm's ``ModelEmaV2``/``V3``, a
    hand-written loop over the ``state_dict``) averages frames of different orientations: the
    result is no frame (rows of norm below 1, cosines away from ``-1/(K-1)``), which biases the
    logits per class. Keep the head out of such an EMA, or copy its buffers after each update.

    Copies: ``copy.deepcopy`` and pickling give a head with ``process_group=None`` (the world,
    under ``sync_dist``): a process group cannot be copied; set ``copy.process_group`` again
    where the copy should synchronise over a subgroup.

    Args:
        in_features: feature dimension ``d >= num_classes - 1``.
        num_classes: number of classes ``K >= 2``.
        momentum: weight of the batch means in the running means (as in batch norm), in
            ``(0, 1]``; any real scalar (Python, numpy, 0-dim tensor), not a bool.
        proximal: weight of the current frame in the target of the Procrustes step (0: the exact
            nearest ETF; the default only breaks ties), finite and ``>= 0``; any real scalar.
        normalize_features, scale, learnable_scale, bias, eps: as :class:`FixedFrameHead`.
        generator: CPU generator for the initial frame's orientation.
        device: device of the buffers and parameters (default: torch's default device; the
            initial frame is drawn on the CPU in any case, then moved).
        dtype: dtype of the buffers and parameters (default: ``torch.get_default_dtype()``);
            the running means are at least float32.
        sync_dist: sum the batch statistics over the processes of ``process_group`` when
            ``torch.distributed`` is initialised, so that every process takes the same step
            (``False``: each process updates from its own batch, e.g. when only one calls it).
        process_group: process group for ``sync_dist`` (default: the world), e.g. the
            data-parallel group of the processes that hold this head. Not copied by
            ``copy.deepcopy`` or pickling (the copy gets ``None``). An FX graph cannot hold
            one: ``torch.fx.symbolic_trace`` of the training-mode update with a group (and
            ``sync_dist``) raises a ``RuntimeError``; in eval mode it traces.

    Example:
        >>> head = NearestETFHead(8, 3, momentum=1.0)
        >>> means = torch.eye(3, 8)  # pretend each class sits on a coordinate axis
        >>> logits = head(means.repeat(4, 1), torch.arange(3).repeat(4))  # one training step
        >>> cosines = torch.nn.functional.normalize(means, dim=1) @ head.frame.T
        >>> bool((cosines.argmax(1) == torch.arange(3)).all())  # the frame turned to the means
        True
        >>> head.eval()(means).shape  # evaluation: fixed frame
        torch.Size([3, 3])
    """

    running_means: Tensor
    class_seen: Tensor

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        momentum: float = 0.1,
        proximal: float = 1e-3,
        normalize_features: bool = True,
        scale: float | None = None,
        learnable_scale: bool = False,
        bias: bool = False,
        eps: float = 1e-12,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        sync_dist: bool = True,
        process_group: Any = None,
    ) -> None:
        in_features = read_int(in_features, "in_features")
        num_classes = read_int(num_classes, "num_classes", 2)
        check_simplex_features(in_features, num_classes)
        # any real scalar (Python, numpy, 0-dim tensor), never a bool
        momentum = read_number(momentum, "momentum", "in (0, 1]", lambda value: 0 < value <= 1)
        proximal = read_number(proximal, "proximal", "a finite float >= 0", lambda v: v >= 0)
        builder = _FrameBuilder(simplex_etf, (num_classes, in_features))
        frame = builder.draw(generator, dtype, device)
        super().__init__(
            frame,
            normalize_features=normalize_features,
            scale=scale,
            learnable_scale=learnable_scale,
            bias=bias,
            eps=eps,
            device=device,
        )
        self.momentum = float(momentum)
        self.proximal = float(proximal)
        self.sync_dist = bool(sync_dist)
        self.process_group = process_group
        # at least float32 (see _apply): in 16 bits small momentum steps round away
        self.register_buffer(
            "running_means",
            torch.zeros_like(
                self.frame, dtype=torch.promote_types(self.frame.dtype, torch.float32)
            ),
        )
        self.register_buffer(
            "class_seen", torch.zeros(num_classes, dtype=torch.bool, device=self.frame.device)
        )
        self._frame_builder = builder

    def reset_parameters(self) -> None:
        """As :meth:`FixedFrameHead.reset_parameters`, and forget the running class means."""
        super().reset_parameters()
        with torch.no_grad():
            self.running_means.zero_()
            self.class_seen.zero_()

    def _apply(self, fn: Any, recurse: bool = True) -> NearestETFHead:
        # the running means keep at least float32 (in float16 an update below half an ulp of the
        # mean rounds away, and the means freeze); ``.double()`` widens them
        apply_keeping_dtypes(self, partial(super()._apply, fn, recurse), ("running_means",))
        return self

    @torch.no_grad()
    def update(self, features: Tensor, target: Tensor) -> Tensor:
        """Fold a batch into the running means and move the frame to the nearest simplex ETF.

        Under ``torch.distributed`` (with ``sync_dist``) the batch statistics are summed over the
        processes of ``process_group`` first, so every process takes the same step.

        A batch with a NaN or infinite feature (on any process) is refused before anything
        changes: running means, seen classes and frame stay as they were, and the next batch
        updates them as if the refused one had not come. The check reads one flag back from an
        accelerator (the SVD of the step waits for the device anyway, to read its status).
        Under ``torch.compile``, where raising would need a graph break, such a batch is
        skipped instead (the state is kept, the logits use the current frame).

        Args:
            features: ``(N, in_features)`` features of the batch (detached here).
            target: ``(N,)`` class indices.

        Returns:
            The new frame (also copied into the ``frame`` buffer).

        Raises:
            ValueError: when ``features`` holds NaN or infinite values (not under
                ``torch.compile``).
        """
        features = check_features(features, self.in_features)
        target = check_target(target, features, self.num_classes)
        return self._step(features, target)

    def _step(self, features: Tensor, target: Tensor | None) -> Tensor:
        """The frame for the logits of ``features`` (see :func:`_frame_step`): with ``target``,
        the step of :meth:`update` on checked inputs; without (only in a ``torch.fx`` graph),
        the frame as it is."""
        synced = self.sync_dist and target is not None
        if synced and is_proxy(features):
            check_traceable_group(self, self.process_group)
        return _frame_step(
            features,
            target,
            self.frame,
            self.running_means,
            self.class_seen,
            self.momentum,
            self.proximal,
            self.eps,
            self.sync_dist,
            self.process_group if synced else None,
        )

    @property
    def weight(self) -> Tensor:
        """The effective ``K x d`` classifier ``scale * frame`` with the frame as it is now; a
        copy of the frame enters the graph, as in :meth:`forward`, so that a labelled call later
        in the step (which moves the frame in place) cannot break the backward pass of a loss
        that read the weight first (that loss sees the frame from before the move)."""
        return self._frame_for_graph() * self.scale

    def _frame_for_graph(self) -> Tensor:
        """The frame as it is now (see :func:`_frame_in_graph`)."""
        return _frame_in_graph(self.frame)

    def forward(self, features: Tensor, target: Tensor | None = None) -> Tensor:
        """Logits ``(*, num_classes)``; in training mode with ``target``, update the frame first.

        Args:
            features: ``(*, in_features)``; ``(N, in_features)`` when ``target`` is given.
            target: optional ``(N,)`` class indices of the batch.
        """
        features = check_features(features, self.in_features)
        traced = is_proxy(features)
        if self.training and not torch.compiler.is_compiling() and not traced:
            note_training_call(
                self,
                target,
                "NearestETFHead was called in training mode without `target`: its frame moves"
                " towards the class means only when the head gets the batch's labels, e.g."
                " `head(features, target)`; called as `model(x)` (as after `replace_head`) it"
                " stays the initial, fixed simplex ETF.",
            )
        if traced:
            # torch.fx: one call in the graph, which takes the branch below when it runs (a graph
            # traced with a `target` input may be called without it); the labels are checked
            # when the graph runs, as update checks them (in eval mode they are not read)
            step_target = target if self.training else None
            if step_target is not None:
                step_target = check_target(step_target, features, self.num_classes)
            return self._logits(features, self._step(features, step_target))
        if target is not None and self.training:
            # A fresh tensor, not the buffer, enters the graph: updating the buffer in a later
            # step cannot invalidate this step's backward pass.
            return self._logits(features, self.update(features, target))
        # The same without a target: a labelled call later in the step (semi-supervised steps)
        # updates the buffer in place before this call's backward.
        return self._logits(features, self._frame_for_graph())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}, proximal={self.proximal}"


@torch.fx.wrap  # one call in a torch.fx graph: it checks values and branches when it runs
def _frame_step(
    features: Tensor,
    target: Tensor | None,
    frame: Tensor,
    running_means: Tensor,
    class_seen: Tensor,
    momentum: float,
    proximal: float,
    eps: float,
    sync_dist: bool,
    process_group: Any,
) -> Tensor:
    """The frame the logits of :class:`NearestETFHead` use. With ``target``: the step of
    :meth:`NearestETFHead.update`, which updates the buffers ``frame``, ``running_means`` and
    ``class_seen`` in place and returns the new frame (a fresh tensor). Without (only a graph
    traced by ``torch.fx`` gets here): the frame, as :func:`_frame_in_graph` hands it out."""
    if target is None:
        return _frame_in_graph(frame)
    with torch.no_grad():
        work = torch.promote_types(features.dtype, torch.float32)
        unit = features.detach().to(work)
        unit = unit / torch.linalg.vector_norm(unit, dim=1, keepdim=True).clamp_min(eps)
        with_counts = torch.cat([unit, unit.new_ones(unit.shape[0], 1)], dim=1)
        stats = unit.new_zeros(frame.shape[0], frame.shape[1] + 1)
        stats.index_add_(0, target.long(), with_counts)
        if sync_dist:
            all_reduce_sum(stats, process_group)
        # a non-finite feature makes its class's row NaN (its unit vector is NaN); checked after
        # the reduction, so that every process decides alike
        finite = torch.isfinite(stats).all()
        compiling = torch.compiler.is_compiling()
        if not compiling and not bool(finite):
            raise ValueError(
                "Expected argument `features` to be finite, but the batch holds NaN or infinite "
                "values (on this or another process); the running means and the frame are left "
                "as they were."
            )
        sums, counts = stats[:, :-1], stats[:, -1]
        present = counts > 0
        # momentum for classes seen before, 1 for new ones, built in the working dtype
        rate = class_seen.to(work).mul_(momentum - 1.0).add_(1.0).mul_(present)
        running = running_means.to(work)
        running = running + rate[:, None] * (sums / counts.clamp_min(1.0)[:, None] - running)
        if compiling:  # skip a non-finite batch without a data-dependent branch
            running = torch.where(finite, running, running_means.to(work))
            present = present & finite
        new_frame = _nearest_simplex_etf(running, frame, proximal, eps).to(frame.dtype)
        if compiling:
            new_frame = torch.where(finite, new_frame, frame)
        running_means.copy_(running)
        class_seen.logical_or_(present)
        frame.copy_(new_frame)
        return new_frame


def _frame_in_graph(frame: Tensor) -> Tensor:
    """The frame as it is now; a copy while autograd records, so that the in-place move of a
    labelled call later in the step cannot invalidate a backward pass through it."""
    return frame.clone() if torch.is_grad_enabled() else frame
