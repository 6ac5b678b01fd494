"""Block-sparse SDPA for a packed prefix tree: only the key blocks a query block can see.

A packed bin's tree mask is mostly empty: a GRPO group's completions see the prompt and
themselves, never each other, and the bins' other trees not at all. SDPA with a dense
mask (CPU's flash kernel, CUDA's memory-efficient kernel) computes every (query, key)
pair regardless, which for a 4 x 8 GRPO batch is more pairs than the plain batch's causal
attention. Here each block of ``BLOCK`` queries attends to the concatenation of the key
blocks that hold at least one of its ancestors: the (bin, query block) pairs become one
batch of blocks, their keys gathered and padded to the most any block sees, in ONE call
of transformers' own ``sdpa_attention_forward`` (same GQA handling, same kernel choice)
with the dense mask's entries at those keys: the same attention (the keys left out are
masked for every query of the block). One gather and one SDPA per layer keep autograd's
bookkeeping small (a call per block made the backward allocate full-size zeros each time).

Used only inside :func:`fastlora.patch.prefix.run_packed`, for decoders whose attention is
``"sdpa"``: the decoder's config names ``"fastlora_tree"`` (registered in transformers'
``AttentionInterface``) for the duration of the packed forward, and :data:`_LAYOUT` holds
the blocks. A call outside that window (gradient checkpointing's recomputation in
backward, another mask) runs plain SDPA on the dense mask: the same values, the old cost.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import torch

NAME = "fastlora_tree"
BLOCK = 128  # queries per block: large enough for SDPA's kernels, small enough to skip work
# Below this fraction of the lower-triangular blocks left out, one dense call is cheaper.
MIN_SKIPPED = 0.25

_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("fastlora_tree_layout", default=None)


@dataclasses.dataclass
class Layout:
    """The key blocks of every query block, as one padded batch of blocks.

    ``index``: ``(n_bins * nq, kmax)`` global key positions (bin * cap + position) each query
    block sees, padded with position 0 where ``valid`` is False; ``kmax`` is the most keys
    any query block sees. ``skipped``: the fraction of a dense kernel's pairs not computed."""

    shape: tuple  # (n_bins, cap): the mask this layout belongs to
    block: int
    index: torch.Tensor
    valid: torch.Tensor
    skipped: float
    masks: dict = dataclasses.field(default_factory=dict)  # id(dense mask) -> (its blocks, the mask)

    def block_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """``(n_bins * nq, 1, block, kmax)`` bool: the dense mask's entries at the gathered
        keys (False on padding); rows past the bin's end see their first key (no NaN)."""
        hit = self.masks.get(id(mask))
        if hit is not None and hit[1] is mask:
            return hit[0]
        nb, C = self.shape
        nq, kmax, blk = self.index.shape[0] // nb, self.index.shape[1], self.block
        rows = torch.nn.functional.pad(mask[:, 0], (0, 0, 0, nq * blk - C))  # (nb, nq*block, C)
        local = (self.index % C).view(nb, nq, 1, kmax).expand(nb, nq, blk, kmax)
        m = rows.view(nb, nq, blk, C).gather(3, local) & self.valid.view(nb, nq, 1, kmax)
        past = (torch.arange(nq * blk, device=m.device) >= C).view(1, nq, blk, 1)
        first = torch.zeros(kmax, dtype=torch.bool, device=m.device)
        first[0] = True
        m = torch.where(past, first, m).view(nb * nq, 1, blk, kmax)
        self.masks[id(mask)] = (m, mask)
        return m


def layout(end: torch.Tensor, block: int | None = None) -> Layout:
    """The blocks of a plan's bins from its ``end`` (``(n_bins, cap)``, bin coordinates):
    key block kb is seen by query block qb when one of its keys k has k <= last query of
    qb and end[k] > first query of qb (an upper bound of the tree mask, so exact)."""
    block = block or BLOCK
    nb, C = end.shape
    nq = -(-C // block)
    starts = torch.arange(nq, device=end.device) * block
    lo, hi = starts, (starts + block).clamp(max=C) - 1  # (nq,)
    k = torch.arange(C, device=end.device)
    sees = (k[None, None, :] <= hi[None, :, None]) & (end[:, None, :] > lo[None, :, None])  # (nb, nq, C)
    occ = torch.nn.functional.pad(sees, (0, nq * block - C)).view(nb, nq, nq, block).any(-1)  # (nb, nq, nq)
    nkb = occ.sum(-1)  # key blocks per query block
    kmax = int(nkb.max()) * block
    # the seen key blocks first, in order: their positions, then padding
    order = torch.argsort((~occ).to(torch.int8), dim=-1, stable=True)  # (nb, nq, nq)
    pos = (order[..., :, None] * block + torch.arange(block, device=end.device)).view(nb, nq, nq * block)[..., :kmax]
    valid = (torch.arange(kmax, device=end.device) < nkb[..., None] * block) & (pos < C)
    pos = torch.where(valid, pos, 0)
    index = (pos + torch.arange(nb, device=end.device)[:, None, None] * C).view(nb * nq, kmax)
    dense = nb * C * C
    return Layout(shape=(nb, C), block=block, index=index, valid=valid.view(nb * nq, kmax),
                  skipped=1.0 - nb * nq * block * kmax / dense)


@contextlib.contextmanager
def active(config, lay: Layout):
    """Inside the block, the decoder's attention (``config``) is the tree attention."""
    register()
    previous = config._attn_implementation
    token = _LAYOUT.set(lay)
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _LAYOUT.reset(token)


def tree_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function contract: (attn_output (B, L, H, D), None).
    query (n_bins, H, C, D), key/value (n_bins, H_kv, C, D), attention_mask (n_bins, 1, C, C).
    One SDPA call over the (bin, query block) pairs, each with the keys it sees."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lay = _LAYOUT.get()
    if (lay is None or attention_mask is None or attention_mask.dim() != 4 or attention_mask.dtype != torch.bool
            or (attention_mask.shape[0], attention_mask.shape[-1]) != lay.shape or query.shape[2] != lay.shape[1]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    nb, C = lay.shape
    blk, kmax = lay.block, lay.index.shape[1]
    nq = lay.index.shape[0] // nb
    H, D = query.shape[1], query.shape[3]
    q = torch.nn.functional.pad(query, (0, 0, 0, nq * blk - C))  # (nb, H, nq*blk, D)
    q = q.view(nb, H, nq, blk, D).transpose(1, 2).reshape(nb * nq, H, blk, D)

    def gather(t):  # (nb, Hkv, C, Dv) -> (nb*nq, Hkv, kmax, Dv)
        flat = t.transpose(1, 2).reshape(nb * C, t.shape[1], t.shape[3])
        return flat.index_select(0, lay.index.view(-1)).view(nb * nq, kmax, t.shape[1], t.shape[3]).transpose(1, 2)

    out, _ = sdpa_attention_forward(module, q, gather(key), gather(value), lay.block_mask(attention_mask), **kwargs)
    # out: (nb*nq, blk, H, Dv) -> (nb, C, H, Dv)
    return out.reshape(nb, nq * blk, H, out.shape[-1])[:, :C], None


_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, tree_attention)
        _REGISTERED = True
