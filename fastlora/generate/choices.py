"""Label-restricted prediction: the answer is exactly one of a few strings.

Each choice is tokenized as a continuation of the prompt and put in a token trie. The
probability of a choice is the product of its tokens' probabilities under the model (the
full, untempered distribution), which is what constrained decoding through the trie
explores; we compute it for every branch rather than walking one greedy path, so the
prediction is the choice of highest probability, not a greedy approximation of it.
``choice_probs`` renormalizes over the choices (rows sum to 1): the confidence a
deployment compares with its threshold before sending an example to a person.

How the trie is scored: the path every choice shares (``{"category": "`` in the
healthcare task) is appended to the prompt and run once per prompt; the cache is then
repeated once per choice and the branches (right-padded) run in a single forward.

If one choice is a token prefix of another ("yes" and "yes!"), a choice must also say
where it ends: every choice is then followed by the first stop token (the model's eos)
in the trie, so "yes" means "yes" then end of answer.
"""
from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_MIN_CONFIDENCE = 0.9


class TokenTrie:
    """Token sequences as a trie; ``shared`` is the path all of them start with."""

    def __init__(self, seqs: Sequence[Sequence[int]]):
        self.root: dict = {}
        self.seqs = [list(s) for s in seqs]
        for i, s in enumerate(self.seqs):
            node = self.root
            for t in s:
                node = node.setdefault(t, {})
            node.setdefault(None, []).append(i)  # None: a choice ends here

    def prefix_conflicts(self) -> list[tuple[int, int]]:
        """(i, j) pairs where choice i's tokens are a proper prefix of choice j's."""
        out = []
        for i, s in enumerate(self.seqs):
            node = self.root
            for t in s:
                node = node[t]
            if len(node) > 1:  # children besides the end marker
                for j, o in enumerate(self.seqs):
                    if j != i and len(o) > len(s) and o[: len(s)] == s:
                        out.append((i, j))
        return out

    def shared(self) -> list[int]:
        """The longest path every choice shares, stopping before any choice ends."""
        path, node = [], self.root
        while len(node) == 1 and None not in node:
            (t, node), = node.items()
            path.append(t)
        return path


def choice_token_ids(choices, tokenizer) -> list[list[int]]:
    """Token ids of each choice as a continuation, with the checks of the issue."""
    if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
        raise TypeError(f"choices must be a list of strings, got {type(choices).__name__}")
    if not choices:
        raise ValueError("choices is empty: give at least one allowed answer")
    seen: dict = {}
    for i, c in enumerate(choices):
        if not isinstance(c, str):
            raise TypeError(f"choices[{i}] must be a str, got {type(c).__name__}")
        if c == "":
            raise ValueError(f"choices[{i}] is the empty string: an answer needs at least one token")
        if c in seen:
            raise ValueError(f"choices[{i}] {c!r} duplicates choices[{seen[c]}]: each allowed answer must be unique")
        seen[c] = i
    if tokenizer is None:
        raise ValueError("choices need a tokenizer to turn each answer into tokens")
    out = []
    for i, c in enumerate(choices):
        ids = list(tokenizer(c, add_special_tokens=False)["input_ids"])
        back = tokenizer.decode(ids, skip_special_tokens=False) if ids else ""
        if not ids or back != c:
            raise ValueError(
                f"choices[{i}] {c!r} cannot be tokenized as a continuation: its tokens {ids} decode to {back!r}. "
                "Give the answer exactly as the model would write it (e.g. without leading/trailing spaces "
                "the tokenizer merges differently)"
            )
        out.append(ids)
    dup = {}
    for i, ids in enumerate(out):
        if tuple(ids) in dup:
            raise ValueError(f"choices[{i}] {choices[i]!r} and choices[{dup[tuple(ids)]}] "
                             f"{choices[dup[tuple(ids)]]!r} tokenize to the same tokens {ids}")
        dup[tuple(ids)] = i
    return out


