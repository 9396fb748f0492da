"""One self-contained HTML report of an evaluation (optionally two, side by side).

Everything is inline: CSS in a ``<style>``, plots as SVG, images as base64 JPEG. The file
opens offline and can be mailed as is. Built from the files ``paligemma-xray evaluate``
writes (``metrics.json``, ``predictions.jsonl``), so ``paligemma-xray report`` can rebuild
it at any time; a training run folder adds its loss curve (``metrics.jsonl``).

The gallery shows the worst images first: most missed fractures, then most false alarms
(each model at its own threshold), then the lowest-scored correct finds. Ground truth is
green, predictions orange (with their score); a prediction that matches is drawn as a full
box, a false alarm by its corners only (supervision's annotators, :mod:`paligemma_xray.draw`).
With an operating point or a saved calibration the report says which point it is and what
it gives, and draws reliability diagrams before and after calibration; with a comparison
(``comparison.json``, from ``evaluate --compare``) it lists the paired differences with
their intervals and p-values. Thresholds print with three significant digits.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paligemma_xray import atomic
from paligemma_xray.draw import draw_boxes, draw_masks, fit, jpeg_data_uri
from paligemma_xray.errors import DataError, check_output
from paligemma_xray.evaluate.compare import COMPARISON_FILE
from paligemma_xray.evaluate.folder import load_metrics, load_predictions
from paligemma_xray.evaluate.metrics import Matching, froc_key, match
from paligemma_xray.locations import Detections
from paligemma_xray.report.plots import SERIES_COLOURS, froc_plot, loss_plot, pr_plot, reliability_plot
from paligemma_xray.train.logs import read_metrics

TRUTH_COLOUR = (47, 158, 68)  # green
PREDICTION_COLOUR = (230, 119, 0)  # orange
THUMBNAIL = 360  # px, longest side in the gallery

PAGE_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
     color:#1d1d1f;background:#fafafa}
header{background:#15324f;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px} header p{margin:0;opacity:.85}
main{padding:20px 28px;max-width:1280px}
h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0001}
th,td{padding:5px 12px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}
thead th{background:#f0f3f7}
td.ci{color:#666;font-size:12px}
.plots{display:flex;flex-wrap:wrap;gap:16px}
.plots figure{margin:0;background:#fff;padding:8px;box-shadow:0 1px 2px #0001}
.plots svg{width:480px;height:auto}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:14px}
.card{background:#fff;box-shadow:0 1px 2px #0001;padding:8px}
.card .pair{display:flex;gap:6px} .card .pair>div{flex:1;min-width:0}
.card img{width:100%;height:auto;display:block}
.card .name{font-size:12px;color:#444;word-break:break-all;margin-top:4px}
.tag{display:inline-block;padding:1px 6px;border-radius:3px;font-size:12px;margin-right:4px}
.miss{background:#ffe3e3;color:#c92a2a} .fa{background:#fff3bf;color:#8a6d00}
.ok{background:#d3f9d8;color:#2b8a3e}
.legend span{margin-right:14px}
.sw{display:inline-block;width:12px;height:12px;vertical-align:middle;margin-right:4px}
.note{color:#666;font-size:12px}
"""
"""Style sheet of the report pages (the evaluation report and the live training page)."""


@dataclass
class Evaluation:
    """What the report reads from one evaluation folder."""

    name: str
    metrics: dict
    rows: list[dict]


def load_evaluation(eval_dir: str | Path, name: str | None = None) -> Evaluation:
    metrics = load_metrics(eval_dir)
    rows = load_predictions(eval_dir)
    return Evaluation(name or str(metrics.get("model") or Path(eval_dir).name), metrics, rows)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def threshold_text(value) -> str:
    """A score threshold with three significant digits (scores of 0.06 matter), "–" if none."""
    return "–" if value is None else f"{float(value):.3g}"


def _ci(metrics: dict, key: str) -> str:
    interval = metrics.get("ci95", {}).get(key)
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


