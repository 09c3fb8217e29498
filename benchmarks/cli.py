"""`pm-bench`: one command for the project's benchmark records (benchmarks/README.md)."""

from __future__ import annotations

import pathlib
import shlex
import sys

import click

if __package__:  # pm_bench.cli (the pm-bench console script)
    from . import bench_gpu, bench_run
else:  # imported by a script: python benchmarks/bench_run.py / bench_gpu.py
    import bench_gpu
    import bench_run

HELP = """Benchmark records: every figure a JSON line with the commit, device, driver and library
versions, settings, p20/p50/p80 and the peer measured in the same run, appended to --out.
Nothing here asserts a time: benchmarks are records, not tests.

\b
  pm-bench [OPTIONS]              CPU: pm-run's onnxruntime backend vs diffusers' PyTorch
                                  pipeline on the same model, latents and scheduler, each
                                  variant in its own process (schema pm-bench-run/1)
  pm-bench --gpu [OPTIONS]        one GPU, one process, SD-1.5-shaped random weights, fp16,
                                  512 px, UNet batch 2: diffusers eager, diffusers in a CUDA
                                  graph, torch.compile (--compile, ~1 min more), the text
                                  encoder, the VAE decoder, a whole image, and our backends
                                  (bench_gpu.OURS); prints ratios against the peers
                                  (schema pm-bench-gpu/1; 172 s with --compile on an H200)
  pm-bench --kernels [OPTIONS]    pm_kernels vs PyTorch at SD 1.5's shapes (its own options:
                                  pm-bench --kernels --help)
  pm-bench --train [OPTIONS]      the training step vs the published way (pm-bench --train --help)

\b
  pm-bench --model tiny --steps 10 --runs 3                    # seconds
  pm-bench --model sd15 --resolution 256 --out run-cpu.jsonl   # many minutes (exports a bundle)
  pm-bench --gpu --compile                                     # on a CUDA machine
  pm-bench --gpu --device cpu --model tiny --steps 3 --reps 3  # the GPU code path on the CPU

Options marked [CPU] belong to the default mode, [GPU] to --gpu; the others to both (their
defaults differ: CPU tiny, 256 px, 10 steps, 1 warm-up image; GPU sd15, 512 px (tiny 64),
50 steps, 3 warm-up calls). The random model (and the bundle) is built once into --cache
([CPU]) or --work ([GPU]) and reused. A variant that fails is recorded with status "error" and
the run goes on; the exit status is then 1. Errors of the command line are one line.
"""

PASSTHROUGH = {"--kernels": "bench_kernels", "--train": "bench_train"}  # argparse scripts with their own options
CPU_ONLY = ("seed", "threads", "variants", "cache", "prepare_only", "wait_quiet", "max_other_frac", "retries")
GPU_ONLY = ("device", "reps", "compile_", "only", "ours", "work")


def _names(text: str | None, allowed, option: str) -> tuple[str, ...]:
    names = tuple(n for n in (text or "").replace(",", " ").split() if n)
    bad = [n for n in names if allowed is not None and n not in allowed]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)} (choose from {', '.join(allowed)})", param_hint=option)
    return names


@click.command("pm-bench", help=HELP,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--gpu", is_flag=True, help="Run the GPU benchmark instead of the CPU one.")
@click.option("--model", type=click.Choice(["tiny", "sd15"]), default=None,
              help="tiny: pm_runtime's tiny random model; sd15: SD 1.5's shapes, random weights. "
                   "[default: CPU tiny, GPU sd15]")
@click.option("--resolution", type=click.IntRange(8), default=None, help="Image side in px. [default: 256 / 512]")
@click.option("--steps", type=click.IntRange(1), default=None, help="Denoising steps per image. [default: 10 / 50]")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="Timed images per variant.")
@click.option("--warmup", type=click.IntRange(0), default=None,
              help="Untimed warm-up: images [CPU, default 1], calls before each timed series [GPU, default 3].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
              help="JSON-lines file to append to. [default: benchmarks/results/run-cpu.jsonl, "
                   "gpu-<device>.jsonl; ./pm-bench-results/ when installed from a wheel]")
@click.option("--commit", default=None, envvar="PM_COMMIT",
              help="Record this commit (a copied tree without .git). [default: git rev-parse HEAD; env PM_COMMIT]")
