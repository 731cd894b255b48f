"""Thumbnail sheets (PNG) of the audit's findings: leaks side by side, label suspects in a grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferlab.io import atomic_path

THUMB = 160  # pixels: the longer side of a thumbnail
COLUMNS = 5  # label suspects per row
DPI = 100


def _thumbnail(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMB, THUMB))
        return image


def _figure(rows: int, columns: int) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.2, rows * 2.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    return fig, axes


def _save(fig: Any, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", metadata={"Software": None})  # no version: same bytes each run
    plt.close(fig)


def _empty(out: Path, title: str) -> None:
    fig, axes = _figure(1, 1)
    axes[0, 0].text(0.5, 0.5, title, ha="center", va="center", fontsize=12)
    _save(fig, out)


def leak_sheet(leaks: list[dict[str, Any]], images: Path, out: Path, rows: int) -> None:
    """The first ``rows`` leaks: held-out image | its match, similarity and parts in the titles."""
    if not leaks:
        _empty(out, "no likely leaks")
        return
    shown = leaks[:rows]
    fig, axes = _figure(len(shown), 2)
    for (left, right), leak in zip(axes, shown):
        left.imshow(_thumbnail(images / leak["path"]))
        left.set_title(f"{leak['part']}: {leak['label']}\ncos {leak['similarity']:.3f}", fontsize=8)
        right.imshow(_thumbnail(images / leak["match"]))
        right.set_title(f"{leak['match_part']}: {leak['match_label']}\n{Path(leak['match']).name[:28]}", fontsize=8)
    _save(fig, out)


def suspect_sheet(suspects: list[dict[str, Any]], images: Path, out: Path, rows: int) -> None:
    """The first ``rows`` label suspects: given label -> suggested, with both probabilities."""
    if not suspects:
        _empty(out, "no label suspects")
        return
    shown = suspects[:rows]
    fig, axes = _figure(-(-len(shown) // COLUMNS), COLUMNS)
    for ax, s in zip(axes.ravel(), shown):
        ax.imshow(_thumbnail(images / s["path"]))
        ax.set_title(f"#{s['rank']} {s['part']}: {s['label']} ({s['p_label']:.2f})\n"
                     f"-> {s['suggested']}? ({s['p_suggested']:.2f})", fontsize=8)
    _save(fig, out)
