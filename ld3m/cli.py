"""The `ld3m` command: parse arguments, build the config, dispatch. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ld3m.config.io import load_config, save_config
from ld3m.config.schema import Config
from ld3m.errors import Ld3mError
from ld3m.utils.threads import configure_threads

log = logging.getLogger("ld3m")


def build_config(args: argparse.Namespace) -> Config:
    """Config from --config (a path or a preset name) and the positional overrides."""
    cfg = load_config(args.config, args.overrides)
    configure_threads(cfg.run.threads)
    return cfg


def cmd_baseline(args: argparse.Namespace) -> None:
    """Write a random-real synthetic set into the run directory."""
    from ld3m.artifacts import save_set
    from ld3m.baseline import random_real_set
    from ld3m.data.datasets import load_dataset
    from ld3m.paths import RunPaths

    cfg = build_config(args)
    paths = RunPaths(Path(cfg.run.out_dir))
    save_config(cfg, paths.config)
    synset = random_real_set(load_dataset(cfg.data), cfg.baseline.ipc, cfg.baseline.seed)
    out = save_set(paths.baseline_set(cfg.baseline.ipc), synset)
    print(out)


def cmd_eval(args: argparse.Namespace) -> None:
    """Train fresh networks on a synthetic set and print mean +- std per architecture."""
    from ld3m.evaluate.harness import eval_config, evaluate_set, format_summary, summarize
    from ld3m.paths import run_of_artifact

    cfg = build_config(args)
    set_path = Path(args.set)
    out = Path(args.out) if args.out else run_of_artifact(set_path).eval_jsonl
    records = evaluate_set(set_path, cfg.data, eval_config(cfg), out, cfg.run.progress)
    print(format_summary(summarize(records), cfg.eval.distill_arch))
    print(f"records: {out}")


def cmd_quickstart(args: argparse.Namespace) -> None:
    """Offline default study: the shipped `quickstart` sweep on MNIST-5k, then its table."""
    from ld3m.hpc.study import run_study

    print(run_study("quickstart", args.executor, args.overrides))


def cmd_experts(args: argparse.Namespace) -> None:
    """Train (a shard of) the expert trajectories."""
    from ld3m.experts.train import experts_main

    experts_main(build_config(args), args.shard)


def cmd_hello(args: argparse.Namespace) -> None:
    """Train HeLlO's CLIP label projector into run.out_dir/projector/."""
    from ld3m.data.datasets import load_dataset
    from ld3m.evaluate.hello import train_projector

    cfg = build_config(args)
    out = Path(cfg.run.out_dir) / "projector"
    print(train_projector(cfg, load_dataset(cfg.data), out))
    print(f"evaluate with it: eval.labels=projector eval.projector={out}")


def cmd_distill(args: argparse.Namespace) -> None:
    """Distil a synthetic set; resumes from the run directory's newest checkpoint."""
    from ld3m.distill.loop import run_distillation

    print(run_distillation(build_config(args), resume=not args.no_resume))


def cmd_prior_train(args: argparse.Namespace) -> None:
    """Train a small class-conditional latent diffusion prior."""
    from ld3m.prior.train import train_prior

    path = train_prior(build_config(args), resume=not args.no_resume)
    if path is not None:
        print(path)


def cmd_prior_convert(args: argparse.Namespace) -> None:
    """Convert the CompVis cin256-v2 checkpoint to a prior directory."""
    from ld3m.prior.convert import convert_main

    convert_main(args)


def cmd_sweep(args: argparse.Namespace) -> None:
    """Expand a sweep file and submit its stages (experts -> distill -> eval)."""
    from ld3m.hpc.submit import submit_sweep

    root = submit_sweep(args.sweep, args.executor, args.overrides, wait=args.wait)
    print(root)


def cmd_status(args: argparse.Namespace) -> None:
    """One line per run of a sweep: state, step, latest loss, latest eval accuracy."""
    from ld3m.hpc.status import format_status, sweep_status

    print(format_status(sweep_status(Path(args.sweep_dir))))


def cmd_render_sbatch(args: argparse.Namespace) -> None:
    """Print (or write) a filled sbatch script from slurm/."""
    from ld3m.hpc.sbatch import RenderRequest, render_sbatch

    req = RenderRequest(args.template, args.config, tuple(args.overrides), args.launcher,
                        args.set, args.shards)  # fmt: skip
    text = render_sbatch(req)
    if args.output:
        Path(args.output).write_text(text)
        print(args.output)
    else:
        print(text, end="")


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("template", choices=["distill", "experts", "eval"], help="slurm/<name>.sbatch")
    p.add_argument("-o", "--output", help="write the script here (default: print it)")
    p.add_argument("--launcher", default="torchrun", choices=["torchrun", "accelerate"],
                   help="distill: the per-node launcher")  # fmt: skip
    p.add_argument("--set", help="eval: the synthetic set (default: the run's final set)")
    p.add_argument("--shards", type=int, default=0, help="experts: array size (default: "
                   "min(experts.num, slurm.array_parallelism))")  # fmt: skip
    p.add_argument("--config", help="YAML config file or preset name")
    p.add_argument("overrides", nargs="*", help="dotted overrides; slurm.<key>=value sets "
                   "Slurm options (slurm.partition=gpu slurm.gpus_per_node=4 ...)")  # fmt: skip


