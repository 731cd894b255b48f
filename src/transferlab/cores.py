"""How many cores this process may use: the one figure ingest and the decode workers are sized from."""

from __future__ import annotations

import psutil


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share)."""
    try:
        return len(psutil.Process().cpu_affinity()) or 1
    except (AttributeError, NotImplementedError, psutil.Error):  # no affinity on macOS
        return psutil.cpu_count() or 1
