"""One stage of one training step: inputs (attack), forward (and teacher), objective, backward, update."""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from sparsekern.modes import preserve_buffers
from sparsekern.training.adversary import Adversary
from sparsekern.training.data import detach_inputs, split_batch
from sparsekern.training.distributed import GradSync
from sparsekern.training.hooks import TrainState, call_hooks
from sparsekern.training.losses import count_correct
from sparsekern.training.objective import Forward, Objective, StageLoss, add_hook_terms, backward_jobs
from sparsekern.training.optim import StageRun


class StageStep:
    """Runs one stage on one batch; see :meth:`__call__` for the order of events.

    ``model`` is the plain module (hooks and the adversary see it), ``module`` what the training forwards
    call (the DDP wrapper under DDP). ``n_stages`` is the number of stages of the run: with one stage and one
    objective the backward is a plain ``loss.backward()``.
    """

    def __init__(
        self, *, state: TrainState, model: nn.Module, module: nn.Module, teacher: nn.Module | None,
        adversary: Adversary | None, objective: Objective, hooks: Sequence[Any], sync: GradSync,
        all_groups: set[str], n_stages: int, grad_clip: float | None,
    ) -> None:
        self.state, self.model, self.module, self.teacher = state, model, module, teacher
        self.adversary, self.objective, self.hooks, self.sync = adversary, objective, hooks, sync
        self.all_groups, self.n_stages, self.grad_clip = all_groups, n_stages, grad_clip
        self.warned_no_grad = False

    def __call__(self, stage: StageRun, batch: Any, reuse_adv: Any) -> Any:
        """Forward, objective, backward and step of ``stage`` on ``batch`` (already on the device).

        ``reuse_adv``: an adversarial input to use instead of attacking (a stage without data of its own
        reuses the main stage's). Returns the adversarial input it used (``None`` without an adversary).
        """
        x, y = split_batch(batch)
        self.state.batch = batch
        for p in stage.params:
            p.grad = None
        with self.sync.passes():
            x_adv = self._adversarial_input(x, y, reuse_adv)
            fwd = self._forward(x, x_adv)
            self.state.phase = "loss"
            loss = self._loss(stage, batch, y, fwd)
            self._record(stage, loss, fwd.outputs, y)
            self._backward(stage, loss)
        self.state.phase = "idle"
        self._update(stage)
        return x_adv

    def _adversarial_input(self, x: Any, y: Any, reuse_adv: Any) -> Any:
        """The adversary's input (run on the plain module in train mode, its buffers restored afterwards)."""
        if self.adversary is None:
            return None
        x_adv = reuse_adv
        if x_adv is None:
            self.state.phase = "attack"
            with preserve_buffers(self.model):
                x_adv = detach_inputs(self.adversary(self.model, x, y))
        self.state.extra["x_adv"] = x_adv
        return x_adv

    def _forward(self, x: Any, x_adv: Any) -> Forward:
        """Training forwards on ``x`` (and ``x_adv``) and the teacher's; each result goes to ``state.extra``."""
        st = self.state
        st.phase = "clean"
        fwd = Forward(self.module(x))
        st.extra["outputs"] = fwd.outputs
        fwd.teacher = self._teacher(x)
        if fwd.teacher is not None:
            st.extra["teacher_outputs"] = fwd.teacher
        if x_adv is not None:
            fwd.x_adv = x_adv
            st.phase = "adversarial"
            fwd.outputs_adv = self.module(x_adv)
            st.extra["outputs_adv"] = fwd.outputs_adv
            fwd.teacher_adv = self._teacher(x_adv)
            if fwd.teacher_adv is not None:
                st.extra["teacher_outputs_adv"] = fwd.teacher_adv
        return fwd

    def _teacher(self, x: Any) -> Any:
        if self.teacher is None:
            return None
        self.state.phase = "teacher"
        with torch.no_grad():
            return self.teacher(x)

    def _loss(self, stage: StageRun, batch: Any, y: Any, fwd: Forward) -> StageLoss:
        """The default objective (when some group of the stage takes it) and the hooks' terms."""
        loss = StageLoss(self.objective.base(fwd, y) if any(g.base_loss for g in stage.groups) else None)
        add_hook_terms(
            loss, self.hooks, self.state, batch, fwd.outputs, stage_groups=stage.names, all_groups=self.all_groups,
        )
        return loss

    def _record(self, stage: StageRun, loss: StageLoss, outputs: Any, y: Any) -> None:
        """Loss (and, for the main stage, accuracy) into ``state.metrics``; a non-finite loss is an error."""
        st = self.state
        prefix = "" if stage.name == "main" else f"{stage.name}/"
        common = loss.common
        value = float(common.detach()) if common is not None else 0.0
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value} at step {st.step} (stage {stage.name!r})")
        st.metrics[f"{prefix}loss"] = value
        for key, t in loss.targeted.items():
            st.metrics[f"{prefix}loss[{key}]"] = float(t.detach())
        if stage.name == "main":
            st.last_loss = value
            corr = count_correct(outputs, y)
            if corr is not None and corr[1]:
                st.metrics["accuracy"] = corr[0] / corr[1]

    def _backward(self, stage: StageRun, loss: StageLoss) -> None:
        """One backward per distinct objective, each into its own groups' parameters only."""
        jobs, n_objectives = backward_jobs(stage.groups, loss)
        if not jobs and not self.warned_no_grad:
            self.warned_no_grad = True
            warnings.warn(
                f"stage {stage.name!r}: the objective does not depend on any of its parameters at step "
                f"{self.state.step}; nothing is updated (are the right parameters given?)", stacklevel=7,
            )
        plain = self.n_stages == 1 and len(jobs) == 1 and n_objectives == 1
        for i, (obj, ps) in enumerate(jobs):
            if plain:
                obj.backward()
            else:
                torch.autograd.backward(obj, inputs=ps, retain_graph=i < len(jobs) - 1)

    def _update(self, stage: StageRun) -> None:
        """Average gradients over ranks, let hooks edit them, clip, step optimizer and schedule."""
        self.sync.average(stage.params)
        call_hooks(self.hooks, "after_backward", self.state)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in stage.params if p.grad is not None], self.grad_clip)
        stage.optimizer.step()
        stage.scheduler.step()
        call_hooks(self.hooks, "after_step", self.state)
