"""``semiseg`` command line: parse, load config, call :mod:`semiseg.api`. No logic lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from semiseg.errors import ConfigError, SemisegError

app = typer.Typer(help="Semi-supervised semantic segmentation with teacher-student pseudo labelling.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Look at data before training on it.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)
out = Console()

def log_line(message: str) -> None:
    """Progress and warnings on stderr, one unwrapped line each (paths stay whole, ``[...]`` stays text)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def _display(no_progress: bool = False) -> None:
    """Progress of this command's long phases: on stderr unless --no-progress (plain lines when not a terminal)."""
    from semiseg.progress import configure

    configure(enabled=not no_progress, console=console)


SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a config key: a.b=c (repeatable)")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="no progress bar (also off when not a terminal)")]


def _pair(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().replace("x", ",").split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise SemisegError(f"expected H,W (e.g. 256,256), got {value!r}")
    return int(parts[0]), int(parts[1])


def _whole_numbers(value: str, option: str) -> list[int]:
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() for p in parts):
        raise SemisegError(f"{option} {value!r}: expected comma-separated whole numbers (e.g. 0,1,2)")
    return [int(p) for p in parts]


def _print_results(results: dict, scored: str = "test") -> None:
    """The result table; ``scored`` labels the rows of ``results["test"]`` (what was evaluated)."""
    test = results.get("test") or {}
    table = Table(title=f"{results.get('name')} ({results.get('method')})")
    for col in ("split", "metric", "value"):
        table.add_column(col)
    for key, value in sorted((results.get("val") or {}).items()):
        table.add_row("val", key, f"{value:.4f}")
    for key in ("dice", "iou", "dice_pooled", "miou", "pixel_accuracy"):
        if isinstance(test.get(key), int | float):
            table.add_row(scored, key, f"{test[key]:.4f}")
    for subset, values in (test.get("per_subset") or {}).items():
        for key in ("dice", "iou", "miou"):
            if isinstance(values.get(key), int | float):
                table.add_row(f"{scored}/{subset}", key, f"{values[key]:.4f}")
    out.print(table)
    for warning in results.get("warnings") or []:
        out.print(f"[bold yellow]warning:[/] {warning}")


@app.command()
def train(config: Annotated[str | None, typer.Argument(
              help="YAML config file, or a bundled protocol: polyp, camvid, demo")] = None,
          set_: SetOption = None) -> None:
    """Train a method as CONFIG says; the run directory is OUT_DIR/NAME."""
    from semiseg import api

    cfg = api.load_config(config, set_ or [])
    results = api.run(cfg, console=console, log=log_line)
    if results:
        _print_results(results)


@app.command("config")
def show_config(config: Annotated[str | None, typer.Argument(help="YAML file or bundled protocol")] = None,
                set_: SetOption = None) -> None:
    """Print the fully resolved config (every default visible), as `train` would use it."""
    from semiseg.api import load_config
    from semiseg.config import dump_config

    out.print(dump_config(load_config(config, set_ or [])), highlight=False, markup=False)


AcceptOption = Annotated[bool, typer.Option(
    "--accept-changed-data", help="go on although image or mask files of the run's splits changed since it was made")]


@app.command()
def resume(run: Annotated[Path, typer.Argument(help="run directory")],
           accept_changed_data: AcceptOption = False) -> None:
    """Continue a killed run: finished stages are skipped, the current one resumes from its checkpoint."""
    from semiseg import api

    results = api.resume(run, console=console, log=log_line, accept_changed_data=accept_changed_data)
    if results:
        _print_results(results)


