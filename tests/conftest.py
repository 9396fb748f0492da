"""Shared fixtures: everything a test needs is built here, nothing is downloaded.

Expensive objects (tiny models, tokenizers, synthetic data sets) are built once per session.
"""

from __future__ import annotations

import os

# Several engineers and CI share two cores; one intra-op thread per test process keeps the
# parallel suite from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
