"""A patched model in transformers.Trainer, with gradient accumulation
(num_items_in_batch). TRL's trainers: test_trl.py."""
import torch

import fastlora
from tests.helpers import assert_close, requires_bnb
from tests.patch import tiny

pytestmark = requires_bnb


def _dataset(n=8, T=12):
    rows = []
    for i in range(n):
        b = tiny.batch(seed=100 + i, B=1, T=T)
        b["labels"][0, : 2 + i % 5] = -100  # uneven token counts: normalization matters
        rows.append({k: v[0] for k, v in b.items()})
    return rows


def _train(model, tmp_path, steps=4):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=2e-3, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
        seed=0, data_seed=0, dataloader_num_workers=0, lr_scheduler_type="constant",
    )
    trainer = Trainer(model=model, args=args, train_dataset=_dataset())
    trainer.train()
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


def test_hf_trainer_trains_patched_model_like_unpatched(saved_models, tmp_path, monkeypatch):
    from fastlora.patch import head

    seen = []
    fused_loss = head.causal_lm_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_items_in_batch"))
        return fused_loss(*args, **kwargs)

    monkeypatch.setattr(head, "causal_lm_loss", spy)
    path = saved_models("llama")
    ref, pat = tiny.load_qlora(path), tiny.load_qlora(path)
    assert fastlora.patch(pat).ok
    before = {n: p.detach().clone() for n, p in pat.named_parameters() if p.requires_grad}
    l_ref = _train(ref, tmp_path / "ref")
    l_pat = _train(pat, tmp_path / "pat")
    assert len(l_pat) == 4 and torch.isfinite(l_pat).all()
    assert_close(l_pat, l_ref, rtol=1e-4, atol=0)
    # the fused loss ran on every micro-batch, normalized by the accumulated token count
    assert len(seen) == 4 * 2 and all(torch.is_tensor(n) and n > 0 for n in seen)
    moved = [n for n, p in pat.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == len(before)
