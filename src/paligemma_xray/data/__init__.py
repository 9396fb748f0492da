"""Data sets, images and DICOM (no torch).

The readers return :class:`Dataset` objects of :class:`Record` s; :func:`load_image` is the
one image loader of the project. The synthetic set, the checker and the importers live in
their own modules (``data.synth``, ``data.check``, ``data.importers``, ``data.download``)
so that importing this package stays light.

Example:
    >>> import tempfile
    >>> from paligemma_xray.data import open_dataset, load_image, record_targets
    >>> from paligemma_xray.data.synth import generate
    >>> ds = open_dataset(generate(tempfile.mkdtemp(), n=3, seed=0, size=64, progress=False))
    >>> record = ds.records("train")[0]
    >>> image = load_image(record.image)
    >>> len(record_targets(record, image.size)) >= 0
    True
"""

from paligemma_xray.data.images import load_image
from paligemma_xray.data.layouts import open_dataset
from paligemma_xray.data.records import SPLITS, Dataset, Problem, Record, record_targets

__all__ = ["SPLITS", "Dataset", "Problem", "Record", "load_image", "open_dataset", "record_targets"]
