"""Shared-prefix training is exact: the same loss, logits and LoRA gradients as the plain batch.

Float64 tiny models of every family the planner supports (sliding windows shorter than
the shared prefix, Gemma2's softcapping, GQA, Phi3's fused projections, Granite's
multipliers), patched twice from the same weights: ``share_prefix=True`` (planning every
batch, whatever the cost model says) against ``share_prefix=False``. The batches cover
right and left padding, groups of 1 to 8 rows, two levels of sharing, uneven suffixes, a
row that shares nothing, and the label boundary exactly at the end of the shared part.
"""
import copy

import pytest
import torch

import fastlora
from fastlora.patch import prefix
from tests.patch.fp64 import float64_all_the_way

VOCAB = 97
W = 4  # sliding window, shorter than every shared prefix below


def config(family: str, attn: str = "eager", **overrides):
    import transformers

    kw = dict(hidden_size=64, intermediate_size=96, vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0,
              attn_implementation=attn)
    if family == "llama":
        cls = transformers.LlamaConfig
    elif family == "mistral":
        cls, kw["sliding_window"] = transformers.MistralConfig, W
    elif family == "qwen2":  # layer 0 full, layer 1 sliding: two masks by layer type
        cls = transformers.Qwen2Config
        kw.update(use_sliding_window=True, sliding_window=W, max_window_layers=1)
    elif family == "gemma2":
        cls = transformers.Gemma2Config
        kw.update(sliding_window=W, final_logit_softcapping=3.0, attn_logit_softcapping=5.0)
    elif family == "phi3":  # fused qkv and gate_up projections
        cls = transformers.Phi3Config
        kw.pop("head_dim")
        kw["sliding_window"] = W
    elif family == "granite":
        cls = transformers.GraniteConfig
        kw.update(embedding_multiplier=2.0, attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=3.0)
    else:
        raise KeyError(family)
    kw.update(overrides)
    return cls(**kw)


def lora_model(family: str, attn: str = "eager", seed: int = 0, dtype=torch.float64, **lora_kw):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config(family, attn)).to(dtype)
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    kw.update(lora_kw)
    return get_peft_model(model, LoraConfig(**kw))


def pair(family: str, attn: str = "eager", **lora_kw):
    """(shared, plain): the same weights, patched with and without shared prefixes."""
    shared = lora_model(family, attn, **lora_kw)
    plain = copy.deepcopy(shared)
    assert fastlora.patch(shared).share_prefix
    assert not fastlora.patch(plain, share_prefix=False).share_prefix
    prefix.set_min_saving(shared, float("-inf"))  # plan every batch: the tests are about exactness
    return shared, plain


def _rand(g, n):
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def rows_for(case: str, seed: int = 0):
    """[(prompt tokens, response tokens)] per row."""
    g = torch.Generator().manual_seed(seed)
    sys_prompt = _rand(g, 7)  # shared by most rows
    if case == "two levels":
        p1, p2 = sys_prompt + _rand(g, 5), sys_prompt + _rand(g, 4)
        return [(p1, _rand(g, 3)), (p1, _rand(g, 6)),  # a pair
                (p2, _rand(g, 1)), (p2, _rand(g, 2)), (p2, _rand(g, 4)), (p2, _rand(g, 5)),  # a group of 4
                (sys_prompt + _rand(g, 3), _rand(g, 2)),  # shares the system prompt only
                (_rand(g, 9), _rand(g, 4))]  # shares nothing
    if case == "group of 8":
        p = sys_prompt + _rand(g, 6)
        return [(p, _rand(g, 1 + (i * 5) % 7)) for i in range(8)]
    if case == "groups of 1 2 3":
        a, b, c = sys_prompt + _rand(g, 2), _rand(g, 8), sys_prompt + _rand(g, 5)
        return [(a, _rand(g, 3)), (b, _rand(g, 2)), (b, _rand(g, 5)), (c, _rand(g, 4)), (c, _rand(g, 1)),
                (c, _rand(g, 3))]
    if case == "one row":
        return [(sys_prompt, _rand(g, 5))]
    raise KeyError(case)


