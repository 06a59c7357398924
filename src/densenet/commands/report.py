"""``densenet report RUN_DIR... [--out DIR]``: training runs as the paper's Tables 2 and 3, and its plots.

The work is ``densenet.analysis.report``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from densenet.analysis.report import markdown, read_run, write_report
from densenet.files import check_outputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders made by `densenet train`")
    parser.add_argument("--out", default=None, help="folder for report.md and report.png (created if needed)")


def run(args: argparse.Namespace) -> int:
    if args.out:
        out = Path(args.out)
        read = [Path(run) / name for run in args.runs for name in ("config.yaml", "metrics.csv")]
        check_outputs([("--out", out / "report.md"), ("--out", out / "report.png")], inputs=read,
                      own=["report.md", "report.png"], command="densenet report")
    results = [read_run(run) for run in args.runs]
    print(markdown(results), end="")
    if args.out:
        command = "densenet report " + " ".join(args.runs) + f" --out {args.out}"
        md, png = write_report(results, args.out, command)
        print(f"wrote {md} and {png}")
    return 0
