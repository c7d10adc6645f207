"""The spread of several runs of bench.run: each figure's median, baseline and ratio per run.

    .venv/bin/python -m bench.spread run1.json run2.json run3.json

Prints a markdown table: per metric, each run's Corral median / baseline median (ratio), then
the range of the ratios. Metrics missing from a run show "—" there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(row: dict[str, Any]) -> str:
    r = row.get("ratio")
    if r is None:
        return "—"
    return f"{r * 100:.0f}%" if row.get("ratio_kind") == "%" else f"{r:.1f}x"


def spread(runs: list[dict[str, Any]]) -> str:
    order: list[str] = []
    by_run: list[dict[str, dict[str, Any]]] = []
    metric: dict[str, str] = {}
    for run in runs:
        rows = {r["key"]: r for r in run["rows"]}
        by_run.append(rows)
        for key, row in rows.items():
            if key not in metric:
                order.append(key)
                metric[key] = f"{row['metric']} ({row['unit']})"
    head = ["metric", *(f"run {i + 1}" for i in range(len(runs))), "ratio range"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for key in order:
        cells, ratios = [metric[key]], []
        for rows in by_run:
            row = rows.get(key)
            if row is None or row.get("corral") is None:
                cells.append("—")
                continue
            corral = _fmt(row["corral"].get("median"))
            base = row.get("baseline") or {}
            if base.get("median") is not None:
                cells.append(f"{corral} / {_fmt(base['median'])} ({_ratio(row)})")
            else:
                cells.append(corral)
            if row.get("ratio") is not None:
                ratios.append(row["ratio"])
        kind = next((r[key].get("ratio_kind") for r in by_run if key in r), "x")
        if ratios:
            lo, hi = min(ratios), max(ratios)
            cells.append(
                f"{lo * 100:.0f} to {hi * 100:.0f}%" if kind == "%" else f"{lo:.1f} to {hi:.1f}x"
            )
        else:
            cells.append("—")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    args = ap.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in args.runs]
    for i, run in enumerate(runs):
        meta = run["meta"]
        loads = meta.get("phase_load_average", {})
        peak = max((max(v) for v in loads.values()), default=None)
        print(f"run {i + 1}: {meta['started_at']}, {meta['seconds']:.0f} s, "
              f"source {meta['source']['src_sha256']}, peak load average {peak}")  # fmt: skip
    print()
    print(spread(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
