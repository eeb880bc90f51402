"""``semiseg`` command line: parse, load config, call :mod:`semiseg.api`. No logic lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from semiseg.cli_bench import bench_app, pilot
from semiseg.cli_common import NoProgress, SetOption, UsageError, console, log_line, out
from semiseg.cli_common import display as _display
from semiseg.cli_common import pair as _pair
from semiseg.errors import SemisegError

app = typer.Typer(help="Semi-supervised semantic segmentation with teacher-student pseudo labelling.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Look at data before training on it.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.command("pilot")(pilot)
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


@app.command("suggest-labels")
def suggest_labels(
        run: Annotated[Path, typer.Argument(help="finished run directory")],
        n: Annotated[int, typer.Option("--n", help="how many images to suggest")],
        out_dir: Annotated[Path | None, typer.Option("--out", help="folder of both files (default: the run)")] = None,
        strategy: Annotated[str, typer.Option(help=(
            "uncertain | typical (low budgets: TypiClust) | confident | random (control arms)"))] = "uncertain",
        similarity: Annotated[float, typer.Option(help="skip an image whose thumbnail is more alike than this "
                                                  "(cosine) to one already chosen; 1 keeps near-duplicates")] = 0.95,
        seed: Annotated[int, typer.Option(help="seed of --strategy random")] = 0,
        stratify: Annotated[bool, typer.Option("--stratify/--no-stratify", help=(
            "split K across the source datasets by their share of the unlabeled images, one frame per video "
            "first"))] = True,
        json_out: Annotated[Path | None, typer.Option("--json", help="also write the suggestion here")] = None,
        no_progress: NoProgress = False) -> None:
    """Which unlabeled images to annotate next: the least confident (and, after st++, least stable) first,
    near-duplicate frames skipped, each source dataset at its share. Writes labels-to-add.txt (stems, best
    first) and a contact sheet."""
    from semiseg.atomic import atomic_write_text
    from semiseg.pipeline.preflight import check_writable_file
    from semiseg.report.suggest import suggest_labels as suggest

    _display(no_progress)
    if json_out:
        check_writable_file(json_out, "--json")
    res = suggest(run, n, out_dir=out_dir, strategy=strategy, similarity=similarity,  # type: ignore[arg-type]
                  seed=seed, stratify=stratify, progress=not no_progress, console=console, log=log_line)
    if json_out:
        atomic_write_text(json_out, json.dumps(res.to_dict(), indent=1))
    dup = f"; {res.skipped_as_duplicates} near-duplicate(s) skipped" if res.skipped_as_duplicates else ""
    if len(res.per_subset) > 1:
        dup += "; " + ", ".join(f"{k} from {sub}" for sub, k in res.per_subset.items())
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
    except (KeyboardInterrupt, typer.Abort):
        console.print("interrupted", soft_wrap=True)
        sys.exit(130)
    except UsageError as err:
        err.show()
        sys.exit(err.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
