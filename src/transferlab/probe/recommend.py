"""The recommendation: a pure function of the probe curve, the dataset measures and ``probe`` params.

The rule starts from the 2 x 2 table of the README's strategy guide:

* **large** data (the smallest class has at least ``large_per_class`` train
  images): fine-tune everything (``full``), like ImageNet or not -- there are
  enough images to move every block without overfitting;
* **small** data: the probe curve decides where to cut. Its *plateau* starts at
  the first block whose val accuracy is within ``tolerance`` of the best
  block's; the blocks above it add nothing this task can use.

  - **like ImageNet**: if the top block is on the plateau, the pretrained
    features already serve the task to the end: ``head_only``. If the top
    falls below it, the last blocks are too specific: train those above the
    plateau's start.
  - **unlike ImageNet**: train the blocks above the plateau's start, at least
    one (the table's "train from a middle block"): the top of the network
    encodes ImageNet's classes, not these.

Whatever it chooses, the reason names the measured figures it used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from transferlab.config import ProbeParams


@dataclass(frozen=True)
class Measures:
    """What places a dataset in the 2 x 2 table."""

    train_per_class: Mapping[str, int]  # train images per class
    similarity: float  # mean top-1 probability of the backbone's ImageNet classifier, train + val images

    @property
    def smallest(self) -> tuple[str, int]:
        return min(self.train_per_class.items(), key=lambda item: (item[1], item[0]))


@dataclass(frozen=True)
class Recommendation:
    strategy: str  # head_only | last_blocks | full
    last_blocks: int | None  # the top N blocks that train (strategy last_blocks only)
    size: str  # small | large
    imagenet: str  # similar | different
    plateau_block: str  # the first block within tolerance of the best
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return f"last_blocks: {self.last_blocks}" if self.strategy == "last_blocks" else self.strategy


def plateau_start(accuracies: Sequence[float], tolerance: float) -> int:
    """Index of the first block whose accuracy is within ``tolerance`` of the best (ties: the earliest)."""
    best = max(accuracies)
    return next(i for i, acc in enumerate(accuracies) if acc >= best - tolerance - 1e-12)


def recommend(curve: Sequence[Mapping[str, Any]], measures: Measures, params: ProbeParams) -> Recommendation:
    """``curve``: per block, input to output, at least ``block`` and ``val_accuracy``."""
    if not curve:
        raise ValueError("the probe curve is empty: the backbone has no named blocks")
    names = [str(point["block"]) for point in curve]
    acc = [float(point["val_accuracy"]) for point in curve]
    n = len(names)
    label, fewest = measures.smallest
    large = fewest >= params.large_per_class
    similar = measures.similarity >= params.similar_above
    start = plateau_start(acc, params.tolerance)
    best = max(range(n), key=lambda i: (acc[i], -i))
    above = n - 1 - start  # blocks after the plateau's start
    top_on_plateau = acc[-1] >= acc[best] - params.tolerance - 1e-12

    size_text = (f"{sum(measures.train_per_class.values())} train images in {len(measures.train_per_class)} "
                 f"classes, {fewest} in the smallest ({label!r}), {'at or above' if large else 'below'} "
                 f"probe.large_per_class {params.large_per_class}: {'large' if large else 'small'} data")
    sim_text = (f"the backbone's own ImageNet classifier gives its top class a mean probability of "
                f"{measures.similarity:.3f} on these images, {'at or above' if similar else 'below'} "
                f"probe.similar_above {params.similar_above:g}: {'like' if similar else 'unlike'} ImageNet")
    curve_text = (f"The linear probe's val accuracy goes from {acc[0]:.3f} at {names[0]} to a best of "
                  f"{acc[best]:.3f} at {names[best]}; it is within probe.tolerance {params.tolerance:g} of "
                  f"the best from {names[start]} on ({acc[start]:.3f}), and the top block {names[-1]} "
                  f"scores {acc[-1]:.3f}")
    if large:
        strategy, last = "full", None
        cell = ("the 2 x 2 table says large data is fine-tuned whole, like ImageNet or not: there are enough "
                "images to adapt every block")
        verdict = "so every block trains (full)"
    elif similar and top_on_plateau:
        strategy, last = "head_only", None
        cell = "the 2 x 2 table says small data like ImageNet trains a head on the frozen features"
        verdict = ("the top block is on the plateau, so the pretrained features serve this task to the end: "
                   "only the head trains (head_only)")
    else:
        last = max(1, above)
        strategy = "full" if last >= n else "last_blocks"
        if similar:
            cell = ("the 2 x 2 table says small data like ImageNet trains a head, but the curve falls after "
                    f"{names[start]}: the top blocks are too specific to ImageNet for this task")
        else:
            cell = ("the 2 x 2 table says small data unlike ImageNet is fine-tuned from a middle block: the "
                    "top of the network encodes ImageNet's classes, not these")
        kept = ", ".join(names[n - last:])
        verdict = (f"so the {last} block{'s' if last > 1 else ''} above the plateau's start train{'' if last > 1 else 's'}"
                   f" ({kept}) and everything up to {names[n - 1 - last]} stays frozen (last_blocks: {last})"
                   if strategy == "last_blocks" else "so every block trains (full)")
    reason = f"{size_text[0].upper()}{size_text[1:]}; {sim_text}. {curve_text}. {cell[0].upper()}{cell[1:]}, {verdict}."
    return Recommendation(strategy, last if strategy == "last_blocks" else None, "large" if large else "small",
                          "similar" if similar else "different", names[start], reason)
