"""One rank of a multi-process distillation test (launched by torchrun or accelerate launch).

    python -m tests.parallel_worker OUT OBJECTIVE SPACE ZERO_STAGE EXPERTS_DIR MODE

MODE `step`: one iteration in OUT/one; writes OUT/one_rank{r}.pt with the averaged gradients
(plain data parallelism) and the synthetic set after the step. MODE `run:N`: distil to N
iterations in OUT/run (resuming from its checkpoints); writes OUT/run_rank{r}.pt with the final
synthetic set. Rank 0 also writes OUT/world.txt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ld3m.distill.loop import Distiller, build_experts
from ld3m.parallel import setup_parallel
from ld3m.tracking import NullTracker
from ld3m.utils.seeding import stream
from tests.conftest import make_tiny_prior
from tests.test_distill import make_cfg, toy_data


def worker_cfg(out: Path, objective: str, space: str, experts: str, *extra: str):
    """The configuration both the workers and the single-process reference use."""
    overrides = [f"distill.objective={objective}", f"distill.space={space}",
                 "distill.mtt.syn_steps=2", "distill.mtt.expert_epochs=1",
                 "distill.mtt.max_start_epoch=2", *extra]  # fmt: skip
    if experts:
        overrides.append(f"experts.dir={experts}")
    return make_cfg(out, *overrides)


def main(argv: list[str]) -> None:
    out, objective, space, zero, experts, mode = argv
    out = Path(out)
    torch.set_num_threads(1)
    par = setup_parallel(int(zero))
    data = toy_data()
    prior = make_tiny_prior() if space == "latent" else None
    if mode == "step":
        cfg = worker_cfg(out / "one", objective, space, experts, "distill.iterations=1")
    else:
        n = int(mode.split(":")[1])
        cfg = worker_cfg(out / "run", objective, space, experts, f"distill.iterations={n}")
    sampler = build_experts(cfg, par.rank, par.world) if objective == "mtt" else None
    d = Distiller(cfg, data, prior, sampler, par)
    if par.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "world.txt").write_text(f"{par.world} {par.zero_stage}\n")
    if mode == "step":
        d.optimizer.zero_grad()
        loss = d.compute_grads(stream(cfg.distill.seed, 0, par.rank, 2), d.noise(0))
        report = d.average(loss)
        grads = {n: p.grad.clone() for n, p in d.synset.named_parameters() if p.grad is not None}
        d.optimizer.step()
        d.keep_lr_positive()
        state = {k: v.clone() for k, v in d.synset.state_dict().items()}
        torch.save({"grads": grads, "loss": report.loss, "state": state},
                   out / f"one_rank{par.rank}.pt")  # fmt: skip
    else:
        d.run(NullTracker())
        state = {k: v.clone() for k, v in d.synset.state_dict().items()}
        torch.save({"state": state, "step": d.state.step}, out / f"run_rank{par.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