def cmd_table(args: argparse.Namespace) -> None:
    """Result tables (Markdown, CSV, LaTeX) and plots of sweeps or runs."""
    from ld3m.report.tables import report

    out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
    written = report([Path(p) for p in args.paths], out)
    if not written:
        print("no evaluation records or metrics found under " + " ".join(args.paths))
    md = out / "results.md"
    if md.is_file():
        print(md.read_text(), end="")
    for path in written:
        print(path)


def add_table_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="sweep directories or run directories")
    p.add_argument("--out", help="output folder (default: <first path>/report)")


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep YAML file (see sweeps/) or a shipped sweep's name")
    add_executor_argument(p, default="slurm")
    p.add_argument("--wait", action="store_true", help="slurm: return when every job ended")
    p.add_argument("overrides", nargs="*", help="dotted overrides added to every run")


def add_executor_argument(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--executor",
        default=default,
        choices=["auto", "slurm", "local", "debug"][0 if default == "auto" else 1 :],
        help="slurm: queue job arrays; local: run here in worker processes, stage by stage; "
        "debug: run in this process"
        + ("; auto: slurm when sbatch works, else local" if default == "auto" else ""),
    )


def add_quickstart_arguments(p: argparse.ArgumentParser) -> None:
    add_executor_argument(p, default="auto")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.epochs=50")


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", help="sweep directory (holds manifest.json)")


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--config and dotted overrides, shared by every config-driven command."""
    p.add_argument("--config", help="YAML config file or preset name (e.g. quickstart)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.epochs=300")


def add_resume_argument(p: argparse.ArgumentParser) -> None:
    """--no-resume for resumable stages."""
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start over, deleting this run's checkpoints (default: resume from the newest)",
    )


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("set", help="synthetic-set .safetensors file")
    p.add_argument("--out", help="eval.jsonl to append to (default: the set's run dir)")
    add_config_arguments(p)


def add_experts_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="train shard I of N, i.e. experts I, I+N, ... (default 0/1: all); on a Slurm array: "
        "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT",
    )
    add_config_arguments(p)


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    add_resume_argument(p)
    add_config_arguments(p)


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="CompVis cin256-v2 model.ckpt (.ckpt, .pt or .safetensors)")
    p.add_argument("out", help="prior directory to write (e.g. priors/cin256-v2)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle arbitrary objects (torch.load weights_only=False); only for trusted files",
    )


Command = tuple[
    Callable[[argparse.Namespace], None], Callable[[argparse.ArgumentParser], None], str
]

COMMANDS: dict[str, Command] = {
    "baseline": (cmd_baseline, add_config_arguments, "write a random-real synthetic set"),
    "eval": (cmd_eval, add_eval_arguments, "evaluate a synthetic set across architectures"),
    "experts": (cmd_experts, add_experts_arguments, "train expert trajectories (or one shard)"),
    "distill": (cmd_distill, add_distill_arguments, "distil a synthetic set (resumable)"),
    "quickstart": (
        cmd_quickstart,
        add_quickstart_arguments,
        "the offline default study on MNIST-5k, end to end",
    ),
    "hello": (cmd_hello, add_config_arguments, "train HeLlO's CLIP label projector (hello.*)"),
    "sweep": (cmd_sweep, add_sweep_arguments, "submit a sweep: experts -> distill -> eval arrays"),
    "status": (cmd_status, add_status_arguments, "one line per run of a sweep"),
    "render-sbatch": (cmd_render_sbatch, add_render_arguments, "fill a slurm/ sbatch template"),
    "table": (cmd_table, add_table_arguments, "result tables and plots of sweeps or runs"),
}
PRIOR_COMMANDS: dict[str, Command] = {
    "train": (cmd_prior_train, add_distill_arguments, "train a small class-conditional prior"),
    "convert": (cmd_prior_convert, add_convert_arguments, "CompVis cin256-v2 checkpoint -> prior"),
}


def add_commands(sub: argparse._SubParsersAction, commands: dict[str, Command]) -> None:
    for name, (run, add_arguments, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)


def make_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per stage."""
    parser = argparse.ArgumentParser(
        prog="ld3m", description="ld3m: latent dataset distillation with diffusion models (LD3M)."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for ld3m errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub, COMMANDS)
    prior = sub.add_parser("prior", help="latent diffusion priors: train or convert")
    add_commands(prior.add_subparsers(dest="prior_command", required=True), PRIOR_COMMANDS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ld3m` console script."""
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`eval SET --config c eval.epochs=3`): argparse leaves them over.
    if extra and hasattr(args, "overrides") and all("=" in a and a[0] != "-" for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.run(args)
    except Ld3mError as exc:
        if args.debug:
            raise
        print(f"ld3m: error: {exc}", file=sys.stderr)
        return 2
    return 0
