"""``progress.html``: a training run's live page, rewritten at every validation.

The original recipe looked at its predictions before, during and after training; this page
does it for every run: the loss and mAP curves so far (from ``metrics.jsonl``) and a fixed
gallery (the first validation images, always the same ones) with the current predictions,
drawn as in the evaluation report. Self-contained; reload it while the run goes on.
"""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Sequence
from pathlib import Path

from paligemma_xray.atomic import write_text
from paligemma_xray.evaluate.folder import dataset_classes
from paligemma_xray.evaluate.metrics import match
from paligemma_xray.locations import Detections
from paligemma_xray.report.html import PAGE_CSS, annotated_image_uri
from paligemma_xray.report.plots import loss_plot, metric_plot
from paligemma_xray.train.logs import last_record, read_metrics

PROGRESS_FILE = "progress.html"
GALLERY = 8


def render_progress(run_dir: str | Path, step: int, rows: Sequence[dict], gallery: int = GALLERY) -> str:
    """The page's HTML: curves from ``run_dir/metrics.jsonl``, ``rows`` (decoded validation
    rows, ``evaluate_records``' form) drawn for the first ``gallery`` images."""
    run_dir = Path(run_dir)
    log = read_metrics(run_dir, missing_ok=True)
    plots = [p for p in (loss_plot(log), metric_plot(log, ("map50", "map50_95"), "Validation mAP")) if p]
    classes = dataset_classes([row["prompt"] for row in rows])
    cards = []
    for row in list(rows)[:gallery]:
        truth, prediction = Detections.from_json(row["ground_truth"]), Detections.from_json(row["prediction"])
        matching = match(truth, prediction, classes)
        data = annotated_image_uri(row["image"], truth, prediction, matching, 0.0)
        img = f"<img alt='' src='{data}'>" if data else "<div class=note>image not found</div>"
        scores = ", ".join(f"{s:.3g}" for s in (prediction.score if prediction.score is not None else []))
        cards.append(
            f"<div class=card>{img}<div class=name>{html.escape(Path(row['image']).name)} · "
            f"{len(prediction)} box(es){': ' + scores if scores else ''}</div></div>"
        )
    last = last_record(log, "eval")
    figures = " · ".join(
        f"{key} {last[key]:.4f}"
        for key in ("val_loss", "map50", "map50_95")
        if isinstance(last.get(key), float)
    )
    gallery_html = (
        f"<div class=gallery>{''.join(cards)}</div>"
        if cards
        else "<p class=note>No predictions: the run does not decode during validation (eval_decode off).</p>"
    )
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>Training progress · step {step}</title><style>{PAGE_CSS}</style></head><body>"
        f"<header><h1>Training progress</h1><p>{html.escape(str(run_dir))} · step {step} · {figures}</p>"
        f"<p>{_dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}</p></header><main>"
        f"<h2>Curves</h2><div class=plots>{''.join(f'<figure>{p}</figure>' for p in plots)}</div>"
        f"<h2>Validation images (the same ones at every step; every box drawn with its score)</h2>"
        f"{gallery_html}</main></body></html>\n"
    )


def write_progress(run_dir: str | Path, step: int, rows: Sequence[dict], gallery: int = GALLERY) -> Path:
    """Rewrite ``run_dir/progress.html`` (atomically); what ``train.run``'s ``on_validation`` gets."""
    return write_text(Path(run_dir) / PROGRESS_FILE, render_progress(run_dir, step, rows, gallery))
