"""The shared-prefix planner against a brute-force prefix tree written from the definition.

Two real positions are the same node iff their rows hold the same tokens from the row's
first real token up to and including that depth. A node attends to a node iff the latter
is at a depth <= its own on the same row (an ancestor, or itself).
"""
import itertools

import pytest
import torch

from fastlora.patch.prefix_plan import CostModel, PrefixPlan, contiguous_rows, plan_batch

FREE = CostModel(per_token=1.0, per_pair=0.0)  # attention free: any packing that drops a slot pays
ALWAYS = float("-inf")  # plan whatever it costs


def rows_of(ids, mask):
    out = []
    for b in range(ids.shape[0]):
        out.append([int(t) for t, m in zip(ids[b], mask[b]) if m])
    return out


def brute_nodes(rows):
    """{(row, depth): node key}: the key is the row's prefix up to and including depth."""
    return {(b, t): tuple(r[: t + 1]) for b, r in enumerate(rows) for t in range(len(r))}


def real_positions(mask):
    out = {}
    for b in range(mask.shape[0]):
        real = [p for p in range(mask.shape[1]) if mask[b, p]]
        for t, p in enumerate(real):
            out[(b, t)] = p
    return out


def check_plan(ids, mask, plan: PrefixPlan, window=None):
    rows = rows_of(ids, mask)
    nodes = brute_nodes(rows)
    pos = real_positions(mask)
    slot = {bt: int(plan.gather[bt[0], p]) for bt, p in pos.items()}
    flat_ids, flat_pos = plan.ids.reshape(-1), plan.positions.reshape(-1)
    total = plan.n_bins * plan.cap
    # each real position reads a slot that holds its token at its depth
    for (b, t), s in slot.items():
        assert 0 <= s < total
        assert int(flat_ids[s]) == rows[b][t] and int(flat_pos[s]) == t
    # positions share a slot iff they are the same node of the tree
    for x, y in itertools.combinations(slot, 2):
        assert (slot[x] == slot[y]) == (nodes[x] == nodes[y]), (x, y)
    # padding positions read the zero row
    for b in range(ids.shape[0]):
        for p in range(ids.shape[1]):
            if not mask[b, p]:
                assert int(plan.gather[b, p]) == total
    # every slot that holds a node is used, so the tree runs each token once
    used = set(slot.values())
    assert plan.tokens_run == total and len(used) == len(set(nodes.values()))
    # the mask: q attends to k iff k is q's ancestor or q itself (and within the window)
    allowed = plan.allowed(window).reshape(plan.n_bins, plan.cap, plan.cap)
    node_of_slot = {s: x for x, s in slot.items()}
    for s in range(total):
        b_s, c_s = divmod(s, plan.cap)
        for k in range(plan.cap):
            got = bool(allowed[b_s, c_s, k])
            s_k = b_s * plan.cap + k
            if s not in node_of_slot or s_k not in node_of_slot:
                assert got == (s == s_k), (s, s_k)  # padding slots see themselves only
                continue
            (b, t), (_, tk) = node_of_slot[s], node_of_slot[s_k]
            want = tk <= t and nodes[(b, tk)] == nodes[node_of_slot[s_k]]
            if window is not None:
                want = want and t - tk < window
            assert got == want, (s, s_k)
        # the mask is lower-triangular: ancestors come first (causal layout)
        assert not allowed[b_s, c_s, c_s + 1:].any()
    # the flex mask_mod states the same rule
    mod = plan.mask_mod(window)
    B, C = plan.n_bins, plan.cap
    bb, qq, kk = torch.meshgrid(torch.arange(B), torch.arange(C), torch.arange(C), indexing="ij")
    assert torch.equal(mod(bb, None, qq, kk), allowed)


def make(rows, L, left=False, vocab=50):
    ids = torch.full((len(rows), L), 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        if left:
            ids[b, L - len(r):] = torch.tensor(r)
            mask[b, L - len(r):] = 1
            ids[b, : L - len(r)] = 7  # padding with a token that also occurs as a real token
        else:
            ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
    return ids, mask


CASES = {
    "two levels": [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9], [1, 2, 3, 8, 8, 8, 8], [1, 2, 3, 8, 8, 5]],
    "a row sharing nothing": [[1, 2, 3, 4], [1, 2, 3, 5, 6], [9, 9, 9]],
    "duplicates": [[4, 4, 4], [4, 4, 4], [4, 4]],
    "prefix of another": [[1, 2], [1, 2, 3, 4, 5], [1, 2, 3]],
    "groups of 1 to 4": [[1, 1, 2], [1, 1, 3], [2, 2, 2, 2], [3, 3, 1], [3, 3, 2], [3, 3, 3], [3, 3, 4, 4]],
    "a single row": [[5, 6, 7, 8]],
}


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("case", list(CASES))
def test_plan_matches_the_brute_force_tree(case, left):
    rows = CASES[case]
    ids, mask = make(rows, max(map(len, rows)) + 2, left=left)
    plan = plan_batch(ids, mask, FREE, min_saving=ALWAYS)
    assert isinstance(plan, PrefixPlan), plan
    check_plan(ids, mask, plan)
    check_plan(ids, mask, plan, window=2)
    assert plan.tokens_in == int(mask.sum())


