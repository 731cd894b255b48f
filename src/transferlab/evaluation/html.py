"""``reports/index.html``: one self-contained page of a run's results, to open offline or send.

Every image is embedded as a ``data:`` URI, and the page has no script, font or style sheet from
elsewhere, so the file alone shows everything without a network: the comparison table with intervals,
per-class precision and recall, confusion matrices, ROC (two classes), reliability diagrams, training
curves, the top-loss gallery with class activation maps, and the run's identity (git commit, params
hash, MLflow runs, the data's hash). Rendered by Jinja2 with autoescaping: labels and paths are text.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from jinja2 import Environment

from transferlab.evaluation.gallery import GalleryItem
from transferlab.io import atomic_write_text

SHOWN_COLUMNS = ("rank", "model", "kind", "accuracy_95ci", "balanced_accuracy", "macro_f1", "log_loss", "ece",
                 "accuracy_without_leaks")
DECIMALS = 3

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>transferlab report</title>
<style>
body{font-family:sans-serif;margin:1.5em;color:#222} table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right} td.t,th.t{text-align:left}
.gallery{display:flex;flex-wrap:wrap;gap:.8em} figure{margin:0;width:236px;font-size:.8em}
figure img{width:112px;height:112px;object-fit:cover} .wrong{color:#b00} img.plot{max-width:100%}
</style></head><body>
<h1>transferlab: test-split report</h1>
<h2 id="identity">Run</h2>
<table>{% for key, value in identity.items() %}<tr><th class="t">{{ key }}</th><td class="t"><code>{{ value }}</code></td></tr>{% endfor %}</table>
<h2 id="comparison">Comparison (test split; 95% bootstrap interval)</h2>
<p>The champion is chosen by a validation figure, never by these. Rows ending in <code>+tta</code>
average the probabilities of the test-time augmentation views; the plain rows are unchanged.</p>
<table><tr>{% for c in columns %}<th class="t">{{ c }}</th>{% endfor %}</tr>
{% for row in rows %}<tr>{% for c in columns %}<td{% if c in ("model", "kind", "accuracy_95ci") %} class="t"{% endif %}>{{ row[c] }}</td>{% endfor %}</tr>
{% endfor %}</table>
<h2 id="per-class">Per-class precision and recall</h2>
<table><tr><th class="t">model</th>{% for c in classes %}<th>{{ c }} precision</th><th>{{ c }} recall</th>{% endfor %}</tr>
{% for model, figures in per_class.items() %}<tr><td class="t">{{ model }}</td>{% for c in classes %}<td>{{ figures[c][0] }}</td><td>{{ figures[c][1] }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% for title, anchor, uri in plots %}<h2 id="{{ anchor }}">{{ title }}</h2><img class="plot" alt="{{ title }}" src="{{ uri }}">
{% endfor %}
<h2 id="confusion">Confusion matrices (rows: actual, columns: predicted)</h2>
<div class="gallery">{% for model, uri in confusion %}<img class="plot" style="max-width:360px" alt="confusion {{ model }}" src="{{ uri }}">{% endfor %}</div>
<h2 id="gallery">Top losses: the test images each model got most wrong</h2>
{% for model, items in galleries.items() %}<h3>{{ model }}</h3><div class="gallery">
{% for item in items %}<figure class="loss"><img class="view" alt="{{ item.path }}" src="{{ item.image }}">{% if item.cam %}<img class="cam" alt="{{ item.method }} {{ item.path }}" src="{{ item.cam }}">{% endif %}
<figcaption{% if item.true != item.predicted %} class="wrong"{% endif %}>true <b>{{ item.true }}</b>, predicted <b>{{ item.predicted }}</b>{% if item.probability is not none %} ({{ "%.3f"|format(item.probability) }}){% endif %}<br>loss {{ "%.3f"|format(item.loss) }}{% if item.method %}; {{ item.method }} of the predicted class{% endif %}<br><small>{{ item.path }}</small></figcaption></figure>
{% endfor %}</div>
{% endfor %}
</body></html>
"""


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _shown(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    return f"{value:.{DECIMALS}f}" if isinstance(value, float) else str(value)


def _per_class(results: Sequence[Mapping[str, Any]]) -> tuple[list[str], dict[str, dict[str, tuple[str, str]]]]:
    classes = list(results[0]["per_class"]) if results else []
    table = {r["model"]: {c: (_shown(float(v["precision"])), _shown(float(v["recall"])))
                          for c, v in r["per_class"].items()} for r in results}
    return classes, table


def _gallery_items(items: Sequence[GalleryItem]) -> list[dict[str, Any]]:
    return [{"path": i.path, "true": i.true, "predicted": i.predicted, "probability": i.probability,
             "loss": i.loss, "method": i.method, "image": data_uri(i.image, "image/jpeg"),
             "cam": None if i.cam is None else data_uri(i.cam, "image/jpeg")} for i in items]


def render(table: pd.DataFrame, results: Sequence[Mapping[str, Any]], plots: Sequence[tuple[str, str, bytes | None]],
           confusion: Mapping[str, Path], galleries: Mapping[str, Sequence[GalleryItem]],
           identity: Mapping[str, str]) -> str:
    """The page's HTML. ``table``: the comparison table (reports.comparison_table, accuracy_without_leaks included);
    ``plots``: (title, anchor, PNG or None when it does not apply); ``confusion``: model -> its PNG file."""
    columns = [c for c in SHOWN_COLUMNS if c in table.columns]
    rows = [{c: _shown(row[c]) for c in columns} for row in table.to_dict("records")]
    classes, per_class = _per_class(results)
    env = Environment(autoescape=True)
    return env.from_string(TEMPLATE).render(
        identity=identity, columns=columns, rows=rows, classes=classes, per_class=per_class,
        plots=[(title, anchor, data_uri(payload, "image/png")) for title, anchor, payload in plots if payload],
        confusion=[(model, data_uri(Path(p).read_bytes(), "image/png")) for model, p in confusion.items()],
        galleries={model: _gallery_items(items) for model, items in galleries.items()},
    )


def write_html(path: Path, page: str) -> None:
    atomic_write_text(path, page)


def build(scored: Sequence[Any], results: Sequence[Mapping[str, Any]], table: pd.DataFrame, reports: Path,
          images_root: Path, features_root: Path, backbones: Mapping[str, Any], gallery_size: int, n_bins: int,
          identity: Mapping[str, str]) -> Path:
    """Write ``reports/index.html`` from evaluate's scored models (plain and TTA) and the files it wrote.

    The gallery and training curves are the plain models' (a TTA row shares its model's training);
    the confusion matrices are read from ``reports/confusion_png``, written before.
    """
    from transferlab.evaluation import figures
    from transferlab.evaluation.gallery import gallery
    from transferlab.evaluation.tta import TTA_SUFFIX
    from transferlab.paths import CURVE_FILE, REPORT_CONFUSION_PNG, REPORT_HTML

    plain = [s for s in scored if not s.ref.name.endswith(TTA_SUFFIX)]
    curves = {s.ref.name: pd.read_csv(s.ref.path / CURVE_FILE) for s in plain if (s.ref.path / CURVE_FILE).exists()}
    plots = [("ROC", "roc", figures.roc_png(results)),
             ("Reliability diagrams (top-1 confidence against accuracy)", "reliability",
              figures.reliability_png(scored, n_bins)),
             ("Training curves", "curves", figures.curves_png(curves))]
    confusion = {s.ref.name: reports / REPORT_CONFUSION_PNG / f"{s.ref.name}.png" for s in scored}
    galleries = {s.ref.name: gallery(s, gallery_size, images_root, features_root, dict(backbones)) for s in plain}
    path = reports / REPORT_HTML
    write_html(path, render(table, results, plots, confusion, galleries, identity))
    return path
