"""The shared-prefix planner: which positions of a batch are the same computation.

In a causal decoder a token's hidden states, at every layer, are a function of that
token, its position and the tokens before it. Two positions of a batch therefore compute
exactly the same thing when they hold the same token at the same *depth* (the position
counted from the row's first real token) after the same earlier tokens. A batch of rows
is then a prefix tree (a trie): a system prompt that every row starts with is one path,
a prompt that a preference pair or a GRPO group shares hangs below it, the responses are
the leaves. Running each tree node once, with each node attending to exactly its
ancestors (the earlier tokens of its own rows), gives every row's hidden states, and the
gradient of a shared node is the sum over the rows that use it.

This module only plans; :mod:`fastlora.patch.prefix` runs the plan inside a patched
decoder. Terms used below (rows in *sorted* order, see :func:`plan_batch`):

    depth      t = position - first real position of the row; the node's RoPE position
    d[i]       longest common prefix of sorted rows i-1 and i (d[0] = 0)
    owner      owner[i, t]: the sorted row that created the node row i uses at depth t
    slot       one position of the packed input ``(n_bins, C)``: a tree node, or padding
    path       path[i, t]: the (global) slot of row i's token at depth t, -1 past its end
    end        end[s]: one past the last descendant of slot s (within its bin)
    component  rows that share at least their first token; runs of rows with d > 0
    bin        one packed sequence of the planned input; holds whole components

Nodes are laid out row by row in sorted order. That is a pre-order walk of the tree:
a node's ancestors come before it, and its descendants are exactly the slots from the
node up to ``end`` (the first node of the next row that branches off at or above the
node's depth). So the tree mask is one comparison per (query, key) pair,
``key <= query < end[key]``, lower-triangular like a causal mask, with no gather.

The plan is chosen by a cost model of the decoder (:class:`CostModel`): linear layers
cost per position, attention per (query, key) pair that a dense masked kernel computes.
The packed layout must be at least ``min_saving`` cheaper than the plain batch, or the
plain batch runs (:data:`MIN_SAVING`: the mask, the gather and the index work are not
free, and a plan that saves a few percent is within the noise of a step).
"""
from __future__ import annotations

import dataclasses

import torch

# Run the packed tree only when the cost model says it saves at least this fraction of
# the plain batch's decoder work: below that, planning, masks and gathers eat the gain.
MIN_SAVING = 0.10
# Slots per bin are rounded up to a multiple of this (aligned rows for the GPU kernels).
ALIGN = 8
# With a block-sparse attention, bins cost padding only, but their dense mask is cap^2:
# bins stop growing here (a single larger tree keeps its own size).
MAX_CAP = 4096


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Decoder cost per layer, in multiply-adds: ``per_token`` for the position-wise work
    (projections, MLP), ``per_pair`` for each (query, key) pair a dense masked attention
    computes (QKᵀ and PV over every head)."""

    per_token: float
    per_pair: float
    sparse: bool = False  # attention skips the pairs of different trees (block-sparse SDPA, FlexAttention)

    @classmethod
    def from_config(cls, cfg) -> "CostModel":
        H = int(getattr(cfg, "hidden_size", 0) or 0)
        heads = int(getattr(cfg, "num_attention_heads", 0) or 1)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        hd = int(getattr(cfg, "head_dim", None) or (H // heads if H else 0))
        inter = int(getattr(cfg, "intermediate_size", None) or 4 * H)
        if not H or not hd:  # an unusual config: count positions and pairs alike
            return cls(per_token=1.0, per_pair=1e-3)
        proj = H * (heads * hd + 2 * kv * hd) + heads * hd * H
        mlp = 3 * H * inter
        return cls(per_token=float(proj + mlp), per_pair=float(2 * heads * hd))

    def cost(self, rows: int, length: int, causal: bool = False) -> float:
        """Rows of ``length`` positions with dense attention (``causal``: the kernel skips
        the upper triangle, as SDPA does for an unpadded batch)."""
        return rows * length * (self.per_token + length * self.per_pair / (2 if causal else 1))


@dataclasses.dataclass
class PrefixPlan:
    """A batch ``(B, L)`` laid out as ``n_bins`` packed sequences of ``cap`` slots.

    ``ids``, ``positions``: ``(n_bins, cap)`` tokens and depths of the slots (padding
    slots: token ``pad_id``, depth 0). ``end``: ``(n_bins, cap)`` one past the slot's
    last descendant, in bin coordinates (a padding slot: itself + 1). ``path``:
    ``(B, L)`` global slot of each sorted row's token at each depth (-1 past the row's
    end). ``gather``: ``(B, L)`` index of each original position into the flattened
    slots plus one zero row at the end (``n_bins * cap``), where padding positions point.
    """

    n_bins: int
    cap: int
    ids: torch.Tensor
    positions: torch.Tensor
    end: torch.Tensor
    path: torch.Tensor
    gather: torch.Tensor
    tokens_in: int  # real (non-pad) tokens of the batch
    tokens_run: int  # slots the decoder runs: n_bins * cap
    plain_cost: float
    packed_cost: float

    @property
    def saving(self) -> float:
        return 1.0 - self.packed_cost / self.plain_cost if self.plain_cost else 0.0

    def allowed(self, window: int | None = None) -> torch.Tensor:
        """``(n_bins, cap, cap)`` bool: slot q may attend to slot k (same bin).

        k is an ancestor of q, or q itself: q lies in k's descendant range
        ``k <= q < end[k]``. With a sliding ``window`` (transformers' convention: the key
        is less than ``window`` positions back), ancestors further back are dropped too.
        Padding slots attend to themselves only (no fully masked row, no NaN)."""
        C = self.cap
        ar = torch.arange(C, device=self.ids.device)
        ok = (ar[None, None, :] <= ar[None, :, None]) & (ar[None, :, None] < self.end[:, None, :])
        if window is not None:
            ok &= self.positions[:, :, None] < self.positions[:, None, :] + window
        return ok

    def mask_mod(self, window: int | None = None):
        """The same rule as :meth:`allowed`, as a FlexAttention ``mask_mod(b, h, q, k)``:
        a block mask built from it skips the blocks no node attends to."""
        end, pos = self.end, self.positions

        def mod(b, h, q, k):
            ok = (k <= q) & (q < end[b, k])
            if window is not None:
                ok = ok & (pos[b, q] < pos[b, k] + window)
            return ok

        return mod

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``(n_bins, cap, ...)`` -> ``(B, L, ...)``: each position reads its slot; padding
        positions read zeros. The backward sums the gradients of the positions that
        share a slot (index_select's backward is an index_add)."""
        flat = packed.reshape(self.n_bins * self.cap, *packed.shape[2:])
        flat = torch.cat([flat, flat.new_zeros((1, *flat.shape[1:]))])
        B, L = self.gather.shape
        return flat.index_select(0, self.gather.reshape(-1)).view(B, L, *packed.shape[2:])


