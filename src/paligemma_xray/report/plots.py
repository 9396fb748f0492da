"""Report plots as inline SVG (matplotlib, text drawn as paths: no font files needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on servers and in CI
import matplotlib.pyplot as plt

from paligemma_xray.evaluate.metrics import FROC_FP_RATES

# Two models side by side keep the same colours everywhere in the report.
SERIES_COLOURS = ("#1f5fbf", "#d9480f", "#2b8a3e", "#7048e8")


def _svg(figure) -> str:
    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "path"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    # Drop the XML prolog and DOCTYPE: the SVG goes inline into HTML.
    return text[text.index("<svg") :]


def pr_plot(series: Sequence[tuple[str, dict]]) -> str:
    """Precision-recall curves (COCO's interpolation, IoU 0.5) per model and class."""
    figure, axes = plt.subplots(figsize=(5.2, 4.0), dpi=100)
    for k, (name, curves) in enumerate(series):
        colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
        for j, (cls, curve) in enumerate(curves.get("pr", {}).items()):
            style = ("-", "--", ":", "-.")[j % 4]
            axes.plot(
                curve["recall"],
                curve["precision"],
                style,
                color=colour,
                lw=1.8,
                label=f"{name} · {cls}",
                drawstyle="steps-post",
            )
    axes.set(
        xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title="Precision-recall at IoU 0.5"
    )
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower left", fontsize=8)
    else:
        axes.text(0.5, 0.5, "no ground-truth boxes", ha="center", va="center", transform=axes.transAxes)
    return _svg(figure)


def froc_plot(series: Sequence[tuple[str, dict, dict]]) -> str:
    """FROC: lesion sensitivity against false positives per image (log scale), per model.

    ``series``: (name, curves["froc"], metrics["froc"]) — the full curve and the
    sensitivities at the standard rates, marked.
    """
    figure, axes = plt.subplots(figsize=(5.2, 4.0), dpi=100)
    for k, (name, curve, at_rates) in enumerate(series):
        colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
        # Log axis: operating points at 0 false positives sit on its left edge.
        left = FROC_FP_RATES[0] / 2
        fppi = [max(left, float(v)) for v in curve["fp_per_image"]]
        sens = list(curve["sensitivity"])
        # Extend flat to the last standard rate: no more predictions, no more finds.
        if fppi[-1] < FROC_FP_RATES[-1]:
            fppi.append(FROC_FP_RATES[-1] * 1.2)
            sens.append(sens[-1])
        axes.plot(fppi, sens, "-", color=colour, lw=1.8, label=name, drawstyle="steps-post")
        axes.plot(at_rates["fp_per_image"], at_rates["sensitivity"], "o", color=colour, ms=4)
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(FROC_FP_RATES), [f"{r:g}" for r in FROC_FP_RATES])
    axes.minorticks_off()
    axes.set(
        xlim=(FROC_FP_RATES[0] / 2, FROC_FP_RATES[-1] * 1.2),
        ylim=(0, 1.02),
        xlabel="false positives per image",
        ylabel="sensitivity",
        title="FROC",
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    return _svg(figure)


def loss_plot(rows: Sequence[dict]) -> str | None:
    """Every ``*loss*`` series of a training run's ``metrics.jsonl`` against its step."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        step = row.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, value in row.items():
            if "loss" in key and isinstance(value, (int, float)):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(step)
                ys.append(value)
    if not series:
        return None
    figure, axes = plt.subplots(figsize=(5.2, 3.4), dpi=100)
    for k, (key, (xs, ys)) in enumerate(sorted(series.items())):
        marker = "o" if len(xs) < 30 else None
        axes.plot(xs, ys, "-", marker=marker, ms=3, color=SERIES_COLOURS[k % len(SERIES_COLOURS)], label=key)
    axes.set(xlabel="step", ylabel="loss", title="Training loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _svg(figure)


def reliability_plot(series: Sequence[tuple[str, dict | None]], title: str = "Reliability") -> str:
    """Reliability diagram: observed frequency against predicted probability, per series.

    ``series``: (name, ``calibration_figures(...)["curve"]``) — scikit-learn's
    ``calibration_curve`` points with their bin counts (marker area ∝ count). The diagonal
    is perfect calibration.
    """
    figure, axes = plt.subplots(figsize=(4.6, 4.0), dpi=100)
    axes.plot([0, 1], [0, 1], ":", color="#888", lw=1, label="perfect")
    for k, (name, curve) in enumerate(series):
        if not curve or not curve.get("prob_pred"):
            continue
        colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
        counts = curve.get("count") or [1] * len(curve["prob_pred"])
        biggest = max(counts) or 1
        axes.plot(curve["prob_pred"], curve["prob_true"], "-", color=colour, lw=1.6, label=name)
        axes.scatter(
            curve["prob_pred"], curve["prob_true"], s=[12 + 60 * c / biggest for c in counts], color=colour
        )
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="predicted probability", ylabel="observed frequency")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
    return _svg(figure)


def metric_plot(rows: Sequence[dict], keys: Sequence[str], title: str) -> str | None:
    """``keys`` of a run's evaluation rows (``kind == "eval"``) against the step (None: none logged)."""
    figure, axes = plt.subplots(figsize=(5.2, 3.4), dpi=100)
    drawn = False
    for k, key in enumerate(keys):
        points = [
            (r["step"], r[key])
            for r in rows
            if r.get("kind") == "eval" and isinstance(r.get(key), (int, float))
        ]
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, "-o", ms=3, color=SERIES_COLOURS[k % len(SERIES_COLOURS)], label=key)
            drawn = True
    if not drawn:
        plt.close(figure)
        return None
    axes.set(xlabel="step", title=title, ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _svg(figure)
