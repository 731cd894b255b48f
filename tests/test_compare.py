from transferlab.tracking.compare import choose, differing_params, figure_table, render
from transferlab.tracking import TAG_EXP_NAME, Execution


def execution(i: int, strategy: str, exp: str | None = None, acc: float = 0.9) -> Execution:
    tags = {TAG_EXP_NAME: exp} if exp else {}
    figs = {"m-finetune": {"accuracy": acc, "accuracy_ci_low": acc - 0.05, "accuracy_ci_high": acc + 0.03,
                           "macro_f1": acc, "log_loss": 0.2}}
    return Execution(f"r{i}", f"pipeline {i}", tags, {"finetune.strategy": strategy, "split.seed": "42"}, figs)


def test_default_is_latest_plus_baseline_when_it_is_an_experiment() -> None:
    runs = [execution(3, "full", exp="tidy-oak"), execution(2, "last_blocks"), execution(1, "head_only")]
    assert [r.run_id for r in choose(runs)] == ["r2", "r3"]
    assert [r.run_id for r in choose(runs[1:])] == ["r2"]
    assert [r.run_id for r in choose(runs, last=3)] == ["r1", "r2", "r3"]
    assert [r.run_id for r in choose(runs, experiments=["tidy-oak"])] == ["r3"]


def test_only_differing_params_are_shown() -> None:
    runs = [execution(2, "last_blocks"), execution(3, "full", exp="tidy-oak")]
    diff = differing_params(runs)
    assert list(diff.index) == ["finetune.strategy"]
    assert list(diff.iloc[0]) == ["last_blocks", "full"]


def test_figures_side_by_side_with_interval() -> None:
    runs = [execution(2, "last_blocks", acc=0.9), execution(3, "full", exp="tidy-oak", acc=0.95)]
    table = figure_table(runs)
    assert table.loc["m-finetune", "accuracy | pipeline 3 [tidy-oak]"] == "0.950 [0.900, 0.980]"
    text = render(runs)
    assert "finetune.strategy" in text and "tidy-oak" in text and "split.seed" not in text


def test_nothing_evaluated_yet_says_what_to_do() -> None:
    assert "dvc repro" in render([])
