"""Benchmark results: merge partial runs, aggregate over split seeds, gap recovered, BENCHMARKS.md tables."""

from __future__ import annotations

import json
import math
import re
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

from semiseg.atomic import atomic_write_text
from semiseg.bench.stats import BASELINES, VALIDITY_GATE, algorithm_of, mean_std
from semiseg.errors import ConfigError


def budget_of(config: Any) -> str:
    """The shared budget of a run in one line: working size, model, steps per training, batch."""
    h, w = config.data.size
    return (f"{h}x{w} px, {config.model.arch}-{config.model.encoder} (weights {config.model.weights}), "
            f"{config.train.steps} steps x batch {config.train.batch_size} per training")


def entry_from_results(protocol: str, results: dict[str, Any], *, budget: str | None = None,
                       entry: str | None = None) -> dict:
    """One row of the benchmark JSON from a run's results.json; ``entry`` names the row when the bench entry
    is not the method's own name (``algorithm`` keeps the method)."""
    test = results.get("test") or {}
    headline = test.get("headline")
    row = {
        "protocol": protocol, "method": entry or results["method"], "algorithm": results["method"],
        "split_seed": results["split_seed"],
        "seed": results.get("seed", 0), "headline_metric": results.get("val_metric"),
        "test": headline, "test_detail": {k: test.get(k) for k in ("dice", "iou", "dice_pooled", "miou",
                                                                   "mean_of_subsets", "per_subset",
                                                                   "per_class_iou") if k in test},
        "val": (results.get("val") or {}).get(results.get("val_metric") or "", None),
        "pseudo_label_quality": results.get("pseudo_label_quality"),
        "wall_seconds": results.get("stage_seconds"),
        "wall_all_sessions": results.get("stage_seconds_all_sessions", False),
        "peak_rss_mb": results.get("peak_rss_mb"), "command": results.get("command"),
        "commit": results.get("commit"), "run": results.get("name"), "budget": budget,
        "trained_steps": results.get("trained_steps"), "finished": results.get("finished"),
        "method_options": results.get("method_options") or {},
    }
    return row


def _key(e: dict) -> tuple:
    return e["protocol"], e["method"], e["split_seed"], e.get("seed", 0)


def merge(existing: list[dict], new: list[dict]) -> list[dict]:
    """Entries keyed by (protocol, method, split seed, seed). A new entry replaces the existing one unless that
    run finished later (UTC ``finished`` of its results; entries from before the field count as oldest), so a
    stale result file merged in, or an old run read back, never hides a newer run."""
    table = {_key(e): e for e in existing}
    for e in new:
        old = table.get(_key(e))
        if old is None or (old.get("finished") or "") <= (e.get("finished") or ""):
            table[_key(e)] = e
    return sorted(table.values(), key=_key)


def _finished_at(session: dict) -> float:
    """When a bench invocation ended (its ``finished`` carries a UTC offset), 0 when unknown."""
    return datetime.fromisoformat(session["finished"]).timestamp() if session.get("finished") else 0.0


def merge_result_files(source: Path, target: Path) -> tuple[int, int]:
    """Merge a result file (another checkout's or machine's ``<protocol>.json``) into ``target``: entries by
    :func:`merge`, bench sessions once each. Returns (rows that changed ``target``, sessions added)."""
    try:
        incoming = json.loads(source.read_text())
        entries, sessions = incoming["entries"], incoming.get("sessions", [])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{source}: not a bench result file ({type(err).__name__}: {err})") from err
    protocols = {e.get("protocol") for e in entries}
    if protocols - {target.stem}:
        raise ConfigError(f"{source}: holds protocol(s) {sorted(map(str, protocols))}, not {target.stem!r}")
    before = {_key(e): e for e in load_entries(target)}
    merged = merge(list(before.values()), entries)
    after = {_key(e): e for e in merged}
    taken = sum(1 for e in entries if after[_key(e)] is e and before.get(_key(e)) != e)
    have = load_sessions(target)
    seen = {(s.get("command"), s.get("commit"), s.get("finished")) for s in have}
    added = [s for s in sessions if (s.get("command"), s.get("commit"), s.get("finished")) not in seen]
    save_entries(target, merged, sorted(have + added, key=_finished_at))
    return taken, len(added)


def load_entries(path: Path) -> list[dict]:
    return json.loads(path.read_text())["entries"] if path.is_file() else []


def load_sessions(path: Path) -> list[dict]:
    """Whole bench invocations (command, commit, runs executed, elapsed), oldest first."""
    return json.loads(path.read_text()).get("sessions", []) if path.is_file() else []


