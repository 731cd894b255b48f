"""``transferlab audit``: the latest audit's findings as text, with paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transferlab.errors import UserError

RAW = "data/raw"
PREPARED = "data/prepared"


class AuditError(UserError, ValueError):
    """The audit cannot read what it needs."""


def read_audit(path: Path) -> dict[str, Any]:
    """``reports/audit.json``; AuditError naming the stage that writes it when it is not there."""
    path = Path(path)
    if not path.exists():
        raise AuditError(f"{path} not found: run `dvc repro` (the audit stage writes it)")
    return json.loads(path.read_text(encoding="utf-8"))


def _groups(title: str, groups: list[list[str]], limit: int) -> list[str]:
    lines = [f"{title}: {len(groups)} group(s)" + (" (paths under data/raw)" if groups else "")]
    for group in groups[:limit]:
        lines.append("  " + "  ==  ".join(group))
    if len(groups) > limit:
        lines.append(f"  ... {len(groups) - limit} more in reports/audit.json")
    return lines


def _where(source: str, path: str) -> str:
    return f"{RAW}/{source}" if source else f"{PREPARED}/{path}"


def format_audit(report: dict[str, Any], limit: int = 20) -> str:
    """The duplicates, likely leaks and label suspects of ``report`` (``reports/audit.json``), ``limit`` of each."""
    params = report.get("params", {})
    lines = [f"Audit of the {report.get('backbone', '?')} features "
             f"(leak threshold {params.get('leak_threshold', '?')}); nothing was moved or relabelled.", ""]
    lines += _groups("Exact duplicates (same bytes; kept in one split part)", report.get("duplicates", []), limit)
    lines += _groups("Near-duplicates (perceptual hash; kept in one split part)", report.get("near_duplicates", []), limit)
    leaks = report.get("leaks", [])
    lines += ["", f"Likely leaks across split parts: {len(leaks)} "
              f"({len(report.get('leaked_test_images', []))} test image(s))"]
    for leak in leaks[:limit]:
        lines.append(f"  {leak['similarity']:.3f}  {leak['part']}: {_where(leak.get('source', ''), leak['path'])}"
                     f"  <->  {leak['match_part']}: {_where(leak.get('match_source', ''), leak['match'])}")
    suspects = report.get("label_suspects", [])
    lines += ["", f"Label suspects: {report.get('label_issues_flagged', len(suspects))} flagged, "
              f"{min(len(suspects), limit)} shown (most likely first)"]
    if "label_issues_skipped" in report:
        lines.append(f"  skipped: {report['label_issues_skipped']}")
    for s in suspects[:limit]:
        lines.append(f"  #{s['rank']:<3} {s['part']}: {_where(s.get('source', ''), s['path'])}  labelled {s['label']!r}"
                     f" (p={s['p_label']:.2f}), looks like {s['suggested']!r} (p={s['p_suggested']:.2f})")
    sheets = report.get("sheets", {})
    if sheets:
        lines += ["", "Thumbnail sheets: " + ", ".join(sheets.values())]
    return "\n".join(lines)