@app.command()
def evaluate(run: Annotated[Path, typer.Argument(help="finished run directory")],
             data: Annotated[str | None, typer.Option(help="another preset or folder (default: the run's own)")] = None,
             root: Annotated[str | None, typer.Option(help="folder of a --data preset")] = None,
             split: Annotated[str, typer.Option(help="labeled | val | test | unlabeled")] = "test",
             protocol: Annotated[str | None, typer.Option(help="resize | whole | center_crop | sliding_window")] = None,
             window: Annotated[str | None, typer.Option(help="sliding window H,W")] = None,
             stride: Annotated[str | None, typer.Option(help="sliding stride H,W")] = None,
             json_out: Annotated[Path | None, typer.Option("--json", help="also write metrics here")] = None,
             accept_changed_data: AcceptOption = False,
             accept_missing_fingerprint: Annotated[bool, typer.Option(
                 "--accept-missing-fingerprint", help="evaluate a run whose fingerprint.json is gone, unchecked "
                 "against the config and data it was made from")] = False,
             no_progress: NoProgress = False) -> None:
    """Evaluate a run's model at original resolution."""
    from semiseg import api
    from semiseg.atomic import atomic_write_text
    from semiseg.pipeline.preflight import check_writable_file, void_warning

    _display(no_progress)
    if json_out:
        check_writable_file(json_out, "--json")  # before the work, not after it
    res = api.evaluate(run, data=data, root=root, split=split, protocol=protocol, window=_pair(window),
                       stride=_pair(stride), accept_changed_data=accept_changed_data,
                       accept_missing_fingerprint=accept_missing_fingerprint, log=log_line,
                       progress=not no_progress, console=console)
    if json_out:
        atomic_write_text(json_out, json.dumps(res, indent=1))
    scored = f"{res['data']}/{res['split']}" if "data" in res else res["split"]
    _print_results({"name": str(run), "method": "evaluate", "test": res,
                    "warnings": [w for w in [void_warning(scored, res.get("void_images") or [])] if w]}, scored)


