"""``semiseg bench ...``: a protocol's method matrix, its tables, merging result files, throughput."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from typer.core import TyperGroup

from semiseg.bench.pilot import DEFAULT_SHARE
from semiseg.cli_common import SetOption, console, log_line, out, whole_numbers
from semiseg.errors import ConfigError


class _ProtocolShorthand(TyperGroup):
    """``semiseg bench polyp`` is short for ``semiseg bench run polyp`` (the commands BENCHMARKS.md records)."""

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> tuple:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


bench_app = typer.Typer(cls=_ProtocolShorthand, no_args_is_help=True, help=(
    "Benchmarks: run a protocol's method matrix (`bench run polyp`, or `bench polyp`), rebuild BENCHMARKS.md "
    "(`bench tables`), merge other checkouts' result files (`bench merge`), time the engine against a bare loop "
    "(`bench throughput`)."))
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

    seed_list = whole_numbers(seeds, "--seeds") if seeds else None  # before any worker or run starts
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




def pilot(config: Annotated[str | None, typer.Argument(help="a config file or bundled protocol (default: the "
                                                        "defaults); your data via --set data.source=...")] = None,
          set_: SetOption = None,
          methods: Annotated[str | None, typer.Option(help="comma-separated candidates (default: the bench's "
                                                       "strongest: st++, unimatch, self-training, mean-teacher, "
                                                       "stso)")] = None,
          seeds: Annotated[str, typer.Option(help="comma-separated split seeds (the spread is the trust)")] = "0,1",
          share: Annotated[float, typer.Option(help="share of train.steps each pilot trains")] = DEFAULT_SHARE,
          out_dir: Annotated[Path, typer.Option(help="the pilot runs (resumable)")] = Path("pilot-runs"),
          json_out: Annotated[Path | None, typer.Option("--json", help="also write the ranking here")] = None) -> None:
    """Which method to run on your data: short pilots of the candidates and their compute-matched supervised
    controls, ranked by validation score with each one's gain over its control (test is never read), with the
    command that trains the winner."""
    from semiseg.atomic import atomic_write_text
    from semiseg.bench.pilot import advised, run_pilot
    from semiseg.pipeline.preflight import check_writable_file

    if json_out:
        check_writable_file(json_out, "--json")
    res = run_pilot(config, set_ or [], methods=methods, seeds=whole_numbers(seeds, "--seeds"), share=share,
                    out_dir=out_dir, log=log_line)
    table = Table(title=f"pilot: {len(res.rows)} candidate runs at {res.share:g} x train.steps, validation only")
    for col in ("rank", "method", "val", "control val", "gain", "seeds > 0", "trust", "full run (est.)"):
        table.add_column(col)
    for i, r in enumerate(res.ranking, 1):
        table.add_row(str(i), r.method, f"{r.val:.3f}", f"{r.control_val:.3f}", f"{r.gain:+.3f} ± {r.spread:.3f}",
                      f"{r.positive_seeds}/{r.seeds}", r.trust, f"{r.full_minutes:.0f} min")
    out.print(table)
    best = res.ranking[0]
    verdict = (f"train {best.method} ({best.trust}): {res.command}" if advised(res.ranking) == best.method else
               "the best-validated candidate does not beat its supervised control: train supervised")
    out.print(verdict, soft_wrap=True)
    if json_out:
        atomic_write_text(json_out, json.dumps(res.to_dict(), indent=1))
