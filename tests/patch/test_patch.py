"""patch/unpatch mechanics and PEFT states: adapters, merging, dropout, DoRA, the
bitsandbytes repack guard, the report; against unpatched PEFT + bitsandbytes."""
import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import fastlora
from fastlora.patch import PatchReport, protect_bnb_weights, unpatch
from tests.helpers import assert_close, requires_bnb
from tests.patch import tiny
from tests.patch.test_families import assert_grads_match

pytestmark = requires_bnb


def loss_and_grads(model, b, **kw):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**b, **kw).loss
    loss.backward()
    return loss.detach()


def assert_same_step(ref, pat, b, *, rtol=1e-5, grad_tol=1e-5, **kw):
    """One backward of each model on batch ``b``: the same loss and the same LoRA grads."""
    assert_close(loss_and_grads(pat, b, **kw), loss_and_grads(ref, b, **kw), rtol=rtol, atol=0)
    assert_grads_match(ref, pat, tol=grad_tol)


def test_unpatch_is_bit_exact(saved_models):
    path = saved_models("qwen2")
    ref, pat = tiny.load_qlora(path), tiny.load_qlora(path)
    b = tiny.batch()
    fastlora.patch(pat)
    loss_and_grads(pat, b)  # run patched once: state must not leak into the original
    assert unpatch(pat) == 2 + 7 * tiny.LAYERS  # head, decoder, LoRA layers
    assert not any("_fastlora_patch" in m.__dict__ or "forward" in m.__dict__ for m in pat.modules())
    l_ref, l_pat = loss_and_grads(ref, b), loss_and_grads(pat, b)
    assert torch.equal(l_ref, l_pat)
    g_ref, g_pat = tiny.lora_grads(ref), tiny.lora_grads(pat)
    assert all(torch.equal(g_ref[k], g_pat[k]) for k in g_ref)
    ref.eval(), pat.eval()
    with torch.no_grad():
        assert torch.equal(ref(input_ids=b["input_ids"]).logits, pat(input_ids=b["input_ids"]).logits)
    again = fastlora.patch(pat)  # unpatched models can be patched again
    assert again.ok and not again.already_patched and sum(again.patched.values()) == 2 + 7 * tiny.LAYERS


def test_patch_twice_is_a_noop_and_only_this_instance_changes(saved_models):
    path = saved_models("llama")
    a, other = tiny.load_qlora(path), tiny.load_qlora(path)
    cls_forwards = {type(m): type(m).forward for m in a.modules()}
    first = fastlora.patch(a)
    second = fastlora.patch(a)
    assert second.already_patched and not first.already_patched
    assert second.patched == first.patched
    assert "already patched" in str(second)
    assert all(type(m).forward is f for m, f in ((m, cls_forwards[type(m)]) for m in a.modules()))
    assert not any("_fastlora_patch" in m.__dict__ for m in other.modules())
    b = tiny.batch()
    assert_close(loss_and_grads(a, b), loss_and_grads(other, b), rtol=1e-5, atol=0)
    assert_grads_match(other, a)


def test_deepcopy_of_patched_model_uses_its_own_modules(saved_models):
    path = saved_models("llama")
    ref, pat = tiny.load_qlora(path), tiny.load_qlora(path)
    fastlora.patch(pat)
    twin = copy.deepcopy(pat)
    with torch.no_grad():  # change the copy only: the original must not see it
        for n, p in twin.named_parameters():
            if "lora_B" in n:
                p.zero_()
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.zero_()
    b = tiny.batch()
    assert_close(loss_and_grads(twin, b), loss_and_grads(ref, b), rtol=1e-5, atol=0)
    assert not torch.allclose(loss_and_grads(pat, b), loss_and_grads(ref, b))