def check_continuation(prompts: Sequence[str], choices: Sequence[str], seqs, tokenizer, add_special_tokens: bool):
    """Each choice must tokenize after each text prompt exactly as on its own: otherwise
    its tokens merge with the prompt's end and the trie would score a sequence the model
    never reads (e.g. a choice starting with a newline after a prompt ending in one)."""
    for j, p in enumerate(prompts):
        head = list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"])
        for i, c in enumerate(choices):
            both = list(tokenizer(p + c, add_special_tokens=add_special_tokens)["input_ids"])
            if both[: len(head)] != head or both[len(head):] != seqs[i]:
                raise ValueError(
                    f"choices[{i}] {c!r} cannot be tokenized as a continuation of prompt {j}: after the prompt it "
                    f"becomes tokens {both[len(head) - 1:]} (from the prompt's last token on), on its own "
                    f"{seqs[i]}. Start the answer where the prompt's tokens end (e.g. drop a leading space or "
                    "newline, or end the prompt with it)"
                )


class _Greedy:
    """The unrestricted greedy answer of each row, read off the forwards that score the
    choices (``generate(..., choices=..., with_greedy=True)``).

    Greedy decoding picks the argmax after every token. The choice-scoring forwards already
    hold the logits after the prompt, after every token of the shared path and after every
    token of every branch, so as long as the greedy token is the next token of the trie,
    the logits for the token after it are at hand: a row whose answer is one of the choices
    followed by a stop token (a trained classifier's usual answer) costs no decode step at
    all. A row that leaves the trie is decoded on from there: from a copy of its prompt's
    cache when it leaves at its first token, else from its prompt and the tokens accepted
    so far. This is speculative decoding with the trie as the draft; the tokens are the
    argmaxes a step-by-step greedy decode takes, computed in batched forwards (the same
    tolerance as prefix sharing: float sums in another order)."""

    def __init__(self, limits: list[int], stop_ids: frozenset):
        self.limits, self.stop_ids = limits, stop_ids
        B = len(limits)
        self.seqs: list = [None] * B
        self.reasons: list = [None] * B
        self.later: list[tuple[int, list[int]]] = []  # (row, accepted tokens): decode from prompt + them
        self.first_off = 0  # rows decoded on from a copy of their prompt's cache

    def push(self, row: int, path: list[int], t: int) -> str | None:
        """Append greedy token ``t``; the finish reason if the row ends here."""
        path.append(t)
        if t in self.stop_ids:
            return "stop_token"
        if len(path) >= self.limits[row]:
            return "length"
        return None

    def finish(self, row: int, path: list[int], reason: str) -> None:
        self.seqs[row], self.reasons[row] = list(path), reason


