"""``semiseg`` command line: parse, load config, call :mod:`semiseg.api`. No logic lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from semiseg.errors import SemisegError

app = typer.Typer(help="Semi-supervised semantic segmentation with teacher-student pseudo labelling.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Look at data before training on it.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: method matrices and throughput.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)
out = Console()

SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a config key: a.b=c (repeatable)")]


def _pair(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().replace("x", ",").split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise SemisegError(f"expected H,W (e.g. 256,256), got {value!r}")
    return int(parts[0]), int(parts[1])


def _print_results(results: dict) -> None:
    test = results.get("test") or {}
    table = Table(title=f"{results.get('name')} ({results.get('method')})")
    for col in ("split", "metric", "value"):
        table.add_column(col)
    for key, value in sorted((results.get("val") or {}).items()):
        table.add_row("val", key, f"{value:.4f}")
    for key in ("dice", "iou", "dice_pooled", "miou", "pixel_accuracy"):
        if isinstance(test.get(key), int | float):
            table.add_row("test", key, f"{test[key]:.4f}")
    for subset, values in (test.get("per_subset") or {}).items():
        for key in ("dice", "iou", "miou"):
            if isinstance(values.get(key), int | float):
                table.add_row(f"test/{subset}", key, f"{values[key]:.4f}")
    out.print(table)


@app.command()
def train(config: Annotated[Path | None, typer.Argument(help="YAML config (defaults if omitted)")] = None,
          set_: SetOption = None) -> None:
    """Train a method as CONFIG says; the run directory is OUT_DIR/NAME."""
    from semiseg import api
    from semiseg.config import load_config

    cfg = load_config(config, set_ or [])
    results = api.run(cfg, console=console, log=console.print)
    if results:
        _print_results(results)


@app.command()
def resume(run: Annotated[Path, typer.Argument(help="run directory")]) -> None:
    """Continue a killed run: finished stages are skipped, the current one resumes from its checkpoint."""
    from semiseg import api

    results = api.resume(run, console=console, log=console.print)
    if results:
        _print_results(results)


@app.command()
def evaluate(run: Annotated[Path, typer.Argument(help="finished run directory")],
             data: Annotated[str | None, typer.Option(help="another preset or folder (default: the run's data)")] = None,
             root: Annotated[str | None, typer.Option(help="folder of a --data preset")] = None,
             split: Annotated[str, typer.Option(help="labeled | val | test | unlabeled")] = "test",
             protocol: Annotated[str | None, typer.Option(help="resize | whole | center_crop | sliding_window")] = None,
             window: Annotated[str | None, typer.Option(help="sliding window H,W")] = None,
             stride: Annotated[str | None, typer.Option(help="sliding stride H,W")] = None,
             json_out: Annotated[Path | None, typer.Option("--json", help="also write the metrics here")] = None) -> None:
    """Evaluate a run's model at original resolution."""
    from semiseg import api

    res = api.evaluate(run, data=data, root=root, split=split, protocol=protocol, window=_pair(window),
                       stride=_pair(stride))
    if json_out:
        json_out.write_text(json.dumps(res, indent=1))
    _print_results({"name": str(run), "method": "evaluate", "test": res})


@app.command()
def predict(run: Annotated[Path, typer.Argument(help="finished run directory")],
            images: Annotated[Path, typer.Argument(help="folder of images")],
            out_dir: Annotated[Path, typer.Argument(help="where masks/ and overlays/ go")],
            protocol: Annotated[str | None, typer.Option(help="inference protocol")] = None) -> None:
    """Segment every image of a folder: PNG masks and overlay images."""
    from semiseg import api

    n = api.predict(run, images, out_dir, protocol=protocol)
    out.print(f"wrote {n} masks to {out_dir / 'masks'} and overlays to {out_dir / 'overlays'}")


@app.command()
def methods() -> None:
    """Registered methods and their options with defaults."""
    from semiseg.methods.registry import list_methods

    for name, cls in list_methods().items():
        out.print(f"[bold]{name}[/bold]  {cls.summary}" + (f"  [dim]({cls.paper})[/dim]" if cls.paper else ""))
        for field, info in cls.options_model.model_fields.items():
            desc = f"  {info.description}" if info.description else ""
            out.print(f"    {field} = {info.default!r}{desc}")


@app.command()
def demo(out_dir: Annotated[Path, typer.Option(help="where the demo runs go")] = Path("runs/demo"),
         fast: Annotated[bool, typer.Option(help="a much shorter budget (smoke test)")] = False) -> None:
    """The main job on built-in synthetic data: supervised vs semi-supervised vs all labels."""
    from semiseg.demo import run_demo

    run_demo(out_dir, fast=fast, console=console, out=out)


@data_app.command("inspect")
def data_inspect(spec: Annotated[str, typer.Argument(help="preset name or folder")],
                 root: Annotated[str | None, typer.Option(help="folder of a preset")] = None) -> None:
    """Counts, sizes, classes, pixel shares, empty masks and every problem found."""
    from semiseg.data.inspect import inspect_spec, render_report

    report = inspect_spec(spec, root=root)
    render_report(report, out)
    if not report.usable:
        raise typer.Exit(1)


@bench_app.command("throughput")
def bench_throughput(steps: Annotated[int, typer.Option(help="timed steps per loop")] = 30,
                     batch: Annotated[int, typer.Option(help="batch size")] = 8,
                     size: Annotated[int, typer.Option(help="square input size")] = 128,
                     threads: Annotated[int | None, typer.Option(help="torch threads")] = None) -> None:
    """Training-step throughput of the engine vs a bare PyTorch loop (ratio must be >= 0.95)."""
    from semiseg.bench.throughput import run_throughput

    run_throughput(steps=steps, batch=batch, size=size, threads=threads, out=out)


def main() -> None:
    try:
        app()
    except SemisegError as err:
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted: `semiseg resume RUN_DIR` continues from the last checkpoint")
        sys.exit(130)
