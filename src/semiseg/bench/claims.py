"""The papers' own claims, checked on the benchmark rows: one generated table of BENCHMARKS.md.

Each claim pairs two rows of the bench matrix (the method a paper says is better, and what it says it beats).
Per protocol, over the split seeds where both rows exist and the seed passes the validity gate: mean ± std of
each side, the mean difference and on how many seeds the claimed side is ahead, and a verdict by a fixed rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from semiseg.bench.stats import VALIDITY_GATE, mean_std

# a "≥" claim also holds when the claimed side is behind by no more than this (0.5 points): within noise
NOISE = 0.005
_EPS = 1e-12  # float slack on the rule's thresholds (differences are sums of recorded test scores)


@dataclass(frozen=True)
class Claim:
    claim: str  # what the paper says, in a few words
    source: str  # paper and table
    better: str  # bench entry the paper says is better ...
    other: str  # ... than this one
    relation: str = ">"  # ">": beats; "≥": at least as good (within noise counts)


CLAIMS = (
    Claim("online momentum pseudo labels beat offline ones", "polyp paper, Table II",
          "momentum-pl", "momentum-pl-offline"),
    Claim("ST++ ≥ ST", "ST++, Table 4", "st++", "self-training", "≥"),
    Claim("DST beats ST", "DST-CBC, Table 5a", "dst-cbc", "self-training"),
    Claim("the class-balanced curriculum adds", "DST-CBC, Table 5a", "dst-cbc", "dst-no-cbc"),
    Claim("ATSO ≥ STSO", "ATSO, Table 1", "atso", "stso", "≥"),
    Claim("STSO ≥ self-learning", "ATSO, Table 1", "stso", "self-learning", "≥"),
    Claim("GTA-Seg beats mean teacher", "GTA-Seg, Table 4", "gta-seg", "mean-teacher"),
)
# the bench entries that exist only for a claim (bench-polyp.yaml, bench-camvid.yaml)
VARIANTS = {
    "momentum-pl-offline": "`momentum-pl` with `teacher_update: offline` (a frozen teacher)",
    "dst-no-cbc": "`dst-cbc` with `ratios: [1.0, 1.0, 1.0, 1.0, 1.0]` (every round labels every pixel: no curriculum)",
}
METRIC_NAMES = {"dice": "Dice", "miou": "mIoU"}


def seeds_passing_gate(entries: list[dict], protocol: str) -> tuple[list[int], dict[int, str]]:
    """Split seeds whose ``supervised`` and ``oracle`` rows exist with the oracle ahead by at least the
    validity gate (the seeds "gap recovered" rests on), and why each other seed of the protocol is left out."""
    rows = [e for e in entries if e["protocol"] == protocol and e.get("test") is not None]
    by_seed = {(e["method"], e["split_seed"]): e["test"] for e in rows}
    passing, left_out = [], {}
    for seed in sorted({e["split_seed"] for e in rows}):
        sup, ora = by_seed.get(("supervised", seed)), by_seed.get(("oracle", seed))
        if sup is None or ora is None:
            left_out[seed] = "no " + " and ".join(n for n, x in (("supervised", sup), ("oracle", ora)) if x is None)
        elif ora - sup < VALIDITY_GATE:
            left_out[seed] = "gate"
        else:
            passing.append(seed)
    return passing, left_out


def check(entries: list[dict], protocol: str, claim: Claim) -> dict[str, Any]:
    """One claim on one protocol: the common valid seeds, each side's scores there, the verdict."""
    passing, left_out = seeds_passing_gate(entries, protocol)
    scores: dict[str, dict[int, float]] = {claim.better: {}, claim.other: {}}
    for e in entries:
        if e["protocol"] == protocol and e.get("test") is not None and e["method"] in scores:
            scores[e["method"]][e["split_seed"]] = e["test"]
    # seeds where a side has a row that the gate leaves out, with the reason
    excluded = {s: left_out[s] for s in sorted(set(scores[claim.better]) | set(scores[claim.other])) if s in left_out}
    better, other = ({s: v for s, v in scores[m].items() if s in passing} for m in (claim.better, claim.other))
    common = sorted(set(better) & set(other))
    diffs = [better[s] - other[s] for s in common]
    ahead = sum(d > 0 for d in diffs)
    diff = sum(diffs) / len(diffs) if diffs else None
    if len(common) < 2:
        verdict = f"pending ({len(common)} seed{'' if len(common) == 1 else 's'})"
    elif diff > _EPS and 2 * ahead > len(common):
        verdict = "confirmed"
    elif claim.relation == "≥" and diff >= -NOISE - _EPS:
        verdict = "confirmed (within noise)"
    else:
        verdict = "not confirmed"
    return {"claim": claim, "protocol": protocol, "seeds": common, "excluded": excluded,
            "better": better, "other": other, "diff": diff, "ahead": ahead, "verdict": verdict}


