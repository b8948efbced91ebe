# The two commands of the README:  `make serve`  and  `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STUDIES ?= sample_studies
PORT ?= 8000

.PHONY: serve test pacs venv lint clean

$(BIN)/metaapp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[test]"
	@touch $@

venv: $(BIN)/metaapp

serve: venv  ## set up, build sample_studies/ if needed, start the server on 127.0.0.1:$(PORT)
	$(BIN)/metaapp serve --studies $(STUDIES) --host 127.0.0.1 --port $(PORT)

pacs: venv  ## Orthanc (Debian's) with sample_studies/ as DICOM on 127.0.0.1:8042, the app against it on :$(PORT)
	$(BIN)/metaapp pacs --studies $(STUDIES) --port $(PORT)

test: venv  ## lint + the whole test suite
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