def test_multiple_active_adapters_and_disable_adapter(saved_models):
    path = saved_models("qwen3")
    models = []
    for _ in range(2):
        m = tiny.load_qlora(path)
        torch.manual_seed(5)
        m.add_adapter("second", tiny.lora_config(r=4, lora_alpha=12))
        m.base_model.set_adapter(["default", "second"])
        models.append(m)
    ref, pat = models
    report = fastlora.patch(pat)
    assert report.ok
    b = tiny.batch()
    assert len(tiny.trainable(ref)) == 4 * 7 * tiny.LAYERS  # both adapters train
    assert_same_step(ref, pat, b)
    with ref.disable_adapter(), pat.disable_adapter():  # base only: nothing to train
        l_ref, l_pat = ref(**b).loss, pat(**b).loss
    assert not l_pat.requires_grad
    assert_close(l_pat, l_ref, rtol=1e-5, atol=0)
    # back on: both adapters again
    assert_same_step(ref, pat, b)


def test_merge_and_unmerge_adapter(saved_models):
    path = saved_models("llama")
    ref, pat = tiny.load_qlora(path), tiny.load_qlora(path)
    fastlora.patch(pat)
    b = tiny.batch()
    before = loss_and_grads(pat, b)
    ref.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that 4-bit merges round
        ref.merge_adapter(), pat.merge_adapter()
        merged_ref, merged_pat = ref(**b).loss, pat(**b).loss  # base only: no grad
        assert_close(merged_pat, merged_ref, rtol=1e-5, atol=0)
        # the merged weight holds the delta (re-quantized): close to the unmerged loss
        assert_close(merged_pat, before, rtol=2e-2, atol=0)
        ref.unmerge_adapter(), pat.unmerge_adapter()
    assert_same_step(ref, pat, b)


def test_dora_falls_back_and_is_reported(saved_models, caplog):
    path = saved_models("llama")
    ref, pat = tiny.load_qlora(path, use_dora=True), tiny.load_qlora(path, use_dora=True)
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        report = fastlora.patch(pat)
    assert not report.ok
    assert len(report.fallbacks) == 7 * tiny.LAYERS
    assert all("DoRA" in f.reason for f in report.fallbacks)
    assert report.patched["lora/bnb-nf4"] == 0 and report.patched["causal-lm head+loss"] == 1
    assert "FALLBACK" in str(report) and "DoRA" in caplog.text
    b = tiny.batch()
    assert_same_step(ref, pat, b)


def test_adapter_added_after_patch_is_handled_at_call_time(saved_models):
    path = saved_models("llama")
    ref, pat = tiny.load_qlora(path), tiny.load_qlora(path)
    fastlora.patch(pat)
    for m in (ref, pat):
        torch.manual_seed(3)
        m.add_adapter("dora", tiny.lora_config(use_dora=True))
        m.base_model.set_adapter(["default", "dora"])
    b = tiny.batch()
    with pytest.warns(RuntimeWarning, match="DoRA"):
        loss = loss_and_grads(pat, b)
    assert_close(loss, loss_and_grads(ref, b), rtol=1e-5, atol=0)


def test_dropout_eval_exact_and_training_statistics(saved_models):
    path = saved_models("llama")
    ref, pat = tiny.load_qlora(path, lora_dropout=0.3), tiny.load_qlora(path, lora_dropout=0.3)
    fastlora.patch(pat)
    b = tiny.batch()
    ref.eval(), pat.eval()  # no dropout in eval: exact
    with torch.no_grad():
        l0 = pat(**b).loss
        assert_close(l0, ref(**b).loss, rtol=1e-5, atol=0)
    # in training dropout is live: two calls differ, and both differ from eval
    pat.train()
    l1 = pat(**b).loss.item()
    l2 = pat(**b).loss.item()
    assert l1 != l2 and l0.item() not in (l1, l2)


class FusedBlock(nn.Module):
    """A Phi-3-style block: one projection makes q, k and v, one makes gate and up."""

    def __init__(self, d=128, bias=True):
        super().__init__()
        self.qkv_proj = nn.Linear(d, 3 * d, bias=bias)
        self.gate_up_proj = nn.Linear(d, 4 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=bias)

    def forward(self, x):
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v
        return self.down_proj(nn.functional.silu(gate) * up) + att


