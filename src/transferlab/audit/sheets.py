"""Thumbnail sheets (PNG) of the audit's findings: leaks side by side, label suspects in a grid.

Each cell is a caption (two lines) over a thumbnail, on a white grid. Composed with Pillow by hand rather
than as a matplotlib subplot grid: pasting images into a grid and writing a caption over each is all a
sheet needs, and matplotlib spent about 2 s of the audit stage laying out, titling and rendering the
40 axes of a 20-row leak sheet (pyplot's import, ``tight_layout`` over every axes' title, Agg's
resampling of each image), where Pillow takes a few tens of milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferlab.io import atomic_path

THUMB = 160  # pixels: the longer side of a thumbnail (smaller images are scaled up to it, as the grid showed them)
COLUMNS = 5  # label suspects per row
PAD = 10  # pixels around each cell's contents
FONT_SIZE = 12  # pixels: the captions' font (Pillow's own, so every machine draws the same sheet)
LINE_SPACING = 3  # pixels between caption lines
BACKGROUND = "white"
INK = "black"


def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(FONT_SIZE)


def _thumbnail(path: Path) -> Any:
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return ImageOps.contain(image.convert("RGB"), (THUMB, THUMB))


def _sheet(cells: list[tuple[str, Any]], columns: int, out: Path) -> None:
    """Write ``cells`` (caption, image or None) row by row, ``columns`` per row, as one PNG at ``out``."""
    from PIL import Image, ImageDraw

    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.multiline_textbbox((0, 0), caption, font=font, spacing=LINE_SPACING) for caption, _ in cells]
    caption_height = max(bottom for _, _, _, bottom in boxes)
    width = max(THUMB, *(right - left for left, _, right, _ in boxes)) + 2 * PAD
    image_height = THUMB if any(image is not None for _, image in cells) else 0
    height = caption_height + image_height + 3 * PAD
    columns = min(columns, len(cells))
    rows = -(-len(cells) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, (caption, image) in enumerate(cells):
        left, top = (i % columns) * width, (i // columns) * height
        draw.multiline_text((left + width // 2, top + PAD), caption, fill=INK, font=font, anchor="ma",
                            spacing=LINE_SPACING, align="center")
        if image is not None:  # centred under its caption
            sheet.paste(image, (left + (width - image.width) // 2,
                                top + caption_height + 2 * PAD + (THUMB - image.height) // 2))
    with atomic_path(out, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")  # Pillow writes no timestamp or version: the same bytes each run


def _empty(out: Path, title: str) -> None:
    _sheet([(title, None)], 1, out)


def leak_sheet(leaks: list[dict[str, Any]], images: Path, out: Path, rows: int) -> None:
    """The first ``rows`` leaks: held-out image | its match, similarity and parts in the captions."""
    if not leaks:
        _empty(out, "no likely leaks")
        return
    cells = []
    for leak in leaks[:rows]:
        cells.append((f"{leak['part']}: {leak['label']}\ncos {leak['similarity']:.3f}",
                      _thumbnail(images / leak["path"])))
        cells.append((f"{leak['match_part']}: {leak['match_label']}\n{Path(leak['match']).name[:28]}",
                      _thumbnail(images / leak["match"])))
    _sheet(cells, 2, out)


def suspect_sheet(suspects: list[dict[str, Any]], images: Path, out: Path, rows: int) -> None:
    """The first ``rows`` label suspects: given label -> suggested, with both probabilities."""
    if not suspects:
        _empty(out, "no label suspects")
        return
    cells = [(f"#{s['rank']} {s['part']}: {s['label']} ({s['p_label']:.2f})\n"
              f"-> {s['suggested']}? ({s['p_suggested']:.2f})", _thumbnail(images / s["path"]))
             for s in suspects[:rows]]
    _sheet(cells, COLUMNS, out)