def save_entries(path: Path, entries: list[dict], sessions: list[dict] | None = None) -> None:
    """Write the entries; the file's bench sessions are kept unless new ones are given."""
    sessions = load_sessions(path) if sessions is None else sessions
    atomic_write_text(path, json.dumps({"entries": entries, "sessions": sessions}, indent=1) + "\n")


def gap_recovered(method: float, supervised: float, oracle: float) -> float | None:
    """(method − supervised) / (oracle − supervised); None when the oracle is not above supervised."""
    denominator = oracle - supervised
    if not math.isfinite(denominator) or denominator <= 0:
        return None
    return (method - supervised) / denominator


def invalid_seeds(entries: list[dict], protocol: str) -> dict[int, str]:
    """Split seeds that fail the validity gate, with the reason (oracle − supervised below the gate)."""
    rows = [e for e in entries if e["protocol"] == protocol and e.get("test") is not None]
    by_seed = {(e["method"], e["split_seed"]): e["test"] for e in rows}
    out = {}
    for seed in sorted({e["split_seed"] for e in rows}):
        sup, ora = by_seed.get(("supervised", seed)), by_seed.get(("oracle", seed))
        if sup is not None and ora is not None and ora - sup < VALIDITY_GATE:
            out[seed] = (f"oracle {ora * 100:.1f} vs supervised {sup * 100:.1f}: {(ora - sup) * 100:+.1f} pts, "
                         f"below the {VALIDITY_GATE * 100:.0f}-point validity gate")
    return out


_STEPS = re.compile(r"(\d+) steps x batch")


def _supervised_steps(e: dict) -> int | None:
    """A supervised row's steps: ``trained_steps``, or, for rows recorded before that field existed, the steps of
    its budget line (one training of ``N steps x batch ...``)."""
    if e.get("trained_steps") is not None:
        return e["trained_steps"]
    found = _STEPS.search(e.get("budget") or "")
    return int(found.group(1)) if found else None


def budget_line(entries: list[dict]) -> str:
    """The protocol's budget (its ``supervised`` rows'), then the step counts of the longer controls and the oracle
    where only their steps differ, then any other budget whole."""
    budgets = sorted({e.get("budget") or "not recorded" for e in entries})
    base = sorted({e["budget"] for e in entries if e["method"] == "supervised" and e.get("budget")})
    if len(base) != 1:
        return "Budget: " + "; ".join(budgets) + "."
    def shape(budget: str) -> str:  # the budget with its step count left out
        return _STEPS.sub("N steps x batch", budget)

    rest = [b for b in budgets if b != base[0]]
    longer = sorted({int(_STEPS.search(b).group(1)) for b in rest if shape(b) == shape(base[0])})  # type: ignore[union-attr]
    others = [b for b in rest if shape(b) != shape(base[0])]
    steps = f" (other step counts: {', '.join(map(str, longer))}, for the controls and the oracle)" if longer else ""
    return "Budget: " + "; ".join([base[0] + steps, *others]) + "."


def is_control(e: dict) -> bool:
    """A compute-matched control: ``supervised`` with its default options, only its steps changed (rows recorded
    before ``method_options`` existed are all such); ``supervised loss=dice`` is a variant, no control."""
    return algorithm_of(e) == "supervised" and not e.get("method_options")


def controls_by_steps(rows: list[dict]) -> dict[tuple[int, int], dict]:
    """The supervised control runs (``supervised``, ``supervised-2x``, ...: :func:`is_control`) keyed by
    (split seed, trained steps); ``supervised`` itself wins a tie."""
    out: dict[tuple[int, int], dict] = {}
    for e in rows:
        steps = _supervised_steps(e) if is_control(e) else None
        if steps is not None:
            key = (e["split_seed"], steps)
            if key not in out or e["method"] == "supervised":
                out[key] = e
    return out


def own_controls(mine: list[dict], controls: dict[tuple[int, int], dict]) -> tuple[list[float], str | None]:
    """A method's gains over its compute-matched control per split seed (the supervised run trained for as many
    steps as the method's delivered net: ``trained_steps``; where that split seed has no such row, the one with
    the fewest steps above it, a conservative control) and the control's name; the name says which step counts
    have no control row. Control rows are their own control (no gain); a supervised variant (Dice loss) is not."""
    gains, names, missing = [], set(), set()
    for e in mine:
        if is_control(e) or e["method"] in BASELINES or e.get("trained_steps") is None:
            continue
        longer = sorted(steps for seed, steps in controls if seed == e["split_seed"] and steps >= e["trained_steps"])
        control = controls[(e["split_seed"], longer[0])] if longer else None
        if control is None:
            missing.add(e["trained_steps"])
        else:
            gains.append(e["test"] - control["test"])
            names.add(control["method"])
    parts = sorted(names) + [f"none at {s} steps" for s in sorted(missing)]
    return gains, ", ".join(parts) or None