# (label, getter, CI key)
_ROWS = [
    ("mAP@0.5", lambda m: m.get("map50"), "map50"),
    ("mAP@[.5:.95]", lambda m: m.get("map50_95"), "map50_95"),
    ("mAP@[.1:.5] (nnDetection's medical mAP)", lambda m: m.get("map10_50"), "map10_50"),
    ("precision @ threshold", lambda m: m.get("precision"), "precision"),
    ("recall @ threshold", lambda m: m.get("recall"), "recall"),
    ("F1 @ threshold", lambda m: m.get("f1"), "f1"),
    ("FROC score (CPM, mean of 1/8…8 FP/image)", lambda m: m.get("froc", {}).get("score"), "froc_score"),
    ("image sensitivity", lambda m: m.get("image_level", {}).get("sensitivity"), "image_sensitivity"),
    ("image specificity", lambda m: m.get("image_level", {}).get("specificity"), "image_specificity"),
    ("image ROC AUC (top box score)", lambda m: m.get("image_level", {}).get("auc"), "image_auc"),
]


def _metrics_table(evaluations: Sequence[Evaluation]) -> str:
    head = "".join(f"<th colspan=2>{html.escape(e.name)}</th>" for e in evaluations)
    sub = "".join("<th>value</th><th>95% CI</th>" for _ in evaluations)
    body = []
    cells = "".join(
        f"<td>{threshold_text(e.metrics.get('threshold'))}</td>"
        f"<td class=ci>{html.escape(_threshold_source(e.metrics))}</td>"
        for e in evaluations
    )
    body.append(f"<tr><td>score threshold</td>{cells}</tr>")
    for label, get, ci_key in _ROWS:
        cells = "".join(
            f"<td>{_fmt(get(e.metrics))}</td><td class=ci>{_ci(e.metrics, ci_key)}</td>" for e in evaluations
        )
        body.append(f"<tr><td>{label}</td>{cells}</tr>")
    first = evaluations[0].metrics
    for i, rate in enumerate(first.get("froc", {}).get("fp_per_image", [])):
        cells = "".join(
            f"<td>{_fmt(e.metrics['froc']['sensitivity'][i])}</td>"
            f"<td class=ci>{_ci(e.metrics, froc_key(rate))}</td>"
            for e in evaluations
        )
        body.append(f"<tr><td>sensitivity at {rate:g} FP/image</td>{cells}</tr>")
    for cls in first.get("classes", []):
        cells = "".join(
            f"<td>{_fmt(e.metrics.get('ap_per_class', {}).get(cls, {}).get('ap50'))}</td><td></td>"
            for e in evaluations
        )
        body.append(f"<tr><td>AP@0.5 · {html.escape(cls)}</td>{cells}</tr>")
    counts = [
        ("boxes TP / FP / FN", lambda m: f"{m.get('tp')} / {m.get('fp')} / {m.get('fn')}"),
        ("images (with fracture)", lambda m: f"{m.get('n_images')} ({m.get('n_positive_images')})"),
        ("parse failures", lambda m: m.get("parse_failures", {}).get("total")),
        ("repeated boxes (IoU ≥ 0.7, same answer)", lambda m: m.get("duplicates", {}).get("boxes")),
        ("unfinished answers", lambda m: m.get("unfinished_answers")),
    ]
    if any("masks" in e.metrics for e in evaluations):  # a segmentation evaluation
        counts = [
            ("masks: mAP@0.5 (COCO segm)", lambda m: _mask_figure(m, "map50")),
            ("masks: mAP@[.5:.95] (COCO segm)", lambda m: _mask_figure(m, "map50_95")),
            ("masks: Dice per matched object (mean)", lambda m: _mask_figure(m, "dice", "mean")),
            ("masks: IoU per matched object (mean)", lambda m: _mask_figure(m, "iou", "mean")),
            ("masks: matched objects", lambda m: _mask_figure(m, "dice", "n")),
            *counts,
        ]
    for label, get in counts:
        cells = "".join(f"<td>{_fmt(get(e.metrics))}</td><td></td>" for e in evaluations)
        body.append(f"<tr><td>{label}</td>{cells}</tr>")
    return (
        f"<table><thead><tr><th>metric</th>{head}</tr><tr><th></th>{sub}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _mask_figure(metrics: dict, key: str, part: str | None = None) -> Any:
    """``metrics["masks"][key][part]`` (None where the evaluation has no masks)."""
    value = metrics.get("masks", {}).get(key)
    return value.get(part) if part is not None and isinstance(value, dict) else value


def annotated_image_uri(
    path: str, truth: Detections, prediction: Detections, matching: Matching, threshold: float
) -> str | None:
    """The image with its boxes (and masks), as a base64 JPEG data URI (None if it cannot be read).

    Ground truth in one colour; predictions scored at least ``threshold`` in another, false
    alarms (unmatched in ``matching``) drawn as corners only. Shared with the live training page.
    """
    try:
        from paligemma_xray.data import load_image

        image = load_image(path)
    except Exception:  # a moved image must not break the whole report
        return None
    image, scale = fit(image, THUMBNAIL)
    scores = prediction.score if prediction.score is not None else np.full(len(prediction), np.nan)
    shown = ~(scores < threshold)  # boxes below the threshold are left out; unscored ones stay
    # Masks first (truth, then the shown predictions'), boxes over them.
    if truth.has_masks and truth.masks is not None:
        image = draw_masks(image, truth.masks, colour=TRUTH_COLOUR, opacity=0.3)
    if prediction.has_masks and prediction.masks is not None:
        image = draw_masks(
            image, [m for m, keep in zip(prediction.masks, shown) if keep], colour=PREDICTION_COLOUR
        )
    image = draw_boxes(image, truth.xyxy * scale, colour=TRUTH_COLOUR, thickness=3)
    labels = np.array([f"{s:.2f}" if not np.isnan(s) else n for s, n in zip(scores, prediction.class_name)])
    matched = np.asarray(matching.pred_tp, dtype=bool)
    for keep, corners_only in ((shown & matched, False), (shown & ~matched, True)):  # false alarm: corners
        image = draw_boxes(
            image,
            prediction.xyxy[keep] * scale,
            labels=list(labels[keep]),
            colour=PREDICTION_COLOUR,
            thickness=2,
            corners_only=corners_only,
        )
    return jpeg_data_uri(image, quality=82)


@dataclass
class _Case:
    index: int
    missed: int
    false_alarms: int
    found: int
    lowest_found: float
    matching: Matching


def _cases(evaluation: Evaluation, classes: list[str], threshold: float, iou: float) -> list[_Case]:
    cases = []
    for index, row in enumerate(evaluation.rows):
        truth, prediction = row["ground_truth"], row["prediction"]
        m = match(truth, prediction, classes, iou)
        scores = prediction.score if prediction.score is not None else [1.0] * len(prediction)
        kept = [float(s) >= threshold for s in scores]
        found = sum(1 for j in m.gt_matched_by if j >= 0 and kept[j])
        false_alarms = sum(1 for i, k in enumerate(kept) if k and not m.pred_tp[i])
        found_scores = [float(scores[j]) for j in m.gt_matched_by if j >= 0 and kept[j]]
        cases.append(
            _Case(
                index, len(truth) - found, false_alarms, found, min(found_scores) if found_scores else 1.0, m
            )
        )
    return cases


def _gallery(evaluations: Sequence[Evaluation], size: int) -> str:
    main = evaluations[0]
    classes = main.metrics.get("classes", [])
    iou = float(main.metrics.get("iou_threshold", 0.5))
    # Each model at its own operating point: the boxes a user of that model would see.
    thresholds = [float(e.metrics.get("threshold") or 0.0) for e in evaluations]
    per_model = [_cases(e, classes, t, iou) for e, t in zip(evaluations, thresholds)]
    # Worst first for the first model: misses, then false alarms, then weakest correct finds.
    order = sorted(per_model[0], key=lambda c: (-c.missed, -c.false_alarms, c.lowest_found, c.index))
    cards = []
    for case in order[:size]:
        row = main.rows[case.index]
        panels = []
        for k, evaluation in enumerate(evaluations):
            other_rows = evaluation.rows
            if case.index >= len(other_rows) or other_rows[case.index]["image"] != row["image"]:
                panels.append("<div class=note>not in this evaluation</div>")
                continue
            c = per_model[k][case.index]
            other = other_rows[case.index]
            data = annotated_image_uri(
                other["image"], other["ground_truth"], other["prediction"], c.matching, thresholds[k]
            )
            tags = []
            if c.missed:
                tags.append(f"<span class='tag miss'>{c.missed} missed</span>")
            if c.false_alarms:
                tags.append(
                    f"<span class='tag fa'>{c.false_alarms} false alarm{'s' * (c.false_alarms > 1)}</span>"
                )
            if c.found:
                tags.append(f"<span class='tag ok'>{c.found} found</span>")
            if not tags:
                tags.append("<span class='tag ok'>correct: nothing</span>")
            img = f"<img alt='' src='{data}'>" if data else "<div class=note>image not found</div>"
            colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
            caption = (
                f"<div class=name style='color:{colour}'>{html.escape(evaluation.name)} "
                f"(≥ {threshold_text(thresholds[k])})</div>"
                if len(evaluations) > 1
                else ""
            )
            panels.append(f"<div>{img}{caption}<div>{''.join(tags)}</div></div>")
        cards.append(
            f"<div class=card><div class=pair>{''.join(panels)}</div>"
            f"<div class=name>{html.escape(Path(row['image']).name)}</div></div>"
        )
    legend = (
        f"<p class=legend><span><i class=sw style='background:rgb{TRUTH_COLOUR}'></i>ground truth</span>"
        f"<span><i class=sw style='background:rgb{PREDICTION_COLOUR}'></i>prediction ≥ "
        f"{' / '.join(threshold_text(t) for t in thresholds)} (score; corners only = false alarm)</span></p>"
    )
    shown = min(size, len(order))
    note = f"<p class=note>{shown} of {len(order)} images, worst first.</p>"
    return f"{legend}{note}<div class=gallery>{''.join(cards)}</div>"


def render_report(
    evaluations: Sequence[Evaluation],
    *,
    run_rows: Sequence[dict] | None = None,
    gallery: int = 24,
    title: str = "Fracture detection report",
    comparison: dict | None = None,
) -> str:
    """The report's HTML for one evaluation or several side by side (first = reference).

    ``comparison``: the paired comparison of the first two (``comparison.json``).
    """
    main = evaluations[0]
    m = main.metrics
    subtitle = (
        f"{html.escape(str(m.get('data', '')))} · split {html.escape(str(m.get('split', '?')))} · "
        f"threshold {threshold_text(m.get('threshold'))} · IoU {m.get('iou_threshold')} · "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"
    )
    ci_note = ""
    boot = m.get("bootstrap", {})
    if boot.get("samples"):
        ci_note = (
            f"<p class=note>95% intervals: percentile bootstrap over images, {boot['samples']} resamples "
            f"(seed {boot.get('seed')}). mAP is COCO's (faster-coco-eval).</p>"
        )
    sections = [
        "<h2>Metrics</h2>",
        _metrics_table(evaluations),
        ci_note,
        "<h2>Curves</h2><div class=plots>",
        f"<figure>{pr_plot([(e.name, e.metrics.get('curves', {})) for e in evaluations])}</figure>",
        "<figure>"
        + froc_plot(
            [
                (
                    e.name,
                    e.metrics.get("curves", {}).get("froc", {"fp_per_image": [0.0], "sensitivity": [0.0]}),
                    e.metrics.get("froc", {}),
                )
                for e in evaluations
            ]
        )
        + "</figure>",
    ]
    if run_rows:
        loss = loss_plot(run_rows)
        if loss:
            sections.append(f"<figure>{loss}</figure>")
    sections.append("</div>")
    sections += _operating_point_section(evaluations)
    sections += _calibration_section(evaluations)
    if comparison:
        sections += ["<h2>Comparison</h2>", _comparison_table(comparison)]
    sections += ["<h2>Gallery</h2>", _gallery(evaluations, gallery)]
    models = " vs ".join(html.escape(e.name) for e in evaluations)
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{models}</p><p>{subtitle}</p></header>"
        f"<main>{''.join(sections)}</main></body></html>\n"
    )


