# The README's two commands: `make demo` and `make test`. Each builds .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build of torch: it lies on local disk here; elsewhere pass TORCH_INDEX="--index-url <cpu wheel index>".
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: venv test demo parity clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[torch,dev,hf,tfds,cuda]"
	touch $@

test: venv
	$(PY) -m pytest -q -n 2 --durations=30 $(PYTEST_ARGS)

demo: venv
	$(PY) -m qvl_jax.train --config configs/demo.yaml --set output.overwrite=true

parity: venv
	$(PY) -m parity_tests.demo

clean:
	rm -rf $(VENV) outputs .pytest_cache