def summarize(entries: list[dict], protocol: str) -> list[dict[str, Any]]:
    """Per method: mean ± std of the test headline over split seeds, gain and gap recovered per seed (gap
    recovered over the split seeds that pass the validity gate only)."""
    rows = [e for e in entries if e["protocol"] == protocol and e.get("test") is not None]
    by_seed: dict[tuple[str, int], float] = {(e["method"], e["split_seed"]): e["test"] for e in rows}
    invalid = invalid_seeds(entries, protocol)
    controls = controls_by_steps(rows)
    # baselines and supervised controls (e.g. supervised-2x) first; they recover no gap and "beat" nothing
    baselines = {e["method"] for e in rows if e["method"] in BASELINES or algorithm_of(e) == "supervised"}
    methods = sorted({e["method"] for e in rows},
                     key=lambda m: (m not in baselines, m not in BASELINES, m != "supervised", m))
    out = []
    for method in methods:
        mine = [e for e in rows if e["method"] == method]
        seeds = sorted(e["split_seed"] for e in mine)
        gains, gaps, gap_seeds = [], [], []
        for e in mine:
            sup = by_seed.get(("supervised", e["split_seed"]))
            ora = by_seed.get(("oracle", e["split_seed"]))
            if sup is not None:
                gains.append(e["test"] - sup)
                if ora is not None and method not in baselines and e["split_seed"] not in invalid:
                    g = gap_recovered(e["test"], sup, ora)
                    if g is not None:
                        gaps.append(g)
                        gap_seeds.append(e["split_seed"])
        m, s = mean_std([e["test"] for e in mine])
        control_gains, control = own_controls(mine, controls)
        quality = [e["pseudo_label_quality"] for e in mine if e.get("pseudo_label_quality") is not None]
        out.append({
            "method": method, "seeds": seeds, "test_mean": m, "test_std": s,
            "gain_mean": mean_std(gains)[0] if gains else None, "gain_std": mean_std(gains)[1] if gains else None,
            "gap_mean": mean_std(gaps)[0] if gaps else None, "gap_seeds": sorted(gap_seeds),
            "control": control, "control_gain_mean": mean_std(control_gains)[0] if control_gains else None,
            "control_gain_std": mean_std(control_gains)[1] if control_gains else None,
            "control_seeds": len(control_gains),
            "pl_quality": statistics.fmean(quality) if quality else None,
            "wall_minutes": statistics.fmean([e["wall_seconds"] or 0 for e in mine]) / 60,
            "wall_lower_bound": not all(e.get("wall_all_sessions") for e in mine),
            "peak_rss_mb": max((e["peak_rss_mb"] or 0) for e in mine),
            "metric": mine[0].get("headline_metric"),
            "beats_supervised": None if not gains or method in baselines else statistics.fmean(gains) > 0,
            "commits": sorted({e.get("commit") or "?" for e in mine}),
        })
    return out


