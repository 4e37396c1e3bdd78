#!/usr/bin/env python3
"""Compare bench runs side by side: `bench/compare.py a.json b.json ...` (e.g. one per experiment).

Several files with the same label (repeated runs) are folded into one column:
the median of each figure, so that one noisy run does not decide.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

FIGURES = (
    ("proxy µs/req", "proxy_us_per_req", ".0f"),
    ("µs/event", "proxy_us_per_event", ".1f"),
    ("marginal µs/event", "proxy_marginal_us_per_event", ".1f"),
    ("req/s", "rps", ".0f"),
    ("p50 ms", "p50_ms", ".3f"),
    ("p99 ms", "p99_ms", ".3f"),
    ("ttfb p50 ms", "ttfb_p50_ms", ".3f"),
)


def main(paths: list[str]) -> int:
    runs: dict[str, list[dict[str, Any]]] = {}
    for p in paths:
        report = json.loads(Path(p).read_text())
        runs.setdefault(report["meta"].get("label") or Path(p).stem, []).append(report)
    labels = list(runs)
    keys: list[tuple[str, str, bool, int]] = []
    for reports in runs.values():
        for r in reports[0]["rows"]:
            k = (r["scenario"], r["via"], r["stream"], r["concurrency"])
            if "skipped" not in r and r["via"] != "direct" and k not in keys:
                keys.append(k)
    lines = [f"runs per label: " + ", ".join(f"{lb} x{len(runs[lb])}" for lb in labels)]
    head = ["scenario", "figure", *labels]
    table = [head]
    for scenario, via, stream, c in keys:
        for name, field, fmt in FIGURES:
            cells = []
            for lb in labels:
                vals = [r.get(field) for rep in runs[lb] for r in rep["rows"]
                        if (r["scenario"], r["via"]) == (scenario, via) and r.get(field) is not None]
                cells.append(format(statistics.median(vals), fmt) if vals else "-")
            if any(c != "-" for c in cells):
                table.append([f"{scenario} {via}", name, *cells])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