def write_report(
    eval_dir: str | Path,
    out: str | Path | None = None,
    *,
    run_dir: str | Path | None = None,
    compare: str | Path | None = None,
    names: tuple[str | None, str | None] = (None, None),
    gallery: int = 24,
    title: str = "Fracture detection report",
) -> Path:
    """Write ``report.html`` (or ``out``) for the evaluation in ``eval_dir``.

    ``compare``: a second evaluation folder shown beside it (e.g. the model before
    fine-tuning); ``run_dir``: a training run whose ``metrics.jsonl`` gives the loss curve.
    """
    evaluations = [load_evaluation(eval_dir, names[0])]
    if compare is not None:
        evaluations.append(load_evaluation(compare, names[1]))
        if evaluations[1].name == evaluations[0].name:
            evaluations[1].name += " (2)"
    run_rows = read_metrics(run_dir) if run_dir is not None else None
    comparison = _read_comparison(eval_dir, compare) if compare is not None else None
    target = check_output(out if out is not None else Path(eval_dir) / "report.html", folder=False)
    # Written under a temporary name and renamed: a full disk never leaves half a report.
    page = render_report(evaluations, run_rows=run_rows, gallery=gallery, title=title, comparison=comparison)
    return atomic.write_text(target, page)


def _read_comparison(eval_dir: str | Path, compare: str | Path) -> dict | None:
    """``comparison.json`` of ``eval_dir`` when it was made against ``compare`` (else None)."""
    path = Path(eval_dir) / COMPARISON_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON: {error}", path=path) from None
    return data if data.get("against") == str(Path(compare).resolve()) else None


