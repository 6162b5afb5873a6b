# visrep_jax: `make demo` and `make test` work on a fresh machine (Python >= 3.11).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup setup-test malloc demo data test test-fast benchmark clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,torch]'
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# tcmalloc (visrep_jax/utils/malloc.py: ~13% faster CPU train steps than glibc's allocator),
# installed when missing if we are root (else a hint; everything works without it).
malloc:
	@ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	      { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; } || true; \
	  else echo "hint: sudo apt-get install libtcmalloc-minimal4 makes CPU training faster"; fi; }

# Fashion-MNIST offline: Debian's dataset-fashion-mnist (IDX files), installed if missing.
data: setup malloc
	@test -f $(FASHION_MNIST) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Installing Debian's dataset-fashion-mnist (needs sudo)"; sudo apt-get install -y dataset-fashion-mnist; fi; }
	$(PY) -m visrep_jax.data.prepare --dataset=fashion_mnist

demo: data
	$(PY) -m visrep_jax.main --config=configs/deit3.py:demo --workdir=$(WORKDIR)

test: setup-test data
	$(PY) -m pytest -q -n 2 --durations=15 tests

test-fast: setup-test
	$(PY) -m pytest -q -n 2 -m "not slow" tests

benchmark: setup-test malloc
	$(PY) scripts/benchmark.py --model=deit3_small_patch16_224 --batch_size=32 --resolution=224 --vs-timm

clean:
	rm -rf $(VENV) workdirs *.egg-info