def _side(name: str, scores: dict[int, float], common: list[int]) -> str:
    """``name: mean ± std`` over the common seeds; without any, the side's own rows (what there is)."""
    if common:
        mean, std = mean_std([scores[s] for s in common])
        return f"`{name}`: {mean * 100:.1f}" + (f" ± {std * 100:.1f}" if len(common) > 1 else "")
    if not scores:
        return f"`{name}`: no row"
    seeds = sorted(scores)
    mean, std = mean_std([scores[s] for s in seeds])
    spread = f" ± {std * 100:.1f}" if len(seeds) > 1 else ""
    return f"`{name}`: {mean * 100:.1f}{spread} (seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))})"


def _row(result: dict[str, Any], label: str) -> str:
    claim, common = result["claim"], result["seeds"]
    seeds = ",".join(map(str, common)) or "none"
    for why in sorted(set(result["excluded"].values())):
        out = [s for s, w in result["excluded"].items() if w == why]
        seeds += f"; seed{'s' if len(out) > 1 else ''} {','.join(map(str, out))} out: {why}"
    diff = "" if result["diff"] is None else f"{result['diff'] * 100:+.2f}"
    ahead = f"{result['ahead']} of {len(common)}" if common else ""
    verdict = result["verdict"]
    if not verdict.startswith("pending"):
        word, _, rest = verdict.partition(" (")
        verdict = f"**{word}**" + (f" ({rest}" if rest else "")
    return (f"| {claim.claim} ({claim.source}) | {label} | {seeds} | {_side(claim.better, result['better'], common)} "
            f"| {_side(claim.other, result['other'], common)} | {diff} | {ahead} | {verdict} |")


def claims_section(by_protocol: dict[str, list[dict]], superseded: tuple[str, ...] = ()) -> list[str]:
    """Markdown lines of the section: the rule, the table (claim-major, protocols in the given order)."""
    labels = {}
    for protocol, entries in by_protocol.items():
        metric = next((e.get("headline_metric") for e in entries if e.get("headline_metric")), None)
        name = METRIC_NAMES.get(metric or "", metric or "headline")
        labels[protocol] = f"`{protocol}` ({name}{', superseded' if protocol in superseded else ''})"
    lines = [
        "## The papers' own claims, checked", "",
        "Each paper's own ablation claim, checked on our rows of the same methods (rows from the result files "
        "above, by the same rule for every claim). Per protocol, over the split seeds where both rows exist and "
        "the seed passes the validity gate (its `supervised` and `oracle` rows exist and the oracle is ahead by at "
        f"least {VALIDITY_GATE * 100:.0f} points, the seeds gap recovered rests on): mean ± std of each side's test "
        "headline (Dice on polyp, mIoU on camvid), the mean difference (claimed better − compared, points) and "
        "on how many of those seeds the claimed side is strictly ahead.", "",
        "Verdict: **confirmed** when the mean difference is > 0 and the claimed side is ahead on a majority of the "
        f"common seeds; a \"≥\" claim is also **confirmed** when the mean difference is ≥ −{NOISE * 100:.1f} points, "
        "i.e. within noise, and then marked \"within noise\" (the claimed side is not clearly ahead: behind on the "
        "mean, or not ahead on a majority of the seeds); **not confirmed** otherwise; pending (n seeds) when fewer "
        "than 2 common seeds exist, showing what there is (the one common seed, else each side's own rows on the "
        "seeds that pass the gate). Superseded protocols get no new runs, so the variants below have no rows "
        "there.", "",
        "| claim (paper) | protocol (metric) | split seeds | claimed better | compared with | difference (pts) | "
        "claimed side ahead | verdict |",
        "|" + "---|" * 8,
    ]
    for claim in CLAIMS:
        for protocol, entries in by_protocol.items():
            lines.append(_row(check(entries, protocol, claim), labels[protocol]))
    used = {c.other for c in CLAIMS} | {c.better for c in CLAIMS}
    lines += ["", "Bench entries that exist for a claim (in `bench-polyp.yaml` and `bench-camvid.yaml`):", "",
              *[f"- `{name}`: {what}" for name, what in VARIANTS.items() if name in used], ""]
    return lines