@app.command()
def predict(run: Annotated[Path, typer.Argument(help="finished run directory, or a model.onnx from `export`")],
            images: Annotated[Path, typer.Argument(help="folder of images")],
            out_dir: Annotated[Path, typer.Argument(help="where masks/ and overlays/ go")],
            protocol: Annotated[str | None, typer.Option(help="inference protocol")] = None,
            no_progress: NoProgress = False) -> None:
    """Segment every image of a folder: PNG masks and overlay images. Unreadable images are skipped, listed,
    and make the exit status 1."""
    _display(no_progress)
    if run.suffix == ".onnx":  # the deploy path: onnxruntime only, torch is never imported
        from semiseg.deploy.onnx_predict import predict_folder

        done = predict_folder(run, images, out_dir, protocol=protocol, progress=not no_progress, console=console,
                              log=log_line)
    else:
        from semiseg import api

        done = api.predict(run, images, out_dir, protocol=protocol, log=log_line, progress=not no_progress,
                           console=console)
    out.print(f"wrote {len(done.written)} masks to {out_dir / 'masks'} and overlays to {out_dir / 'overlays'}")
    if done.skipped:
        console.print(f"[bold red]error:[/bold red] skipped {len(done.skipped)} unreadable image(s): "
                      + escape("; ".join(f"{p.name} ({why})" for p, why in done.skipped)), highlight=False,
                      soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def export(run: Annotated[Path, typer.Argument(help="finished run directory")],
           format_: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
           out_file: Annotated[Path | None, typer.Option("--out", help="model file (default RUN/model.onnx); "
                                                         "its preprocessing goes beside it as .json")] = None) -> None:
    """The run's delivered model as ONNX (dynamic batch and size, normalisation inside), parity-checked
    against PyTorch on the run's test images; fails and writes nothing if they differ."""
    from semiseg.export import export_run

    meta = export_run(run, out_file, fmt=format_, log=log_line)
    pre = meta["preprocessing"]
    out.print(f"wrote {meta['path']} (opset {meta['opset']}, input [0,1] RGB NCHW, {pre['protocol']} "
              f"{pre['size'][0]}x{pre['size'][1]}) and {Path(meta['path']).with_suffix('.json')}")


@app.command()
def methods() -> None:
    """Registered methods and their options with defaults."""
    from semiseg.methods.registry import list_methods

    for name, cls in list_methods().items():
        out.print(f"[bold]{name}[/bold]  {cls.summary}" + (f"  [dim]({cls.paper})[/dim]" if cls.paper else ""))
        for field, info in cls.options_model.model_fields.items():
            if field == "name":  # which method, printed above: not one of its options
                continue
            desc = f"  {info.description}" if info.description else ""
            out.print(f"    {field} = {info.default!r}{desc}")


@app.command()
def demo(out_dir: Annotated[Path, typer.Option(help="where the demo runs go")] = Path("runs/demo"),
         fast: Annotated[bool, typer.Option(help="a much shorter budget (smoke test)")] = False,
         seed: Annotated[int, typer.Option(help="draws the split and the trainings (the data stay the same)")] = 0,
         ) -> None:
    """The main job on built-in synthetic data: supervised vs semi-supervised vs all labels."""
    from semiseg.demo import run_demo

    run_demo(out_dir, fast=fast, seed=seed, console=console, out=out)


@data_app.command("inspect")
def data_inspect(spec: Annotated[str, typer.Argument(help="preset name or folder")],
                 root: Annotated[str | None, typer.Option(help="folder of a preset")] = None) -> None:
    """Counts, sizes, classes, pixel shares, empty masks and every problem found."""
    from semiseg.data.inspect import inspect_spec, render_report

    report = inspect_spec(spec, root=root)
    render_report(report, out)
    if not report.usable:
        raise typer.Exit(1)


class _ProtocolShorthand(TyperGroup):
    """``semiseg bench polyp`` is short for ``semiseg bench run polyp`` (the commands BENCHMARKS.md records)."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


bench_app = typer.Typer(cls=_ProtocolShorthand, no_args_is_help=True, help=(
    "Benchmarks: run a protocol's method matrix (`bench run polyp`, or `bench polyp`), rebuild BENCHMARKS.md "
    "(`bench tables`), merge other checkouts' result files (`bench merge`), time the engine against a bare loop "
    "(`bench throughput`)."))
app.add_typer(bench_app, name="bench")
ResultsOption = Annotated[Path, typer.Option(help="folder of the merged result JSONs")]
MarkdownOption = Annotated[Path, typer.Option(help="generated tables")]


@bench_app.command("run")
def bench_run(protocol: Annotated[str, typer.Argument(help="a bundled protocol: polyp | camvid | demo")],
              methods: Annotated[str | None, typer.Option(help="comma-separated methods (default: the matrix)")] = None,
              seeds: Annotated[str | None, typer.Option(help="comma-separated split seeds")] = None,
              out_dir: Annotated[Path, typer.Option(help="run directories of the bench")] = Path("bench-runs"),
              results: ResultsOption = Path("benchmarks/results"), markdown: MarkdownOption = Path("BENCHMARKS.md"),
              set_: SetOption = None,
              workers: Annotated[int, typer.Option(min=1, help=(
                  "bench processes of one torch thread each, side by side (CPU: one per core); they split the "
                  "runs between them"))] = 1) -> None:
    """Run a protocol's method matrix (resumable), merged into RESULTS/PROTOCOL.json, then BENCHMARKS.md."""
    from semiseg.bench.matrix import run_bench
    from semiseg.bench.tables import write_benchmarks_md

    seed_list = _whole_numbers(seeds, "--seeds") if seeds else None  # before any worker or run starts
    if workers > 1:
        from semiseg.bench.workers import run_workers

        args = [protocol, "--out-dir", str(out_dir), "--results", str(results), "--markdown", str(markdown),
                *(["--methods", methods] if methods else []), *(["--seeds", seeds] if seeds else []),
                *[x for s in set_ or [] for x in ("--set", s)]]
        code = run_workers(args, workers, write=log_line)
        if any(results.glob("*.json")):
            write_benchmarks_md(results, markdown)  # once more, with every worker's runs
            out.print(f"wrote {markdown}")
        if code:
            raise typer.Exit(code)
        return
    try:
        run_bench(protocol, methods=methods.split(",") if methods else None,
                  seeds=seed_list, out_dir=out_dir,
                  results_path=results / f"{protocol}.json", overrides=set_ or [], log=log_line, console=console)
    finally:  # runs that finished reach the tables even when others failed (the exit code says so)
        if any(results.glob("*.json")):
            write_benchmarks_md(results, markdown)
            out.print(f"wrote {markdown}")


@bench_app.command("tables")
def bench_tables(results: ResultsOption = Path("benchmarks/results"),
                 markdown: MarkdownOption = Path("BENCHMARKS.md")) -> None:
    """Regenerate BENCHMARKS.md from the result JSONs (no training)."""
    from semiseg.bench.tables import write_benchmarks_md

    if not any(results.glob("*.json")):
        raise ConfigError(f"{results}: no <protocol>.json result files to build tables from")
    write_benchmarks_md(results, markdown)
    out.print(f"wrote {markdown}")


@bench_app.command("merge")
def bench_merge(files: Annotated[list[Path], typer.Argument(help="result files <protocol>.json of another "
                                                                 "checkout or machine")],
                results: ResultsOption = Path("benchmarks/results"),
                markdown: MarkdownOption = Path("BENCHMARKS.md")) -> None:
    """Merge other benches' result files into RESULTS (the later run of a row wins), then BENCHMARKS.md."""
    from semiseg.bench.tables import merge_result_files, write_benchmarks_md

    for path in files:
        if not path.is_file():
            raise ConfigError(f"{path}: no such result file")
        taken, added = merge_result_files(path, results / path.name)
        out.print(f"{path}: {taken} rows taken, {added} bench sessions added -> {results / path.name}",
                  soft_wrap=True)  # paths stay whole
    write_benchmarks_md(results, markdown)
    out.print(f"wrote {markdown}")


@bench_app.command("throughput")
def bench_throughput(steps: Annotated[int, typer.Option(help="timed steps")] = 30,
                     size: Annotated[int, typer.Option(help="square input size")] = 128,
                     batch: Annotated[int, typer.Option(min=1, help="images per step and per forward pass")] = 8,
                     frames: Annotated[int, typer.Option(min=1, help="960x540 JPEG frames the inference reads")] = 32,
                     threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
                     device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto")] = "cpu",
                     json_out: Annotated[Path | None, typer.Option("--json", help="also write the figures here")] = None
                     ) -> None:
    """Training and inference speed of the engine against a bare PyTorch loop on the same model and batch."""
    from semiseg.atomic import atomic_write_text
    from semiseg.bench.throughput import run_throughput
    from semiseg.engine.distributed import resolve_device

    figures = run_throughput(steps=steps, batch=batch, size=size, threads=threads, out=out,
                             device=resolve_device(device), frames=frames)
    if json_out:
        atomic_write_text(json_out, json.dumps(figures, indent=1) + "\n")


@app.command("suggest-labels")
def suggest_labels(
        run: Annotated[Path, typer.Argument(help="finished run directory")],
        n: Annotated[int, typer.Option("--n", help="how many images to suggest")],
        out_dir: Annotated[Path | None, typer.Option("--out", help="folder of both files (default: the run)")] = None,
        strategy: Annotated[str, typer.Option(help="uncertain | confident | random (control arms)")] = "uncertain",
        similarity: Annotated[float, typer.Option(help="skip an image whose thumbnail is more alike than this "
                                                  "(cosine) to one already chosen; 1 keeps near-duplicates")] = 0.95,
        seed: Annotated[int, typer.Option(help="seed of --strategy random")] = 0,
        json_out: Annotated[Path | None, typer.Option("--json", help="also write the suggestion here")] = None,
        no_progress: NoProgress = False) -> None:
    """Which unlabeled images to annotate next: the least confident (and, after st++, least stable) first,
    near-duplicate frames skipped. Writes labels-to-add.txt (stems, best first) and a contact sheet."""
    from semiseg.atomic import atomic_write_text
    from semiseg.pipeline.preflight import check_writable_file
    from semiseg.report.suggest import suggest_labels as suggest

    _display(no_progress)
    if json_out:
        check_writable_file(json_out, "--json")
    res = suggest(run, n, out_dir=out_dir, strategy=strategy, similarity=similarity,  # type: ignore[arg-type]
                  seed=seed, progress=not no_progress, console=console, log=log_line)
    if json_out:
        atomic_write_text(json_out, json.dumps(res.to_dict(), indent=1))
    dup = f"; {res.skipped_as_duplicates} near-duplicate(s) skipped" if res.skipped_as_duplicates else ""
    out.print(f"wrote {len(res.stems)} images to label, best first, to {res.files['list']} and a contact sheet to "
              f"{res.files['sheet']} ({res.criterion}{dup})")


@app.command()
def report(runs: Annotated[list[Path], typer.Argument(help="run directory (several with --compare)")],
           compare: Annotated[bool, typer.Option("--compare", help="one page comparing the runs' methods")] = False,
           out_file: Annotated[Path | None, typer.Option("--out", help="HTML file (default RUN/report.html; "
                                                         "with --compare, compare.html next to the runs)")] = None,
           threads: Annotated[int | None, typer.Option(help="torch CPU threads while predicting")] = None,
           no_progress: NoProgress = False) -> None:
    """A self-contained HTML page (images embedded, opens offline) about a run, or comparing methods."""
    from semiseg.report import write_compare_report, write_run_report

    _display(no_progress)
    if compare:
        path = write_compare_report(runs, out_file, threads=threads, log=log_line)
    elif len(runs) != 1:
        raise SemisegError("report: give one run directory, or several with --compare")
    else:
        path = write_run_report(runs[0], out=out_file, threads=threads, log=log_line,
                                progress=not no_progress, console=console)
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: every error a user can cause ends in one line on stderr and a non-zero exit status."""
    _display()  # a command with --no-progress sets it again
    try:
        code = app(args=argv, standalone_mode=False)
    except SemisegError as err:
        # soft_wrap: one line however long, so that the message can be grepped and read in a log
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        console.print("interrupted", soft_wrap=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
