"""`transferlab compare`: its parser and handler (the comparison itself is :mod:`transferlab.tracking.compare`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from transferlab.errors import UserError

EXIT_OK = 0


class CompareError(UserError):
    """`transferlab compare` was asked for executions that do not exist."""


def _cmd_compare(args: argparse.Namespace) -> int:
    from transferlab import tracking
    from transferlab.tracking import compare

    if args.last is not None and args.last < 1:
        raise CompareError(f"--last must be at least 1, got {args.last}")
    runs = tracking.executions(args.root)
    if not runs:
        raise CompareError(compare.render([]))
    experiments = args.exp or ()
    known = {r.tags.get(tracking.TAG_EXP_NAME) for r in runs}
    missing = [name for name in experiments if name not in known]
    if missing:
        have = sorted(n for n in known if n)
        raise CompareError(f"no execution of DVC experiment {', '.join(map(repr, missing))} reached evaluate; "
                           f"experiments that did: {', '.join(have) or 'none'}")
    chosen = compare.choose(runs, last=len(runs) if args.all else args.last, experiments=experiments)
    print(compare.render(chosen))
    return EXIT_OK


def add_parser(subparsers: Any) -> None:
    cmp = subparsers.add_parser(
        "compare",
        help="compare pipeline executions recorded in MLflow: differing params and test figures",
        description=(
            "By default the latest execution that reached evaluate; when that is a DVC experiment, "
            "also the latest plain execution before it, side by side."
        ),
    )
    cmp.add_argument("--last", type=int, metavar="N", help="the N latest executions")
    cmp.add_argument("--exp", action="append", metavar="NAME", help="executions of DVC experiment NAME (repeatable)")
    cmp.add_argument("--all", action="store_true", help="every execution")
    cmp.add_argument("--root", type=Path, default=Path("."),
                     help="a folder of the project whose mlruns/ holds the store (default: .)")
    cmp.set_defaults(handler=_cmd_compare)
