"""``python -m paligemma_xray.cli`` (and ``torchrun … -m paligemma_xray.cli``)."""

import sys

from paligemma_xray.cli.parser import main

sys.exit(main())
