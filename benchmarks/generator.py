"""Time and memory of the generator's backward schemes, side by side, in one run.

For each prior size (`tiny`: the 16 px test prior; `cin256`: a randomly initialised cin256-v2
shaped prior, ~400M UNet parameters, at `--res` px) every option (scheme x checkpointing) runs in
a fresh subprocess: build the prior, then `--warmup` + `--repeats` iterations of generate + loss
+ backward into Z and c. Reported: median seconds per iteration, its speed ratio against the
released scheme (two_phase + checkpointing, chunk min(10, N)), peak memory above the state after
model load (CPU: VmHWM - VmRSS of /proc/self/status; GPU: torch.cuda.max_memory_allocated), the
memory `predict_memory` expected, the max relative difference of dZ and dc to the released
run, and the option `choose_scheme` picks. On a busy CPU use `--threads 1`.

    .venv/bin/python benchmarks/generator.py --sizes tiny cin256 --n 4 --steps 10 --chunk 2
    .venv/bin/python benchmarks/generator.py --sizes cin256 --device cuda --bf16 --n 20 --chunk 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ld3m.config.schema import GeneratorConfig
from ld3m.generator import LD3MGenerator, choose_scheme, draw_noise, generate_and_backward
from ld3m.generator.backward import COST, option_name, predict_memory
from ld3m.prior.architectures import (
    CIN256_UNET,
    CIN256_VQ,
    build_unet,
    build_vq,
    cin256_spec,
    unet_config,
    vq_config,
)
from ld3m.prior.layout import PriorSpec
from ld3m.prior.model import Prior, freeze

MEAN, STD = (0.4377, 0.4438, 0.4728), (0.229, 0.224, 0.225)
MB = 2**20


def build_prior(size: str) -> Prior:
    """A random prior: `tiny` (as tests/conftest.py) or `cin256` (cin256-v2 shapes)."""
    torch.manual_seed(0)
    if size == "cin256":
        vae, unet = build_vq(CIN256_VQ), build_unet(CIN256_UNET)
        return freeze(Prior(cin256_spec("random"), vae, unet, torch.randn(1001, 512)))
    vae = build_vq(vq_config((8, 8, 16), 3, 16, 16, layers_per_block=1, norm_num_groups=4))
    unet = build_unet(
        unet_config((8, 16), (False, True), 8, 3, 4, layers_per_block=1, norm_num_groups=4)
    )
    spec = PriorSpec(
        num_classes=3, null_class=3, image_size=16, channels=3, latent_channels=3,
        latent_size=4, autoencoder="vq", source="random tiny",
    )  # fmt: skip
    return freeze(Prior(spec, vae, unet, torch.randn(4, 8)))


def memory_now(device: str) -> tuple[int, int]:
    """(current, peak) bytes: RSS and VmHWM on CPU, allocated and max allocated on CUDA."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def setup(args: argparse.Namespace) -> tuple[LD3MGenerator, tuple[torch.Tensor, ...]]:
    """Generator and (latents, context, noise) of the benchmark, on args.device."""
    prior = build_prior(args.size).to(args.device)
    res = 16 if args.size == "tiny" else args.res
    cfg = GeneratorConfig(steps=args.steps, guidance=3.0, chunk=args.chunk, bf16=args.bf16)
    generator = LD3MGenerator(prior, cfg, res, MEAN, STD)
    shape = (args.n, *generator.latent_shape)
    latents = draw_noise(shape, 0, device=args.device).requires_grad_()
    classes = torch.arange(args.n, device=args.device) % prior.spec.num_classes
    context = prior.embed(classes).detach().clone().requires_grad_()
    return generator, (latents, context, draw_noise(shape, 1, device=args.device))


def loss_fn(images: torch.Tensor) -> torch.Tensor:
    """A fixed random projection plus the mean square."""
    weights = draw_noise(images.shape, 2, images.dtype, str(images.device))
    return (weights * images).mean() + (images**2).mean()


def unet_call_seconds(generator: LD3MGenerator, inputs: tuple[torch.Tensor, ...]) -> float:
    """Seconds of one guided UNet call on one chunk, without gradients."""
    z, c = inputs[0][: generator.cfg.chunk].detach(), inputs[1][: generator.cfg.chunk].detach()
    with torch.no_grad():
        generator.eps(z, generator.schedule[0].t, c)
        start = time.perf_counter()
        generator.eps(z, generator.schedule[0].t, c)
        sync(generator)
        return time.perf_counter() - start


