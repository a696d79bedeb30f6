# The two front-door commands: `make demo` and `make test`. Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/mas-triplets
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-data venv clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# Real test data: Fashion-MNIST from Debian's dataset-fashion-mnist (root + apt-get only; tests skip with a reason otherwise).
test-data:
	@if [ ! -d $(FASHION_MNIST) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "warning: could not install dataset-fashion-mnist; its tests will be skipped"; \
	fi

test: $(STAMP) test-data
	$(PY) -m pytest -q tests

DEMO_DIR := runs/demo
demo: $(STAMP) test-data
	$(PY) -m triplets.demo --out $(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR) runs/demo_data
