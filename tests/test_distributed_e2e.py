"""`dvc repro` with distributed.nproc_per_node: 2 on the default dataset: torchrun under DVC, end to end.

One repro of the whole pipeline in a copy of the project, with fast params
(one cached-feature head, 2 fine-tuning epochs): extract and finetune launch
two ranks each, every other stage runs as always, MLflow gets one child run per
stage (rank 0's, never one per rank), and then changing only the number of
processes outdates finetune (its weights depend on the world size) but not
extract (its store is the same bytes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import copy_project, project_env, output as run
from transferlab import tracking

pytestmark = pytest.mark.slow
BACKBONE = "efficientnet_lite0"



def fast_two_ranks(params: dict) -> None:
    params["train_head"]["kinds"] = ["gap"]
    params["finetune"].update(max_epochs=2, warmup_epochs=1)
    params["distributed"]["nproc_per_node"] = 2


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    root = tmp_path_factory.mktemp("distributed-e2e") / "project"
    env = project_env() | {"OMP_NUM_THREADS": "1"}  # one thread per rank: 2 ranks on 2 cores
    copy_project(root, env, edit=fast_two_ranks)
    run(["transferlab", "data", "get"], root, env)
    return root, env, run(["dvc", "repro"], root, env)


def test_two_ranks_under_dvc_repro_log_one_child_run_per_stage(repro: tuple[Path, dict[str, str], str]) -> None:
    root, env, out = repro
    for stage in (f"extract@{BACKBONE}", f"finetune@{BACKBONE}"):
        assert f"{stage}: launching 2 process(es) on node 0 of 1 (world size 2) through torchrun" in out
    c, exp = tracking.client(root), tracking.experiment_id(root)
    parents = c.search_runs([exp], filter_string=f"tags.`{tracking.TAG_KIND}` = 'pipeline'")
    assert len(parents) == 1
    children = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    stages = set(run(["dvc", "stage", "list", "--name-only"], root, env).split()) - {"preflight"}
    assert sorted(r.info.run_name for r in children) == sorted(stages)  # each once: no run per rank
    extract = next(r for r in children if r.info.run_name == f"extract@{BACKBONE}")
    n = len(pd.read_csv(root / "data/split.csv"))
    by_rank = [extract.data.metrics[f"images_forwarded_rank{r}"] for r in (0, 1)]
    assert sum(by_rank) == extract.data.metrics["images_forwarded"] == n and min(by_rank) > 0
    finetune = next(r for r in children if r.info.run_name == f"finetune@{BACKBONE}")
    assert finetune.data.params["world_size"] == "2" and finetune.data.params["batch_size_per_rank"] == "16"
    assert json.loads((root / f"models/finetune/{BACKBONE}/metrics.json").read_text())["epochs_run"] == 2


def test_the_process_count_outdates_finetune_but_not_extract(repro: tuple[Path, dict[str, str], str]) -> None:
    root, env, _ = repro
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["distributed"]["nproc_per_node"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(run(["dvc", "status", "--json"], root, env))
    assert set(status) == {"preflight", f"finetune@{BACKBONE}"}