def sync(generator: LD3MGenerator) -> None:
    """Wait for the GPU, if any."""
    if next(generator.prior.unet.parameters()).is_cuda:
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    """One option in this process: time it, measure its peak, save gradients and a JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    generator, (latents, context, noise) = setup(args)
    result: dict = {"unet_call_s": unet_call_seconds(generator, (latents, context, noise))}
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base, _ = memory_now(args.device)
    times = []
    for i in range(args.warmup + args.repeats):
        latents.grad = context.grad = None
        start = time.perf_counter()
        generate_and_backward(
            generator, latents, context, noise, loss_fn, args.scheme, args.ckpt, args.chunk
        )
        sync(generator)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    _, peak = memory_now(args.device)
    result.update(seconds=statistics.median(times), peak=peak - base)
    result["predicted"] = predict_memory(generator, args.n)[(args.scheme, args.ckpt)]
    if args.predict:
        scheme, ckpt, reason = choose_scheme(generator, args.n, int(args.budget_gb * 1e9))
        result["pick"] = f"{option_name((scheme, ckpt))}  ({reason})"
    torch.save({"z": latents.grad.cpu(), "c": context.grad.cpu()}, args.out + ".pt")
    Path(args.out + ".json").write_text(json.dumps(result))


def run_option(
    args: argparse.Namespace, size: str, option: tuple, tmp: Path, predict: bool
) -> dict:
    """Run one option in a fresh subprocess; its result dict with the gradients."""
    scheme, ckpt, chunk = option
    out = tmp / f"{size}-{scheme}-{int(ckpt)}-{chunk}"
    command = [
        sys.executable, __file__, "--worker", "--size", size, "--scheme", scheme,
        "--chunk", str(chunk), "--out", str(out), *(["--ckpt"] if ckpt else []),
        *(["--predict"] if predict else []), *passthrough(args),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        why = "killed (out of memory)" if done.returncode in (-9, 137) else f"rc {done.returncode}"
        print(f"worker {option} failed: {why}\n{done.stderr[-2000:]}", flush=True)
        return {"failed": why}
    result = json.loads(Path(f"{out}.json").read_text())
    return result | {"grads": torch.load(f"{out}.pt")}


def passthrough(args: argparse.Namespace) -> list[str]:
    """The flags every worker shares with the parent."""
    flags = ["--n", args.n, "--steps", args.steps, "--res", args.res, "--device", args.device]
    flags += ["--threads", args.threads, "--warmup", args.warmup, "--repeats", args.repeats]
    flags += ["--budget-gb", args.budget_gb, *(["--bf16"] if args.bf16 else [])]
    return [str(f) for f in flags]


def rel_diff(grads: dict, reference: dict) -> str:
    """Max |g - g_ref| / max |g_ref| for Z and c."""
    out = []
    for key in ("z", "c"):
        scale = reference[key].abs().max().clamp_min(1e-30)
        out.append(f"{float((grads[key] - reference[key]).abs().max() / scale):.1e}")
    return "/".join(out)


def bench_size(args: argparse.Namespace, size: str, tmp: Path) -> None:
    """All options of one size, then the table."""
    released = ("two_phase", True, min(10, args.n))
    options = [released] + [(s, c, args.chunk) for s, c in COST if (s, c, args.chunk) != released]
    results = {}
    for i, option in enumerate(options):
        results[option] = run_option(args, size, option, tmp, predict=i == 0)
        if i == 0:
            r = results[option]
            print(f"[{size}] one guided UNet call on {option[2]} images {r['unet_call_s']:.3f} s;"
                  f" released iteration {r['seconds']:.2f} s", flush=True)  # fmt: skip
    ref = results[released]
    print(f"\n{size}: N={args.n} T={args.steps} device={args.device} bf16={args.bf16}")
    print(f"{'option':<28}{'chunk':>6}{'cost':>5}{'s/iter':>9}{'speed':>7}"
          f"{'peak MB':>10}{'pred MB':>10}  max rel diff dZ/dc")  # fmt: skip
    for (scheme, ckpt, chunk), r in results.items():
        if "failed" in r:
            name = option_name((scheme, ckpt))
            print(f"{name:<28}{chunk:>6}{COST[(scheme, ckpt)]:>5}  {r['failed']}")
            continue
        print(f"{option_name((scheme, ckpt)):<28}{chunk:>6}{COST[(scheme, ckpt)]:>5}"
              f"{r['seconds']:>9.3f}{ref['seconds'] / r['seconds']:>6.2f}x{r['peak'] / MB:>10.1f}"
              f"{r['predicted'] / MB:>10.1f}  {rel_diff(r['grads'], ref['grads'])}")  # fmt: skip
    pick = next((r["pick"] for r in results.values() if "pick" in r), "unknown (worker failed)")
    print(f"choose_scheme (chunk {args.chunk}) picks: {pick}\n", flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (workers get the parent's plus --worker and their option)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "cin256"], choices=["tiny", "cin256"])
    p.add_argument("--n", type=int, default=4, help="images")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps T")
    p.add_argument("--chunk", type=int, default=2, help="images per generator call")
    p.add_argument("--res", type=int, default=128, help="cin256 image size (latent = res/4)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (cuda only)")
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0 = default")
    p.add_argument("--warmup", type=int, default=0, help="untimed iterations per option")
    p.add_argument("--repeats", type=int, default=1, help="timed iterations per option")
    p.add_argument("--budget-gb", type=float, default=0.0, help="choose_scheme budget, 0 = auto")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--scheme", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--predict", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            bench_size(args, size, Path(tmp))


if __name__ == "__main__":
    main()
