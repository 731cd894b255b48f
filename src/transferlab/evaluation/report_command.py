"""`transferlab report [--open]`: where the last run's report page is, or open it in a browser."""

from __future__ import annotations

import argparse
import webbrowser
from pathlib import Path
from typing import Any

from transferlab.errors import UserError
from transferlab.paths import REPORT_HTML, REPORTS

EXIT_OK = 0


class ReportMissingError(UserError, FileNotFoundError):
    """No report page yet."""


def _cmd_report(args: argparse.Namespace) -> int:
    page = (args.reports / REPORT_HTML).resolve()
    if not page.is_file():
        raise ReportMissingError(f"no report at {args.reports / REPORT_HTML}: run `dvc repro` (its evaluate stage "
                                 "writes it)")
    print(page)
    if args.open and not webbrowser.open(page.as_uri()):
        raise ReportMissingError(f"no browser could be started here; open {page} on a machine with one")
    return EXIT_OK


def add_parser(subparsers: Any) -> None:
    report = subparsers.add_parser(
        "report", help="print the path of the last run's report page (reports/index.html), or open it",
        description="The page evaluate writes: comparison, per-class figures, curves, top losses with class "
                    "activation maps, the run's identity. Self-contained: send the file, no network needed.")
    report.add_argument("--open", action="store_true", help="also open it in the default web browser")
    report.add_argument("--reports", type=Path, default=REPORTS, help=f"evaluate's outputs (default: {REPORTS})")
    report.set_defaults(handler=_cmd_report)