def contiguous_rows(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(start, n)`` per row when each row's real tokens are one contiguous block (left,
    right or both sides padded); None otherwise."""
    m = attention_mask != 0
    B, L = m.shape
    n = m.sum(1)
    start = torch.where(n > 0, m.to(torch.int8).argmax(1), torch.zeros_like(n))
    ar = torch.arange(L, device=m.device)
    block = (ar >= start[:, None]) & (ar < (start + n)[:, None])
    return (start, n) if torch.equal(block, m) else None


def _bins(sizes: list[int], cap: int) -> tuple[list[int], list[int], int]:
    """First-fit decreasing: (bin of each component, its offset in the bin, bins used)."""
    order = sorted(range(len(sizes)), key=lambda c: -sizes[c])
    fill: list[int] = []
    where, off = [0] * len(sizes), [0] * len(sizes)
    for c in order:
        for b, used in enumerate(fill):
            if used + sizes[c] <= cap:
                where[c], off[c] = b, used
                fill[b] += sizes[c]
                break
        else:
            where[c], off[c] = len(fill), 0
            fill.append(sizes[c])
    return where, off, len(fill)


def _round_up(n: int, k: int = ALIGN) -> int:
    return -(-n // k) * k


def choose_bins(sizes: list[int], cost: CostModel) -> tuple[int, list[int], list[int], int, float]:
    """Pack components of ``sizes`` nodes into bins of one capacity, the capacity that
    costs least: one bin per component wastes padding when they differ in size, one bin
    for everything pays attention over pairs that never meet. Returns
    (capacity, bin of each component, offset, bins, cost)."""
    largest, total = max(sizes), sum(sizes)
    limit = max(largest, MAX_CAP) if cost.sparse else total
    caps, c = [], largest
    while c < min(total, limit):
        caps.append(c)
        c *= 2
    caps.append(min(total, limit))
    tree_pairs = sum(s * s for s in sizes)  # a block-sparse kernel: pairs within each tree only
    best = None
    for c in caps:
        c = _round_up(c)
        where, off, nb = _bins(sizes, c)
        pairs = tree_pairs if cost.sparse else nb * c * c
        k = nb * c * cost.per_token + pairs * cost.per_pair
        if best is None or k < best[-1]:
            best = (c, where, off, nb, k)
    return best


def plan_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cost: CostModel, *,
               min_saving: float = MIN_SAVING, pad_id: int = 0) -> PrefixPlan | str:
    """Plan ``input_ids`` ``(B, L)`` (with its 0/1 ``attention_mask``, left or right
    padded) as a prefix tree; returns the :class:`PrefixPlan`, or the reason the plain
    batch runs instead (a string)."""
    if input_ids.dim() != 2:
        return f"input_ids of shape {tuple(input_ids.shape)} (not (batch, length))"
    B, L = input_ids.shape
    dev = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows = contiguous_rows(attention_mask)
    if rows is None:
        return "attention_mask with holes (not left/right padding)"
    start, n = rows
    ar = torch.arange(L, device=dev)
    # tokens moved to the left edge of each row; -1 past the row's end (ids are >= 0)
    aligned = input_ids.gather(1, (start[:, None] + ar).clamp(max=L - 1))
    aligned = torch.where(ar < n[:, None], aligned, -1)
    # Sorting makes every shared prefix a run of consecutive rows. One host copy of the
    # ids; Python's sort compares rows as lists, shorter-first on a common prefix.
    host = aligned.tolist()
    order = sorted(range(B), key=host.__getitem__)
    order_t = torch.tensor(order, device=dev)
    A, ns = aligned[order_t], n[order_t]  # sorted rows
    eq = (A[1:] == A[:-1]) & (A[1:] >= 0)
    d = torch.cat([ns.new_zeros(1), eq.long().cumprod(1).sum(1)])  # (B,) LCP with the previous row
    # Row i uses, at depth t, the node of the latest row j <= i that created one there:
    # rows j+1..i all share more than t tokens with j, so its node is theirs.
    rowix = torch.arange(B, device=dev)
    owner = torch.where(d[:, None] <= ar[None, :], rowix[:, None], -1).cummax(0).values  # (B, L)
    new = (ar[None, :] >= d[:, None]) & (ar[None, :] < ns[:, None])  # nodes row i creates
    fresh = ns - d  # (B,) how many

    comp = (d == 0).long().cumsum(0) - 1  # (B,) component of each sorted row
    n_comp = int(comp[-1]) + 1 if B else 0
    sizes_t = torch.zeros(n_comp, dtype=torch.long, device=dev).index_add_(0, comp, fresh)
    sizes = sizes_t.tolist()
    tokens_in = int(n.sum())
    plain = cost.cost(B, L, causal=bool(n.min() == L))  # unpadded: the plain kernel is causal
    if tokens_in == 0 or max(sizes) == 0:
        return "no real token in the batch"
    cap, where, off, nb, packed = choose_bins([max(s, 1) for s in sizes], cost)
    if packed > (1.0 - min_saving) * plain:
        return f"saving below {min_saving:.0%}"

    # slot of the first node each sorted row creates
    excl = fresh.cumsum(0) - fresh  # exclusive cumsum over sorted rows
    first_row = torch.zeros(n_comp, dtype=torch.long, device=dev).scatter_reduce_(
        0, comp, rowix, reduce="amin", include_self=False)
    base = (torch.tensor(where, device=dev) * cap + torch.tensor(off, device=dev))[comp] \
        + excl - excl[first_row][comp]  # (B,)
    slot_table = torch.where(new, base[:, None] + ar[None, :] - d[:, None], -1)  # (B, L)
    path = slot_table.gather(0, owner)
    path = torch.where(ar[None, :] < ns[:, None], path, -1)

    # end of each node's descendants: the first node of the next row that branches off
    # at or above its depth (pre-order), or the end of its component
    later = torch.where(d[:, None] <= ar[None, :], rowix[:, None], B)  # (B, L)
    nxt = torch.cat([later[1:].flip(0).cummin(0).values.flip(0), later.new_full((1, L), B)])  # first j > i
    comp_end = torch.tensor(where, device=dev) * cap + torch.tensor(off, device=dev) + sizes_t  # (n_comp,)
    base_ext = torch.cat([base, base.new_zeros(1)])
    comp_ext = torch.cat([comp, comp.new_full((1,), -1)])
    end_table = torch.where(comp_ext[nxt] == comp[:, None], base_ext[nxt], comp_end[comp][:, None])  # (B, L)

    total = nb * cap
    slots = slot_table[new]
    ids = torch.full((total,), pad_id, dtype=input_ids.dtype, device=dev)
    ids[slots] = A[new]
    positions = torch.zeros(total, dtype=torch.long, device=dev)
    positions[slots] = ar.expand(B, L)[new]
    end = torch.arange(1, total + 1, device=dev)  # padding slots: themselves only
    end[slots] = end_table[new]
    end = end.view(nb, cap) - torch.arange(nb, device=dev)[:, None] * cap  # in bin coordinates

    inv = torch.empty_like(order_t)
    inv[order_t] = rowix
    P = path[inv]  # original row order, depth-indexed
    depth = (ar[None, :] - start[:, None]).clamp(0, L - 1)
    real = attention_mask != 0
    gather = torch.where(real, P.gather(1, depth), total)
    return PrefixPlan(
        n_bins=nb, cap=cap, ids=ids.view(nb, cap), positions=positions.view(nb, cap),
        end=end, path=path, gather=gather, tokens_in=tokens_in, tokens_run=total, plain_cost=plain, packed_cost=packed,
    )
