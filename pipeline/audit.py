"""Stage audit: likely leaks across split parts and likely label errors, from the cached pooled vectors.

Outputs: reports/audit.json (with ingest's duplicate groups) and reports/audit/{leaks.png,
label_suspects.png, run.json}. Nothing is moved or relabelled; `transferlab audit` prints the findings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferlab import collector, config, paths, tracking
from transferlab.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, default=paths.FEATURES,
                        help=f"the feature stores; audit.backbone chooses one (default: {paths.FEATURES})")
    parser.add_argument("--images", type=Path, default=paths.PREPARED, help=f"default: {paths.PREPARED}")
    parser.add_argument("--out", type=Path, default=paths.AUDIT_REPORT, help=f"default: {paths.AUDIT_REPORT}")
    parser.add_argument("--sheets", type=Path, default=paths.AUDIT_DIR,
                        help=f"thumbnail sheets and run record (default: {paths.AUDIT_DIR})")
    args = parser.parse_args(argv)
    all_params = config.load(paths.PARAMS)
    params, backbone = all_params.audit, all_params.audited_backbone()
    logged = config.as_dict(params) | {"backbone": backbone}
    with tracking.start() as tracker:  # MLflow opens in a helper process while _run imports the stage's code
        _run(args, params, backbone, logged, tracker)


def _run(args: argparse.Namespace, params: config.AuditParams, backbone: str, logged: dict,
         tracker: tracking.Tracker) -> None:
    with collector.importing():  # the stage's libraries (transferlab.collector: no collection meanwhile)
        from transferlab.audit.job import audit

    with tracker.stage_run("audit", logged, args.sheets / paths.RUN_RECORD) as run:
        report = audit(args.features / backbone, args.images, args.images / paths.MANIFEST.name,
                       args.images / paths.INGEST_REPORT.name, params, args.out, args.sheets)
        counts = report["counts"]
        run.log_metrics({
            "duplicate_groups": counts["duplicate_groups"],
            "near_duplicate_groups": counts["near_duplicate_groups"],
            "leaks": counts["leaks"],
            "leaked_test_images": counts["leaked_test_images"],
            "label_issues_flagged": counts["label_issues_flagged"],
        })
        run.log_artifact(args.out)
        for sheet in report["sheets"].values():
            run.log_artifact(Path(sheet), "audit")
        print(f"audit ({backbone}): {counts['duplicate_groups']} exact and {counts['near_duplicate_groups']} near "
              f"duplicate groups, {counts['leaks']} likely leaks ({counts['leaked_test_images']} test images), "
              f"{counts['label_issues_flagged']} label suspects; `transferlab audit` lists them")


if __name__ == "__main__":
    exit_on_user_error("audit", main)