def _threshold_source(metrics: dict) -> str:
    point = metrics.get("operating_point")
    if point:
        return f"operating point {point.get('name')} ({point.get('source')})"
    return {
        "given": "given",
        "best_f1_here": "best F1 on this split (optimistic)",
        "all_boxes": "every box (no true positive)",
    }.get(str(metrics.get("threshold_source")), "")


def _operating_point_section(evaluations: Sequence[Evaluation]) -> list[str]:
    rows = []
    for e in evaluations:
        point = e.metrics.get("operating_point")
        if not point:
            continue
        valid = point.get("valid") or {}
        m = e.metrics
        image = m.get("image_level", {})
        reached = "" if valid.get("reached", True) else " (target not reached on valid)"
        rows.append(
            f"<tr><td>{html.escape(e.name)}</td><td>{html.escape(str(point.get('name')))}{reached}</td>"
            f"<td>{threshold_text(point.get('threshold'))}</td>"
            f"<td>{_fmt(valid.get('image_sensitivity'))} / {_fmt(valid.get('image_specificity'))}</td>"
            f"<td>{_fmt(image.get('sensitivity'))} <span class=ci>{_ci(m, 'image_sensitivity')}</span></td>"
            f"<td>{_fmt(image.get('specificity'))} <span class=ci>{_ci(m, 'image_specificity')}</span></td>"
            f"<td>{_fmt(m.get('precision'))} / {_fmt(m.get('recall'))}</td></tr>"
        )
    if not rows:
        return []
    head = (
        "<tr><th>model</th><th>operating point</th><th>threshold</th>"
        "<th>valid: image sens. / spec.</th><th>image sensitivity (95% CI)</th>"
        "<th>image specificity (95% CI)</th><th>box precision / recall</th></tr>"
    )
    note = (
        "<p class=note>The threshold is chosen on the valid split and applied here; sensitivity and "
        "specificity are image level (an image is called positive when a box scores at least the "
        "threshold).</p>"
    )
    return [
        "<h2>Operating point</h2>",
        f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>",
        note,
    ]


