"""Side-by-side comparison of pipeline executions (the data comes from tracking.executions).

Which executions: by default the latest one that reached ``evaluate``; when
that one is a DVC experiment (``dvc exp run``), also the latest execution
before it that is not, as its baseline, so the change shows next to what it
changed. ``last`` and ``experiments`` choose explicitly.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from transferlab.tracking import TAG_COMMIT, TAG_DIRTY, TAG_EXP_NAME, Execution

FIGURES = ("accuracy", "macro_f1", "log_loss")
SHORT_COMMIT = 8


def choose(runs: Sequence[Execution], last: int | None = None,
           experiments: Sequence[str] = ()) -> list[Execution]:
    """Pick executions (newest first in ``runs``); returned oldest first for reading left to right."""
    if experiments:
        chosen = [r for r in runs if r.tags.get(TAG_EXP_NAME) in set(experiments)]
    elif last is not None:
        chosen = list(runs[:last])
    else:
        chosen = list(runs[:1])
        if chosen and TAG_EXP_NAME in chosen[0].tags:
            chosen += [r for r in runs[1:] if TAG_EXP_NAME not in r.tags][:1]
    return list(reversed(chosen))


def label(run: Execution) -> str:
    exp = run.tags.get(TAG_EXP_NAME)
    return f"{run.name} [{exp}]" if exp else run.name


def header(runs: Sequence[Execution]) -> pd.DataFrame:
    rows = [{"execution": label(r), "commit": r.tags.get(TAG_COMMIT, "")[:SHORT_COMMIT],
             "dirty": r.tags.get(TAG_DIRTY, ""), "dvc experiment": r.tags.get(TAG_EXP_NAME, ""),
             "run id": r.run_id} for r in runs]
    return pd.DataFrame(rows)


def differing_params(runs: Sequence[Execution]) -> pd.DataFrame:
    """Params whose values differ between the executions (rows), one column per execution."""
    keys = sorted({k for r in runs for k in r.params})
    table = pd.DataFrame({label(r): [r.params.get(k, "") for k in keys] for r in runs}, index=keys)
    if len(runs) < 2:
        return table.iloc[0:0]
    return table[table.nunique(axis=1) > 1]


def figure_table(runs: Sequence[Execution], figures: Sequence[str] = FIGURES) -> pd.DataFrame:
    """One row per model; per execution the accuracy with its interval and the other figures."""
    models = sorted({m for r in runs for m in r.test})
    table = pd.DataFrame(index=pd.Index(models, name="model"))
    for r in runs:
        for fig in figures:
            column = f"{fig} | {label(r)}" if len(runs) > 1 else fig
            table[column] = [_cell(r.test.get(m, {}), fig) for m in models]
    first = table.columns[0] if len(table.columns) else None
    return table.sort_values(first, ascending=False) if first else table


def _cell(figs: dict[str, float], fig: str) -> str:
    if fig not in figs:
        return ""
    if fig == "accuracy" and "accuracy_ci_low" in figs:
        return f"{figs[fig]:.3f} [{figs['accuracy_ci_low']:.3f}, {figs['accuracy_ci_high']:.3f}]"
    return f"{figs[fig]:.3f}"


def render(runs: Sequence[Execution]) -> str:
    if not runs:
        return "no pipeline execution has reached the evaluate stage yet: run `dvc repro`"
    parts = ["Executions:", header(runs).to_string(index=False), ""]
    diff = differing_params(runs)
    if len(runs) > 1:
        parts += ["Params that differ:", diff.to_string() if not diff.empty else "(none)", ""]
    parts += ["Test figures:", figure_table(runs).to_string()]
    return "\n".join(parts)