@click.option("--seed", type=int, default=233, show_default=True, help="[CPU] Seed of the initial latents.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="[CPU] onnxruntime intra-op threads. [default: its own]")
@click.option("--variants", default=None, metavar="A,B",
              help=f"[CPU] Variants to run, comma-separated. [default: {','.join(bench_run.DEFAULT_VARIANTS)}; also: "
                   f"{','.join(v for v in bench_run.VARIANTS if v not in bench_run.DEFAULT_VARIANTS)}]")
@click.option("--cache", type=click.Path(file_okay=False, path_type=pathlib.Path),
              default=pathlib.Path("/tmp/pm-bench-run"), show_default=True,
              help="[CPU] Model, concept and bundle, built once and reused.")
@click.option("--prepare-only", is_flag=True, help="[CPU] Build the cached model and bundle, run nothing.")
@click.option("--wait-quiet", type=click.FloatRange(0), default=0.0,
              help="[CPU] Before each variant wait up to this many seconds for other processes to go idle.")
@click.option("--max-other-frac", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="[CPU] Re-measure a variant when other processes took more than this share of the CPUs.")
@click.option("--retries", type=click.IntRange(0), default=0, show_default=True,
              help="[CPU] How many times to re-measure a busy variant.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="[GPU] cpu: the same code on the CPU (use --model tiny; CUDA graph and compile are "
                   "skipped): a check of the plumbing, not a figure.")
@click.option("--reps", type=click.IntRange(1), default=30, show_default=True,
              help="[GPU] Timed calls per UNet step / text encoder / VAE variant (CUDA events).")
@click.option("--compile", "compile_", is_flag=True,
              help="[GPU] Also torch.compile(unet, mode='reduce-overhead'), run after the other peers "
                   "(~1 min to compile).")
@click.option("--only", type=click.Choice(["all", "peers", "ours"]), default="all", show_default=True,
              help="[GPU] Run only the diffusers peers or only our backends.")
@click.option("--ours", default=None, metavar="A,B",
              help="[GPU] Our backends (bench_gpu.OURS) or their variants to run, comma-separated, e.g. "
                   "torch-cuda,torch-cuda-no-kernels. [default: all]")
@click.option("--work", type=click.Path(file_okay=False, path_type=pathlib.Path),
              default=pathlib.Path("/tmp/pm-bench-gpu"), show_default=True,
              help="[GPU] Model folder and bundles, built once and reused.")
@click.pass_context
def bench(ctx, gpu, model, resolution, steps, runs, warmup, out, commit, seed, threads, variants, cache,
          prepare_only, wait_quiet, max_other_frac, retries, device, reps, compile_, only, ours, work):
    from pm_runtime.errors import UserError

    given = {p.name for p in ctx.command.params
             if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE}
    wrong = [n for n in (CPU_ONLY if gpu else GPU_ONLY) if n in given]
    if wrong:
        flags = " ".join("--" + n.replace("_", "-").rstrip("-") for n in wrong)
        raise click.UsageError(f"{flags}: {'not an option of --gpu' if gpu else 'needs --gpu'}")
    if resolution is not None and resolution % 8:
        raise click.BadParameter(f"{resolution} is not a multiple of 8 (the VAE's scale)", param_hint="--resolution")
    command = f"{ctx.info_name or 'pm-bench'} {shlex.join(sys.argv[1:] if ctx.obj is None else ctx.obj)}".strip()
    try:
        if gpu:
            o = bench_gpu.GpuOptions(device=device, model=model or "sd15", resolution=resolution,
                                     steps=steps or 50, reps=reps, warmup=3 if warmup is None else warmup, runs=runs,
                                     compile=compile_, only=only, ours=_names(ours, None, "--ours"), work=work,
                                     out=out, commit=commit)
            records = bench_gpu.run(o, command, log=lambda m: click.echo(m))
        else:
            o = bench_run.RunOptions(model=model or "tiny", resolution=resolution or 256, steps=steps or 10, runs=runs,
                                     warmup=1 if warmup is None else warmup, seed=seed, threads=threads,
                                     variants=_names(variants, bench_run.VARIANTS, "--variants") or bench_run.DEFAULT_VARIANTS,
                                     cache=cache, out=out, commit=commit, prepare_only=prepare_only,
                                     wait_quiet=wait_quiet, max_other_frac=max_other_frac, retries=retries)
            records = bench_run.run(o, command, log=lambda m: click.echo(m))
    except UserError as e:
        err = click.ClickException(str(e))
        err.exit_code = 2  # cannot run here (as pm-bench --kernels without CUDA)
        raise err from None
    except KeyboardInterrupt:
        click.echo("interrupted; the records of finished variants are in the --out file", err=True)
        sys.exit(130)
    sys.exit(1 if any(r.get("status") == "error" for r in records) else 0)


def _passthrough(flag: str, rest: list[str], prog: str) -> int:
    """--kernels / --train: their scripts' own argparse options."""
    import importlib

    name = PASSTHROUGH[flag]
    try:
        module = importlib.import_module(f".{name}", __package__) if __package__ else importlib.import_module(name)
    except ModuleNotFoundError as e:
        click.echo(f"{prog}: {e.name} is not installed (pip install 'personamagic-runtime[dev]'; GPU: the CUDA "
                   "build of torch and the 'kernels' extra)", err=True)
        return 2
    argv0, sys.argv = sys.argv, [f"{prog} {flag}", *rest]  # argparse's prog; the records' command line
    try:
        return int(module.main(rest) or 0)
    finally:
        sys.argv = argv0


def main(argv: list[str] | None = None, prog: str = "pm-bench") -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    modes = [a for a in args if a in ("--gpu", *PASSTHROUGH)]
    if len(modes) > 1:
        click.echo(f"{prog}: choose one of --gpu, --kernels, --train (got {' '.join(modes)})", err=True)
        return 2
    if modes and modes[0] in PASSTHROUGH:
        return _passthrough(modes[0], [a for a in args if a != modes[0]], prog)
    try:
        bench.main(args=args, prog_name=prog, obj=args)  # standalone: always ends in SystemExit
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
