"""Plot mIoU against the optimisation steps a cell trained, from label-efficiency records (the budget curve).

    python scripts/budget_curve.py RECORDS.jsonl [MORE.jsonl ...] docs/label_efficiency_budget_cpu.png

One panel per pool -> eval split, one line per row; only scribble cells at N = 20, seed 0, without pretraining or
``--set`` variants; of two records of one cell, the later file's. ``rf`` records (no steps) are a horizontal line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"labelsmart": "C0", "ce-only": "C1", "contrastive": "C2"}  # one colour per row in every panel


def main(records_paths: list[str], out: str) -> None:
    records = [
        json.loads(line) for path in records_paths for line in Path(path).read_text().splitlines() if line.strip()
    ]
    keep = [
        r
        for r in records
        if r.get("n_labeled") == 20
        and r.get("labels") == "scribble"
        and r.get("seed", 0) == 0
        and not r.get("variant")
        and not r.get("ssl")
    ]
    latest: dict[tuple[str, str], dict] = {}  # a later record of the same cell (a rerun) replaces the earlier one
    for r in keep:
        latest[(r["pool"], r["cell"])] = r
    panels: dict[str, list[dict]] = {}
    for r in latest.values():
        panels.setdefault(f"{Path(r['pool']).name}: {r['pool_split']} → {r['eval_split']}", []).append(r)
    if not panels:
        sys.exit("no scribble N=20 seed-0 records without variants in the given files")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, recs) in zip(axes[0], sorted(panels.items()), strict=True):
        for row in sorted({r["row"] for r in recs}):
            if row == "rf":
                ax.axhline(100 * next(r for r in recs if r["row"] == "rf")["miou"], ls="--", c="grey", label="rf")
                continue
            pts = sorted((r["steps"], 100 * r["miou"]) for r in recs if r["row"] == row)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=row, c=COLOURS.get(row, "C3"))
        ax.set_xscale("log")
        ax.set_xlabel("optimisation steps trained (log)")
        ax.set_ylabel("mIoU (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"{out}: {sum(len(v) for v in panels.values())} records in {len(panels)} panels")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python scripts/budget_curve.py RECORDS.jsonl [MORE.jsonl ...] OUT.png")
    main(sys.argv[1:-1], sys.argv[-1])
