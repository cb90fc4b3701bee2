# `make demo` and `make test` each create or refresh .venv, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-t2i test lint clean gpu-check

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, exact pin: the CPU wheel; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# kronfluence (EK-FAC) declares torchvision, which it never imports and whose wheel breaks the CPU torch:
	# install it without dependencies (its real ones, accelerate/einops/einconv/opt-einsum, are the [ekfac] extra)
	$(PY) -m pip install --quiet --no-deps kronfluence==1.0.1
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradtrace demo --out demo_out

demo-t2i: $(STAMP)
	$(VENV)/bin/gradtrace demo --text-to-image --out demo_t2i_out

# lint first (ruff, configured in pyproject.toml: pyflakes, pycodestyle, import order); the HTML report tests drive a
# real headless Chromium (installed from Debian where missing); the language-model tests train on Debian's fortunes
# (installed where missing)
test: $(STAMP)
	$(VENV)/bin/ruff check .
	bash scripts/ensure_chromium.sh
	bash scripts/ensure_fortunes.sh
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

# on a machine with a CUDA GPU (about 8 minutes): featurize float32/bfloat16 against the CPU, a LoRA step, the CIFAR
# featurization ratios against the GPU's own floor, scoring 1M x 8,192 (tests run it tiny on the CPU: --dry-run)
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --out bench_out/gpu_check --write-docs

lint: $(STAMP)
	$(VENV)/bin/ruff check .

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

# Text-to-image benchmarks on the small SD-layout pipeline (built once into bench_out/t2i_pipe, about 4 min):
# LDS of a LoRA fine-tune (about 45 min), prompt-defined aspects (about 8 min), featurization cost (2 min).
.PHONY: bench-t2i bench-t2i-pipe

bench_out/t2i_pipe/gradtrace_build.json: $(STAMP)
	$(VENV)/bin/gradtrace build-pipeline --out bench_out/t2i_pipe

bench-t2i-pipe: bench_out/t2i_pipe/gradtrace_build.json

bench-t2i: bench-t2i-pipe
	$(PY) bench/bench_t2i_lds.py --pipeline bench_out/t2i_pipe --out bench_out/t2i_lds
	$(PY) bench/bench_t2i_aspects.py --pipeline bench_out/t2i_pipe --out bench_out/t2i_aspects
	$(PY) bench/bench_t2i_featurize.py --pipeline bench_out/t2i_pipe --out bench_out/t2i_featurize

# Classifier benchmark (bench/bench_classifier.py): LDS and mislabel AUC of a small ResNet and ViT on digits,
# sized for about 45-90 min of the shared 2-core machine; quick is a smoke run of about a minute.
.PHONY: bench-classifier bench-classifier-quick

bench-classifier: $(STAMP)
	$(PY) bench/bench_classifier.py --out bench_out/classifier

bench-classifier-quick: $(STAMP)
	$(PY) bench/bench_classifier.py --quick --out bench_out/classifier_quick

# Language-model benchmark (bench/bench_lm.py): LDS and tail-patch of TracIn, TRAK, LoGra and EK-FAC x uniform /
# learned weights on the small GPT-2 trained on fortunes, and the featurization cost; the full one took 8 min of the
# shared 2-core machine (most of it the 32 retrained models); quick is a smoke run of under a minute.
.PHONY: bench-lm bench-lm-quick

bench-lm: $(STAMP)
	bash scripts/ensure_fortunes.sh
	$(PY) bench/bench_lm.py --out bench_out/lm

bench-lm-quick: $(STAMP)
	bash scripts/ensure_fortunes.sh
	$(PY) bench/bench_lm.py --quick --out bench_out/lm_quick

# Featurization at CIFAR scale (bench/bench_featurize_cifar.py): the 35.7M-parameter CIFAR-10 DDPM UNet; floor,
# vmap, Kronecker (k = 2048, 8192), traker, dattri. CUDA when present, else the CPU (there: about 1 h on the shared
# 2-core machine, most of it traker and dattri running into their 25-min limit).
.PHONY: bench-featurize-cifar

bench-featurize-cifar: $(STAMP)
	$(PY) bench/bench_featurize_cifar.py
