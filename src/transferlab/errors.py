"""The one base class of the errors a user can fix: bad params, data, sources or servers.

Stage scripts and the CLI print a ``UserError`` as one line and exit with
:data:`EXIT_USER_ERROR`; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import gc
import sys
from typing import Callable, NoReturn

EXIT_USER_ERROR = 2  # the code argparse uses for bad arguments


class UserError(Exception):
    """Something the user can fix (a params key, a data file, a server address); not a bug."""


def exit_on_user_error(what: str, main: Callable[[], object]) -> None:
    """Run ``main``, a stage process's whole work; a UserError becomes ``<what>: error: <message>`` and exit code 2.

    The process ends right after, so every object is then frozen out of the garbage collector
    (``gc.freeze``): Python's shutdown otherwise runs full collections over all that torch, timm, scikit-learn
    and MLflow created at import, about a second per stage process on 2 cores. Nothing else is skipped:
    atexit handlers, finalizers and buffered output run as always.
    """
    try:
        main()
    except UserError as exc:
        fail(what, exc)
    finally:
        gc.freeze()


def fail(what: str, exc: BaseException) -> NoReturn:
    print(f"{what}: error: {exc}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
