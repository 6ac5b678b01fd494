"""Padding-free packing on a real (tiny, random) Llama: documents packed into one row never
attend to each other, positions restart per document, and the packed loss and its gradients
equal the unpacked ones.

The model runs in float64, but transformers computes the eager softmax and the causal-LM loss
in float32, so the tolerances are float32's. A leak across documents changes logits of a random
model by ~1e-1, five orders of magnitude above them."""
import pytest
import torch

from fastlora.train import data as D
from tests.helpers import assert_close

RTOL, ATOL = 1e-5, 1e-6


def tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).double().eval()


def docs(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 61, (n,), generator=g).tolist()
        labels = list(ids)
        labels[: n // 3] = [D.IGNORE_INDEX] * (n // 3)  # a masked prompt of varying length
        out.append({"input_ids": ids, "labels": labels})
    return out


def segments(row):
    """[(start, length)] of each document in a packed row."""
    out, start = [], 0
    for n in row["seq_lengths"]:
        out.append((start, n))
        start += n
    return out


@pytest.fixture(params=["eager", "sdpa"])
def model(request):
    return tiny_llama(request.param)


def test_no_attention_across_documents(model):
    exs = docs([7, 5, 4])
    (row,) = D.pack(exs, max_length=16)
    batch = D.collate([row], pad_token_id=0)
    assert "attention_mask" not in batch
    with torch.no_grad():
        # use_cache=False: transformers only derives per-document masks when no cache is passed
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        for start, n in segments(row):
            doc = batch["input_ids"][:, start:start + n]
            alone = model(input_ids=doc, use_cache=False).logits[0]  # (n, V)
            assert_close(packed[start:start + n], alone, rtol=RTOL, atol=ATOL, msg=f"document at {start}")

        # changing the first document leaves every later document's logits bit-for-bit unchanged
        changed = batch["input_ids"].clone()
        s0, n0 = segments(row)[0]
        changed[0, s0:s0 + n0] = (changed[0, s0:s0 + n0] + 7) % 61
        after = model(input_ids=changed, position_ids=batch["position_ids"], use_cache=False).logits[0]
        assert not torch.allclose(after[s0:s0 + n0], packed[s0:s0 + n0])
        assert torch.equal(after[s0 + n0:], packed[s0 + n0:])


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_loss_and_grads_equal_unpacked(model):
    model.train()  # no dropout in Llama; train mode only to be the trainer's path
    exs = docs([6, 9, 3, 5, 4, 2], seed=3)
    rows = D.pack(exs, max_length=12)  # several rows of different lengths: padding is exercised
    assert len(rows) > 1 and len({len(r["input_ids"]) for r in rows}) > 1
    packed_loss, packed_grads = _loss_and_grads(model, D.collate(rows, pad_token_id=0))
    unpacked_loss, unpacked_grads = _loss_and_grads(model, D.collate(exs, pad_token_id=0))

    # the same targets: the mean over the trained tokens of all documents
    n_targets = sum(sum(t != D.IGNORE_INDEX for t in e["labels"][1:]) for e in exs)
    assert n_targets == sum(sum(t != D.IGNORE_INDEX for t in r["labels"][1:]) for r in rows)
    assert_close(packed_loss, unpacked_loss, rtol=RTOL, atol=ATOL)
    for name, g in unpacked_grads.items():
        assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_loss_matches_float64_reference(model):
    """The loss is the mean token cross-entropy of each document computed on its own."""
    exs = docs([5, 8, 3], seed=5)
    rows = D.pack(exs, max_length=16)
    with torch.no_grad():
        loss = model(**D.collate(rows, pad_token_id=0), use_cache=False).loss
        total, count = torch.zeros((), dtype=torch.float64), 0
        for e in exs:
            logits = model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0, :-1]
            target = torch.tensor(e["labels"][1:])
            keep = target != D.IGNORE_INDEX
            logp = torch.log_softmax(logits[keep], dim=-1)
            total -= logp.gather(1, target[keep][:, None]).sum()
            count += int(keep.sum())
    assert_close(loss, total / count, rtol=RTOL, atol=ATOL)
