"""Plot merged label-efficiency records, one PNG per data set (the figures of BENCHMARKS.md).

    python scripts/label_efficiency_plots.py RECORDS.jsonl [MORE.jsonl ...] "docs/label_efficiency_{}_cpu.png"

``{}`` in the output pattern becomes the data set's folder name (``camvid``, ``isbi-em``). Records at a minutes
budget and seeds other than 0 stay out of the plots (they are tables in BENCHMARKS.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labelsmart.bench import label_efficiency as labeleff  # noqa: E402


def main(records_paths: list[str], pattern: str) -> None:
    records = [
        json.loads(line) for path in records_paths for line in Path(path).read_text().splitlines() if line.strip()
    ]
    by_pool: dict[str, list[dict]] = {}
    for r in records:
        if r.get("seed", 0) == 0 and r.get("budget_minutes") is None:
            by_pool.setdefault(Path(r["pool"]).name, []).append(r)
    for name, recs in sorted(by_pool.items()):
        out = Path(pattern.format(name))
        labeleff.plot(recs, out)
        print(f"{out}: {len(recs)} records")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python scripts/label_efficiency_plots.py RECORDS.jsonl [MORE.jsonl ...] OUT_{}.png")
    main(sys.argv[1:-1], sys.argv[-1])
