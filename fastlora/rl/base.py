"""The shared base: ONE frozen 4-bit causal LM serving every RL role.

Classic PPO holds four models (policy, reference, critic, reward). With QLoRA they can
share one NF4 copy of the weights::

    role        adapter              output
    policy      LoRA "policy"        token log-probs (B, L-1)    fastlora.token_logprobs, no logits
    reference   none (all off)       token log-probs (B, L-1)    the base model itself
    critic      LoRA "critic"+head   values per token (B, L)
    reward      LoRA "reward"+head   score per sequence (B,)     at the last non-pad token

A role is a name mapped, in ONE place (:class:`RoleSpec`), to an adapter (or none), an
output kind (``"lm"``, ``"value"``, ``"score"``), an optional scalar head and whether it
trains. Several roles may share an adapter (PPO's ``critic: shared`` puts a value head on
the policy's adapter), and the reference may be a frozen adapter instead of the bare base
(the SFT adapter, when PPO starts from one).

Heads are plain ``nn.Linear(hidden, 1)`` modules held HERE, outside PEFT's
``modules_to_save``: PEFT's ``disable_adapter()`` (the reference role) reverts
``modules_to_save`` wrappers to their original module, which silently swapped users'
trained heads for random ones. Ours are never touched by an adapter switch.

PEFT's ``set_adapter`` / ``disable_adapter_layers`` also flip ``requires_grad`` (only the
active adapter trains); every switch here re-applies each role's own ``trainable`` flag,
so an optimizer built once over the policy and the critic keeps both.

The log-prob roles run the decoder and then ``fastlora.token_logprobs`` on the hidden
states and the output embedding read exactly as ``fastlora/patch/head.py`` reads it
(LoRA on the head folded in, logit scale and softcap from the checked head spec): the
(batch, length, vocab) logits never exist. Position ids come from the attention mask
(cumsum - 1), as ``generate`` computes them, so left-padded rollouts score the same
tokens at the same positions they were sampled at.

bitsandbytes' CPU repack (AVX512-BF16 machines rewrite a ``Linear4bit``'s bytes on its
first eval-mode no-grad forward, and training afterwards diverges) is closed on every
path: :meth:`SharedBase.from_model` calls ``protect_bnb_weights`` before anything runs,
and again after every adapter is added.

``save(dir)`` / ``load(dir)`` keep adapters and heads together (safetensors, written to
a temporary directory and renamed into place), so a checkpoint never lacks its heads::

    shared_base.json                 roles (adapter, kind, head, trainable)
    heads.safetensors                "<role>.weight" [, "<role>.bias"] per head
    adapters/<adapter>/              PEFT format (adapter_config.json + adapter_model.safetensors)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

KINDS = ("lm", "value", "score")
# default output kind of the well-known role names
_DEFAULT_KIND = {"policy": "lm", "reference": "lm", "critic": "value", "reward": "score"}
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
# names that are also module / parameter path segments in PEFT models: an adapter called
# like that could not be told apart from the model's own modules in parameter names
_RESERVED = frozenset({"model", "base_model", "weight", "bias", "lora_A", "lora_B", "modules_to_save",
                       "original_module", "base_layer", "lm_head", "score", "heads"})
META_FILE = "shared_base.json"
HEADS_FILE = "heads.safetensors"
ADAPTERS_DIR = "adapters"
FORMAT_VERSION = 1


@dataclasses.dataclass
class RoleSpec:
    """What a role means. ``adapter=None``: every adapter off (the bare base)."""

    adapter: str | None
    kind: str  # "lm" (token log-probs) | "value" (per-token scalar) | "score" (per-sequence scalar)
    trainable: bool = False
    head: bool = False  # a scalar head of its own (value / score roles)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position whose mask is 1, for left or right padding.

    attention_mask: (B, L) 0/1. A row with no valid token is an error (a response of
    length 0 has no token to score), named by its row index.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, length), got shape {tuple(attention_mask.shape)}")
    valid = attention_mask != 0
    empty = (~valid.any(-1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"rows {empty.tolist()[:8]} of the batch have no valid token (attention_mask all 0)")
    L = valid.shape[-1]
    # argmax returns the FIRST maximum: on the flipped mask that is the last valid position
    return (L - 1) - valid.flip(-1).to(torch.uint8).argmax(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over valid tokens only (what ``generate`` uses with left padding)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED:
        raise ValueError(f"{what} name {name!r} is not allowed: use letters, digits, '_' or '-', starting with a "
                         f"letter, and none of {sorted(_RESERVED)}")


class SharedBase(nn.Module):
    """One frozen (4-bit) causal LM, named LoRA adapters, scalar heads, and the roles on top.

    Build with :meth:`from_model`, add roles with :meth:`add_role`, run one with
    ``base(role, input_ids, attention_mask)``. ``base.model`` is the PEFT model (None until
    the first adapter exists); ``base.lm`` the transformers causal LM inside it.
    """

    def __init__(self, lm: nn.Module, *, patch: bool = True, head_dtype: torch.dtype = torch.float32,
                 share_prefix: bool = True):
        super().__init__()
        from ..patch.head import _decoder, is_causal_lm

        if not is_causal_lm(lm):
            raise TypeError(f"SharedBase needs a transformers *ForCausalLM model, got {type(lm).__name__}")
        if _decoder(lm) is None:
            raise ValueError(f"{type(lm).__name__} has no decoder at .{getattr(lm, 'base_model_prefix', None)}")
        self._protect(lm)
        for p in lm.parameters():
            p.requires_grad_(False)  # the base is frozen: only adapters and heads train
        self.model: nn.Module = lm  # replaced by the PEFT model once an adapter exists
        self.heads = nn.ModuleDict()
        self.roles: dict[str, RoleSpec] = {"reference": RoleSpec(adapter=None, kind="lm")}
        self.patched = bool(patch)
        self.share_prefix = bool(share_prefix)
        self.head_dtype = head_dtype
        self._active: str | None = None
        self._spec = None
        self._repatch()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, *, patch: bool = True, roles: dict[str, str] | None = None,
                   trainable: Sequence[str] = (), head_dtype: torch.dtype = torch.float32,
                   share_prefix: bool = True) -> "SharedBase":
        """Wrap a loaded (bnb 4-bit) causal LM, or a PEFT model around one.

        A PEFT model's adapters are kept (frozen unless named in ``trainable``); ``roles``
        maps role names to existing adapter names, e.g. ``{"reference": "default"}`` to
        make a loaded SFT adapter the reference. ``patch`` runs ``fastlora.patch``, with
        ``share_prefix`` (every role's forward then runs the tokens its rows share once:
        a preference pair's prompt, a GRPO group's prompt, the system prompt).
        """
        peft = _peft_model_type()
        if peft is not None and isinstance(model, peft):
            if any(getattr(c, "peft_type", None) is not None and str(c.peft_type.value) != "LORA"
                   for c in model.peft_config.values()):
                raise ValueError("SharedBase supports LoRA adapters only; the PEFT model holds "
                                 f"{sorted({str(c.peft_type.value) for c in model.peft_config.values()})}")
            for name in model.peft_config:
                _check_name("adapter", name)
            self = cls(model.get_base_model(), patch=False, head_dtype=head_dtype, share_prefix=share_prefix)
            self.model = model
            for name in model.peft_config:
                self.roles.setdefault(name, RoleSpec(adapter=name, kind="lm", trainable=name in trainable))
            self.patched = bool(patch)
        else:
            self = cls(model, patch=False, head_dtype=head_dtype, share_prefix=share_prefix)
            self.patched = bool(patch)
        for role, adapter in (roles or {}).items():
            self.add_role(role, adapter=adapter, trainable=role in trainable)
        self._protect(self.model)
        self._apply_trainable()
        self._repatch()
        return self

    @property
    def lm(self) -> nn.Module:
        """The transformers causal LM (inside the PEFT wrapper once there is one)."""
        peft = _peft_model_type()
        return self.model.get_base_model() if peft is not None and isinstance(self.model, peft) else self.model

    @property
    def hidden_size(self) -> int:
        from ..patch.head import _text_config

        return int(_text_config(self.lm).hidden_size)

    @property
    def adapters(self) -> list[str]:
        cfg = getattr(self.model, "peft_config", None)
        return list(cfg) if cfg else []

    def add_role(self, role: str, lora_config=None, *, adapter: str | None = None, kind: str | None = None,
                 head: bool | None = None, trainable: bool | None = None, r: int = 16, alpha: int = 32,
                 dropout: float = 0.0, target_modules: Sequence[str] | str = "all-linear",
                 from_pretrained: str | os.PathLike | None = None, head_init_std: float | None = None,
                 seed: int | None = None) -> RoleSpec:
        """Add (or redefine) a role.

        - ``adapter``: the adapter it runs; default: an adapter named like the role. An
          existing adapter is reused (e.g. ``add_role("critic", adapter="policy")`` for a
          critic on the policy's trunk); a missing one is created from ``lora_config``
          (a ``peft.LoraConfig``) or from ``r``/``alpha``/``dropout``/``target_modules``,
          or loaded from the PEFT adapter dir ``from_pretrained``.
        - ``kind``: ``"lm"`` | ``"value"`` | ``"score"``; default from the role name
          (policy/reference: lm, critic: value, reward: score).
        - ``head``: a scalar head ``Linear(hidden, 1, bias=False)`` (default: for value and
          score roles). Initialized N(0, head_init_std²) (default 1/sqrt(hidden)), or loaded
          with the adapter when ``from_pretrained`` holds one (a sequence-classification
          adapter's ``score.weight``).
        - ``trainable``: default True for a new adapter, False for a loaded one; a reused
          adapter keeps its trainability. Roles sharing an adapter share it.
        """
        _check_name("role", role)
        kind = kind or _DEFAULT_KIND.get(role)
        if kind not in KINDS:
            raise ValueError(f"role {role!r}: kind={kind!r} must be one of {KINDS} (no default for this role name)")
        head = (kind != "lm") if head is None else bool(head)
        if kind != "lm" and not head:
            raise ValueError(f"role {role!r}: a {kind!r} role needs a head (head=True)")
        if adapter is None and role == "reference" and lora_config is None and from_pretrained is None:
            adapter_name = None  # the bare base
        else:
            adapter_name = adapter or role
            _check_name("adapter", adapter_name)
        created = False
        loaded_head = None
        if adapter_name is not None and adapter_name not in self.adapters:
            if from_pretrained is not None:
                loaded_head = self._load_adapter_dir(adapter_name, Path(from_pretrained))
            else:
                self._new_adapter(adapter_name, lora_config or _lora_config(r, alpha, dropout, target_modules), seed)
                created = True
        elif from_pretrained is not None:
            raise ValueError(f"role {role!r}: adapter {adapter_name!r} already exists; from_pretrained would replace it "
                             f"(load weights with SharedBase.load, or pick another adapter name)")
        if trainable is None:
            # a reused adapter keeps its trainability; a new one trains, a loaded one is frozen
            users = [s for s in self.roles.values() if adapter_name is not None and s.adapter == adapter_name]
            trainable = users[0].trainable if users else created
        if adapter_name is None and trainable:
            raise ValueError(f"role {role!r} has no adapter (the bare base), so nothing of it can train")
        if head:
            if role not in self.heads:
                self.heads[role] = self._new_head(head_init_std, seed)
            if loaded_head is not None:
                self._set_head(role, loaded_head, source=str(from_pretrained))
        elif role in self.heads:
            del self.heads[role]
        spec = RoleSpec(adapter=adapter_name, kind=kind, trainable=trainable, head=head)
        self.roles[role] = spec
        for other in self.roles.values():  # roles sharing an adapter share its trainability
            if other.adapter == adapter_name and adapter_name is not None and other is not spec:
                other.trainable = trainable
        self._protect(self.model)
        self._apply_trainable()
        if created or loaded_head is not None or from_pretrained is not None:
            self._repatch()
        return spec

    def _new_adapter(self, name: str, config, seed: int | None) -> None:
        from peft import get_peft_model

        if getattr(config, "modules_to_save", None):
            raise ValueError(f"adapter {name!r}: modules_to_save={config.modules_to_save} is not supported; "
                             "scalar heads live in SharedBase.heads, outside PEFT (add_role(..., head=True))")
        config = dataclasses.replace(config, task_type="CAUSAL_LM") if hasattr(config, "task_type") else config
        with _seeded(seed):
            if self.adapters:
                self.model.add_adapter(name, config)
            else:
                self.model = get_peft_model(self.model, config, adapter_name=name)
        self._restore_active()

    def _load_adapter_dir(self, name: str, path: Path) -> torch.Tensor | None:
        """Load a PEFT LoRA adapter dir as adapter ``name``; return its ``score`` head weight if any."""
        from peft import LoraConfig, get_peft_model
        from peft.utils import set_peft_model_state_dict

        cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a PEFT adapter dir (needs adapter_config.json and "
                                    "adapter_model.safetensors)")
        from safetensors.torch import load_file

        config = LoraConfig.from_pretrained(str(path))
        config.inference_mode = False
        config.modules_to_save = None  # the file's copies are refused below, not loaded into the base
        config.task_type = "CAUSAL_LM"
        state = load_file(str(weights))
        head = None
        for key in [k for k in state if k.endswith(("score.weight", "score.bias"))]:
            if key.endswith("score.weight"):
                head = state[key]
            elif state[key].abs().max() > 0:
                raise ValueError(f"{weights}: the score head has a bias ({key}); fastlora heads have none")
            del state[key]
        state = lora_entries(self.lm, state, source=str(weights))  # before the model changes
        if self.adapters:
            self.model.add_adapter(name, config)
        else:
            self.model = get_peft_model(self.model, config, adapter_name=name)
        self._restore_active()
        device = next(self.lm.parameters()).device
        state = {k: v.to(device) for k, v in state.items()}
        _set_adapter_state(self.model, state, name, source=str(weights))
        del set_peft_model_state_dict
        return head

    def _new_head(self, std: float | None, seed: int | None) -> nn.Linear:
        H = self.hidden_size
        device = next(self.lm.parameters()).device
        lin = nn.Linear(H, 1, bias=False, device=device, dtype=self.head_dtype)
        with _seeded(seed), torch.no_grad():
            lin.weight.normal_(0.0, std if std is not None else H ** -0.5)
        return lin

    def _set_head(self, role: str, weight: torch.Tensor, *, source: str) -> None:
        head = self.heads[role]
        want = tuple(head.weight.shape)
        got = tuple(weight.shape)
        if got != want:
            raise ValueError(f"{source}: head of role {role!r} has shape {got}, but this base needs {want} "
                             f"(hidden size {self.hidden_size}): the checkpoint was made on another model")
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight.dtype))

    # ------------------------------------------------------------------ switching roles
    def _role(self, role: str) -> RoleSpec:
        try:
            return self.roles[role]
        except KeyError:
            raise KeyError(f"unknown role {role!r}; this base has roles {sorted(self.roles)}") from None

    @contextlib.contextmanager
    def activate(self, role: str) -> Iterator[nn.Module]:
        """Run ``role``'s adapter (or none) inside the block; yields the PEFT/causal-LM model,
        ready for ``generate``. The previous role is restored on exit; heads never change."""
        spec = self._role(role)
        previous = self._active
        self._switch(spec)
        self._active = role
        try:
            yield self.model
        finally:
            self._active = previous
            if previous is not None:
                self._switch(self.roles[previous])
            else:
                self._restore_active()

    def _switch(self, spec: RoleSpec) -> None:
        if not self.adapters:
            return  # no adapter exists: every role runs the bare base
        inner = self.model.base_model  # the LoraModel
        if spec.adapter is None:
            inner.disable_adapter_layers()
        else:
            inner.enable_adapter_layers()
            self.model.set_adapter(spec.adapter)
        self._apply_trainable()

    def _restore_active(self) -> None:
        """The resting state between calls: adapters enabled, trainability per role."""
        if self.adapters:
            self.model.base_model.enable_adapter_layers()
        self._apply_trainable()

    def _apply_trainable(self) -> None:
        # PEFT flips requires_grad on every switch (only the active adapter trains); undo that
        want = {s.adapter: s.trainable for s in self.roles.values() if s.adapter is not None}
        for name, p in self._adapter_named_parameters():
            p.requires_grad_(bool(want.get(name, False)))
        for role, head in self.heads.items():
            head.weight.requires_grad_(self.roles[role].trainable if role in self.roles else False)

    def _adapter_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(adapter name, parameter) of every adapter parameter of the PEFT model."""
        if not self.adapters:
            return
        names = set(self.adapters)
        for full, p in self.model.named_parameters():
            parts = full.split(".")
            for i in range(1, len(parts)):
                if parts[i] in names and parts[i - 1].startswith("lora_"):
                    yield parts[i], p
                    break

    def parameters_of(self, role: str) -> list[nn.Parameter]:
        """The parameters a role trains: its adapter's and its head's (frozen ones included)."""
        spec = self._role(role)
        params = [p for a, p in self._adapter_named_parameters() if a == spec.adapter]
        if role in self.heads:
            params += list(self.heads[role].parameters())
        return params

    def trainable_parameters(self, roles: Sequence[str] | None = None) -> list[nn.Parameter]:
        """Parameters that train, of ``roles`` (default: every trainable role), each once."""
        roles = [r for r, s in self.roles.items() if s.trainable] if roles is None else list(roles)
        seen, out = set(), []
        for r in roles:
            if not self._role(r).trainable:
                raise ValueError(f"role {r!r} is frozen (trainable=False)")
            for p in self.parameters_of(r):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    # ------------------------------------------------------------------ running a role
    def hidden_states(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """(B, L, H) last hidden states of the decoder under ``role``'s adapter."""
        from ..patch.head import _decoder

        input_ids, attention_mask = _check_batch(input_ids, attention_mask)
        pos = position_ids_from_mask(attention_mask)
        with self.activate(role):
            self._protect(self.model)  # cheap; keeps the bnb repack closed even if someone reset it
            out = _decoder(self.lm)(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                    use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logprobs_from_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                             attention_mask: torch.Tensor | None = None, *, temperature: float = 1.0,
                             return_entropy: bool = False, training: bool | None = None):
        """log p(input_ids[:, t+1] | ..t) from hidden (B, L, H): (B, L-1) float32, 0 where the
        target or its context is padding; with ``return_entropy`` also the (B, L-1) entropy."""
        from ..ops.token_logprobs import token_logprobs
        from ..patch.head import head_weights

        input_ids, attention_mask = _check_batch(input_ids, attention_mask)
        if hidden.shape[:2] != input_ids.shape:
            raise ValueError(f"hidden {tuple(hidden.shape)} does not match input_ids {tuple(input_ids.shape)}")
        lm = self.lm
        w, b, why = head_weights(lm, self.training if training is None else training)
        if why:
            raise ValueError(f"cannot compute token log-probs without logits: {why}")
        spec = self._head_spec()
        valid = (attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)  # (B, L-1)
        h = hidden[:, :-1][valid]  # (N, H): only the positions that are scored
        tok = input_ids[:, 1:][valid]  # (N,)
        dtype = w.dtype
        res = token_logprobs(h.to(w.device, dtype), w, tok.to(w.device), bias=None if b is None else b.to(dtype),
                             temperature=temperature, logit_scale=spec.logit_scale, softcap=spec.softcap,
                             return_entropy=return_entropy)
        parts = res if return_entropy else (res,)
        outs = []
        for part in parts:
            full = part.new_zeros(valid.shape)
            full = full.masked_scatter(valid.to(full.device), part)  # (B, L-1)
            outs.append(full)
        return tuple(outs) if return_entropy else outs[0]

    def head_values(self, role: str, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """(B, L) the role's head on every position (float32), 0 on padding."""
        if role not in self.heads:
            raise ValueError(f"role {role!r} has no head (roles with heads: {sorted(self.heads)})")
        head = self.heads[role]
        v = head(hidden.to(head.weight.dtype)).squeeze(-1)  # (B, L)
        if attention_mask is not None:
            v = v.masked_fill(attention_mask == 0, 0.0)
        return v

    def forward(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                temperature: float = 1.0, return_entropy: bool = False):
        """Run ``role`` on a batch.

        input_ids: (B, L) int; attention_mask: (B, L) 0/1 (left or right padding; default all 1).
        Returns, by the role's kind:
          - ``lm``: (B, L-1) float32 log-probs of ``input_ids[:, 1:]`` (0 on padding), and the
            (B, L-1) entropy too when ``return_entropy``;
          - ``value``: (B, L) float32 head values per token (0 on padding);
          - ``score``: (B,) float32 head value at each row's last non-pad token.
        """
        spec = self._role(role)
        input_ids, attention_mask = _check_batch(input_ids, attention_mask)
        if spec.kind == "score":
            idx = last_token_index(attention_mask)  # validates before the forward
        hidden = self.hidden_states(role, input_ids, attention_mask)
        if spec.kind == "lm":
            return self.logprobs_from_hidden(hidden, input_ids, attention_mask, temperature=temperature,
                                             return_entropy=return_entropy)
        values = self.head_values(role, hidden, attention_mask)
        if spec.kind == "value":
            return values
        return values.gather(1, idx.to(values.device).unsqueeze(1)).squeeze(1)

    def score(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) the head of ``role`` at the last non-pad token (any role with a head)."""
        input_ids, attention_mask = _check_batch(input_ids, attention_mask)
        idx = last_token_index(attention_mask)
        values = self.head_values(role, self.hidden_states(role, input_ids, attention_mask), attention_mask)
        return values.gather(1, idx.to(values.device).unsqueeze(1)).squeeze(1)

    def _head_spec(self):
        if self._spec is None:
            from ..patch import _bind
            from ..patch.head import HeadSpec, build_spec

            lm = self.lm
            st = _bind.state(lm)
            if st is not None and isinstance(st.extra, HeadSpec):
                self._spec = st.extra
            else:
                with self.activate("reference"):
                    spec, why = build_spec(lm, lm.forward, verify=True)
                if spec is None:
                    raise ValueError(f"cannot compute token log-probs without logits for {type(lm).__name__}: {why}")
                self._spec = spec
        return self._spec

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike, roles: Sequence[str] | None = None) -> Path:
        """Write the roles' adapters and heads together (see the module docstring), atomically:
        into a temporary dir renamed into place, so an existing save is replaced only once the
        new one is complete."""
        from safetensors.torch import save_file

        from ..train.checkpoint import write_dir_atomic, write_json_atomic

        roles = list(self.roles) if roles is None else list(roles)
        specs = {r: self._role(r) for r in roles}
        adapters = sorted({s.adapter for s in specs.values() if s.adapter is not None})

        def fill(tmp: Path) -> None:
            for a in adapters:
                save_adapter_dir(self.model, a, tmp / ADAPTERS_DIR / a)
            heads = {f"{r}.weight": self.heads[r].weight.detach().cpu().contiguous()
                     for r in roles if r in self.heads}
            save_file(heads, str(tmp / HEADS_FILE), metadata={"format": "pt"})
            write_json_atomic(tmp / META_FILE, {"format": FORMAT_VERSION, "hidden_size": self.hidden_size,
                                                "roles": {r: s.to_dict() for r, s in specs.items()}})

        return write_dir_atomic(directory, fill)

    def load(self, directory: str | os.PathLike, *, roles: Sequence[str] | None = None) -> list[str]:
        """Restore adapters and heads written by :meth:`save`; roles missing here are added
        (with their saved LoRA config). Returns the roles loaded. Every shape is checked
        against this base before anything changes, and a mismatch names the file."""
        from safetensors.torch import load_file

        d = Path(directory)
        meta_file = d / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{str(d)!r} holds no shared base save ({META_FILE} is missing)")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_file}, line {e.lineno}: malformed JSON ({e.msg})") from None
        saved = meta.get("roles", {})
        roles = list(saved) if roles is None else list(roles)
        missing = [r for r in roles if r not in saved]
        if missing:
            raise ValueError(f"{meta_file}: no role(s) {missing}; it holds {sorted(saved)}")
        heads_file = d / HEADS_FILE
        heads = load_file(str(heads_file)) if heads_file.is_file() else {}
        # check every head's shape first: a wrong-sized head must not leave half a load behind
        want = (1, self.hidden_size)
        for r in roles:
            if saved[r].get("head"):
                key = f"{r}.weight"
                if key not in heads:
                    raise ValueError(f"{heads_file}: the head of role {r!r} ({key}) is missing")
                if tuple(heads[key].shape) != want:
                    raise ValueError(f"{heads_file}: head of role {r!r} has shape {tuple(heads[key].shape)}, but "
                                     f"this base needs {want} (hidden size {self.hidden_size}): the checkpoint "
                                     "was made on another model")
        for r in roles:
            s = RoleSpec(**saved[r])
            if s.adapter is not None:
                path = d / ADAPTERS_DIR / s.adapter
                if s.adapter in self.adapters:
                    load_adapter_weights(self.model, s.adapter, path)
                else:
                    self.add_role(r, from_pretrained=path, adapter=s.adapter, kind=s.kind, head=s.head,
                                  trainable=s.trainable)
            if r not in self.roles or self.roles[r] != s:
                self.add_role(r, adapter=s.adapter, kind=s.kind, head=s.head, trainable=s.trainable)
            if s.head:
                self._set_head(r, heads[f"{r}.weight"], source=str(heads_file))
        self._apply_trainable()
        return roles

    # ------------------------------------------------------------------ sequence-classification export
    def export_sequence_classification(self, role: str, directory: str | os.PathLike) -> Path:
        """Write ``role``'s adapter and head as a PEFT adapter for transformers'
        ``AutoModelForSequenceClassification(num_labels=1)``: LoRA config with
        ``task_type="SEQ_CLS"`` and ``modules_to_save=["score"]``, the head saved as
        ``score.weight``. Other tools then score with ``PeftModel.from_pretrained``;
        :meth:`add_role` (``from_pretrained=``) and :meth:`load_sequence_classification` read it back.
        Written atomically (temporary dir, then rename)."""
        from safetensors.torch import save_file
        from peft.utils import get_peft_model_state_dict

        from ..train.checkpoint import write_dir_atomic

        spec = self._role(role)
        if spec.adapter is None or role not in self.heads:
            raise ValueError(f"role {role!r} needs an adapter and a head to export as a sequence classifier")

        def fill(tmp: Path) -> None:
            state = {k: v.detach().cpu().contiguous()
                     for k, v in get_peft_model_state_dict(self.model, adapter_name=spec.adapter).items()}
            state["base_model.model.score.weight"] = self.heads[role].weight.detach().cpu().float().contiguous()
            save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            config = dataclasses.replace(self.model.peft_config[spec.adapter], task_type="SEQ_CLS",
                                         modules_to_save=["score"], inference_mode=True)
            config.save_pretrained(str(tmp))

        return write_dir_atomic(directory, fill)

    def load_sequence_classification(self, role: str, directory: str | os.PathLike) -> None:
        """Load weights written by :meth:`export_sequence_classification` into ``role``'s
        existing adapter and head. Shapes are checked first (a head of another hidden size,
        an adapter of another rank), naming the file; nothing changes on a mismatch."""
        from safetensors.torch import load_file

        spec = self._role(role)
        if spec.adapter is None or role not in self.heads:
            raise ValueError(f"role {role!r} has no adapter and head to load into")
        weights = Path(directory) / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{str(weights)!r} is missing")
        state = load_file(str(weights))
        head = state.pop("base_model.model.score.weight", None)
        if head is None:
            raise ValueError(f"{weights}: no score head (base_model.model.score.weight) in the file")
        want = tuple(self.heads[role].weight.shape)
        if tuple(head.shape) != want:
            raise ValueError(f"{weights}: head of role {role!r} has shape {tuple(head.shape)}, but this base needs "
                             f"{want} (hidden size {self.hidden_size}): it was made on another model")
        device = next(self.lm.parameters()).device
        _set_adapter_state(self.model, {k: v.to(device) for k, v in state.items()}, spec.adapter, source=str(weights))
        self._set_head(role, head, source=str(weights))

    # ------------------------------------------------------------------ memory
    def memory_report(self, roles: Sequence[str] = ("policy", "reference", "critic", "reward")) -> dict:
        """Exact parameter counts and bytes: this shared base vs one separate 4-bit model per role.

        Counts every tensor that holds the model (parameters, buffers, bitsandbytes
        quantization states), each storage once (tied embeddings once). A separate model
        per role holds the whole base plus that role's adapter and head; the shared base
        holds the base once plus every adapter and head.
        """
        from .memory import model_memory

        return model_memory(self, roles)

    # ------------------------------------------------------------------ internals
    def _protect(self, model) -> None:
        from ..patch import protect_bnb_weights

        protect_bnb_weights(model)

    def _repatch(self) -> None:
        """fastlora.patch the model once; afterwards patch only the LoRA layers created since
        (a new adapter on new target modules), without re-running the head self-check."""
        if not self.patched:
            return
        import fastlora
        from ..patch import _bind
        from ..patch import lora as lora_patch

        if not any(_bind.state(m) is not None for m in self.model.modules()):
            # Before the first adapter exists there is no LoRA layer to fuse: patch the head
            # only (patch would warn "accelerated no LoRA layer"); the layers are patched below
            # as add_role creates them.
            has_lora = any(lora_patch.is_lora_layer(m) for m in self.model.modules())
            fastlora.patch(self.model, lora=has_lora, share_prefix=self.share_prefix)
            self._spec = None
            return
        for m in self.model.modules():
            if lora_patch.is_lora_layer(m) and _bind.state(m) is None and lora_patch.unsupported_reason(m) is None:
                lora_patch.patch_layer(m)

    def extra_repr(self) -> str:
        return ", ".join(f"{r}: {s.adapter or '(base)'} {s.kind}{' +head' if s.head else ''}"
                         f"{' trainable' if s.trainable else ''}" for r, s in self.roles.items())


# ---------------------------------------------------------------------- helpers
def _peft_model_type():
    import sys

    mod = sys.modules.get("peft")
    return getattr(mod, "PeftModel", None) if mod is not None else None


def _lora_config(r: int, alpha: int, dropout: float, target_modules):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      task_type="CAUSAL_LM", bias="none")


@contextlib.contextmanager
def _seeded(seed: int | None):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer (batch, length) tensor, got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    return input_ids, attention_mask


def save_adapter_dir(peft_model, adapter: str, target: Path) -> None:
    """One adapter in PEFT's own format (what ``PeftModel.from_pretrained`` reads)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(target / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    peft_model.peft_config[adapter].save_pretrained(str(target))


def load_adapter_weights(peft_model, adapter: str, path: Path) -> None:
    from safetensors.torch import load_file

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"adapter file {str(weights)!r} is missing")
    device = next(peft_model.parameters()).device
    state = {k: v.to(device) for k, v in load_file(str(weights)).items()}
    _set_adapter_state(peft_model, state, adapter, source=str(weights))


def lora_entries(lm: nn.Module, state: dict, *, source: str) -> dict:
    """The entries of a PEFT adapter state dict that belong to the LoRA adapter itself.

    Any other entry is a weight of the base model (PEFT's ``modules_to_save``, a trained
    embedding, ``bias="all"`` / ``"lora_only"``), and PEFT would load it, strict=False,
    into the one frozen base that every role shares: a policy loaded from such a file
    would silently change the reference, the critic and the reward model too. Such entries
    are refused, naming them and the file, unless each equals (in the base's dtype) the
    base tensor it would overwrite: PEFT writes copies of an untouched embedding whenever
    ``target_modules`` names one (``save_embedding_layers="auto"``); those change nothing
    and are dropped. ``lm``: the transformers model under the PEFT wrapper.
    """
    others = [k for k in state if not any(part.startswith("lora_") for part in k.split("."))]
    if not others:
        return state
    # remove_duplicate=False: a tied head is a name of its own
    base = dict(lm.named_parameters(remove_duplicate=False))
    base.update(lm.named_buffers(remove_duplicate=False))
    changed = []
    for k in others:
        # the layer is LoRA-wrapped (".base_layer.") in the file, here, or both
        plain = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        stem, _, leaf = plain.rpartition(".")
        t = base.get(plain, base.get(f"{stem}.base_layer.{leaf}"))
        v = state[k]
        if (t is None or not t.dtype.is_floating_point or tuple(t.shape) != tuple(v.shape)
                or not torch.equal(v.to(t.device, t.dtype), t)):
            changed.append(k)
    if changed:
        raise ValueError(f"{source} holds weights of the base model, not of a LoRA adapter: {changed[:8]}"
                         + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
                         + ". The roles share one frozen base, which an adapter file may not change: save the "
                           "adapter without modules_to_save, trained embeddings or biases (bias='none')")
    return {k: v for k, v in state.items() if k not in others}


def _set_adapter_state(peft_model, state: dict, adapter: str, *, source: str) -> None:
    """Copy a PEFT adapter state dict into ``adapter``, refusing unknown keys and wrong shapes."""
    from peft.utils import set_peft_model_state_dict

    state = lora_entries(peft_model.get_base_model(), state, source=source)
    own = {n: p for n, p in peft_model.named_parameters() if f".{adapter}." in f".{n}."}
    # shapes first (PEFT would raise a torch size-mismatch error without the file's name)
    for k, v in state.items():
        target = k.replace(".weight", f".{adapter}.weight") if ".lora_" in k else k
        if target in own and tuple(own[target].shape) != tuple(v.shape):
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, this model's adapter {adapter!r} needs "
                             f"{tuple(own[target].shape)} (another base model or LoRA rank)")
    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{source} does not fit this model's adapter {adapter!r}: unexpected keys {unexpected[:5]}")