def _calibration_section(evaluations: Sequence[Evaluation]) -> list[str]:
    calibrated = [e for e in evaluations if e.metrics.get("calibration")]
    if not calibrated:
        return []
    rows, plots = [], []
    for e in calibrated:
        c = e.metrics["calibration"]
        for level, label in (("image", "image: P(fracture)"), ("box", "box: P(true positive)")):
            before, after = c[level]["before"], c[level]["after"]
            rows.append(
                f"<tr><td>{html.escape(e.name)}</td><td>{label}</td><td>{before.get('n')}</td>"
                f"<td>{_fmt(before.get('ece'))}</td><td>{_fmt(after.get('ece'))}</td>"
                f"<td>{_fmt(before.get('brier'))}</td><td>{_fmt(after.get('brier'))}</td></tr>"
            )
            series = [
                ("raw score", before.get("curve")),
                (f"calibrated ({c.get('method')})", after.get("curve")),
            ]
            plots.append(f"<figure>{reliability_plot(series, f'{e.name} · {label}')}</figure>")
    head = (
        "<tr><th>model</th><th>probability of</th><th>n</th><th>ECE raw</th><th>ECE calibrated</th>"
        "<th>Brier raw</th><th>Brier calibrated</th></tr>"
    )
    fitted = calibrated[0].metrics["calibration"].get("fitted_on", {})
    note = (
        f"<p class=note>Fitted on the {html.escape(str(fitted.get('split', 'valid')))} split "
        f"({fitted.get('n_images')} images, {fitted.get('n_boxes')} boxes); measured here. ECE: 10 "
        "equal-width bins; Brier: scikit-learn's brier_score_loss.</p>"
    )
    return [
        "<h2>Calibration</h2>",
        f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>",
        note,
        f"<div class=plots>{''.join(plots)}</div>",
    ]


