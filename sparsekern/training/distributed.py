"""Several processes (``torchrun``): process group, the DDP wrapper and gradient averaging."""
from __future__ import annotations

import atexit
import contextlib
import os
from typing import Any, ContextManager, Sequence

import torch
from torch import Tensor, nn

from sparsekern.training.optim import StageRun

def setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Initialises the process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if world > 1 and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    if world <= 1:
        return 0, 1, dev
    import torch.distributed as dist

    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
    return dist.get_rank(), dist.get_world_size(), dev


def allreduce_mean(params: Sequence[Tensor], world_size: int) -> None:
    """Average ``p.grad`` over ranks; a parameter without a gradient on every rank keeps ``None``."""
    import torch.distributed as dist

    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has)
    for p, h in zip(params, has.tolist()):
        if h == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)



class GradSync:
    """How a stage's gradients are averaged over ``world_size`` ranks.

    With ``manual`` (a step with several forward or backward passes, which DDP's reducer cannot follow, or
    no DDP wrapper at all) the passes run under ``ddp.no_sync()`` and :meth:`average` all-reduces every
    parameter of the stage; otherwise DDP averages the model's gradients itself and :meth:`average` only
    handles the parameters outside the model (``external_ids``). One process: nothing to do.
    """

    def __init__(self, world_size: int, ddp: nn.Module | None, manual: bool, external_ids: set[int]) -> None:
        self.world_size, self.ddp, self.manual, self.external_ids = world_size, ddp, manual, external_ids

    def passes(self) -> ContextManager[Any]:
        """Context of the stage's forward and backward passes."""
        return self.ddp.no_sync() if (self.ddp is not None and self.manual) else contextlib.nullcontext()

    def average(self, params: Sequence[Tensor]) -> None:
        """Average the gradients of ``params`` (a stage's parameters) over the ranks."""
        if self.world_size > 1:
            todo = params if self.manual else [p for p in params if id(p) in self.external_ids]
            allreduce_mean(todo, self.world_size)


def several_passes(stages: Sequence[StageRun], adversarial: bool) -> bool:
    """Whether a step makes more than one forward or backward pass through the model: with an adversary,
    with further stages, or when the main stage's groups get different objectives (named or without the
    default objective)."""
    main_groups = stages[0].groups
    return (
        adversarial
        or len(stages) > 1
        or (len(main_groups) > 1 and any(g.name is not None or not g.base_loss for g in main_groups))
    )


def wrap_model(
    model: nn.Module, device: torch.device, world_size: int, *, multi_pass: bool, find_unused_parameters: bool,
    external_ids: set[int],
) -> tuple[nn.Module, GradSync]:
    """The module the step calls (``DistributedDataParallel(model)`` under DDP when some model parameter
    is trained, else ``model``) and its :class:`GradSync`. ``multi_pass``: a step makes more than one
    forward or backward pass through the model."""
    if world_size <= 1:
        return model, GradSync(world_size, None, False, external_ids)
    ddp = None
    if any(p.requires_grad for p in model.parameters()):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    sync = GradSync(world_size, ddp, multi_pass or ddp is None, external_ids)
    return (ddp if ddp is not None else model), sync


def barrier(world_size: int) -> None:
    """Wait for every rank (no-op in one process)."""
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
