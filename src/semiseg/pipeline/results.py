"""What a finished run reports (``results.json``): validation and test scores of the delivered model, how far
it moved from its initialisation, pseudo-label quality, stage timings, provenance."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from semiseg.evaluation import evaluator
from semiseg.layout import RunLayout, StageLayout
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.preflight import void_stems, void_warning
from semiseg.pipeline.training import barely_moved_warning, moved_from_init, validation_fn
from semiseg.provenance import git_commit, recorded_command


def final_results(ctx: RunContext, model: torch.nn.Module, stage_dirs: list[Path], seconds: float, *,
                  trained_steps: int | None = None) -> dict:
    """Val metrics at working size, test metrics at original resolution, timings, provenance, and the
    optimizer steps behind the delivered net (``trained_steps``: which supervised run is its compute-matched
    control)."""
    cfg = ctx.config
    val = validation_fn(ctx)(model)
    moved = moved_from_init(ctx, model)
    test = None
    if ctx.test_stems:
        res = evaluator.evaluate_source(model, ctx.source, ctx.test_stems, protocol=cfg.eval.protocol,
                              size=tuple(cfg.data.size), window=cfg.eval.window, stride=cfg.eval.stride,
                              device=ctx.device)
        test = res.to_dict()
        test["headline"] = res.headline()
    void = {"val": void_stems(ctx.arrays("val")) if ctx.splits.val else [], "test": (test or {}).get("void_images", [])}
    warnings = [w for w in [barely_moved_warning(moved), *(void_warning(k, v) for k, v in void.items())] if w]
    stages = []
    for d in stage_dirs:
        stage = StageLayout(d)
        info = json.loads(stage.done.read_text()) if stage.is_done() else {}
        stages.append({"dir": d.name, **info})
    diagnostics = RunLayout(ctx.run_dir).diagnostics
    return {
        "pseudo_label_quality": last_pseudo_label_quality(stage_dirs, ctx.classes.is_binary),
        "diagnostics": json.loads(diagnostics.read_text()) if diagnostics.is_file() else None,
        "name": cfg.name, "method": cfg.method.name, "split_seed": cfg.split.seed, "seed": cfg.seed,
        # what makes a variant (e.g. supervised with a Dice loss is no compute-matched control)
        "method_options": cfg.method.model_dump(mode="json", exclude_defaults=True),
        "val_metric": ctx.val_metric, "val": val, "test": test, "moved_from_init": moved, "warnings": warnings,
        "void_images": void,  # masks void everywhere: no score, left out of every mean
        "trained_steps": trained_steps,
        "stage_seconds": round(sum(s.get("seconds", 0.0) for s in stages), 1),
        # False where a stage was timed before the stage clock: a resumed one counted its last session only
        "stage_seconds_all_sessions": all(s.get("seconds_all_sessions", False) for s in stages),
        "session_seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "stages": stages, "command": recorded_command(), "commit": git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),  # UTC: result files merge by it
    }


def last_pseudo_label_quality(stage_dirs: list[Path], binary: bool) -> float | None:
    """Quality of the newest pseudo-label round against ground truth (benchmark mode), if any."""
    for d in reversed(stage_dirs):
        for stats_path in sorted(d.rglob("stats.json")):
            quality = json.loads(stats_path.read_text()).get("quality")
            if quality:
                return quality.get("foreground_dice" if binary else "miou")
    return None
