"""Data-parallel distillation with 2 CPU processes (gloo): gradient averaging, resume, ZeRO-2.

Each test launches real processes (torchrun or `accelerate launch`) running
tests/parallel_worker.py and compares them with a single-process reference computed here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ld3m.distill.loop import Distiller, build_experts
from ld3m.parallel import Parallel, first_host, slurm_env_to_torch
from ld3m.utils.seeding import stream
from tests.conftest import make_tiny_prior
from tests.parallel_worker import worker_cfg
from tests.test_distill import tiny_experts, toy_data

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, out: Path, objective: str, space: str, zero: int, experts: str,
           mode: str) -> None:  # fmt: skip
    """Run tests/parallel_worker.py on 2 processes; fail with its output if it fails."""
    port = str(free_port())
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", port]  # fmt: skip
    else:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
        assert accelerate, "accelerate's launcher is not installed next to this Python"
        head = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", port]  # fmt: skip
    args = [str(out), objective, space, str(zero), experts, mode]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run([*head, "-m", "tests.parallel_worker", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (out / "world.txt").read_text().split() == ["2", str(zero)]


def single_rank(tmp: Path, objective: str, space: str, experts: str, rank: int) -> Distiller:
    """A one-process Distiller that draws rank `rank`'s streams, with its local gradient."""
    cfg = worker_cfg(tmp / f"ref{rank}", objective, space, experts, "distill.iterations=1")
    sampler = build_experts(cfg, rank, 2) if objective == "mtt" else None
    prior = make_tiny_prior() if space == "latent" else None
    d = Distiller(cfg, toy_data(), prior, sampler, Parallel(rank=rank, world=1))
    d.optimizer.zero_grad()
    d.compute_grads(stream(cfg.distill.seed, 0, rank, 2), d.noise(0))
    return d


def grads_of(d: Distiller) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in d.synset.named_parameters() if p.grad is not None}


def expected_step(tmp: Path, objective: str, space: str, experts: str):
    """(mean of the two single-rank gradients, synthetic set after one step with it)."""
    d0, d1 = (single_rank(tmp, objective, space, experts, r) for r in (0, 1))
    g0, g1 = grads_of(d0), grads_of(d1)
    assert any(not torch.allclose(g0[k], g1[k]) for k in g0)  # the ranks really differ
    mean = {k: (g0[k] + g1[k]) / 2 for k in g0}
    for name, p in d0.synset.named_parameters():
        if name in mean:
            p.grad = mean[name].clone()
    d0.optimizer.step()
    d0.keep_lr_positive()
    return mean, d0.synset.state_dict()


def assert_states_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("experts")
    return str(tiny_experts(root, toy_data()))


@pytest.mark.parametrize(("objective", "space"), [("mtt", "pixel"), ("dm", "latent")])
def test_two_ranks_step_with_the_mean_gradient(tmp_path: Path, experts: str, objective: str,
                                               space: str) -> None:  # fmt: skip
    exp = experts if objective == "mtt" else ""
    launch("torchrun", tmp_path, objective, space, 0, exp, "step")
    mean, after = expected_step(tmp_path, objective, space, exp)
    ranks = [torch.load(tmp_path / f"one_rank{r}.pt") for r in (0, 1)]
    for got in ranks:
        assert_states_close(got["grads"], mean)
        assert_states_close(got["state"], after)


def test_two_ranks_resume_like_an_uninterrupted_run(tmp_path: Path, experts: str) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    launch("torchrun", full, "mtt", "pixel", 0, experts, "run:4")
    launch("torchrun", part, "mtt", "pixel", 0, experts, "run:2")
    launch("torchrun", part, "mtt", "pixel", 0, experts, "run:4")
    states = [torch.load(d / f"run_rank{r}.pt") for d in (full, part) for r in (0, 1)]
    assert [s["step"] for s in states] == [4, 4, 4, 4]
    for s in states[1:]:
        assert_states_close(s["state"], states[0]["state"], atol=0)


def test_zero2_under_accelerate_launch_matches_and_resumes(tmp_path: Path, experts: str) -> None:
    one, full, part = tmp_path / "one", tmp_path / "full", tmp_path / "part"
    launch("accelerate", one, "mtt", "pixel", 2, experts, "step")
    _, after = expected_step(one, "mtt", "pixel", experts)
    for r in (0, 1):
        assert_states_close(torch.load(one / f"one_rank{r}.pt")["state"], after)
    launch("accelerate", full, "mtt", "pixel", 2, experts, "run:4")
    launch("accelerate", part, "mtt", "pixel", 2, experts, "run:2")
    assert (part / "run" / "run" / "ckpt" / "step_00000002" / "zero").is_dir()  # optimiser shards
    launch("accelerate", part, "mtt", "pixel", 2, experts, "run:4")
    states = [torch.load(d / f"run_rank{r}.pt") for d in (full, part) for r in (0, 1)]
    for s in states[1:]:
        assert_states_close(s["state"], states[0]["state"])


def test_srun_environment_becomes_torch_environment(monkeypatch) -> None:
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "123456"}  # fmt: skip
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the plain parser is used
    slurm_env_to_torch(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert (env["LOCAL_WORLD_SIZE"], env["MASTER_ADDR"]) == ("2", "gpu07")
    assert env["MASTER_PORT"] == str(29500 + 123456 % 10000)
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}
    slurm_env_to_torch(torchrun)  # a launcher already set the rank: left alone
    assert (torchrun["RANK"], torchrun["WORLD_SIZE"]) == ("0", "2")
    assert "RANK" not in os.environ


@pytest.mark.parametrize(("nodes", "first"), [("n1", "n1"), ("a[3,5-7],b1", "a3"),
                                              ("c-[10-12]", "c-10")])  # fmt: skip
def test_first_host_of_a_node_list(monkeypatch, nodes: str, first: str) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert first_host(nodes) == first