def _quantized_block(seed=0, bias=True):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = FusedBlock(bias=bias)
    block = FusedBlock(bias=bias)
    for name in ("qkv_proj", "gate_up_proj", "down_proj"):
        lin = getattr(dense, name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
        q.load_state_dict(lin.state_dict())
        q = q.to("cpu")  # bitsandbytes quantizes when the weight is moved to its device
        assert q.weight.quant_state is not None
        setattr(block, name, q)
    return block


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fused_projections_custom_module(dropout):
    from peft import LoraConfig, get_peft_model

    models = []
    for _ in range(2):
        block = _quantized_block()
        protect_bnb_weights(block)
        torch.manual_seed(2)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["qkv_proj", "gate_up_proj", "down_proj"],
                         init_lora_weights=False, lora_dropout=dropout)
        models.append(get_peft_model(block, cfg))
    ref, pat = models
    report = fastlora.patch(pat)
    assert report.patched["lora/bnb-nf4"] == 3 and report.ok
    assert "no transformers *ForCausalLM" in str(report)
    x = torch.randn(2, 9, 128)
    for m in (ref, pat):
        m.eval()
    with torch.no_grad():
        assert_close(pat(x), ref(x), rtol=1e-4, atol=1e-5)
    if dropout:
        return  # training with live dropout is compared layer by layer below
    xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    for m, xx in ((ref, xr), (pat, xp)):
        m.train()
        m(xx).square().mean().backward()
    assert_close(xp.grad, xr.grad, rtol=1e-4, atol=1e-6)
    assert_grads_match(ref, pat)


def test_dropout_mask_consistent_forward_and_backward():
    """With A = B = I and scaling 1, the LoRA term is dropout(x) itself: this recovers
    the mask the patched layer drew and checks every output and gradient against PEFT's
    formula evaluated with that same mask."""
    from peft import LoraConfig, get_peft_model

    p = 0.4
    block = _quantized_block(bias=True)
    protect_bnb_weights(block)
    model = get_peft_model(block, LoraConfig(r=128, lora_alpha=128, target_modules=["down_proj"],
                                             lora_dropout=p, init_lora_weights=False))
    layer = model.base_model.model.down_proj
    d = 128
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.eye(d, 2 * d))
        layer.lora_B["default"].weight.copy_(torch.eye(d))
    assert fastlora.patch(model).ok
    model.train()
    x = (torch.randn(64, 2 * d).abs() + 0.1).requires_grad_()  # no zeros: the mask shows
    base = layer.get_base_layer()
    with torch.no_grad():
        base_out = base(x)
    y = layer(x)
    term = (y - base_out).detach()[:, :d]  # the first d inputs feed the identity A
    mask = term.abs() > 1e-3
    keep = mask.float().mean().item()
    assert abs(keep - (1 - p)) < 0.02, f"kept fraction {keep:.3f}, expected {1 - p}"
    assert_close(term[mask], (x.detach()[:, :d] / (1 - p))[mask], rtol=1e-5, atol=1e-5)
    # gradients: the same mask must be used in backward
    gy = torch.randn_like(y)
    y.backward(gy)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    xd = torch.zeros_like(x.detach())
    xd[:, :d] = torch.where(mask, x.detach()[:, :d] / (1 - p), 0)
    xd[:, d:] = float("nan")  # recovered only for the first d columns, which A reads
    dB_ref = gy.t() @ (xd[:, :d] @ A[:, :d].detach().t())
    assert_close(B.grad, dB_ref, rtol=1e-5, atol=1e-5)
    dA_ref = (gy @ B.detach()).t() @ xd[:, :d]
    assert_close(A.grad[:, :d], dA_ref, rtol=1e-5, atol=1e-5)


def test_lm_head_lora_is_folded(saved_models):
    path = saved_models("llama")
    kw = dict(target_modules=["q_proj", "v_proj", "lm_head"])
    ref, pat = tiny.load_qlora(path, **kw), tiny.load_qlora(path, **kw)
    report = fastlora.patch(pat)
    assert report.ok
    assert report.patched["lora/linear"] == 1  # lm_head itself, for eval/generation
    assert report.kept["bnb Linear4bit without LoRA"][0] == 5 * tiny.LAYERS
    b = tiny.batch()
    assert_same_step(ref, pat, b)
    assert any("lm_head" in n for n in tiny.lora_grads(pat))