def _fmt(x: float | None, scale: float = 100.0, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x * scale:+.1f}" if signed else f"{x * scale:.1f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | split seeds | test (mean ± std) | gain vs supervised (pts) | own control | "
            "gain vs own control (pts) | gap recovered | beats supervised? | pseudo-label quality | wall time / run | "
            "peak RSS | commit |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        beats = {None: "", True: "yes", False: "**no**"}[r["beats_supervised"]]
        spread = len(r["seeds"]) > 1  # a std over one seed would read as "no variance"
        gain = "" if r["gain_mean"] is None or r["method"] == "supervised" else \
            _fmt(r["gain_mean"], signed=True) + (f" ± {_fmt(r['gain_std'])}" if spread else "")
        test = _fmt(r["test_mean"]) + (f" ± {_fmt(r['test_std'])}" if spread else "")
        control = "" if r["control"] is None else f"`{r['control']}`" if r["control_gain_mean"] is not None \
            else r["control"]
        control_gain = "" if r["control_gain_mean"] is None else _fmt(r["control_gain_mean"], signed=True) + (
            f" ± {_fmt(r['control_gain_std'])}" if r["control_seeds"] > 1 else "")
        gap = "" if r["gap_mean"] is None else f"{r['gap_mean'] * 100:.0f} %"
        if gap and r["gap_seeds"] != r["seeds"]:  # the oracle beat supervised on these split seeds only
            gap += f" (seed{'s' if len(r['gap_seeds']) > 1 else ''} {','.join(map(str, r['gap_seeds']))})"
        lines.append(
            f"| `{r['method']}` | {','.join(map(str, r['seeds']))} | {test} | "
            f"{gain} | {control} | {control_gain} | {gap} | {beats} | {_fmt(r['pl_quality'])} | "
            f"{'≥ ' if r['wall_lower_bound'] else ''}{r['wall_minutes']:.1f} min | "
            f"{r['peak_rss_mb']:.0f} MB | {', '.join(r['commits'])} |")
    return "\n".join(lines)


def sessions_table(sessions: list[dict]) -> list[str]:
    """Markdown lines: the elapsed time of whole bench invocations (the budget a user of the matrix pays)."""
    if not sessions:
        return []
    lines = ["Whole bench invocations (elapsed = wall clock of the command; runs read back from an earlier "
             "session cost nothing):", "",
             "| split seeds | methods | runs executed / read back / left to another process / failed | elapsed | "
             "CPU cores | commit | command |",
             "|" + "---|" * 7]
    for s in sessions:
        lines.append(
            f"| {','.join(map(str, s['seeds']))} | {len(s['methods'])} | {s['executed']} / {s['read_back']} / "
            f"{len(s.get('busy', []))} / {len(s['failed'])} | {s['elapsed_seconds'] / 60:.1f} min | "
            f"{s.get('cpu_cores', '?')} | "
            f"{s.get('commit') or '?'} | `{s['command']}` |")
    return lines + [""]


def _span(session: dict) -> tuple[float, float]:
    end = datetime.fromisoformat(session["finished"]).timestamp()
    return end - session["elapsed_seconds"], end


def matrix_wall_clock(sessions: list[dict], methods_by_seed: dict[int, set[str]]) -> list[str]:
    """Markdown lines: per split seed, the wall clock in which benches run side by side (overlapping in time,
    every run executed, none failed) trained every method the table has for that seed: the budget of a seed."""
    single = [s for s in sessions if len(s["seeds"]) == 1 and s.get("finished") and s["read_back"] == 0
              and not s["failed"]]
    lines = []
    for seed in sorted({s["seeds"][0] for s in single}):
        group = sorted((s for s in single if s["seeds"][0] == seed), key=lambda s: _span(s)[0])
        clusters: list[list[dict]] = []
        for s in group:  # sessions overlapping in time ran side by side
            if clusters and _span(s)[0] < max(_span(c)[1] for c in clusters[-1]):
                clusters[-1].append(s)
            else:
                clusters.append([s])
        methods = methods_by_seed.get(seed, set())
        for cluster in clusters:
            if not methods or not methods <= {m for s in cluster for m in s["methods"]}:
                continue
            start, end = min(_span(s)[0] for s in cluster), max(_span(s)[1] for s in cluster)
            cores = ", ".join(sorted({str(s.get("cpu_cores", "?")) for s in cluster}))
            commits = ", ".join(sorted({s.get("commit") or "?" for s in cluster}))
            lines.append(f"- split seed {seed}: all {len(methods)} methods in {(end - start) / 60:.1f} min wall clock "
                         f"({len(cluster)} bench process{'es side by side' if len(cluster) > 1 else ''} on "
                         f"{cores} cores, commit {commits})")
    if not lines:
        return []
    return ["Whole matrix per split seed (from the invocations below):", "", *lines, ""]


PROTOCOL_NOTES = {
    "polyp": "test Dice = per-image Dice of the polyp class, mean of the Kvasir-SEG and CVC-ClinicDB test-set "
             "means (original resolution); test split fixed (semiseg/splits/polyp/test.txt).",
    "camvid": "test mIoU over 11 classes, void ignored, on the 233 official test frames of the complete CamVid "
              "(original resolution); validation = the 101 official val frames; 46 of the 367 train frames labeled.",
    "camvid-subset-v1": "test mIoU over 11 classes, void ignored, on the 101 official val frames of the 224-frame "
                        "subset (original resolution); 14 labeled frames. Superseded by the complete-CamVid protocol "
                        "`camvid` (issue 29).",
}
# result files of superseded protocols: reported beside the current ones (after them), never instead
SUPERSEDED = ("polyp-before-issue25", "polyp-scratch-v1", "camvid-subset-v1", "camvid-scratch-v1")
PROTOCOL_NOTES["polyp-scratch-v1"] = PROTOCOL_NOTES["polyp"] + " Superseded protocol (from scratch), see below."
PROTOCOL_NOTES["camvid-scratch-v1"] = PROTOCOL_NOTES["camvid-subset-v1"] + " From scratch (no pretrained encoder)."
PROTOCOL_NOTES["polyp-before-issue25"] = PROTOCOL_NOTES["polyp"] + (
    " The polyp table as it stood at commit 1746466, before issue 25 changed gta-seg, momentum-pl, the ATSO family "
    "and dst-cbc (paper-faithful defaults, strong views, longer students); their current rows are above.")


def _seed_count(entries: list[dict]) -> str:
    seeds = sorted({e["split_seed"] for e in entries})
    return f"split seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def write_benchmarks_md(results_dir: Path, out_path: Path) -> Path:
    """BENCHMARKS.md from every ``<protocol>.json`` in ``results_dir`` (numbers only from those files)."""
    from semiseg.bench.claims import claims_section  # it builds on this module
    from semiseg.bench.measurements import measurement_kind, measurements_section
    from semiseg.bench.per_class import per_class_section

    parts = ["# Benchmarks", "",
             "Generated by `semiseg bench tables` from the committed result files in "
             f"`{results_dir.as_posix()}/`; never edited by hand. Protocols: `../shared/BENCHMARK.md`. "
             "Each row names the commit(s) of the runs; the command of every run is in the JSON. The last "
             "section checks the papers' own claims on these rows.", ""]
    by_protocol: dict[str, list[dict]] = {}
    for path in sorted(results_dir.glob("*.json"), key=lambda p: (p.stem in SUPERSEDED, p.stem)):
        if measurement_kind(path):
            continue
        protocol = path.stem
        entries = by_protocol[protocol] = load_entries(path)
        rows = summarize(entries, protocol)
        commands = sorted({e.get("command") or "" for e in entries})
        gate = [f"- **split seed {seed} invalid**: {why}; left out of gap recovered."
                for seed, why in invalid_seeds(entries, protocol).items()]
        parts += [f"## `{protocol}`", "", PROTOCOL_NOTES.get(protocol, ""), "",
                  budget_line(entries), "", markdown_table(rows), "", *per_class_section(entries, rows, protocol),
                  *(["Validity gate (the oracle must beat supervised by at least "
                     f"{VALIDITY_GATE * 100:.0f} points on a split seed):", "", *gate, ""] if gate else []),
                  f"Read with care: {_seed_count(entries)} and one run per seed; where validation was still rising "
                  "at the end of the budget, training is under-converged and differences of a few points are within "
                  "run-to-run noise; gap recovered is blank where no split seed passes the validity gate.", "",
                  "Gain and gap recovered are computed per split seed against that seed's `supervised` and "
                  "`oracle` runs. Own control: the supervised run trained for as many steps as the method's "
                  "delivered network (a fine-tuned net counts its teacher's steps; where no supervised row has "
                  "exactly as many, the one with the fewest steps above it); the gain over it is what the "
                  "unlabeled images did beyond more training. A supervised row with other options "
                  "(`supervised-dice`: momentum-pl's Dice loss on the labeled images alone) is no control; its "
                  "own control is the cross-entropy supervised row of as many steps. Pseudo-label quality: last "
                  "round against the unlabeled images' ground truth "
                  "(benchmark mode). Wall time: sum of the run's stages (a reused teacher counts for every method "
                  "that uses it), over every session that worked on it; ≥: a row timed before that rule, where a "
                  "stage resumed in a later session counted its last session only.",
                  "", "Commands:", ""]
        parts += [f"- `{c}`" for c in commands if c] + [""]
        by_seed: dict[int, set[str]] = {}
        for e in entries:
            by_seed.setdefault(e["split_seed"], set()).add(e["method"])
        parts += matrix_wall_clock(load_sessions(path), by_seed)
        parts += sessions_table(load_sessions(path))
        notes = results_dir / f"{protocol}-notes.md"
        if notes.is_file():  # the team's reading of the numbers, written by hand, kept apart from them
            parts += [f"### Reading the `{protocol}` results (hand-written: `{notes.as_posix()}`)", "",
                      notes.read_text().strip(), ""]
    parts += measurements_section(results_dir)
    parts += claims_section(by_protocol, SUPERSEDED)
    atomic_write_text(out_path, "\n".join(parts))
    return out_path
