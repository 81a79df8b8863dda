"""The ``text2image`` command: export models, generate images, inspect the installation.

Heavy libraries load inside the commands, so ``text2image --help`` answers at once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import click

from backend.config import Settings
from backend.standalone.tasks_cli import tasks
from runtime import validation as v
from runtime.errors import BundleError, ConfigError, T2IError
from runtime.options import PRECISIONS, DecoderChoice, EngineChoice, LoadOptions

if TYPE_CHECKING:
    from runtime import Pipeline

log = logging.getLogger("text2image")


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the one user-facing error type into click's, so the user sees the message without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except T2IError as exc:
            raise click.ClickException(str(exc)) from None
        except ImportError as exc:
            raise click.ClickException(
                f"{exc}. Install the engines with: pip install 'text2image-sd2[cpu]' (or [cuda], [export])"
            ) from None

    return wrapper


def _say(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Stable Diffusion 2 text-to-image on ONNX Runtime (CPU/CUDA) and OpenVINO, without torch.

    Settings also come from environment variables: T2I_MODEL, T2I_MODEL_STORE, T2I_DEVICE, T2I_ENGINE,
    T2I_THREADS, T2I_FORMAT, T2I_OFFLINE. Command-line options win over them.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Our own INFO lines (device, engine, threads, where a service listens) are for admins: shown by default.
    for name in ("text2image", "backend", "runtime", "exporters"):
        logging.getLogger(name).setLevel(min(level, logging.INFO))


@cli.command()
@click.argument("source")
@click.option("--format", "fmt", type=click.Choice(["onnx", "openvino"]), default="onnx", show_default=True,
              help="onnx runs on onnxruntime (CPU and CUDA); openvino is fastest on x86 CPUs.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Bundle folder to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Weight precision. fp16 halves the size; int8 (OpenVINO only) quantizes the UNet with "
                   "calibration for CPUs with VNNI/AMX: fastest, changes pixels more.")
@click.option("--taesd", metavar="SOURCE",
              help="Also export the TAESD decoder (about 18x cheaper than the VAE, coarser pixels) from SOURCE: "
                   "madebyollin/taesd, a folder, or 'tiny'/'random' for tests and benchmarks.")
@click.option("--fusions", type=click.Choice(["none", "cpu", "cuda"]), default="none", show_default=True,
              help="onnxruntime graph fusions (ONNX only). cuda: fused attention, NHWC convolutions, GroupNorm … "
                   "for GPUs; use with --precision fp16; such a bundle runs on --device cuda only. cpu: the fused "
                   "ops that have CPU kernels. none: the plain graph every engine reads.")
@click.option("--converter", type=click.Choice(["auto", "torch", "template"]), default="auto", show_default=True,
              help="torch: optimum's export, each graph checked against torch (needs the export extra). template: "
                   "no torch; the checkpoint's safetensors are bound into graph templates of that same export "
                   "(sd-turbo, sd2.1-base, sd2.1, sdxs-512 architectures). auto: torch where installed, else "
                   "template.")
@click.option("--int8-matmuls", is_flag=True,
              help="OpenVINO: store the matrix-product weights of the text encoder and the UNet in int8 (per "
                   "channel; activations stay floating point). For SD2.1 on an f32 CPU the compiled model holds "
                   "1.7 GB less at the same speed; on a CPU with AMX (bf16) the UNet's run about 7 % slower per "
                   "step. Pixels change slightly. The model store exports this way, with --precision fp16, except "
                   "that on AMX it compresses the text encoder's only.")
@_user_errors
def export(source: str, fmt: str, out: Path, precision: str, taesd: str | None, fusions: str,
           converter: str, int8_matmuls: bool) -> None:
    """Export SOURCE to a model bundle.

    SOURCE is a hub model id (e.g. stabilityai/sd-turbo), a known short name (sd-turbo, sd2.1-base, sd2.1,
    sdxs-512), a local diffusers folder, or 'tiny' (a small random model for tests; 'tiny-v' is its v-prediction
    variant, 'tiny-sdxs' one of SDXS's layout). With torch each component is checked against the torch model after
    export; without it the torch-free converter is used.
    Re-running on a finished folder does nothing.
    """
    try:
        from exporters.export import export_model
    except ImportError as exc:
        raise ConfigError(f"exporting needs the export extra ({exc.name} is missing): "
                       "pip install 'text2image-sd2[export]'") from None
    from backend.model_store import TINY_MODELS, TINY_WARNING

    if source in TINY_MODELS:
        _say(TINY_WARNING)
    from backend.catalog import export_args

    source, defaults = export_args(source)
    export_model(source, fmt, out, precision, say=_say, taesd=taesd, fusions=fusions, converter=converter,
                 defaults=defaults, int8_matmuls=int8_matmuls)  # its errors are T2IErrors: one line each


def _runtime_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """The runtime's load options as flags of ``command``, which gets them as one ``runtime`` dict by option name
    (a :class:`runtime.options.LoadOptions` field, so the environment's ``T2I_*`` values apply under them)."""
    flags = [
        click.option("--device", help="auto, cpu, cuda or cuda:N (GPU N). Default: auto (CUDA when usable)."),
        click.option("--engine", type=click.Choice(get_args(EngineChoice)), help="Default: auto."),
        click.option("--threads", type=int, help="Op threads for the engine. Default: the cores this process may use."),
        click.option("--decoder", type=click.Choice(get_args(DecoderChoice)),
                     help="vae (default) or taesd: much faster decoding with coarser detail, if the bundle has it."),
        click.option("--precision", type=click.Choice(PRECISIONS),
                     help="Math precision. auto: OpenVINO uses bf16 on CPUs with AVX512-BF16/AMX (faster, tiny pixel "
                          "changes); fp32: exact."),
        click.option("--cuda-graph/--no-cuda-graph", default=None,
                     help="On CUDA, capture a CUDA graph per image size and replay it (less launch overhead, more "
                          "GPU memory). Default: T2I_CUDA_GRAPH or off."),
    ]
    names = {f.name for f in fields(LoadOptions)}

    @functools.wraps(command)
    def with_runtime(**kwargs: Any) -> Any:
        runtime = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
        return command(runtime=runtime, **kwargs)

    for flag in reversed(flags):
        with_runtime = flag(with_runtime)
    return with_runtime


def _load(model: str | None, offline: bool, runtime: dict[str, Any]) -> Pipeline:
    """The pipeline of ``model`` with the ``runtime`` flags given (None: not given) over the environment's."""
    from backend.loading import open_pipeline
    from backend.model_store import TINY_MODELS, TINY_WARNING
    from runtime.engines import parse_threads

    if runtime.get("threads") is not None:  # 0 means every core in T2I_THREADS, but is no count of threads here
        parse_threads(runtime["threads"])
    s = Settings.from_env(model=model, offline=offline or None, **runtime)
    pipe = open_pipeline(s, say=_say)
    if pipe.bundle.source_id in TINY_MODELS and s.store.model not in TINY_MODELS:
        _say(TINY_WARNING)
    _say(f"model {pipe.bundle.path} ({pipe.bundle.format}, {pipe.bundle.weights}) on {pipe.engine}/{pipe.device} "
         f"with {pipe.threads} threads")
    return pipe


def _check_out(out: Path) -> None:
    """Refuse an output folder that could not be written, without creating it yet."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {str(out)!r} cannot be created: {str(existing)!r} is a file, not a folder")
    # Writing is the only sure test: permissions say nothing for root, nor for /proc, a read-only mount or an ACL.
    try:
        fd, probe = tempfile.mkstemp(prefix=".t2i-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"--out {str(out)!r} is not writable: no file can be created in {str(existing)!r} "
                       f"({exc.strerror}); choose another folder") from None


@cli.command()
@click.argument("prompt")
@click.option("--model", help="Bundle folder, short name, hub id, or 'tiny'. Default: T2I_MODEL or sd-turbo.")
@click.option("-n", "n", type=int, default=1, show_default=True, help=f"Number of images (1-{v.MAX_IMAGES}).")
@click.option("--size", help=f"WIDTHxHEIGHT, multiples of {v.SIDE_STEP} from {v.MIN_SIDE} to {v.MAX_SIDE}. "
              "Default: the model's native size.")
@click.option("--steps", type=int,
              help=f"Denoising steps (1-{v.MAX_STEPS}). Default: the model's (sd-turbo 1, others 25).")
@click.option("--guidance", type=float,
              help=f"Classifier-free guidance scale (0-{v.MAX_GUIDANCE:g}; ≤1 turns it off).")
@click.option("--negative", default="", help="Negative prompt: what the image should not show.")
@click.option("--seed", type=int, help="Seed of the first image; image i uses seed+i. Default: random.")
@click.option("--scheduler", help="euler, dpm++2m, dpm++2m-karras or ddim. Default: the model's.")
@_runtime_flags
@click.option("--offline", is_flag=True, help="Do not download; use only bundles already on disk.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Folder for the PNG files.")
@_user_errors
def generate(prompt: str, model: str | None, n: int, size: str | None, steps: int | None, guidance: float | None,
             negative: str, seed: int | None, scheduler: str | None, offline: bool, out: Path,
             runtime: dict[str, Any]) -> None:
    """Generate images for PROMPT and write them as PNG files with their settings in the metadata."""
    from backend.images import save_png
    from runtime import validation
    from runtime.request import GenerationRequest

    # The whole request is checked here, before the model is loaded.
    width, height = validation.parse_size(size) if size else (None, None)
    request = GenerationRequest(prompt=prompt, negative_prompt=negative, n=n, width=width, height=height,
                                steps=steps, guidance=guidance, seed=seed, scheduler=scheduler)
    # So is the output folder: a generation must not run only to find that its images cannot be written.
    _check_out(out)
    pipe = _load(model, offline, runtime)
    with click.progressbar(length=0, label="denoising", file=sys.stderr) as bar:
        def on_step(done: int, all_steps: int) -> None:
            bar.length = all_steps  # the resolved request's steps: the bar needs no default of its own
            bar.update(1)

        items = pipe.run(request, on_step=on_step)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for item in items:
            path = save_png(item, out / f"t2i-{item.seed}.png")
            click.echo(str(path))
    except OSError as exc:
        raise ConfigError(f"the images cannot be written to --out {str(out)!r}: {exc.strerror or exc}") from None
    from backend.model_store import TINY_MODELS, TINY_WARNING

    if pipe.bundle.source_id in TINY_MODELS:
        _say(TINY_WARNING)


@cli.command()
@click.option("--model", help="Also describe this bundle (folder, short name or hub id already in the store).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_user_errors
def info(model: str | None, as_json: bool) -> None:
    """Show the engines and devices available, the device and threads that would be used and why, and a bundle."""
    from backend.catalog import CATALOG
    from runtime.engines import available_engines, cuda_driver_problem, cuda_usable, default_threads

    s = Settings.from_env(model=model)
    report: dict[str, Any] = {
        "engines": available_engines(),
        "cuda_usable": cuda_usable(),
        "cuda_driver": cuda_driver_problem() or "no problem found (or no NVIDIA driver here)",
        "threads": s.runtime.threads or default_threads(),
        "threads_reason": ("T2I_THREADS/--threads" if s.runtime.threads
                           else "cores this process may use (affinity mask)"),
        "model": s.store.model,
        "model_store": str(s.store.model_store),
        "known_models": {k: f"{m.source} — {m.notes}" for k, m in CATALOG.items()},
    }
    if model:
        from backend.model_store import resolve_model
        from runtime.bundle import Bundle
        from runtime.engines import choose

        bundle = Bundle.open(resolve_model(model, s.store.model_store, s.bundle_format(), offline=True, say=_say))
        report["bundle"] = bundle.summary()
        eng, dev, why = choose(bundle.format, s.runtime.engine, s.runtime.device)
        report["would_use"] = {"engine": eng, "device": dev, "reason": why}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _print_tree(report)


def _print_tree(value: Any, indent: int = 0) -> None:
    for key, item in value.items():
        if isinstance(item, dict):
            click.echo(f"{' ' * indent}{key}:")
            _print_tree(item, indent + 2)
        else:
            shown = ", ".join(map(str, item)) if isinstance(item, list) else item
            click.echo(f"{' ' * indent}{key}: {shown}")


@cli.command()
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_user_errors
def verify(bundle_dir: Path) -> None:
    """Check every file of a bundle against the sha256 and size in its manifest.json."""
    from runtime.bundle import Bundle

    bad = Bundle.open(bundle_dir).verify_hashes()
    if bad:
        raise BundleError(f"{len(bad)} file(s) of {bundle_dir} do not match manifest.json: {', '.join(bad)}; "
                       "re-export or re-download the bundle")
    click.echo(f"{bundle_dir}: all files match manifest.json")


@cli.command()
@click.option("--standalone", is_flag=True,
              help="Run the standalone task service (Nextcloud's Text-To-Image API, no Nextcloud needed) instead of "
                   "the Nextcloud ExApp.")
@click.option("--host", help="Address to listen on. ExApp: APP_HOST; standalone: 127.0.0.1.")
@click.option("--port", type=int, help="Port to listen on. ExApp: APP_PORT; standalone: 8765.")
@click.option("--workers", type=int, help="Generation workers in this process (T2I_WORKERS, default 1); the thread "
                                           "cap is split between them.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Standalone: folder for the task store and images (T2I_DATA_DIR).")
@_user_errors
def serve(standalone: bool, host: str | None, port: int | None, workers: int | None, data_dir: Path | None) -> None:
    """Serve tasks: as a Nextcloud ExApp (default) or as a standalone task service (--standalone)."""
    if standalone:
        from backend.standalone.server import serve as serve_standalone

        serve_standalone(host=host, port=port, workers=workers, data_dir=data_dir)
    else:
        from backend.nextcloud.app import serve as serve_exapp

        serve_exapp(host=host, port=port, workers=workers)


cli.add_command(tasks)


@cli.command()
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path),
              default=Path.home() / ".cache" / "text2image-sd2" / "bench", show_default=True,
              help="Where the full-size random model and its exports are kept between runs (about 20 GB).")
@click.option("--threads", type=int, help="Threads for every engine. Default: the cores this process may use.")
@click.option("--latents", default="32,64", show_default=True, help="Latent sides (32 = 256² images, 64 = 512²).")
@click.option("--batches", default="1,2", show_default=True, help="Images per prompt.")
@click.option("--steps", type=int, default=2, show_default=True, help="Denoising steps of the whole-image timing.")
@click.option("--guidance", type=float, default=7.5, show_default=True, help="> 1 runs CFG (UNet batch 2n).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per figure (median).")
@click.option("--peers/--no-peers", default=True, help="Also measure diffusers PyTorch and optimum's pipelines.")
@click.option("--int8/--no-int8", default=True, help="Also export and measure the int8 variant.")
@click.option("--only", help="Comma-separated parts of configuration names to measure (e.g. 'openvino,turbo').")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, or cuda / cuda:N: our fp16 CUDA-fused ONNX bundle (with and without CUDA graphs) against "
                   "diffusers PyTorch fp16 on the same GPU; e.g. --device cuda --latents 64 --batches 1 --steps 50.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_user_errors
def bench(cache: Path, threads: int | None, latents: str, batches: str, steps: int, guidance: float, repeats: int,
          peers: bool, int8: bool, only: str | None, device: str, as_json: bool) -> None:
    """Time our engines against diffusers and optimum on the full-size SD2.1-base architecture (random weights).

    Text encoder, one UNet step, VAE decode and a whole image, at each latent size and batch, each configuration in
    its own process (warm-up, then medians, peak memory). A development command, run from a source checkout
    (pip install -e '.[cpu,export,bench]': the export extra, and optimum-intel for the peers). Takes tens of minutes
    on 2 cores.
    """
    try:
        from backend.bench.report import run
    except ModuleNotFoundError as exc:
        if exc.name != "backend.bench":
            raise
        raise ConfigError("text2image bench is a development command and not part of the installed package; run it "
                       "from a source checkout: pip install -e '.[cpu,export,bench]' && text2image bench") from None
    from runtime.engines import default_threads

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"bench device '{device}' is not known; use cpu, cuda or cuda:N")
    run(cache, threads or default_threads(), ints(latents), ints(batches), steps, guidance, repeats, peers, int8,
        only.split(",") if only else None, as_json, device)


def main() -> None:
    cli()
