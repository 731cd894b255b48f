"""The probe and `finetune.strategy: auto` against the strategies chosen by hand, on real data.

Hymenoptera (split as its published figures are: train folder with val drawn from it,
test = val folder), efficientnet_lite0: times extract and probe side by side, then
fine-tunes with `auto`, `head_only`, `last_blocks: 2` and `full` through `dvc repro`
and reads each one's test accuracy from evaluate. builtin:digits (small, unlike
ImageNet): the probe and what auto chooses. Writes its section of BENCHMARKS.md and
the curves' PNGs into bench/figures/.

    .venv/bin/python bench/strategies.py [--keep DIR] [--skip-finetune]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
from hymenoptera import sh  # noqa: E402
from projects import copy_project, find_hymenoptera, machine, project_env, split_as_published, write_section  # noqa: E402

SECTION = "strategies"
BACKBONE = "efficientnet_lite0"
FIGURES = ROOT / "bench" / "figures"
HAND = (("head_only", None), ("last_blocks", 2), ("full", None))


def project(work: Path, source: str, env: dict[str, str], published: bool) -> Path:
    dest = work / source.replace(":", "-").strip("/").replace("/", "-")
    copy_project(dest, env)
    sh(["transferlab", "data", "get", source], dest, env)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params = split_as_published(params) if published else params
    params["train_head"]["kinds"] = ["svm"]  # finetune depends on the heads; the svm is the quickest
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def timed(project_dir: Path, stage: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    sh(["dvc", "repro", "--single-item", stage], project_dir, env)
    return time.perf_counter() - started


def set_strategy(project_dir: Path, strategy: str, last_blocks: int | None) -> None:
    path = project_dir / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["finetune"]["strategy"] = strategy
    if last_blocks is not None:
        params["finetune"]["last_blocks"] = last_blocks
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def finetune_test(project_dir: Path, env: dict[str, str]) -> dict:
    started = time.perf_counter()
    sh(["dvc", "repro", "evaluate"], project_dir, env)
    metrics = json.loads((project_dir / "reports" / "metrics.json").read_text())
    meta = json.loads((project_dir / "models" / "finetune" / BACKBONE / "model.json").read_text())
    test = metrics[f"{BACKBONE}-finetune"]
    return {"accuracy": test["accuracy"], "low": test["accuracy_ci_low"], "high": test["accuracy_ci_high"],
            "errors": test["errors"], "n": test["n"], "strategy": meta["strategy"],
            "seconds": time.perf_counter() - started}


def probe_table(report: dict) -> list[str]:
    lines = ["| block | channels | val accuracy [95% CI] | C |", "|---|---|---|---|"]
    lines += [f"| {b['block']} | {b['channels']} | {b['val_accuracy']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}] "
              f"| {b['C']:g} |" for b in report["blocks"]]
    return lines


def chosen(rec: dict) -> str:
    return f"last_blocks: {rec['last_blocks']}" if rec["strategy"] == "last_blocks" else rec["strategy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=find_hymenoptera())
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--skip-finetune", action="store_true", help="probes and timings only")
    args = parser.parse_args()
    if args.data is None:
        parser.error("no local copy of hymenoptera found: pass --data DIR or set TRANSFERLAB_HYMENOPTERA")
    env = project_env()
    work = args.keep or Path(tempfile.mkdtemp(prefix="transferlab-bench-"))
    load = os.getloadavg()
    hym = project(work, str(args.data.resolve()), env, published=True)
    sh(["dvc", "repro", "split"], hym, env)
    extract_s = timed(hym, f"extract@{BACKBONE}", env)
    probe_s = timed(hym, f"probe@{BACKBONE}", env)
    reports = {"hymenoptera": json.loads((hym / "reports" / "probe" / f"{BACKBONE}.json").read_text())}
    runs = {}
    if not args.skip_finetune:
        auto = reports["hymenoptera"]["recommendation"]
        set_strategy(hym, "auto", None)
        runs["auto"] = finetune_test(hym, env)
        # the strategy auto chose runs next: same checkpoint identity, so its outputs come without training
        order = sorted(HAND, key=lambda s: chosen({"strategy": s[0], "last_blocks": s[1]}) != chosen(auto))
        for strategy, last in order:
            set_strategy(hym, strategy, last)
            runs[chosen({"strategy": strategy, "last_blocks": last})] = finetune_test(hym, env)
            print(f"{strategy} {last}: {runs}", flush=True)
    digits = project(work, "builtin:digits", env, published=False)
    sh(["dvc", "repro", "split"], digits, env)
    digits_extract_s = timed(digits, f"extract@{BACKBONE}", env)
    digits_probe_s = timed(digits, f"probe@{BACKBONE}", env)
    reports["digits"] = json.loads((digits / "reports" / "probe" / f"{BACKBONE}.json").read_text())
    FIGURES.mkdir(parents=True, exist_ok=True)
    for name, folder in (("hymenoptera", hym), ("digits", digits)):
        shutil.copyfile(folder / "reports" / "probe" / f"{BACKBONE}.png", FIGURES / f"probe-{name}.png")
    text = section(reports, runs, {"extract": extract_s, "probe": probe_s, "digits_extract": digits_extract_s,
                                   "digits_probe": digits_probe_s}, load)
    write_section(SECTION, text)
    print(text)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


def section(reports: dict, runs: dict, seconds: dict, load: tuple[float, float, float]) -> str:
    hym, dig = reports["hymenoptera"], reports["digits"]
    lines = [
        "## Choosing the strategy from measurements: the probe and `strategy: auto` (`bench/strategies.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, **beside other work** (load average "
        f"{load[0]:.2f} at start): absolute seconds are inflated; the probe/extract ratio was measured side "
        "by side in one run. efficientnet_lite0, params.yaml defaults (train_head.kinds: [svm]).",
        "",
        "| dataset | extract s | probe s | probe / extract | ImageNet similarity | auto chose |",
        "|---|---|---|---|---|---|",
    ]
    for name, rep, ex, pr in (("hymenoptera", hym, seconds["extract"], seconds["probe"]),
                              ("builtin:digits", dig, seconds["digits_extract"], seconds["digits_probe"])):
        sim = rep["measures"]["imagenet_similarity"]["value"]
        lines.append(f"| {name} | {ex:.1f} | {pr:.1f} | {pr / ex:.2f} | {sim:.3f} | {chosen(rep['recommendation'])} |")
    lines += ["", "Seconds: `dvc repro --single-item <stage>` wall time (start-up, imports and DVC included). "
              "Extract forwards train, val and test, writes the maps and keeps every block's pooled output of "
              "train and val; the probe reads them from the store and fits a logistic regression per block.", ""]
    if runs:
        lines += ["Hymenoptera test split (the `val` folder), fine-tuned efficientnet_lite0:", "",
                  "| strategy | test accuracy [95% CI] | errors | blocks trained |", "|---|---|---|---|"]
        for name, r in runs.items():
            label = f"auto (chose {r['strategy']['name']}" + (f": {r['strategy']['last_blocks']})"
                                                            if r["strategy"]["last_blocks"] else ")") \
                if name == "auto" else name
            lines.append(f"| {label} | {r['accuracy']:.3f} [{r['low']:.3f}, {r['high']:.3f}] | {r['errors']} of "
                         f"{r['n']} | {len(r['strategy']['trainable_blocks'])} |")
        lines.append("")
    for name, rep in (("Hymenoptera", hym), ("builtin:digits", dig)):
        lines += [f"Probe curve, {name} (`bench/figures/probe-{name.split(':')[-1].lower()}.png`):", "",
                  *probe_table(rep), "", f"Reason: {rep['recommendation']['reason']}", ""]
    return "\n".join(lines).rstrip("\n")


if __name__ == "__main__":
    main()
