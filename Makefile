# Two commands matter: `make demo` and `make test`. Both set everything up on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint browser pacs-deps ohif bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build on disk; an unpinned torch would pull gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/paligemma-xray demo $(DEMO_ARGS)

# Chromium (Debian's) is only needed by the browser tests; installed when we may.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: browser tests will be skipped"; }

# Orthanc with its DICOMweb plugin (a real PACS for the pacs tests), dicom3tools (dciodvfy, an
# independent DICOM validator) and DCMTK (dsrdump, a second SR reader); installed when we may.
pacs-deps:
	@{ [ -x /usr/sbin/Orthanc ] && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] && command -v dciodvfy >/dev/null 2>&1 && command -v dsrdump >/dev/null 2>&1; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb dicom3tools dcmtk >/dev/null) || \
	  echo "orthanc / orthanc-dicomweb / dicom3tools / dcmtk not installed: the PACS and DICOM validator tests will be skipped"; }

# OHIF (npm @ohif/app, a prebuilt viewer) for the test that opens our SRs in a real viewer;
# fetched into .cache/ohif when npm and its registry answer, else that test is skipped.
OHIF_VERSION := 3.13.2
ohif:
	@[ -f .cache/ohif/ohif-app-$(OHIF_VERSION).tgz ] || { command -v npm >/dev/null 2>&1 && mkdir -p .cache/ohif && \
	  npm pack -q @ohif/app@$(OHIF_VERSION) --pack-destination .cache/ohif >/dev/null 2>&1; } || \
	  echo "@ohif/app not fetched (no npm or no registry): the OHIF viewer test will be skipped"

# ruff (lint + format check), mypy on src/ ([tool.mypy]) and the import contracts: layer order and
# no private names across modules ([tool.importlinter], lint-imports); CI runs it through `make test`.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: setup browser pacs-deps ohif lint
	$(VENV)/bin/pytest -n 2 -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/train_step.py --out benchmarks/results/train_step.json
	$(PY) benchmarks/decode.py --out benchmarks/results/decode.json
	$(PY) benchmarks/serve.py --out benchmarks/results/serve.json
	$(PY) benchmarks/load_memory.py --out benchmarks/results/load_memory.json
	$(PY) benchmarks/gpu_suite.py --preset tiny --out benchmarks/results/gpu_suite_cpu.json

clean:
	rm -rf $(VENV) build *.egg-info
