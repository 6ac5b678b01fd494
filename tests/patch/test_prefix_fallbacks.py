"""Shared prefixes are never silently different: what the plan cannot run exactly runs the
plain batch, and the reason is counted. Also the interface: the report, the stats, unpatch."""
import types

import pytest
import torch
from torch import nn

import fastlora
from fastlora.patch import _bind, prefix
from tests.patch.fp64 import float64_all_the_way
from tests.patch.test_prefix import batch, lora_model, pair, rel, rows_for


def fallbacks(model):
    return fastlora.shared_prefix_stats(model)["fallbacks"]


def decoder(model):
    return model.base_model.model.model


@pytest.fixture
def models():
    with float64_all_the_way():
        yield pair("llama")


def test_report_stats_and_unpatch():
    model = lora_model("llama")
    dec = decoder(model)
    report = fastlora.patch(model)
    assert report.share_prefix and report.patched[prefix.KIND] == 1
    assert "shared prefix: on" in str(report)
    assert _bind.state(dec).kind == prefix.KIND
    again = fastlora.patch(model)  # a second call keeps the one binding
    assert again.share_prefix and again.already_patched
    ids, mask, _ = batch(rows_for("group of 8"), left=False)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    stats = fastlora.shared_prefix_stats(model)
    assert set(stats) == {"calls", "shared_calls", "tokens_in", "tokens_run", "fallbacks"}
    assert stats["calls"] == stats["shared_calls"] == 1
    assert stats["tokens_in"] == int(mask.sum()) and stats["tokens_run"] < stats["tokens_in"]
    assert fastlora.shared_prefix_stats(model, reset=True) == stats
    assert fastlora.shared_prefix_stats(model)["calls"] == 0
    fastlora.unpatch(model)
    assert _bind.state(dec) is None and "forward" not in dec.__dict__


def test_share_prefix_false_binds_nothing():
    model = lora_model("llama")
    report = fastlora.patch(model, share_prefix=False)
    assert not report.share_prefix and "shared prefix: off (share_prefix=False)" in str(report)
    assert _bind.state(decoder(model)) is None
    assert fastlora.shared_prefix_stats(model)["calls"] == 0


def test_a_decoder_without_rope_is_kept_and_said():
    import transformers

    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32)
    report = fastlora.patch(transformers.GPT2LMHeadModel(cfg))
    assert not report.share_prefix
    count, why = report.kept[prefix.KIND]
    assert count == 1 and "rotary" in why


def test_unsupported_backend_and_layer_types_are_named():
    rope = nn.Module()
    dec = nn.Module()
    dec.rotary_emb = rope
    dec.config = types.SimpleNamespace(_attn_implementation="flash_attention_2")
    assert "flash_attention_2" in prefix.unsupported_reason(dec)
    dec.config = types.SimpleNamespace(_attn_implementation="sdpa", layer_types=["chunked_attention"])
    assert "chunked_attention" in prefix.unsupported_reason(dec)
    dec.config = types.SimpleNamespace(_attn_implementation="sdpa", layer_types=["sliding_attention"])
    assert prefix.unsupported_reason(dec) is None


def plain_equal(shared, plain, real=None, **kw):
    """Both give the same outputs at the real positions (padding reads zeros when shared)."""
    with torch.no_grad():
        a = shared(**kw)
        b = plain(**kw)
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    a, b = getattr(a, key), getattr(b, key)
    real = torch.ones(a.shape[:2], dtype=torch.bool) if real is None else real.bool()
    assert rel(a[real], b[real]) <= 1e-12


def test_a_cache_runs_the_plain_batch(models):
    shared, plain = models
    ids, mask, _ = batch(rows_for("two levels"), left=True)
    shared.eval(), plain.eval()
    with float64_all_the_way():
        plain_equal(shared, plain, input_ids=ids, attention_mask=mask, use_cache=True)
        assert fallbacks(shared) == {"use_cache=True": 1}
        out = shared.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 2
    assert fallbacks(shared)["a cache is passed"] >= 1


def test_caller_masks_positions_and_embeddings(models):
    shared, plain = models
    ids, mask, _ = batch(rows_for("two levels"), left=False)
    dec_s, dec_p = decoder(shared), decoder(plain)
    shared.eval(), plain.eval()
    with float64_all_the_way():
        # a 4D mask of the caller's own
        m4 = mask[:, None, None, :].bool() & torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        plain_equal(dec_s, dec_p, input_ids=ids, attention_mask=m4, use_cache=False)
        assert fallbacks(shared) == {"a 4D or prepared attention mask": 1}
        # position ids counting up by one from any offset: shared, and exact
        pos = torch.arange(ids.shape[1]).expand_as(ids) + 3
        plain_equal(dec_s, dec_p, mask, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        assert fastlora.shared_prefix_stats(shared)["shared_calls"] == 1
        # packed rows: positions restart mid-row
        packed = pos.clone()
        packed[:, 6:] -= 6
        plain_equal(dec_s, dec_p, input_ids=ids, attention_mask=mask, position_ids=packed, use_cache=False)
        assert fallbacks(shared)["packed position_ids"] == 1
        # embeddings instead of ids (PEFT prompt tuning, some trainers)
        emb = dec_s.embed_tokens(ids)
        plain_equal(dec_s, dec_p, inputs_embeds=emb, attention_mask=mask, use_cache=False)
        assert fallbacks(shared)["inputs_embeds instead of input_ids"] == 1
        # attention weights asked for
        plain_equal(dec_s, dec_p, input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
        assert fallbacks(shared)["output_attentions"] == 1
        # a mask with holes
        holes = mask.clone()
        holes[0, 2] = 0
        plain_equal(dec_s, dec_p, input_ids=ids, attention_mask=holes, use_cache=False)
        assert fallbacks(shared)["attention_mask with holes (not left/right padding)"] == 1


@pytest.mark.parametrize("where", ["lora", "attention"])
def test_dropout_in_training_runs_the_plain_batch(where):
    import transformers

    with float64_all_the_way():
        if where == "lora":
            model = lora_model("llama", lora_dropout=0.1)
        else:
            from peft import LoraConfig, get_peft_model

            from tests.patch.test_prefix import config

            base = transformers.AutoModelForCausalLM.from_config(config("llama", attention_dropout=0.1)).double()
            model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        fastlora.patch(model)
        prefix.set_min_saving(model, float("-inf"))
        ids, mask, labels = batch(rows_for("two levels"), left=False)
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels)
        want = "dropout > 0 in training mode" if where == "lora" else "attention dropout > 0 in training mode"
        assert fallbacks(model) == {want: 1}
        model.eval()  # no dropout in eval mode: shared
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, labels=labels)
        assert fastlora.shared_prefix_stats(model)["shared_calls"] == 1


def test_small_saving_is_counted():
    model = lora_model("llama")
    fastlora.patch(model)
    ids = torch.randint(3, 90, (2, 16))  # nothing shared, no padding: nothing to gain
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert fallbacks(model) == {"saving below 10%": 1}


def test_a_failing_self_check_leaves_the_decoder_alone(monkeypatch):
    model = lora_model("llama")

    def wrong(self, window=None):  # a tree mask that lets every slot see every other
        return torch.ones(self.n_bins, self.cap, self.cap, dtype=torch.bool)

    monkeypatch.setattr(prefix.PrefixPlan, "allowed", wrong)
    report = fastlora.patch(model)
    assert not report.share_prefix
    (fb,) = [f for f in report.fallbacks if f.kind == "shared-prefix"]
    assert "self-check failed" in fb.reason
    assert _bind.state(decoder(model)) is None
