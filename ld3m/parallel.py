"""Data parallelism for the distillation loop: one process per rank, launched by `accelerate
launch`, `torchrun`, or `srun` (one task per process), on one or many nodes.

Every rank holds the whole synthetic set; ranks differ only in the random streams they draw
(real batches, DSA, expert trajectories). After each rank has its local gradient, `Parallel`
averages it over ranks, so N ranks match N trajectories (or real batches) per step:
- plain data parallelism: one all-reduce of every gradient, then the same SGD step everywhere;
- DeepSpeed ZeRO stage 1/2 (`run.zero_stage`): the optimiser state is partitioned over ranks;
  the local gradient enters DeepSpeed's backward through a proxy loss sum(p * g), whose
  gradient is g, and DeepSpeed averages, partitions and steps.

On CPU the backend is gloo. Accelerate silently falls back to independent single processes
unless `cpu=True` (plain) or an explicit gloo process group (DeepSpeed) is requested, and
DeepSpeed clips gradients to norm 1 unless told otherwise; both are set here.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ld3m.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500


def slurm_env_to_torch(env: MutableMapping[str, str] = os.environ) -> None:
    """Under `srun` with several tasks and no torchrun/accelerate launcher, derive the
    torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from
    Slurm's. Leaves an environment that already names a rank alone."""
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) < 2 or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", env["WORLD_SIZE"]).split("(")[0]
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    if "MASTER_PORT" not in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        env["MASTER_PORT"] = str(DEFAULT_PORT + job % 10000)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (`scontrol show hostnames`, else a plain parse)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
            check=True, timeout=30,
        ).stdout.split()  # fmt: skip
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        return "127.0.0.1"
    prefix, ranges = match.groups()
    return prefix + (re.split(r"[,-]", ranges)[0] if ranges else "")


@dataclass
class Parallel:
    """This process's place among the ranks, and the collective operations the loop needs."""

    rank: int = 0
    world: int = 1
    zero_stage: int = 0
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        device = self.accelerator.device if self.accelerator is not None else None
        return device if device is not None and device.type != "cpu" else torch.device("cpu")

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            torch.distributed.barrier()

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average `tensors` over ranks, in place (one flat all-reduce)."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on some rank."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item() > 0)

    def gather_object(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def setup_parallel(zero_stage: int = 0) -> Parallel:
    """Join the launcher's process group (if any) through Accelerate; a single process needs
    none. `zero_stage` 1 or 2 turns on DeepSpeed ZeRO for the optimiser state."""
    if zero_stage not in (0, 1, 2):
        raise ConfigError(f"run.zero_stage={zero_stage}: use 0 (off), 1 or 2")
    slurm_env_to_torch()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and zero_stage == 0:
        return Parallel()
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available()
    if zero_stage:
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu else []
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(zero_stage))
        acc = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers)
    else:
        acc = Accelerator(cpu=cpu)
    if acc.num_processes != world:
        raise ConfigError(
            f"WORLD_SIZE={world} but Accelerate started {acc.num_processes} process(es); launch "
            "with `accelerate launch --multi_gpu --num_processes N`, torchrun, or srun"
        )
    return Parallel(acc.process_index, acc.num_processes, zero_stage, acc)


def deepspeed_config(stage: int) -> dict[str, Any]:
    """ZeRO config: stage 1/2, no clipping (DeepSpeed's default clips to 1), fp32."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }


class SyncedOptimizer:
    """The optimiser of the synthetic set, stepping with gradients averaged over ranks.

    Callers fill `.grad` of the module's parameters with this rank's local gradient, then call
    `step()`; `state_dict`/`load_state_dict` and `save`/`load` cover the checkpoint.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, par: Parallel) -> None:
        self.module, self.par = module, par
        self.optimizer = optimizer
        self.engine = None
        if par.zero_stage:
            self.engine, self.optimizer = par.accelerator.prepare(module, optimizer)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def average_grads(self) -> None:
        """Plain data parallelism: replace the local gradients by their mean over ranks."""
        if self.engine is None:
            self.par.mean_([p.grad for p in self.params if p.grad is not None])

    def step(self) -> None:
        """Apply the (averaged) gradient: SGD step, or DeepSpeed's backward + step."""
        if self.engine is None:
            self.optimizer.step()
            return
        grads = [(p, p.grad) for p in self.params if p.grad is not None]
        self.zero_grad()
        proxy = sum((p * g.detach()).sum() for p, g in grads)
        self.par.accelerator.backward(proxy)  # DeepSpeed: average, partition, step, zero
        self.zero_grad()

    def clamp_(
        self,
        param: nn.Parameter,
        minimum: float | torch.Tensor,
        maximum: float | torch.Tensor | None = None,
    ) -> None:
        """Keep `param` within [minimum, maximum] (bounds broadcast), in DeepSpeed's fp32
        master copy too."""
        with torch.no_grad():
            inside = bool((param.detach() >= minimum).all())
            if maximum is not None:
                inside = inside and bool((param.detach() <= maximum).all())
            if inside:
                return
            if self.engine is None:
                param.copy_(param.clamp(min=minimum, max=maximum))
                return
            from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

            full = safe_get_full_fp32_param(param)
            safe_set_full_fp32_param(param, full.clamp(min=minimum, max=maximum))
            param.copy_(param.clamp(min=minimum, max=maximum))

    def state_dict(self) -> dict[str, Any]:
        """Optimiser state for the rank-0 checkpoint file (empty under ZeRO: see save_sharded)."""
        return {} if self.engine is not None else self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.engine is None:
            self.optimizer.load_state_dict(state)

    def save_sharded(self, folder: Path) -> None:
        """ZeRO: every rank writes its optimiser partition into `folder` (collective)."""
        if self.engine is not None:
            self.engine.save_checkpoint(str(folder), tag="zero", client_state={})

    def load_sharded(self, folder: Path) -> None:
        """ZeRO: every rank reads its optimiser partition (and the module) from `folder`."""
        if self.engine is None:
            return
        if not (folder / "zero").is_dir():
            raise ConfigError(
                f"checkpoint {folder} has no ZeRO optimiser shards; resume with the run.zero_stage "
                "it was written with"
            )
        self.engine.load_checkpoint(str(folder), tag="zero", load_module_strict=True)
