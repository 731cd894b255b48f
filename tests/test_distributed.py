"""extract and finetune in several processes (torchrun, Gloo on the CPU): the same results, one run, no hang.

Every test runs the real stage scripts in a small project (32 px synthetic
images) with ``distributed.nproc_per_node`` 1 or 2, one torch thread per rank
(2 ranks on 2 cores must not thrash), and rendezvous ports from the OS.

The fine-tuning comparison trains the head only on the packaged ImageNet
EfficientNet-Lite0, with dropout 0 and no augmentation: the frozen backbone
stays in eval mode, so its BatchNorm uses running statistics, and each step's
mean gradient over the global batch is then the same computation in one process
and in two (up to float summation order). A trained BatchNorm would normalise
with each rank's half of the batch on the CPU (PyTorch's SyncBatchNorm runs on
GPUs only), and random augmentation and dropout draw from each rank's own
generator: both change the weights by design, not by error, so the test leaves
them out rather than loosen its tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image

from helpers import tree_digest
from transferlab import config
from transferlab.config import ParamsError
from transferlab.distributed.launch import first_failure, torchrun_args
from transferlab.training.finetune import CHECKPOINT_FILE, MODEL_FILE

pytestmark = pytest.mark.slow  # each case starts 2-4 stage processes (torch imports: seconds each)

REPO = Path(__file__).resolve().parents[1]
SMALL = "mobilenet_v3_small"  # random init (seeded in extract): the cheapest forward
LITE = "efficientnet_lite0"  # packaged ImageNet weights: a head that learns something in 2 epochs
PER_CLASS = {"train": 10, "val": 3}  # 20 train images: 5 global batches of 4, 2 images per rank
KILL_BOUND_S = 120
STAGE_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for label, color in {"blue": (30, 40, 220), "red": (220, 30, 40)}.items():
        for part, count in PER_CLASS.items():
            for i in range(count):
                rel = f"images/{label}/{part}-{i}.jpg"
                pixels = np.clip(np.array(color) + rng.integers(-60, 60, (32, 32, 3)), 0, 255)
                (root / "data/prepared" / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(root / "data/prepared" / rel)
                rows.append((rel, label, part, "0" * 64))
    pd.DataFrame(rows, columns=["path", "label", "part", "sha256"]).to_csv(root / "data/split.csv", index=False)


def write_params(root: Path, nproc: int = 1, max_epochs: int = 2, **distributed: Any) -> None:
    params = {
        "extract": {"backbones": [SMALL, LITE], "weights": {SMALL: "none"}, "batch_size": 4},
        "finetune": {"backbones": [LITE], "strategy": "head_only", "dropout": 0.0, "max_epochs": max_epochs,
                     "warmup_epochs": 1, "patience": 10, "batch_size": 4, "lr": 0.01, "autocast": False,
                     "augment": {"random_resized_crop": False, "hflip": False}},
        "distributed": {"nproc_per_node": nproc, **distributed},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    write_images(root)
    return root


def env(key: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TORCHELASTIC_", "RANK"))}
    return base | {"OMP_NUM_THREADS": "1", "TRANSFERLAB_EXECUTION": key}


def stage(script: str, root: Path, args: list[str], key: str, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(REPO / "pipeline" / script), *args], cwd=root, env=env(key),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finished(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=STAGE_TIMEOUT_S)
    assert proc.returncode == 0, out
    return out


def stage_runs(root: Path, name: str) -> list[Any]:
    from transferlab import tracking

    c = tracking.client(root)
    return c.search_runs([tracking.experiment_id(root)], filter_string=f"attributes.run_name = '{name}'")


# --------------------------------------------------------------------------- params and the launch line


def test_global_batch_must_split_evenly_over_the_ranks() -> None:
    with pytest.raises(ParamsError, match=r"finetune.batch_size: got 6; allowed: a multiple of the world size .* \(4\)"):
        config.parse(config.Params, {"finetune": {"batch_size": 6}, "distributed": {"nproc_per_node": 2, "nnodes": 2,
                                                                                    "rdzv_endpoint": "node0:1234"}})
    with pytest.raises(ParamsError, match=r"distributed.node_rank: got 2; allowed: 0 to nnodes - 1 \(1\)"):
        config.parse(config.Params, {"distributed": {"nnodes": 2, "node_rank": 2}})
    with pytest.raises(ParamsError, match="distributed.rdzv_endpoint"):
        config.parse(config.Params, {"distributed": {"rdzv_endpoint": "no-port"}})


def test_the_rank_killed_by_a_signal_is_named_before_peers_that_raised_in_the_same_second() -> None:
    fail = lambda seconds, code: SimpleNamespace(timestamp=seconds, exitcode=code)  # noqa: E731
    assert first_failure({0: fail(100, 1), 1: fail(100, -9)}) == 1  # a tie in torchrun's whole seconds
    assert first_failure({0: fail(99, 1), 1: fail(100, -9)}) == 0  # rank 0 failed a second earlier
    assert first_failure({0: fail(100, 1), 1: fail(100, 1)}) == 0  # no signal: the lowest rank
    assert first_failure({0: fail(100, -15), 1: fail(100, -9)}) == 1  # SIGTERM: torchrun stopping rank 0
    assert first_failure({0: fail(100, -15), 1: fail(100, 1)}) == 1  # rank 1 raised; torchrun stopped 0


def test_one_node_picks_its_own_port_and_two_nodes_meet_at_the_endpoint() -> None:
    one = config.DistributedParams(nproc_per_node=4)
    assert "--standalone" in torchrun_args(one, "s.py", ["a"])
    two = config.DistributedParams(nproc_per_node=2, nnodes=2, rdzv_endpoint="10.0.0.1:29400", node_rank=0)
    line = torchrun_args(two, "pipeline/finetune.py", ["lite"], node_rank=1)
    assert {"--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29400", "--nnodes=2",
            "--nproc-per-node=2", "--max-restarts=0"} <= set(line)
    assert line[-2:] == ["pipeline/finetune.py", "lite"]


# --------------------------------------------------------------------------- sharded extraction


def test_two_ranks_write_the_store_of_one_bit_for_bit_and_forward_each_image_once(project: Path) -> None:
    stores = {}
    for nproc in (1, 2):
        write_params(project, nproc)
        out = f"data/features/one-{nproc}"
        log = finished(stage("extract.py", project, [SMALL, "--out", out], f"extract-{nproc}"))
        stores[nproc] = tree_digest(project / out)
    n = sum(PER_CLASS.values()) * 2
    assert f"{n} images forwarded, once each (14 + 12 by 2 ranks)" in log  # train: batches 0, 2, 4 vs 1, 3; val: its 2nd (2 images) vs its 1st (4)
    assert stores[2] == stores[1]
    runs = stage_runs(project, f"extract@{SMALL}")
    assert len(runs) == 2  # one MLflow run per stage run, not per rank
    two = next(r for r in runs if r.data.metrics.get("world_size") == 2)
    by_rank = [two.data.metrics[f"images_forwarded_rank{r}"] for r in (0, 1)]
    assert sum(by_rank) == two.data.metrics["images_forwarded"] == n and min(by_rank) > 0


def test_a_two_node_run_on_localhost_completes(project: Path) -> None:
    write_params(project, 1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}")
    out = "data/features/two-nodes"
    nodes = [stage("extract.py", project, [SMALL, "--out", out, "--node-rank", str(rank)], "two-nodes")
             for rank in (0, 1)]
    logs = [finished(p) for p in nodes]
    assert "once each (14 + 12 by 2 ranks)" in logs[0]
    assert tree_digest(project / out) == tree_digest(project / "data/features/one-1")  # node 0 wrote it


# --------------------------------------------------------------------------- DDP fine-tuning


def weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path / MODEL_FILE))


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(project: Path) -> None:
    trained = {}
    for nproc in (1, 2):
        write_params(project, nproc)
        out = project / f"models/finetune/ddp-{nproc}"
        finished(stage("finetune.py", project, [LITE, "--out", str(out)], f"finetune-{nproc}"))
        trained[nproc] = weights(out)
        meta = json.loads((out / "model.json").read_text())
        assert meta["best_epoch"] == 2
    head = [k for k in trained[1] if k.startswith("classifier")]
    assert head and trained[1].keys() == trained[2].keys()
    for key, tensor in trained[1].items():
        torch.testing.assert_close(trained[2][key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    curves = [pd.read_csv(project / f"models/finetune/ddp-{n}/curve.csv") for n in (1, 2)]
    np.testing.assert_allclose(curves[1]["val_loss"], curves[0]["val_loss"], rtol=1e-5)
    assert len(stage_runs(project, f"finetune@{LITE}")) == 2  # rank 0's run only


def test_a_killed_rank_fails_the_stage_in_bounded_time_and_the_rerun_resumes(project: Path) -> None:
    max_epochs = 6
    write_params(project, 2, max_epochs=max_epochs)
    out = project / "models/finetune/killed"
    proc = stage("finetune.py", project, [LITE, "--out", str(out)], "killed")
    try:
        deadline = time.monotonic() + STAGE_TIMEOUT_S
        while not (out / CHECKPOINT_FILE).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        rank1 = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                     if p.environ().get("RANK") == "1")
        killed_at = time.monotonic()
        rank1.send_signal(signal.SIGKILL)
        log, _ = proc.communicate(timeout=KILL_BOUND_S)
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2 and took < KILL_BOUND_S, log
    assert f"finetune: error: rank 1 (local rank 1, pid {rank1.pid}) was killed by SIGKILL" in log
    done = torch.load(out / CHECKPOINT_FILE, weights_only=True)["epoch"]
    assert 1 <= done < max_epochs and not (out / MODEL_FILE).exists()

    rerun = finished(stage("finetune.py", project, [LITE, "--out", str(out)], "killed-rerun"))
    assert f"resuming finetune@{LITE} from checkpoint: epoch {done} of {max_epochs} finished" in rerun
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == max_epochs
