"""generate gives every module back its own train/eval flag.

A PEFT wrapper reads ``training=True`` while the transformers model inside it is in eval
mode (``from_pretrained`` returns it so); restoring the wrapper's flag on the whole
model switched every dropout on for the next caller (PPO's scoring passes).
"""
from __future__ import annotations

import torch

import fastlora
from tests.helpers import requires_bnb
from tests.patch import tiny

pytestmark = requires_bnb


def test_mixed_modes_survive_generate_and_choices(tmp_path):
    model = tiny.load_qlora(tiny.save_random("llama", tmp_path / "llama"), lora_dropout=0.1)
    fastlora.patch(model)
    model.train()
    model.get_base_model().eval()
    model.get_base_model().model.layers[0].self_attn.train()  # one live module deep inside
    modes = {n: m.training for n, m in model.named_modules()}
    assert model.training and any(modes.values()) and not all(modes.values())
    ids = torch.randint(3, tiny.VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    fastlora.generate(model, input_ids=ids, max_new_tokens=3, temperature=1.0, seed=0, stop_token_ids=[])
    assert {n: m.training for n, m in model.named_modules()} == modes
    fastlora.generate(model, input_ids=ids, choices=["a", "b"], tokenizer=tiny.tokenizer())
    assert {n: m.training for n, m in model.named_modules()} == modes