def test_random_batches_match_the_brute_force_tree():
    g = torch.Generator().manual_seed(0)
    for trial in range(25):
        B = int(torch.randint(1, 9, (1,), generator=g))
        base = torch.randint(0, 3, (12,), generator=g).tolist()  # a small alphabet: many shared prefixes
        rows = []
        for _ in range(B):
            keep = int(torch.randint(0, 8, (1,), generator=g))
            tail = torch.randint(0, 3, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
            rows.append(base[:keep] + tail)
        ids, mask = make(rows, max(map(len, rows)) + int(trial % 3), left=bool(trial % 2))
        plan = plan_batch(ids, mask, FREE, min_saving=ALWAYS)
        assert isinstance(plan, PrefixPlan), plan
        check_plan(ids, mask, plan, window=None if trial % 4 else 3)


def test_bins_hold_whole_trees_and_the_cheapest_capacity_wins():
    rows = [[1] * 30 + [2], [1] * 30 + [3], [5, 6], [7, 8], [9, 9]]
    ids, mask = make(rows, 31)
    # attention is free: one bin of everything has the least padding
    plan = plan_batch(ids, mask, FREE, min_saving=ALWAYS)
    assert plan.n_bins == 1 and plan.cap == 40  # 32 + 3 * 2 = 38, aligned to 8
    # two trees of 31 nodes, attention dominates: one bin each (2 x 32 slots) beats one of 64
    rows = [[1] * 29 + [2], [1] * 29 + [3], [5] * 29 + [2], [5] * 29 + [3]]
    ids, mask = make(rows, 30)
    plan = plan_batch(ids, mask, CostModel(per_token=1.0, per_pair=10.0), min_saving=ALWAYS)
    check_plan(ids, mask, plan)
    assert plan.cap == 32 and plan.n_bins == 2
    assert plan.gather[0, 0] // 32 != plan.gather[2, 0] // 32  # the trees are in different bins


def test_small_saving_runs_the_plain_batch():
    ids, mask = make([[1, 2, 3, 4], [5, 6, 7, 8]], 4)
    why = plan_batch(ids, mask, FREE)
    assert isinstance(why, str) and "saving below 10%" in why
    # a real saving: 7 of 8 tokens... on a batch that shares most of its tokens
    ids, mask = make([[1, 2, 3, 4, 5, 6, 7, 8]] * 2, 8)
    assert isinstance(plan_batch(ids, mask, FREE), PrefixPlan)


def test_masks_with_holes_are_refused():
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]])
    assert contiguous_rows(mask) is None
    assert "holes" in plan_batch(ids, mask, FREE, min_saving=ALWAYS)
    both = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]])  # left and right padding at once (TRL's GRPO)
    start, n = contiguous_rows(both)
    assert start.tolist() == [1, 0] and n.tolist() == [3, 3]


def test_unpack_sums_the_gradients_of_shared_positions():
    ids, mask = make([[1, 2, 3], [1, 2, 4]], 3)
    plan = plan_batch(ids, mask, FREE, min_saving=ALWAYS)
    packed = torch.randn(plan.n_bins, plan.cap, 2, dtype=torch.float64, requires_grad=True)
    out = plan.unpack(packed)
    assert out.shape == (2, 3, 2)
    w = torch.randn(2, 3, 2, dtype=torch.float64)
    (out * w).sum().backward()
    want = torch.zeros(plan.n_bins * plan.cap + 1, 2, dtype=torch.float64)
    want.index_add_(0, plan.gather.reshape(-1), w.reshape(-1, 2))
    torch.testing.assert_close(packed.grad.reshape(-1, 2), want[:-1], rtol=0, atol=0)
    assert torch.equal(out[0, :2], out[1, :2])  # the shared tokens read one slot
