"""Re-render a benchmark page's tables from its JSON, with the current columns and earlier pages beside.

Nothing is refitted, re-tested or re-timed: the page keeps its header (command, machine, date, notes)
and its rows; only the tables are written again, e.g. after a column was added to the report, or to
show rows of pages measured later beside it.

    python benchmarks/render_benchmark.py docs/results/student.md \
        --compare docs/results/baselines.json --compare docs/results/student_baselines.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgead.benchmark import BenchmarkReport, earlier_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--compare", action="append", default=[], type=Path)
    args = parser.parse_args(argv)
    rows = json.loads(args.page.with_suffix(".json").read_text())
    text = args.page.read_text()
    header = text[: text.index("\n| ")].rstrip("\n").split("\n") + [""]
    runtimes = sorted({r.get("runtime", "torch") for r in rows})
    report = BenchmarkReport(args.page, [], "", 0, None, [], runtimes, hardware=False)
    report.header = header + ["- Tables re-rendered from the JSON by `python " + " ".join(sys.argv) + "`.", ""]
    report.rows = rows
    report.earlier = earlier_rows(args.compare, {r["dataset"] for r in rows})
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
