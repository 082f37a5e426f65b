"""The training loop: a run's setup, epochs, steps, evaluation and checkpoints, in terms of the parts in
:mod:`sparsekern.training`. :func:`sparsekern.train.train` is its public face."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from sparsekern.modes import restore_flags, training_flags
from sparsekern.training import checkpoint as ckpt
from sparsekern.training.adversary import Adversary
from sparsekern.training.config import Stage, TrainConfig
from sparsekern.training.data import count_samples, count_steps, make_loader, split_batch, to_device
from sparsekern.training.distributed import setup_distributed, several_passes, wrap_model
from sparsekern.training.evaluate import evaluate
from sparsekern.training.hooks import TrainResult, TrainState, call_hooks
from sparsekern.training.losses import LossFn
from sparsekern.training.objective import Objective
from sparsekern.training.optim import build_stage_runs
from sparsekern.training.params import Freezer, collect_params, group_names
from sparsekern.training.step import StageStep

# Per-rank reseeding after a resume: each rank keeps its own stream of dropout / attack randomness.
RESUME_SEED_STRIDE = 104729


class EpochMeter:
    """Per-epoch means of the step metrics, each weighted by the batch's sample count."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, metrics: dict[str, Any], weight: float) -> None:
        """Add one step's metrics (values that are not numbers or one-element tensors are skipped)."""
        for k, v in metrics.items():
            try:
                v = float(v.detach()) if isinstance(v, Tensor) else float(v)
            except (TypeError, ValueError):
                continue
            self.sums[k] = self.sums.get(k, 0.0) + v * weight
            self.weights[k] = self.weights.get(k, 0.0) + weight

    def mean(self, key: str) -> float:
        """Weighted mean of ``key`` over the steps so far."""
        return self.sums[key] / self.weights[key]

    def postfix(self, lr: float) -> dict[str, str]:
        """What the progress bar shows: running loss, accuracy and the current lr."""
        post = {"loss": f"{self.mean('loss'):.4f}"} if "loss" in self.sums else {}
        if "accuracy" in self.sums:
            post["acc"] = f"{self.mean('accuracy'):.3f}"
        post["lr"] = f"{lr:.3g}"
        return post


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` and deterministic cuDNN while inside, when ``enabled``; the
    previous settings come back on exit either way."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        if enabled:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev_cudnn


def seed_everything(seed: int, rank: int) -> None:
    """Seed torch with ``seed + rank``, numpy and ``random`` with ``seed``."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def final_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """The last evaluation's metrics or, without one, the last epoch's ``train_*`` entries."""
    if not history:
        return {}
    last = history[-1]
    evals = {k[5:]: v for k, v in last.items() if k.startswith("eval_")}
    return evals or {k: v for k, v in last.items() if k.startswith("train_")}


class Trainer:
    """One run of :func:`sparsekern.train.train` (same arguments, checked here)."""

    def __init__(
        self, model: nn.Module, train_data: Any, config: TrainConfig, *, hooks: list[Any], eval_data: Any,
        teacher: nn.Module | None, distill_alpha: float, distill_temperature: float,
        adversary: Adversary | None, adversarial_weight: float, eval_adversary: Adversary | None,
        params: Iterable[Any] | None, stages: list[Stage], loss_fn: LossFn,
    ) -> None:
        if not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {distill_alpha}")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        if adversarial_weight < 0:
            raise ValueError(f"adversarial_weight must be >= 0, got {adversarial_weight}")
        names = [s.name for s in stages]
        if "main" in names or len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique and not 'main', got {names}")
        self.model, self.config, self.hooks = model, config, hooks
        self.train_data, self.eval_data = train_data, eval_data
        self.teacher, self.adversary, self.eval_adversary = teacher, adversary, eval_adversary
        self.objective = Objective(loss_fn, distill_alpha, distill_temperature, adversarial_weight)
        self.params_arg, self.stage_specs = params, stages
        self.freezer = Freezer()

    def _setup(self) -> None:
        """Devices, what each stage trains, data and step counts, optimizers, DDP, the state hooks see."""
        cfg = self.config
        self.rank, self.world, self.device = setup_distributed(cfg.device)
        self.model.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device)
        stage_params = collect_params(self.model, self.params_arg, self.stage_specs)
        self.freezer.freeze(self.model, stage_params, self.device)
        self.main_loader, self.main_sampler = make_loader(
            self.train_data, batch_size=cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed, rank=self.rank,
            world_size=self.world, drop_last=cfg.drop_last, num_workers=cfg.num_workers,
        )
        self.counts = count_steps(self.main_loader, cfg.epochs, cfg.max_steps)
        self.stages = build_stage_runs(
            stage_params, cfg, self.counts.total_steps, rank=self.rank, world_size=self.world
        )
        module, sync = wrap_model(
            self.model, self.device, self.world, multi_pass=several_passes(self.stages, self.adversary is not None),
            find_unused_parameters=cfg.find_unused_parameters, external_ids=self.freezer.external_ids,
        )
        self.state = TrainState(
            model=self.model, config=cfg, optimizers=[s.optimizer for s in self.stages],
            schedulers=[s.scheduler for s in self.stages], stage_names=[s.name for s in self.stages],
            device=self.device, total_steps=self.counts.total_steps, steps_per_epoch=self.counts.steps_per_epoch,
            rank=self.rank, world_size=self.world,
        )
        self.stage_step = StageStep(
            state=self.state, model=self.model, module=module, teacher=self.teacher, adversary=self.adversary,
            objective=self.objective, hooks=self.hooks, sync=sync, all_groups=group_names(stage_params),
            n_stages=len(self.stages), grad_clip=cfg.grad_clip,
        )

    def _loaders(self) -> list[Any]:
        return [self.main_loader] + [s.loader for s in self.stages[1:]]

    def _save_checkpoint(self) -> None:
        if self.config.checkpoint is None:
            return
        payload = (
            ckpt.checkpoint_payload(self.state, self.stages, self.freezer.external, self.hooks, self._loaders())
            if self.rank == 0 else {}
        )
        ckpt.save_checkpoint(self.config.checkpoint, payload, rank=self.rank, world_size=self.world)

    def _load_checkpoint(self) -> int:
        """Load ``config.checkpoint`` if it exists; return the epoch to start from."""
        path = self.config.checkpoint
        if path is None or not os.path.exists(path):
            return 0
        ck = ckpt.read_checkpoint(
            path, total_steps=self.counts.total_steps, stage_names=[s.name for s in self.stages],
            n_external=len(self.freezer.external),
        )
        ckpt.restore_run(
            ck, model=self.model, external=self.freezer.external, stages=self.stages, hooks=self.hooks, path=path
        )
        self.state.history = list(ck["history"])
        self.state.step = int(ck["step"])
        ckpt.set_rng_state(ck["rng"])
        if self.rank:
            torch.manual_seed(self.config.seed + self.rank + RESUME_SEED_STRIDE * self.state.step)
        ckpt.set_loader_generator_states(self._loaders(), ck["loader_generators"])
        return int(ck["epoch"])

    def run(self) -> TrainResult:
        """Set up, resume, train epoch after epoch until the steps are done or a hook stops, clean up."""
        cfg = self.config
        teacher_flags = training_flags(self.teacher) if self.teacher is not None else []
        model_flags = training_flags(self.model)
        bar = None
        with deterministic_mode(cfg.deterministic):
            try:
                self._setup()
                seed_everything(cfg.seed, self.rank)
                if self.teacher is not None:
                    self.teacher.eval()
                epoch = self._load_checkpoint()
                self.model.train()
                call_hooks(self.hooks, "on_train_start", self.state)
                if cfg.progress and self.rank == 0:
                    from tqdm.auto import tqdm

                    bar = tqdm(
                        total=self.counts.total_steps, initial=self.state.step, desc="train", dynamic_ncols=True
                    )
                while self.state.step < self.counts.total_steps and not self.state.stop:
                    if self.counts.num_epochs is not None and epoch >= self.counts.num_epochs:
                        break
                    self._run_epoch(epoch, bar)
                    epoch += 1
                call_hooks(self.hooks, "on_train_end", self.state)
            finally:
                if bar is not None:
                    bar.close()
                self.freezer.restore()
                restore_flags(model_flags)
                restore_flags(teacher_flags)
        st = self.state
        return TrainResult(history=list(st.history), final=final_metrics(st.history), steps=st.step, state=st)

    def _run_epoch(self, epoch: int, bar: Any) -> None:
        """Steps over the main loader, then the epoch's history entry, evaluation, hooks and checkpoint."""
        st = self.state
        st.epoch = epoch
        for sampler in [self.main_sampler] + [s.sampler for s in self.stages[1:]]:
            if sampler is not None:
                sampler.set_epoch(epoch, 0)
        for s in self.stages[1:]:
            s.restart()
        self.model.train()
        call_hooks(self.hooks, "on_epoch_start", st)
        meter = EpochMeter()
        for batch in self.main_loader:
            if st.step >= self.counts.total_steps:
                break
            self._step(batch)
            meter.add(st.metrics, float(count_samples(split_batch(batch)[0])))
            st.step += 1
            if bar is not None:
                bar.set_postfix(meter.postfix(st.lr), refresh=False)
                bar.update(1)
            if st.stop:
                break
        entry: dict[str, float] = {"epoch": float(epoch + 1), "step": float(st.step), "lr": st.lr}
        entry.update({f"train_{k}": meter.mean(k) for k in meter.sums})
        last_epoch = st.step >= self.counts.total_steps or st.stop
        if self.eval_data is not None and ((epoch + 1) % self.config.eval_every == 0 or last_epoch):
            entry.update(self._evaluate(epoch, bar))
        st.history.append(entry)
        call_hooks(self.hooks, "on_epoch_end", st)
        self._save_checkpoint()

    def _evaluate(self, epoch: int, bar: Any) -> dict[str, float]:
        """``eval_*`` entries of the epoch's history (the line is also written under the progress bar)."""
        cfg = self.config
        self.state.phase = "eval"
        metrics = evaluate(
            self.model, self.eval_data, device=self.device, adversary=self.eval_adversary,
            loss_fn=self.objective.loss_fn, batch_size=cfg.eval_batch_size or cfg.batch_size,
        )
        self.state.phase = "idle"
        if bar is not None and "accuracy" in metrics:
            bar.write(f"epoch {epoch + 1}: eval loss {metrics['loss']:.4f} acc {metrics['accuracy']:.4f}")
        return {f"eval_{k}": v for k, v in metrics.items()}

    def _step(self, main_batch: Any) -> None:
        """One step: every stage due at ``state.step``, the main stage first (its adversarial input is
        reused by stages without data of their own)."""
        st = self.state
        st.extra.clear()
        st.metrics.clear()
        call_hooks(self.hooks, "on_step_start", st)
        main_batch = to_device(main_batch, self.device)
        x_adv = None
        for stage in self.stages:
            if st.step % stage.every:
                continue
            st.stage = stage.name
            if stage.name == "main":
                x_adv = self.stage_step(stage, main_batch, None)
            elif stage.loader is None:
                self.stage_step(stage, main_batch, x_adv)
            else:
                self.stage_step(stage, to_device(stage.next_batch(st.epoch), self.device), None)
        st.stage = "main"
