"""Stage extract@<backbone>: each image through the frozen backbone, once.

Outputs: data/features/<backbone>/ (feature store + manifest) and its run
record data/features/<backbone>.run.json.

With distributed.nproc_per_node x nnodes > 1 the script runs itself again
under torchrun: each rank forwards a disjoint shard of every split part, rank 0
writes the store (the same bytes as one process) and the one MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from transferlab import collector, config, paths, tracking
from transferlab.config import ParamsError
from transferlab.distributed.launch import is_rank_zero, relaunch
from transferlab.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone", help="a name in extract.backbones")
    parser.add_argument("--split", type=Path, default=paths.SPLIT, help=f"default: {paths.SPLIT}")
    parser.add_argument("--images", type=Path, default=paths.PREPARED, help=f"default: {paths.PREPARED}")
    parser.add_argument("--out", type=Path, help="feature store (default: data/features/<backbone>)")
    parser.add_argument("--node-rank", type=int, help="this node's rank (default: distributed.node_rank); "
                                                      "for the commands run by hand on nodes other than 0")
    args = parser.parse_args(argv)
    name = args.backbone
    all_params = config.load(paths.PARAMS)
    params = all_params.extract
    if name not in params.backbones:
        raise ParamsError(f"extract: {name!r} is not in extract.backbones {params.backbones}")
    out = args.out or paths.features(name)
    relaunch(f"extract@{name}", all_params.distributed, args.node_rank)  # returns in each rank, or alone
    # rank 0 alone logs: MLflow opens in a helper process while _run imports torch and the stage's code
    with tracking.start() if is_rank_zero() else contextlib.nullcontext() as tracker:
        _run(name, args, all_params, out, tracker)


def _run(name: str, args: argparse.Namespace, all_params: config.Params, out: Path,
         tracker: tracking.Tracker | None) -> None:
    with collector.importing():  # the stage's libraries (transferlab.collector: no collection meanwhile)
        import torch

        from transferlab.device import decode_workers, resolve_device
        from transferlab.distributed import init_ranks, main_only
        from transferlab.models.backbones import load_backbone
        from transferlab.models.features import RANDOM_INIT_SEED, extract

    params, compute = all_params.extract, all_params.compute
    with init_ranks(all_params.distributed, resolve_device(compute.device)) as ranks:
        device = ranks.device(resolve_device(compute.device))
        workers = decode_workers(compute.num_workers, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            backbone = load_backbone(name, params.weights.get(name), params.weights_path.get(name))
        logged = {"backbone": name, "weights": backbone.weights_id, "batch_size": params.batch_size,
                  "keep_maps": params.keep_maps, "device": str(device), "num_workers": workers,
                  "world_size": ranks.world}
        record = out.with_name(f"{out.name}.run.json")
        with main_only(ranks, lambda: tracker.stage_run(f"extract@{name}", logged, record)) as run:
            tally: dict[str, int] = {}
            started = time.perf_counter()
            manifest = extract(backbone, args.split, args.images, out, params.batch_size, params.keep_maps,
                               device=device, num_workers=workers, ranks=ranks, tally=tally)
            seconds = time.perf_counter() - started  # rank 0: the backbone load to the store written
            by_rank = [sum(t.values()) for t in ranks.gather(tally) or []]
            if manifest is None:
                return
            forwarded = sum(by_rank)  # counted where the forward passes ran, rank by rank
            if forwarded != manifest["images_forwarded"]:
                raise RuntimeError(f"extract@{name}: {forwarded} forward passes for "
                                   f"{manifest['images_forwarded']} images")
            counts = manifest["param_counts"]
            run.log_metrics({"images_forwarded": forwarded, "params_total": counts["total"],
                             "params_frozen": counts["frozen"], "world_size": ranks.world,
                             "extract_seconds": round(seconds, 3),
                             **{f"images_forwarded_rank{r}": n for r, n in enumerate(by_rank)}})
            run.log_dict(manifest, "feature_manifest.json")
            split = f" ({' + '.join(map(str, by_rank))} by {ranks.world} ranks)" if ranks.distributed else ""
            print(f"extract@{name}: {forwarded} images forwarded, once each{split}")


if __name__ == "__main__":
    exit_on_user_error("extract", main)