def test_lm_head_lora_with_dropout_runs_unfused(saved_models):
    path = saved_models("qwen2")
    kw = dict(target_modules=["lm_head"], lora_dropout=0.1)
    pat = tiny.load_qlora(path, **kw)
    fastlora.patch(pat)
    pat.train()
    with pytest.warns(RuntimeWarning, match="dropout"):
        out = pat(**tiny.batch())
    assert out.logits is not None and torch.isfinite(out.loss)


def test_tied_embeddings_get_gradient_through_fused_loss(saved_models):
    # Gemma ties lm_head to the input embedding; train that shared weight too.
    path = saved_models("gemma")
    models = []
    for _ in range(2):
        m = tiny.load_qlora(path, modules_to_save=None)
        emb = m.get_input_embeddings()
        assert m.get_output_embeddings().weight is emb.weight
        emb.weight.requires_grad_(True)
        models.append(m)
    ref, pat = models
    assert fastlora.patch(pat).ok
    b = tiny.batch()
    assert_close(loss_and_grads(pat, b), loss_and_grads(ref, b), rtol=1e-5, atol=0)
    g_ref = ref.get_input_embeddings().weight.grad
    g_pat = pat.get_input_embeddings().weight.grad
    assert ((g_pat - g_ref).norm() / g_ref.norm()).item() < 1e-5


def test_num_items_in_batch_and_shift_labels(saved_models):
    path = saved_models("mistral")
    ref, pat = tiny.load_qlora(path), tiny.load_qlora(path)
    fastlora.patch(pat)
    b = tiny.batch()
    n = torch.tensor(37)
    assert_same_step(ref, pat, b, num_items_in_batch=n)
    shift = torch.nn.functional.pad(b["labels"], (0, 1), value=-100)[:, 1:].clone()
    shift[:, 2] = -100
    assert_same_step(ref, pat, b, shift_labels=shift)


def test_gradient_checkpointing_same_grads(saved_models):
    path = saved_models("qwen2")
    ref, pat = tiny.load_qlora(path), tiny.load_qlora(path)
    fastlora.patch(pat)
    for m in (ref, pat):
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    b = tiny.batch()
    assert_same_step(ref, pat, b)


def test_return_dict_false_gives_a_tuple(saved_models):
    path = saved_models("llama")
    ref, pat = tiny.load_qlora(path), tiny.load_qlora(path)
    fastlora.patch(pat)
    b = tiny.batch()
    ref.train(), pat.train()
    out = pat(**b, return_dict=False)
    assert isinstance(out, tuple)
    assert_close(out[0], ref(**b).loss, rtol=1e-5, atol=0)


