"""An adapter file never changes the frozen base that every role shares.

PEFT loads an adapter state dict with strict=False, so base-model entries in the file
(``modules_to_save``, trained embeddings) would be copied into the one shared base. The
shared base refuses them, naming the keys and the file, before anything changes; copies
equal to the base's own tensors (what PEFT writes when ``target_modules`` names the
head) load and change nothing.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from fastlora.rl import SharedBase
from tests.patch import tiny
from tests.helpers import requires_bnb

pytestmark = requires_bnb


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny.save_random("llama", tmp_path_factory.mktemp("rl_keys") / "llama")


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=False).items()}


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"base tensors changed: {changed[:5]}"


def _save_adapter(tiny_path, out: Path, *, bump_head: bool, **lora_kw) -> dict[str, torch.Tensor]:
    """A trained-looking PEFT adapter saved to ``out``; returns its file's tensors."""
    from safetensors.torch import load_file

    model = tiny.load_qlora(tiny_path, seed=3, **lora_kw)
    if bump_head:  # a trained modules_to_save copy of the head
        head = model.base_model.model.lm_head.modules_to_save["default"]
        with torch.no_grad():
            head.weight.add_(0.5)
    model.save_pretrained(out)
    return load_file(str(out / "adapter_model.safetensors"))


def _base_snapshot(base: SharedBase) -> dict:
    """The base model's own tensors (quantization states included), by their names
    before any LoRA wrapping, so snapshots before and after an adapter compare."""
    return {k.replace("base_layer.", ""): v for k, v in _snapshot(base.lm).items() if ".lora_" not in k}


@pytest.mark.parametrize("existing", [False, True])
def test_modules_to_save_adapter_is_refused_and_the_base_is_untouched(tiny_path, tmp_path, existing):
    state = _save_adapter(tiny_path, tmp_path / "a", bump_head=True, modules_to_save=["lm_head"])
    assert "base_model.model.lm_head.weight" in state  # what the bug copied into the shared base
    base = SharedBase.from_model(tiny.load_4bit(tiny_path), patch=False)
    if existing:
        base.add_role("critic", tiny.lora_config(), seed=4)
    before, adapters, roles = _base_snapshot(base), list(base.adapters), dict(base.roles)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors holds weights of the base model.*"
                                         r"base_model\.model\.lm_head\.weight"):
        base.add_role("policy", from_pretrained=tmp_path / "a", trainable=True)
    _assert_same(before, _base_snapshot(base))
    assert base.adapters == adapters and base.roles == roles  # nothing half-added


def test_unchanged_copies_of_base_tensors_load_and_change_nothing(tiny_path, tmp_path):
    """PEFT saves the head when target_modules names it (save_embedding_layers='auto'), and
    an untrained modules_to_save copy equals the base's head: both load."""
    for sub, kw in (("lm", dict(target_modules=["q_proj", "lm_head"])), ("mts", dict(modules_to_save=["lm_head"]))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT: "Setting save_embedding_layers to True ..."
            state = _save_adapter(tiny_path, tmp_path / sub, bump_head=False, **kw)
        copies = [k for k in state if ".lora_" not in k]
        assert copies, "PEFT wrote no copy of the head: the test would not test anything"
        base = SharedBase.from_model(tiny.load_4bit(tiny_path), patch=False)
        before = _base_snapshot(base)
        base.add_role("policy", from_pretrained=tmp_path / sub, trainable=True)
        _assert_same(before, _base_snapshot(base))
        mine = {n: p for n, p in base.model.named_parameters() if ".policy." in n}
        loaded = [k for k in state if ".lora_" in k]
        assert loaded and len(mine) == len(loaded)
        for k in loaded:
            assert torch.equal(mine[k.replace(".weight", ".policy.weight")], state[k])


def test_checkpoint_with_a_base_weight_is_refused(tiny_path, tmp_path):
    """SharedBase.load into existing adapters (a resumed run) checks the files too."""
    from safetensors.torch import load_file, save_file

    base = SharedBase.from_model(tiny.load_4bit(tiny_path), patch=False)
    base.add_role("policy", tiny.lora_config(), seed=4)
    base.save(tmp_path / "ck")
    f = tmp_path / "ck" / "adapters" / "policy" / "adapter_model.safetensors"
    state = load_file(str(f))
    state["base_model.model.model.embed_tokens.weight"] = base.lm.model.embed_tokens.weight.detach() + 1.0
    save_file(state, str(f))
    before = _snapshot(base.model)
    with pytest.raises(ValueError, match=r"embed_tokens\.weight"):
        base.load(tmp_path / "ck")
    _assert_same(before, _snapshot(base.model))
