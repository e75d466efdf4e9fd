# Two commands a user needs (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test clean label-env label test-label dicom3tools

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build that lies on disk; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/monai-covid infer samples/ct_dicom out/demo --overwrite
	@echo "Demo results: $(CURDIR)/out/demo/report.html (table: out/demo/report.csv)"

# dciodvfy (Debian package dicom3tools) validates every DICOM SEG the tests write; installed here when missing
dicom3tools:
	@command -v dciodvfy >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dicom3tools; \
		elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo apt-get install -y -qq dicom3tools; \
		else echo "dciodvfy missing: install the Debian package dicom3tools" >&2; exit 1; fi; }

test: $(STAMP) dicom3tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache

# MONAI Label server (docs/monailabel.md) in its own environment: MONAI Label's pins clash with the core's.
LABEL_VENV := .venv-label
LABEL_BIN := $(LABEL_VENV)/bin
LABEL_STAMP := $(LABEL_VENV)/.installed
LABEL_STUDIES ?= out/label_studies
LABEL_PORT ?= 8000

$(LABEL_STAMP): monailabel_app/requirements.txt setup.cfg pyproject.toml
	test -x $(LABEL_BIN)/python || $(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_BIN)/python -m pip install -q --upgrade pip
	# a lock file: every package pinned, installed without resolving (see its header)
	$(LABEL_BIN)/python -m pip install -q --no-deps -r monailabel_app/requirements.txt
	$(LABEL_BIN)/python -m pip install -q --no-deps -e .
	touch $(LABEL_STAMP)

label-env: $(LABEL_STAMP)

# Serves monailabel_app on 127.0.0.1:$(LABEL_PORT); studies: NIfTI files in $(LABEL_STUDIES) (default: the shipped
# sample converted there, since MONAI Label keeps its labels and index inside the studies folder).
label: $(LABEL_STAMP)
	ls $(LABEL_STUDIES)/*.nii.gz >/dev/null 2>&1 || $(LABEL_BIN)/monai-covid convert samples/ct_dicom $(LABEL_STUDIES)
	MONAI_LABEL_AUTO_UPDATE_SCORING=false NO_PROXY=127.0.0.1 no_proxy=127.0.0.1 $(LABEL_BIN)/python -m monailabel.main \
		start_server --app monailabel_app --studies $(LABEL_STUDIES) --host 127.0.0.1 --port $(LABEL_PORT) \
		--conf skip_trainers true

test-label: $(STAMP) $(LABEL_STAMP)
	MONAI_COVID_LABEL_TEST=1 $(BIN)/python -m pytest tests/test_monailabel.py $(PYTEST_ARGS)