def test_repack_guard(saved_models):
    """An eval/no-grad forward after patch must not repack NF4 in place (bnb 0.50 does
    on AVX512-BF16 CPUs), and training afterwards still matches."""
    from bitsandbytes.nn import Linear4bit

    path = saved_models("llama")
    ref, pat = tiny.load_qlora(path), tiny.load_qlora(path)
    fastlora.patch(pat)
    pat.eval()
    with torch.no_grad():
        pat(input_ids=tiny.batch()["input_ids"])
    layers = [m for m in pat.modules() if isinstance(m, Linear4bit)]
    assert layers and all(not m.support_avx512bf16_for_cpu for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    b = tiny.batch()
    assert_same_step(ref, pat, b)


def test_already_repacked_weights_fall_back():
    from bitsandbytes.nn import Linear4bit
    from peft import LoraConfig, get_peft_model

    block = _quantized_block()
    layer = block.qkv_proj
    if not getattr(Linear4bit(8, 8), "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    assert layer.weight.quant_state.packing_format_for_cpu
    model = get_peft_model(block, LoraConfig(r=4, target_modules=["qkv_proj", "gate_up_proj"]))
    report = fastlora.patch(model)
    assert [f.name.split(".")[-1] for f in report.fallbacks] == ["qkv_proj"]
    assert "packing_format_for_cpu" in report.fallbacks[0].reason
    assert report.patched["lora/bnb-nf4"] == 1


def test_unknown_head_transform_is_detected_and_reported(saved_models):
    from transformers import LlamaForCausalLM

    class OddForCausalLM(LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            out = super().forward(input_ids=input_ids, labels=labels, **kwargs)
            out.logits = out.logits * 3.0  # a head change the config does not describe
            return out

    path = saved_models("llama")
    base = tiny.load_4bit(path)
    odd = OddForCausalLM(base.config)
    odd.load_state_dict(LlamaForCausalLM.from_pretrained(path).state_dict())
    report = fastlora.patch(odd, lora=False)
    assert [f.kind for f in report.fallbacks] == ["head"]
    assert "self-check failed" in report.fallbacks[0].reason


@pytest.mark.parametrize("family,overrides", [
    ("cohere", {"logit_scale": 0.25}),
    ("granite", {"logits_scaling": 4.0}),
])
def test_logit_scale_families(tmp_path, family, overrides):
    import transformers
    from transformers import AutoModelForCausalLM

    cls = {"cohere": transformers.CohereConfig, "granite": transformers.GraniteConfig}[family]
    cfg = cls(hidden_size=128, intermediate_size=256, vocab_size=256, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, **overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    ref, pat = tiny.load_qlora(tmp_path), tiny.load_qlora(tmp_path)
    report = fastlora.patch(pat)
    assert report.ok, str(report)
    b = tiny.batch()
    assert_same_step(ref, pat, b)


def test_custom_loss_function_falls_back(saved_models):
    path = saved_models("llama")
    pat = tiny.load_qlora(path)
    lm = pat.base_model.model
    lm.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    report = fastlora.patch(pat)
    assert [f.kind for f in report.fallbacks] == ["head"]
    assert "custom loss_function" in report.fallbacks[0].reason
    pat.train()
    out = pat(**tiny.batch())
    assert out.logits is not None and torch.equal(out.loss, out.logits.float().mean())


def test_report_table_and_fallback_api():
    r = PatchReport()
    r.add_patched("lora/bnb-nf4")
    r.add_fallback("model.layers.0.mlp", "lora", "some reason")
    r.add_kept("bnb Linear4bit without LoRA", "kept")
    text = str(r)
    assert not r.ok and r.fallbacks[0].reason == "some reason"
    for piece in ("lora/bnb-nf4", "FALLBACK", "some reason", "model.layers.0.mlp", "kept", "backend"):
        assert piece in text


def test_callable_package_name():
    # `import fastlora.patch` rebinds the attribute to the package: it must still patch.
    import fastlora.patch as pkg

    report = pkg(nn.Sequential(nn.Linear(4, 4)))
    assert isinstance(report, PatchReport) and not report.patched
    assert "no transformers *ForCausalLM module found" in str(report)


def test_lm_head_in_modules_to_save(saved_models):
    path = saved_models("llama")
    kw = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    ref, pat = tiny.load_qlora(path, **kw), tiny.load_qlora(path, **kw)
    for m in (ref, pat):  # make the trained copy differ from the original head
        with torch.no_grad():
            m.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    assert fastlora.patch(pat).ok
    b = tiny.batch()
    assert_same_step(ref, pat, b)
    assert any("modules_to_save" in n for n in tiny.lora_grads(pat))
    with ref.disable_adapter(), pat.disable_adapter():
        assert_close(pat(**b).loss, ref(**b).loss, rtol=1e-5, atol=0)


def test_fp4_base_falls_back():
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    block = _quantized_block()
    lin = nn.Linear(128, 384)
    fp4 = bnb.nn.Linear4bit(128, 384, compute_dtype=torch.float32, quant_type="fp4")
    fp4.load_state_dict(lin.state_dict())
    block.qkv_proj = fp4.to("cpu")
    model = get_peft_model(block, LoraConfig(r=4, target_modules=["qkv_proj", "down_proj"]))
    report = fastlora.patch(model)
    assert report.patched["lora/bnb-nf4"] == 1
    assert len(report.fallbacks) == 1 and "'fp4'" in report.fallbacks[0].reason


def test_unquantized_base_layers(saved_models):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    path = saved_models("qwen2")
    models = []
    for _ in range(2):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        torch.manual_seed(1)
        models.append(get_peft_model(m, tiny.lora_config()))
    ref, pat = models
    report = fastlora.patch(pat)
    assert report.ok and report.patched["lora/linear"] == 7 * tiny.LAYERS
    b = tiny.batch()
    assert_same_step(ref, pat, b)


def test_bf16_model_with_fp32_adapters(saved_models):
    """The usual GPU setup in bf16: PEFT keeps adapters in fp32 and so does the patch."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = saved_models("llama")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    models = []
    for _ in range(2):
        m = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
        protect_bnb_weights(m)
        torch.manual_seed(1)
        models.append(get_peft_model(m, tiny.lora_config()))
    ref, pat = models
    assert {p.dtype for n, p in pat.named_parameters() if p.requires_grad} == {torch.float32}
    assert fastlora.patch(pat).ok
    b = tiny.batch()
    assert_same_step(ref, pat, b, rtol=1e-2, grad_tol=3e-2)  # bf16 rounding (grads measured 1.3e-2 worst)


def test_disabled_input_dtype_casting_runs_peft(monkeypatch):
    # peft.helpers.disable_input_dtype_casting hands x to the adapters uncast; the fused
    # op always casts, so the patched layer must run PEFT's own forward meanwhile.
    import fastlora.ops.lora_linear as ll
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting

    models = []
    for _ in range(2):
        block = _quantized_block()
        protect_bnb_weights(block)
        torch.manual_seed(2)
        models.append(get_peft_model(block, LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False)))
    ref, pat = models
    assert fastlora.patch(pat).ok
    import fastlora.patch.lora as pl

    calls = []
    real = ll.lora_linear
    monkeypatch.setattr(ll, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_decode = pl._cpu_decode  # the no-grad CPU decode path fuses without lora_linear

    def decode(*a):
        out = real_decode(*a)
        if out is not None:
            calls.append(1)
        return out

    monkeypatch.setattr(pl, "_cpu_decode", decode)
    x = torch.randn(3, 5, 128)
    ref.eval(), pat.eval()
    with torch.no_grad():
        with disable_input_dtype_casting(pat), disable_input_dtype_casting(ref):
            assert torch.equal(pat(x), ref(x))
        assert not calls
        assert_close(pat(x), ref(x), rtol=1e-4, atol=1e-5)
    assert len(calls) == 1


def test_imports_stay_cheap():
    # Importing the ops and the patcher must not pull in Triton (imported only once
    # dispatch chose it) nor the HF stack (found in sys.modules when a model uses it).
    import subprocess
    import sys

    code = ("import sys, fastlora.ops.lora_linear, fastlora.ops.cross_entropy, fastlora.ops.linear_cross_entropy, "
            "fastlora.ops.token_logprobs, fastlora.patch; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'triton', 'transformers', 'peft', 'bitsandbytes', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_nf4_view_is_built_once_and_rebuilt_when_the_weight_changes():
    """The patched layer keeps one NF4Weight view per layer (per-token overhead in
    decode), and any change PEFT or bitsandbytes makes to the weight gives a new one."""
    import types

    from fastlora.patch.lora import _nf4_view

    calls = []

    class FakeNF4:
        @staticmethod
        def from_bnb(param):
            calls.append(param)
            return object()

    module = torch.nn.Module()
    param = torch.zeros(8, dtype=torch.uint8)
    param.quant_state = types.SimpleNamespace(absmax=torch.zeros(2))
    v1 = _nf4_view(module, param, FakeNF4)
    assert _nf4_view(module, param, FakeNF4) is v1 and len(calls) == 1
    param.quant_state = types.SimpleNamespace(absmax=torch.zeros(2))  # a new QuantState
    v2 = _nf4_view(module, param, FakeNF4)
    assert v2 is not v1 and len(calls) == 2
    param.data = torch.zeros(8, dtype=torch.uint8)  # new bytes
    v3 = _nf4_view(module, param, FakeNF4)
    assert v3 is not v2 and len(calls) == 3
    other = torch.zeros(8, dtype=torch.uint8)  # a new parameter (merge, move)
    other.quant_state = param.quant_state
    assert _nf4_view(module, other, FakeNF4) is not v3 and len(calls) == 4
    assert "_fastlora_nf4_view" not in module.state_dict()
