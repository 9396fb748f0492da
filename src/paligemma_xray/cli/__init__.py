"""Command line: ``paligemma-xray VERB …`` (also ``python -m paligemma_xray.cli``).

One module per verb (:mod:`.data`, :mod:`.convert`, :mod:`.train`, :mod:`.predict`,
:mod:`.evaluate`, :mod:`.report`, :mod:`.serve`, :mod:`.demo`, :mod:`.pacs`), each a
``register(verbs)`` that declares the verb and a handler that makes one library call; the
parser, the verb list and :func:`main` are in :mod:`.parser`. A verb's flags, ``--help`` and
``--config FILE`` come from its settings class (:mod:`paligemma_xray.settings`). Nothing
imports this package.
"""

from paligemma_xray.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
