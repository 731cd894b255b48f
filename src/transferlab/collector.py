"""Python's garbage collector around a stage process's heavy imports and its exit.

A stage imports torch, timm, scikit-learn and MLflow: millions of objects (modules,
classes, functions) that live as long as the process. Counting allocations,
the collector runs hundreds of passes over them while they load and finds
nothing to free: about 0.4 s of CPU for a head stage's imports, 1.2 s for
finetune's (measured with ``gc.callbacks`` on 2 cores). At exit, Python's
shutdown runs full passes over all of them again: about a second per stage.

So the collector is off while a stage imports (:func:`importing`), and what
the imports made is then frozen out of every later pass (``gc.freeze``), as it
is before the process exits (:func:`before_exit`). Collection itself goes on
for the stage's own work; nothing else changes (atexit handlers and finalizers
run as always).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def importing() -> Iterator[None]:
    """No collection while the block imports; then everything alive is frozen out of later passes."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def before_exit() -> None:
    """Spare the process's shutdown the full passes over all it imported: it ends now."""
    gc.freeze()