_COMPARED_LABELS = {
    "map50": "mAP@0.5",
    "map50_95": "mAP@[.5:.95]",
    "map10_50": "mAP@[.1:.5]",
    "froc_score": "FROC score",
    "image_sensitivity": "image sensitivity",
    "image_specificity": "image specificity",
    "image_auc": "image ROC AUC",
}


def _p(value) -> str:
    if value is None:
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _comparison_table(comparison: dict) -> str:
    names = comparison.get("names") or ["first", "second"]
    rows = []
    for key, label in _COMPARED_LABELS.items():
        d = comparison.get("differences", {}).get(key)
        if not d:
            continue
        interval = d.get("ci95")
        ci = f"[{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else ""
        value = "–" if d.get("value") is None else f"{d['value']:+.3f}"
        rows.append(
            f"<tr><td>{label}</td><td>{_fmt(d.get('a'))}</td><td>{_fmt(d.get('b'))}</td>"
            f"<td>{value}</td><td class=ci>{ci}</td><td>{_p(d.get('p_value'))}</td></tr>"
        )
    auc = comparison.get("image_auc") or {}
    if auc.get("auc_a") is not None:
        rows.append(
            f"<tr><td>image ROC AUC, DeLong</td><td>{_fmt(auc.get('auc_a'))}</td>"
            f"<td>{_fmt(auc.get('auc_b'))}</td>"
            f"<td>{auc['difference']:+.3f}</td><td class=ci>z {_fmt(auc.get('z'), 2)}</td>"
            f"<td>{_p(auc.get('p_value'))}</td></tr>"
        )
    head = (
        f"<tr><th>figure</th><th>{html.escape(names[0])}</th><th>{html.escape(names[1])}</th>"
        "<th>difference</th><th>95% CI (paired)</th><th>p</th></tr>"
    )
    boot = comparison.get("bootstrap", {})
    pair = (
        f"{threshold_text(comparison.get('threshold_a'))} / {threshold_text(comparison.get('threshold_b'))}"
    )
    note = (
        f"<p class=note>{comparison.get('n_images')} images; each model at its own threshold ({pair}). "
        f"Paired percentile bootstrap over images ({boot.get('samples')} resamples, "
        f"seed {boot.get('seed')}), "
        "two-sided p-values; the AUC difference is also tested with DeLong's method "
        f"({html.escape(str(auc.get('method')))}).</p>"
    )
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>{note}"
