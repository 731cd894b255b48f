"""``finetune.strategy: auto``: the probe's recommendation as finetune params, and the record of the choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transferlab.config import AUTO, FinetuneParams, ParamsError
from transferlab.errors import UserError


class ProbeReportMissingError(UserError):
    """strategy auto, but no probe report for the backbone."""


def resolve(params: FinetuneParams, probe_report: Path) -> tuple[FinetuneParams, dict[str, Any] | None]:
    """Params with ``auto`` replaced by the recommended strategy, and ``{requested, chosen, reason}``.

    Explicit strategies come back unchanged, with None: the probe report is not read.
    The resolved params go into the checkpoint identity, so a changed recommendation retrains.
    """
    if params.strategy != AUTO:
        return params, None
    path = Path(probe_report)
    if not path.is_file():
        raise ProbeReportMissingError(f"finetune.strategy is auto, but the probe report {path} is missing: run "
                                      "`dvc repro` (the probe stage writes it) or choose a strategy")
    rec = json.loads(path.read_text())["recommendation"]
    strategy, last = rec["strategy"], rec.get("last_blocks")
    if strategy not in ("head_only", "last_blocks", "full") or (strategy == "last_blocks" and not last):
        raise ParamsError(f"{path}: recommendation {rec!r} is not a strategy; rerun the probe stage")
    update: dict[str, Any] = {"strategy": strategy}
    if strategy == "last_blocks":
        update["last_blocks"] = int(last)
    chosen = f"last_blocks: {last}" if strategy == "last_blocks" else strategy
    return params.model_copy(update=update), {"requested": AUTO, "chosen": chosen, "reason": rec["reason"],
                                              "probe_report": path.as_posix()}
