"""The one base class of the errors a user can fix: bad params, data, sources or servers.

Stage scripts and the CLI print a ``UserError`` as one line and exit with
:data:`EXIT_USER_ERROR`; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

from transferlab.collector import before_exit

EXIT_USER_ERROR = 2  # the code argparse uses for bad arguments


class UserError(Exception):
    """Something the user can fix (a params key, a data file, a server address); not a bug."""


def exit_on_user_error(what: str, main: Callable[[], object]) -> None:
    """Run ``main``, a stage process's whole work; a UserError becomes ``<what>: error: <message>`` and exit code 2.

    The process ends right after: :func:`transferlab.collector.before_exit` spares its shutdown the
    collector's passes over all it imported.
    """
    try:
        main()
    except UserError as exc:
        fail(what, exc)
    finally:
        before_exit()


def fail(what: str, exc: BaseException) -> NoReturn:
    print(f"{what}: error: {exc}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
