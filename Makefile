# `make demo` and `make test` each create or refresh .venv, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-t2i test clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, exact pin: the CPU wheel; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradtrace demo --out demo_out

demo-t2i: $(STAMP)
	$(VENV)/bin/gradtrace demo --text-to-image --out demo_t2i_out

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo_out demo_t2i_out

# LDS benchmark (bench/bench_lds.py): the full one took 84 min of both cores; quick is tiny.
.PHONY: bench-lds bench-lds-quick

bench-lds: $(STAMP)
	$(PY) bench/bench_lds.py --out bench_out/lds

bench-lds-quick: $(STAMP)
	$(PY) bench/bench_lds.py --quick --out bench_out/lds_quick

# Aspect retrieval benchmark on shapes (bench/bench_aspects.py): the full one takes about 35 min on the
# shared 2-core machine and writes docs/img/aspects_*.png; quick is a smoke run of a few minutes.
.PHONY: bench-aspects bench-aspects-quick

bench-aspects: $(STAMP)
	$(PY) bench/bench_aspects.py --out bench_out/aspects

bench-aspects-quick: $(STAMP)
	$(PY) bench/bench_aspects.py --quick --out bench_out/aspects_quick

# Training step time by AdamW implementation (bench/bench_train_step.py): about 10 min.
.PHONY: bench-train-step

bench-train-step: $(STAMP)
	$(PY) bench/bench_train_step.py