def score_choices(runner, rows: list[list[int]], choices, *, tokenizer, stop_ids: frozenset, pad_id: int,
                  batch_size: int | None, ctx: int | None, prompt_texts: Sequence[str] | None = None,
                  add_special_tokens: bool = True, greedy_limits: list[int] | None = None,
                  share_prefix: bool = True):
    """The :class:`GenerationResult` of ``generate(..., choices=...)``; with
    ``greedy_limits`` (each row's token budget) also the unrestricted greedy answers in
    ``.greedy`` (see :class:`_Greedy`)."""
    from .api import GenerationResult
    from .decode import fork_cache, prefill

    choices = list(choices) if isinstance(choices, tuple) else choices
    seqs = choice_token_ids(choices, tokenizer)
    if prompt_texts is not None:
        check_continuation(prompt_texts, choices, seqs, tokenizer, add_special_tokens)
    trie = TokenTrie(seqs)
    conflicts = trie.prefix_conflicts()
    if conflicts:
        i, j = conflicts[0]
        if not stop_ids:
            raise ValueError(f"choice {choices[i]!r} is a token prefix of {choices[j]!r} and the model has no stop "
                             "token to mark where an answer ends; pass stop_token_ids=")
        end = min(stop_ids)
        seqs = [s + [end] for s in seqs]
        trie = TokenTrie(seqs)
    shared = trie.shared()
    branches = [s[len(shared):] for s in seqs]  # each non-empty: no choice ends inside the shared path
    C = len(seqs)
    L = max(len(b) for b in branches)
    for i, r in enumerate(rows):
        if ctx is not None and len(r) + max(len(s) for s in seqs) > ctx:
            raise ValueError(f"prompt {i} has {len(r)} tokens; with the longest choice "
                             f"({max(len(s) for s in seqs)} tokens) it exceeds the model's context of {ctx}")

    dev = runner.device
    B = len(rows)
    bs = batch_size or B
    logp = torch.empty((B, C), dtype=torch.float32)
    shared_t = torch.tensor(shared, dtype=torch.long, device=dev)
    br_ids = torch.full((C, L), pad_id, dtype=torch.long, device=dev)
    br_mask = torch.zeros((C, L), dtype=torch.long, device=dev)
    for c, b in enumerate(branches):
        br_ids[c, : len(b)] = torch.tensor(b, dtype=torch.long)
        br_mask[c, : len(b)] = 1
    greedy = _Greedy(greedy_limits, stop_ids) if greedy_limits is not None else None
    S = len(shared)
    # similar lengths together (less padding); results go back to each row's place
    order = list(range(B)) if bs >= B else sorted(range(B), key=lambda i: len(rows[i]))
    for s in range(0, B, bs):
        idx = order[s: s + bs]
        chunk = [rows[r] for r in idx]
        n = len(chunk)
        # logits at the last prompt token and at every shared token: they predict
        # shared[0], ..., shared[-1], then the first branch token
        cache, attn, next_pos, head = prefill(runner, [r + shared for r in chunk], pad_id, keep=S + 1,
                                              share_prefix=share_prefix)
        walking: dict[int, list[int]] = {}  # chunk row -> greedy tokens so far, still on the trie
        first_off: list[int] = []  # chunk rows whose first greedy token is off the trie
        if greedy is not None:
            g = head.float().argmax(-1).tolist()  # (n, S+1): what choose() takes greedily
            for i in range(n):
                path: list[int] = []
                for j in range(S + 1):
                    reason = greedy.push(idx[i], path, g[i][j])
                    if reason:
                        greedy.finish(idx[i], path, reason)
                        break
                    on = g[i][j] == shared[j] if j < S else any(b[0] == g[i][j] for b in branches)
                    if not on:
                        if j == 0:
                            first_off.append(i)
                        else:
                            greedy.later.append((idx[i], path))
                        break
                else:
                    walking[i] = path
            if first_off:  # their prompt's cache, before the shared path is appended (a copy)
                sel = torch.tensor(first_off, device=dev)
                T = attn.shape[1]
                forked = fork_cache(runner, cache, sel, T - S)
                if forked is None:  # a cache that cannot be cut: decode them from their prompts
                    greedy.later.extend((idx[i], []) for i in first_off)
                    first_off = []
                else:
                    first_start = (forked, attn[sel, : T - S], next_pos[sel] - S, head[sel, 0].float())
        head = head.float().log_softmax(-1)  # (n, S+1, V)
        lp_shared = torch.zeros(n, device=dev)
        if shared:
            lp_shared = head[:, :-1, :].gather(-1, shared_t.expand(n, -1).unsqueeze(-1)).squeeze(-1).sum(-1)
        first = head[:, -1, :]  # (n, V)
        # one row per (prompt, choice), choice fastest
        cache.batch_repeat_interleave(C)
        b_ids = br_ids.repeat(n, 1)  # (n*C, L)
        b_mask = br_mask.repeat(n, 1)
        attn2 = torch.cat([attn.repeat_interleave(C, dim=0), b_mask], dim=1)
        pos2 = next_pos.repeat_interleave(C, dim=0) + torch.arange(L, device=dev)
        lp_first = first.repeat_interleave(C, dim=0).gather(-1, b_ids[:, :1]).squeeze(-1)  # (n*C,)
        lp_rest = torch.zeros(n * C, device=dev)
        bo = None
        if L > 1 or walking:
            raw = runner(b_ids, attn2, pos2, cache, keep=L).float()  # (n*C, L, V)
            if walking:
                bo = raw.argmax(-1).tolist()  # greedy token after each branch token
            out = raw.log_softmax(-1)
            tok_lp = out[:, :-1, :].gather(-1, b_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (n*C, L-1)
            lp_rest = (tok_lp * b_mask[:, 1:]).sum(-1)
        total = lp_shared.repeat_interleave(C) + lp_first + lp_rest
        logp[torch.tensor(idx)] = total.view(n, C).cpu()
        if greedy is None:
            continue
        for i, path in walking.items():  # down the branches while greedy follows one
            cands = [c for c in range(C) if branches[c][0] == path[-1]]
            k = 1
            while True:
                t = bo[i * C + cands[0]][k - 1]  # after branch token k-1 (shared by every candidate)
                reason = greedy.push(idx[i], path, t)
                if reason:
                    greedy.finish(idx[i], path, reason)
                    break
                cands = [c for c in cands if len(branches[c]) > k and branches[c][k] == t]
                if not cands:
                    greedy.later.append((idx[i], path))
                    break
                k += 1
        if first_off:
            greedy.first_off += len(first_off)
            _decode_rest(runner, greedy, [idx[i] for i in first_off], [chunk[i] for i in first_off], [[]] * len(first_off),
                         tokenizer=tokenizer, pad_id=pad_id, start=first_start)
    greedy_result = None
    if greedy is not None:
        for k in range(0, len(greedy.later), bs):
            part = greedy.later[k: k + bs]
            _decode_rest(runner, greedy, [r for r, _ in part], [rows[r] + p for r, p in part], [p for _, p in part],
                         tokenizer=tokenizer, pad_id=pad_id, share_prefix=share_prefix)
        seqs_g = [torch.tensor(q, dtype=torch.long, device=dev) for q in greedy.seqs]
        greedy_result = GenerationResult(
            sequences=seqs_g, lengths=torch.tensor([len(q) for q in seqs_g], dtype=torch.long),
            finish_reasons=list(greedy.reasons),
            texts=[tokenizer.decode(q, skip_special_tokens=True) for q in greedy.seqs],
            info={"rows_decoded_from_their_prompt_cache": greedy.first_off,
                  "rows_decoded_after_trie_tokens": len(greedy.later),
                  "rows_without_a_decode_step": B - greedy.first_off - len(greedy.later)})
    probs = torch.softmax(logp.double(), dim=-1).float()
    best = probs.argmax(-1).tolist()
    sequences = [torch.tensor(seqs[c], dtype=torch.long, device=dev) for c in best]
    return GenerationResult(
        sequences=sequences, lengths=torch.tensor([len(x) for x in sequences], dtype=torch.long),
        finish_reasons=["choice"] * B, texts=[choices[c] for c in best], choices=list(choices),
        choice_probs=probs, choice_logprobs=logp, predictions=[choices[c] for c in best],
        confidences=[float(probs[i, c]) for i, c in enumerate(best)],
        info={"shared_tokens": len(shared), "branch_tokens": [len(b) for b in branches],
              "end_token_appended": bool(conflicts)},
        greedy=greedy_result,
    )


def _decode_rest(runner, greedy: _Greedy, rows_idx: list[int], prompts: list[list[int]], paths: list[list[int]],
                 *, tokenizer, pad_id: int, start=None, share_prefix: bool = True) -> None:
    """Greedy-decode rows that left the trie, after their accepted tokens ``paths``."""
    from .decode import decode
    from .sampling import check_sampling

    d = decode(runner, prompts, limits=[greedy.limits[r] - len(p) for r, p in zip(rows_idx, paths)],
               sampling=check_sampling(0.0, None, None), generator=None, stop_ids=greedy.stop_ids, stop_strings=(),
               tokenizer=tokenizer, need_logprobs=False, pad_id=pad_id, share_prefix=share_prefix, start=start)
    for j, (r, p) in enumerate(zip(rows_idx, paths)):
        greedy.finish(r, p + d.tokens[j, : d.lengths[j]].tolist(), d.reasons[j])
