"""Peak memory of MTT's image gradient: TESLA's estimator vs the full unroll, against syn_steps.

Each configuration runs in a fresh subprocess: random CIFAR-shaped synthetic images (IPC x
classes, 3 x res x res), a random-walk expert trajectory for the ConvNet of that shape, one
`image_grad` call. Peak = VmHWM after the call minus VmRSS before it (the peak is reset
through /proc/self/clear_refs just before the call where the kernel allows it). The table
also gives TESLA's bookkeeping, the N stored parameter vectors theta_i and (as in TESLA's
code, not needed here because the DSA draws are replayed from a seed) the N augmented
minibatches: N * (P + batch * C * H * W) * 4 bytes. Goal: TESLA's growth from the fewest
to the most steps is no more than the bookkeeping's growth (activation memory flat), while
the full unroll grows linearly.

    .venv/bin/python benchmarks/mtt_memory.py --steps 10 20 40

The children run with MALLOC_MMAP_THRESHOLD_=131072 by default (`--allocator default` turns
it off): glibc's dynamic threshold otherwise keeps the freed ~10 MiB activation blocks in the
heap, whose fragmentation creeps up with the number of alloc/free cycles (i.e. with N) and
blurs the comparison; the fixed threshold returns them to the OS on free.

Defaults: ConvNetD3, 32 px, 10 classes, IPC 10, synthetic minibatch 20 (the whole set of 100
costs ~4 s per student step on 2 busy cores and ~300 MiB per step unrolled), 1 torch thread
(several threads on an oversubscribed machine were 10-20x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ld3m.config.schema import DistillConfig, MTTConfig
from ld3m.distill.objectives import build_objective
from ld3m.distill.objectives.base import seeded_network
from ld3m.models.functional import flatten_params

MIB = 2**20


def proc_status_kib(key: str) -> int:
    """A `kB` field (VmRSS, VmHWM) of /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (this benchmark needs Linux)")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def fake_experts(arch: str, classes: int, res: int, epochs: int) -> SimpleNamespace:
    """An object with `next()` giving a random-walk trajectory [epochs + 1, P] for `arch`."""
    net = seeded_network(arch, 3, classes, res, seed=0)
    g = torch.Generator().manual_seed(1)
    theta = flatten_params(net)
    steps = 1e-3 * torch.randn(epochs, theta.numel(), generator=g)
    snapshots = torch.cat([theta[None], theta + steps.cumsum(0)])
    traj = SimpleNamespace(snapshots=snapshots)
    return SimpleNamespace(next=lambda: traj, num_params=theta.numel())


def child(args: argparse.Namespace) -> None:
    """Measure one configuration and print it as one JSON line."""
    torch.set_num_threads(args.threads)
    mtt = MTTConfig(syn_steps=args.n, expert_epochs=2, max_start_epoch=1, batch_syn=args.batch_syn)
    cfg = DistillConfig(objective="mtt", arch=args.arch, ipc=args.ipc, dsa=True, mtt=mtt)
    experts = fake_experts(args.arch, args.classes, args.res, epochs=2)
    obj = build_objective(cfg, None, args.classes, 3, args.res, experts, estimator=args.form)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.classes * args.ipc, 3, args.res, args.res, generator=g)
    labels = torch.arange(args.classes).repeat_interleave(args.ipc)
    syn_lr = torch.tensor(0.01)
    reset = reset_peak()
    before = proc_status_kib("VmRSS")
    start = time.perf_counter()
    out = obj.image_grad(images, labels, syn_lr, torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    peak = proc_status_kib("VmHWM") - before
    record = {"form": args.form, "n": args.n, "peak_kib": peak, "seconds": seconds}
    record.update(params=experts.num_params, reset=reset, loss=out.loss)
    print(json.dumps(record))


def child_env(allocator: str) -> dict[str, str]:
    """Environment of a measurement: glibc's default malloc, or a fixed 128 KiB mmap threshold."""
    env = dict(os.environ)
    if allocator == "fixed-mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    return env


def run_child(argv: list[str], form: str, n: int, allocator: str) -> dict:
    """Run one configuration in a fresh interpreter; its JSON record."""
    cmd = [sys.executable, __file__, *argv, "--child", form, str(n)]
    env = child_env(allocator)
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bookkeeping_mib(n: int, params: int, args: argparse.Namespace) -> float:
    """N * (P + batch * C * H * W) * 4 bytes, in MiB."""
    batch = args.batch_syn or args.classes * args.ipc
    return n * (params + batch * 3 * args.res * args.res) * 4 / MIB


def report(rows: list[dict], args: argparse.Namespace) -> None:
    """Print the table and TESLA's growth beside its bookkeeping's growth."""
    print(f"allocator: {args.allocator}; batch_syn {args.batch_syn or 'all'}; "
          f"P = {rows[0]['params']}")  # fmt: skip
    print(f"{'form':>7} {'N':>4} {'peak MiB':>9} {'seconds':>8} {'bookkeeping MiB':>16} "
          f"{'theta_i only MiB':>17}")  # fmt: skip
    for r in rows:
        book = bookkeeping_mib(r["n"], r["params"], args)
        thetas = r["n"] * r["params"] * 4 / MIB
        print(f"{r['form']:>7} {r['n']:>4} {r['peak_kib'] / 1024:9.1f} {r['seconds']:8.1f} "
              f"{book:16.1f} {thetas:17.1f}")  # fmt: skip
    for form in args.forms:
        own = sorted((r for r in rows if r["form"] == form), key=lambda r: r["n"])
        lo, hi = own[0], own[-1]
        growth = (hi["peak_kib"] - lo["peak_kib"]) / 1024
        book = bookkeeping_mib(hi["n"], hi["params"], args)
        book -= bookkeeping_mib(lo["n"], lo["params"], args)
        print(f"{form}: growth N={lo['n']}->{hi['n']}: {growth:.1f} MiB "
              f"(bookkeeping growth {book:.1f} MiB)")  # fmt: skip


def parse(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--forms", nargs="+", default=["tesla", "unroll"])
    p.add_argument("--arch", default="ConvNetD3")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-syn", type=int, default=20, help="0 = the whole synthetic set")
    p.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    p.add_argument(
        "--allocator",
        choices=["fixed-mmap", "default"],
        default="fixed-mmap",
        help="fixed-mmap: MALLOC_MMAP_THRESHOLD_=131072, so freed activations leave the process "
        "and VmHWM follows live memory; default: glibc's dynamic threshold (heap fragmentation)",
    )
    p.add_argument("--child", nargs=2, metavar=("FORM", "N"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    """Run every (form, N) in its own process and print the table."""
    args = parse(argv)
    if args.child:
        args.form, args.n = args.child[0], int(args.child[1])
        child(args)
        return
    rows = [run_child(argv, form, n, args.allocator) for form in args.forms for n in args.steps]
    report(rows, args)


if __name__ == "__main__":
    main(sys.argv[1:])
