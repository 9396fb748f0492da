"""The HTML report: one self-contained file with metrics, curves and a gallery."""

from paligemma_xray.report.html import Evaluation, load_evaluation, render_report, write_report

__all__ = ["Evaluation", "load_evaluation", "render_report", "write_report"]