def batch(rows, *, left: bool, train_prompt: bool = False):
    """input_ids, attention_mask, labels: responses trained (the label boundary is exactly
    where the shared prompt ends), prompts too with ``train_prompt``."""
    L = max(len(p) + len(r) for p, r in rows) + 1
    B = len(rows)
    ids = torch.full((B, L), 5, dtype=torch.long)  # pad with a real token id: the mask must decide
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (p, r) in enumerate(rows):
        seq = p + r
        s = L - len(seq) if left else 0
        ids[b, s:s + len(seq)] = torch.tensor(seq)
        mask[b, s:s + len(seq)] = 1
        lo = s if train_prompt else s + len(p)
        labels[b, lo:s + len(seq)] = ids[b, lo:s + len(seq)]
    return ids, mask, labels


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def compare(shared, plain, ids, mask, labels, tol):
    stats0 = fastlora.shared_prefix_stats(shared, reset=True)
    del stats0
    shared.train(), plain.train()
    out_s = shared(input_ids=ids, attention_mask=mask, labels=labels)
    out_p = plain(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel(out_s.loss, out_p.loss) <= tol, (out_s.loss.item(), out_p.loss.item())
    out_s.loss.backward()
    out_p.loss.backward()
    g_s, g_p = lora_grads(shared), lora_grads(plain)
    assert set(g_s) == set(g_p) and g_s
    for name in g_p:
        assert g_p[name].abs().max() > 0, f"{name}: zero gradient, the comparison would be vacuous"
        assert rel(g_s[name], g_p[name]) <= tol, (name, rel(g_s[name], g_p[name]))
    stats = fastlora.shared_prefix_stats(shared)
    assert stats["shared_calls"] == stats["calls"] == 1, stats
    # logits and every hidden state at every real position (eval mode, no labels)
    shared.eval(), plain.eval()
    with torch.no_grad():
        o_s = shared(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        o_p = plain(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    real = mask.bool()
    assert rel(o_s.logits[real], o_p.logits[real]) <= tol
    assert len(o_s.hidden_states) == len(o_p.hidden_states)
    for h_s, h_p in zip(o_s.hidden_states, o_p.hidden_states):
        assert h_s.shape == h_p.shape
        assert rel(h_s[real], h_p[real]) <= tol
    stats = fastlora.shared_prefix_stats(shared)
    assert stats["shared_calls"] == 2, stats
    return stats


FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "phi3", "granite"]
CASES = ["two levels", "group of 8", "groups of 1 2 3", "one row"]


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_float64_exact(family, case, left):
    with float64_all_the_way():
        shared, plain = pair(family)
        ids, mask, labels = batch(rows_for(case), left=left)
        stats = compare(shared, plain, ids, mask, labels, tol=1e-10)
    if case != "one row":
        assert stats["tokens_run"] < stats["tokens_in"], stats


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_float64_exact_with_trained_prompts_and_sdpa(family):
    # targets inside the shared part: the gradient of a shared token's own target is summed
    attn = "sdpa" if family == "llama" else "eager"  # Gemma2's softcapping needs eager
    with float64_all_the_way():
        shared, plain = pair(family, attn)
        ids, mask, labels = batch(rows_for("two levels", seed=3), left=False, train_prompt=True)
        compare(shared, plain, ids, mask, labels, tol=1e-10)


def test_a_label_predicted_from_padding_runs_the_plain_batch():
    # Left padding with the first real token trained: the plain batch predicts it from the
    # padding position before it, a hidden state the tree never runs. That call is plain.
    with float64_all_the_way():
        shared, plain = pair("llama")
        ids, mask, labels = batch(rows_for("two levels", seed=3), left=True, train_prompt=True)
        shared.train(), plain.train()
        loss_s = shared(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss_p = plain(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert rel(loss_s, loss_p) <= 1e-12
        stats = fastlora.shared_prefix_stats(shared)
        assert stats["shared_calls"] == 0
        assert stats["fallbacks"] == {"a trained label predicted from a padding position": 1}
        labels[:, 1:][mask[:, 1:].bool() & ~mask[:, :-1].bool()] = -100  # drop those terms: shared again
        shared(input_ids=ids, attention_mask=mask, labels=labels)
        assert fastlora.shared_prefix_stats(shared)["shared_calls"] == 1


def test_float64_exact_with_gradient_checkpointing():
    # checkpointing re-runs the same layers on the same packed inputs: nothing to fall back on
    with float64_all_the_way():
        shared, plain = pair("llama")
        for m in (shared, plain):
            m.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids, mask, labels = batch(rows_for("two levels"), left=False)
        compare(shared, plain, ids, mask, labels, tol=1e-10)


def test_a_wrong_plan_is_caught():
    # the comparison can fail: a plan whose tree mask lets a node see its own future differs
    with float64_all_the_way():
        shared, plain = pair("llama")
        ids, mask, labels = batch(rows_for("two levels"), left=False)
        real = prefix_plan_allowed = prefix.PrefixPlan.allowed

        def leaky(self, window=None):
            return real(self, window) | torch.ones_like(real(self, window))

        prefix.PrefixPlan.allowed = leaky
        try:
            with pytest.raises(AssertionError):
                compare(shared, plain, ids, mask, labels, tol=1e-10)
        finally:
            prefix.PrefixPlan.allowed = prefix_plan_allowed


# ---------------------------------------------------------------------------- fp32 NF4
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_fp32_nf4_exact(saved_models, family, left):
    # the real stack: transformers + bitsandbytes NF4 (fp32 compute) + PEFT LoRA, patched
    from tests.helpers import has_module
    from tests.patch import tiny

    if not has_module("bitsandbytes"):
        pytest.skip("bitsandbytes is not installed")
    overrides = {"sliding_window": W} if family in ("mistral", "gemma2") else {}
    if family == "qwen2":
        overrides = {"use_sliding_window": True, "sliding_window": W, "max_window_layers": 1}
    path = saved_models(family, **overrides)
    shared, plain = tiny.load_qlora(path), tiny.load_qlora(path)
    assert fastlora.patch(shared).share_prefix
    fastlora.patch(plain, share_prefix=False)
    prefix.set_min_saving(shared, float("-inf"))
    g = torch.Generator().manual_seed(1)
    sys_prompt = torch.randint(3, tiny.VOCAB, (9,), generator=g).tolist()
    rows = [(sys_prompt + [7, 8, 9], torch.randint(3, tiny.VOCAB, (1 + i % 4,), generator=g).tolist())
            for i in range(4)] + [(sys_prompt, [11, 12]), ([13] * 5, [14, 15, 16])]
    ids, mask, labels = batch(rows, left=left)
    shared.train(), plain.train()
    l_s = shared(input_ids=ids, attention_mask=mask, labels=labels).loss
    l_p = plain(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel(l_s, l_p) <= 1e-5
    l_s.backward(), l_p.backward()
    g_s, g_p = lora_grads(shared), lora_grads(plain)
    assert set(g_s) == set(g_p) and len(g_s) == len(tiny.trainable(plain))
    for name in g_p:
        assert g_p[name].abs().max() > 0
        assert rel(g_s[name], g_p[name]) <= 1e-4, name
    stats = fastlora.shared_prefix_stats(shared)
    assert stats["shared_calls"] == 1 and stats["tokens_run"] < stats["tokens_in"], stats


# ---------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_gpu_exact(attn):
    """On a GPU: SDPA with the dense tree mask, and FlexAttention with the block mask (no
    dense T x T tensor), against the plain batch, fp32 (transformers compiles flex)."""
    shared = lora_model("mistral", attn, dtype=torch.float32).cuda()
    plain = copy.deepcopy(shared)
    report = fastlora.patch(shared)
    assert report.share_prefix, str(report)
    fastlora.patch(plain, share_prefix=False)
    prefix.set_min_saving(shared, float("-inf"))
    ids, mask, labels = (t.cuda() for t in batch(rows_for("two levels"), left=True))
    shared.train(), plain.train()
    l_s = shared(input_ids=ids, attention_mask=mask, labels=labels).loss
    l_p = plain(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel(l_s, l_p) <= 1e-5
    l_s.backward(), l_p.backward()
    g_s, g_p = lora_grads(shared), lora_grads(plain)
    for name in g_p:
        assert rel(g_s[name], g_p[name]) <= 1e-4, name
    assert fastlora.shared_prefix_stats(shared)["shared_calls"] == 1


def test_flex_block_mask_states_the_tree_mask():
    # The BlockMask is built from PrefixPlan.mask_mod; on CPU, FlexAttention run eagerly
    # (no compile) must equal SDPA with the dense mask. transformers compiles flex, which
    # inductor's CPU backend fails to generate code for with this mask_mod (torch 2.13):
    # the patch-time self-check then leaves the decoder alone and says so.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from fastlora.patch.prefix_plan import CostModel, plan_batch

    ids, mask, _ = batch(rows_for("two levels"), left=True)
    plan = plan_batch(ids, mask, CostModel(1.0, 0.0), min_saving=float("-inf"))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(plan.n_bins, 4, plan.cap, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(plan.n_bins, 4, plan.cap, 16, generator=g, dtype=torch.float64) for _ in range(2))
    for window in (None, W):
        bm = create_block_mask(plan.mask_mod(window), plan.n_bins, None, plan.cap, plan.cap, device="cpu")
        got = flex_attention(q, k, v, block_mask=bm)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=plan.allowed(window)[:, None])
        assert rel(got, want) <= 1e-12


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_sparse_sdpa_is_exact(monkeypatch, checkpointing):
    """SDPA on the key blocks each query block sees (tree_attention) gives the dense mask's
    result: groups that never see each other skip their blocks. Under gradient checkpointing
    the dense mask runs instead (the recomputation must save what the forward saved)."""
    from fastlora.patch import tree_attention

    monkeypatch.setattr(tree_attention, "BLOCK", 4)  # tiny rows: small blocks so that some are skipped
    used = []
    real = tree_attention.tree_attention

    def spy(module, query, *a, **k):
        used.append(tree_attention._LAYOUT.get() is not None)
        return real(module, query, *a, **k)

    monkeypatch.setattr(tree_attention, "tree_attention", spy)
    monkeypatch.setattr(tree_attention, "_REGISTERED", False)  # register the spy
    with float64_all_the_way():
        shared, plain = pair("llama", "sdpa")
        if checkpointing:
            for m in (shared, plain):
                m.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids, mask, labels = batch(rows_for("groups of 1 2 3") + rows_for("group of 8", seed=2), left=False)
        compare(shared, plain, ids, mask, labels, tol=1e-10)
    assert any(used), used  # (with checkpointing: in the eval forwards, which run no backward)
    assert shared.config._attn_implementation == "sdpa"  # restored after every packed forward
    monkeypatch.undo()
    tree_attention._REGISTERED = False  # the real function again for later tests


def test_tree_attention_layout_skips_what_no_query_sees():
    from fastlora.patch import tree_attention
    from fastlora.patch.prefix_plan import CostModel, plan_batch

    # two groups of 4 rows: 8 prompt tokens each, responses of 4
    rows = [([1] * 8, [2 + i] * 4) for i in range(4)] + [([3] * 8, [20 + i] * 4) for i in range(4)]
    ids, mask, _ = batch(rows, left=False)
    plan = plan_batch(ids, mask, CostModel(1.0, 0.0, sparse=True), min_saving=float("-inf"))
    lay = tree_attention.layout(plan.end, block=4)
    allowed = plan.allowed()
    nb, C = plan.n_bins, plan.cap
    nq = lay.index.shape[0] // nb
    for b in range(nb):
        for qb in range(nq):
            row = b * nq + qb
            keys = lay.index[row][lay.valid[row]]
            assert bool((keys // C == b).all())  # its own bin's keys
            kept = torch.zeros(C, dtype=torch.bool)
            kept[keys % C] = True
            assert not allowed[b, qb * 4:(qb + 1) * 4][:, ~kept].any()  # nothing a query sees is left out
            m = lay.block_mask(allowed[:, None])[row, 0]
            assert torch.equal(m[:, lay.valid[row]], allowed[b, qb * 4:(qb + 1) * 4][:, keys % C])
    # per tree of 24 slots: 2 prompt blocks, 4 response blocks that see the prompt and
    # themselves only (3 blocks): 6 query blocks x 12 keys of 24 x 24 pairs
    assert lay.skipped == pytest.approx(1 - 6 * 4 * 12 / (24 * 24))
