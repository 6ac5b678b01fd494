"""The parameter-efficient methods the fine-tuning course teaches, for ``fastlora sft --peft``.

=========  ==================================================================  ===========
method     what trains                                                         built with
=========  ==================================================================  ===========
lora       low-rank A·B beside every targeted linear (QLoRA over NF4)          PEFT LoraConfig
dora       LoRA with a learned per-output magnitude (weight decomposition)     PEFT LoraConfig(use_dora)
ia3        a learned per-channel scale of keys, values and the MLP input      PEFT IA3Config
prefix     trained key/value vectors prepended in every attention layer       PEFT PrefixTuningConfig
prompt     trained virtual-token embeddings prepended to the input            PEFT PromptTuningConfig
adapter    a bottleneck (down, GELU, up, residual) after attention and MLP    :class:`BottleneckAdapter`
bitfit     the bias terms only (or, without biases, the norm weights)          requires_grad / PEFT LNTuning
=========  ==================================================================  ===========

PEFT has no bottleneck adapter. Its custom-module mechanism
(``LoraConfig._register_custom_module``) plugs a *LoRA* layer for a new base-layer type:
its layers are built around the base layer's input (in -> r -> out, added to the base
output), while a serial adapter transforms the base layer's output, and the mapping is
not saved in ``adapter_config.json`` (every loader must register it again). So the
adapter is the thinnest own module: it wraps the block's output projection
(``o_proj``/``down_proj``), starts as the identity (up-projection zero) and saves/loads
with :func:`save_trainable`/:func:`load_trainable`, like BitFit's biases.

BitFit trains only biases. Llama-family models (SmolLM2 included) have no bias in their
linear layers nor in their RMSNorms: BitFit has nothing to train there, and we say so.
:func:`add_peft` then trains the norm weights instead (PEFT's LN tuning, ``--peft ln``),
the closest thing such a model has, and records ``method_used: ln`` next to the request.

What ``fastlora.patch`` does with each: LoRA is fused; DoRA falls back (reported) to
PEFT's forward; IA³, LN tuning, prefix/prompt tuning and the bottleneck adapter run
their own (PEFT's or ours) forward and the report lists them as kept, while the causal-LM
loss is still computed without logits.

Merging: ``fastlora merge`` folds plain LoRA into the dequantized base; every other kind
is refused with the reason (:func:`merge_refusal`): prefix/prompt tuning and the
bottleneck adapter cannot fold into weights at all; DoRA and IA³ could, but not by the
LoRA-delta merge, so rather than write a model that silently lacks them we refuse.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

METHODS = ("lora", "dora", "ia3", "prefix", "prompt", "adapter", "bitfit", "ln")
# The course's list, in the order the comparison reports it.
COMPARED = ("lora", "ia3", "prefix", "adapter", "bitfit", "prompt", "dora")

# Learning rates (AdamW, the embedded task's 60 steps of batch 8). LoRA's is the tuned
# embedded default. The others were NOT swept on this task (no time on the shared CPU):
# each is the usual value from its paper or PEFT's own examples, where methods with few
# parameters that start at the identity (scales of 1, zero up-projections, virtual tokens)
# take 10-60x LoRA's rate. The comparison reports the rate each method ran with.
DEFAULT_LR = {
    "lora": 5e-4,
    "dora": 5e-4,
    "ia3": 1e-2,  # IA3 paper / PEFT examples: 3e-3 .. 1e-2 (scales start at 1: small steps do little)
    "prefix": 1e-2,  # PEFT's prefix-tuning examples: 1e-2
    "prompt": 3e-2,  # PEFT's prompt-tuning examples: 3e-2 (Lester et al. use 0.3 with Adafactor)
    "adapter": 1e-3,  # Houlsby et al.: 1e-4 .. 1e-3
    "bitfit": 3e-3,  # BitFit paper: 1e-4 .. 1e-3 on BERT; norms/biases need larger steps in 60 steps
    "ln": 3e-3,
}

ADAPTER_TARGETS = ("o_proj", "down_proj", "out_proj", "dense_4h_to_h", "c_proj", "fc2")
CONFIG_FILE = "fastlora_peft.json"
WEIGHTS_FILE = "fastlora_peft.safetensors"
_ATTR = "_fastlora_peft"  # instance attribute of a model carrying an own method
_BASE_BIASES = "_fastlora_peft_base_biases"  # BitFit: the base model's own biases


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"peft={method!r} is not one of {list(METHODS)}")
    return method


# ------------------------------------------------------------------ the adapter
class BottleneckAdapter(nn.Module):
    """``y + up(gelu(down(y)))`` on the output ``y`` of a block's output projection.

    ``up`` starts at zero, so a fresh adapter is the identity (Houlsby et al.). The
    adapter runs in its own dtype (fp32) and returns y's dtype.
    """

    fastlora_kept_reason = "bottleneck adapter: its own forward (fastlora fuses LoRA only)"

    def __init__(self, base: nn.Module, features: int, dim: int):
        super().__init__()
        self.base = base
        self.enabled = True  # False: the base layer's output (adapter_disabled)
        self.down = nn.Linear(features, dim)
        self.up = nn.Linear(dim, features)
        nn.init.normal_(self.down.weight, std=features ** -0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        if not self.enabled:
            return y
        h = y.to(self.down.weight.dtype)
        return y + self.up(nn.functional.gelu(self.down(h))).to(y.dtype)


def _out_features(m: nn.Module) -> int:
    n = getattr(m, "out_features", None)
    if n is None:
        raise ValueError(f"cannot insert a bottleneck adapter after {type(m).__name__} (no out_features)")
    return int(n)


def _insert_adapters(model: nn.Module, dim: int, targets=ADAPTER_TARGETS) -> list[str]:
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets]
    if not names:
        from .model import linear_module_names

        raise ValueError(
            f"no block output projection named one of {list(targets)} to put a bottleneck adapter after; "
            f"this model's linear layers are {linear_module_names(model)}"
        )
    device = next(model.parameters()).device
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, leaf)
        setattr(parent, leaf, BottleneckAdapter(base, _out_features(base), dim).to(device))
    return names


# ---------------------------------------------------------------------- BitFit
def bias_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if n.endswith(".bias") or n == "bias"]


NO_BIAS_MESSAGE = (
    "BitFit trains only bias terms, and this model has none: Llama-family models (SmolLM2 included) have no "
    "bias in their linear layers or RMSNorms. Training the norm weights instead (PEFT's LN tuning, "
    "--peft ln): the closest thing to BitFit this model has. Its figures are LN tuning's, not BitFit's."
)


# ------------------------------------------------------------------- building
def add_peft(model, method: str = "lora", *, r: int = 16, alpha: int = 32, dropout: float = 0.0,
             target_modules: Any = "all-linear", num_virtual_tokens: int = 16, adapter_dim: int = 32,
             gradient_checkpointing: bool = False, log=print):
    """Make ``model`` trainable with ``method``; returns ``(model, info)``.

    ``model`` is a (4-bit) transformers causal LM. PEFT methods return a ``PeftModel``;
    ``adapter`` and BitFit return ``model`` itself with its own trainable parameters
    (saved by :func:`save_trainable`). ``info``: ``method`` (asked), ``method_used``
    (what trains), ``trainable``/``total`` parameter counts and ``notes``.
    """
    check_method(method)
    info: dict[str, Any] = {"method": method, "method_used": method, "notes": []}
    if method in ("lora", "dora"):
        from .model import add_lora

        model = add_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                         gradient_checkpointing=gradient_checkpointing, use_dora=(method == "dora"))
        return model, _count(model, info)
    if method == "bitfit":
        names = bias_names(model)
        if not names:
            log(f"fastlora: --peft bitfit: {NO_BIAS_MESSAGE}")
            info["notes"].append(NO_BIAS_MESSAGE)
            info["method_used"] = method = "ln"
    _prepare(model, gradient_checkpointing)
    if method in ("ia3", "prefix", "prompt", "ln"):
        from peft import get_peft_model

        model = get_peft_model(model, _peft_config(method, model, num_virtual_tokens))
        return model, _count(model, info)
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "adapter":
        targets = _insert_adapters(model, adapter_dim)
        config = {"method": "adapter", "adapter_dim": adapter_dim, "targets": targets}
    else:  # bitfit on a model with biases
        _keep_base_biases(model, names)
        for n, p in model.named_parameters():
            if n in set(names):
                p.requires_grad_(True)
        config = {"method": "bitfit", "biases": names}
        if not any(p.is_floating_point() for n, p in model.named_parameters() if p.requires_grad):
            raise ValueError("bitfit: the model's biases are not floating point tensors; cannot train them")
    config["base_model_name_or_path"] = getattr(model.config, "_name_or_path", None)
    model.__dict__[_ATTR] = config
    return model, _count(model, info)


def _prepare(model, gradient_checkpointing: bool) -> None:
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


def _peft_config(method: str, model, num_virtual_tokens: int):
    import peft

    if method == "ia3":
        return peft.IA3Config(task_type="CAUSAL_LM", **_default_targets(model, "ia3"))
    if method == "ln":
        return peft.LNTuningConfig(task_type="CAUSAL_LM", **_default_targets(model, "ln"))
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    # SAMPLE_VOCAB: virtual tokens start as embeddings of random vocabulary tokens, at the
    # embedding scale (RANDOM would start them at N(0, 1), far off that scale).
    return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                   prompt_tuning_init="SAMPLE_VOCAB")


def _default_targets(model, method: str) -> dict:
    """PEFT's own per-architecture targets; a clear error for architectures PEFT does not map."""
    from peft.utils import constants

    table = {
        "ia3": (constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
                constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING),
        "ln": (constants.TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING, None),
    }[method]
    mtype = getattr(model.config, "model_type", None)
    if mtype not in table[0]:
        raise ValueError(f"--peft {method}: PEFT has no default target modules for model_type {mtype!r}")
    out = {"target_modules": list(table[0][mtype])}
    if table[1] is not None:
        out["feedforward_modules"] = list(table[1][mtype])
    return out


def _logical_numel(p: torch.Tensor) -> int:
    # a bnb Params4bit stores two 4-bit values per byte: count the weights it stands for
    qs = getattr(p, "quant_state", None)
    shape = getattr(qs, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, 4-bit weights counted as the weights they encode."""
    trainable = total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def _count(model, info: dict) -> dict:
    info["trainable"], info["total"] = count_parameters(model)
    info["trainable_percent"] = 100.0 * info["trainable"] / max(info["total"], 1)
    return info


# ------------------------------------------------------------ save / load / merge
def own_method(model) -> dict | None:
    """The config of an own (non-PEFT) method carried by ``model``, or None."""
    return model.__dict__.get(_ATTR)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model, directory: str | os.PathLike) -> None:
    """Save what trains: PEFT's ``save_pretrained`` for PEFT methods; for the adapter and
    BitFit, ``fastlora_peft.json`` + ``fastlora_peft.safetensors`` (trainable tensors only).
    Called inside an atomic directory write (see ``checkpoint.write_dir_atomic``)."""
    config = own_method(model)
    if config is None:
        model.save_pretrained(directory)
        return
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(d / WEIGHTS_FILE))
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def is_own_adapter_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def load_trainable(model, directory: str | os.PathLike, *, is_trainable: bool = False):
    """Apply a saved adapter to a freshly loaded base ``model``; returns the model.

    PEFT adapter dirs load with ``PeftModel.from_pretrained``; ours insert the adapter (or
    select the biases) and load the saved tensors, refusing a mismatch by name."""
    d = Path(directory)
    if not is_own_adapter_dir(d):
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(d), is_trainable=is_trainable)
    from safetensors.torch import load_file

    config = json.loads((d / CONFIG_FILE).read_text())
    if config.get("method") == "adapter":
        _insert_adapters(model, int(config["adapter_dim"]), targets={t.rsplit(".", 1)[-1] for t in config["targets"]})
    elif config.get("method") != "bitfit":
        raise ValueError(f"{d / CONFIG_FILE}: unknown method {config.get('method')!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    state = load_file(str(d / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise ValueError(f"{d / WEIGHTS_FILE} does not fit this model: no parameter named {missing[:3]}")
    if config.get("method") == "bitfit":
        _keep_base_biases(model, sorted(state))
    with torch.no_grad():
        for n, t in state.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{d / WEIGHTS_FILE}: {n} has shape {tuple(t.shape)}, the model's is "
                                 f"{tuple(params[n].shape)}")
            params[n].copy_(t.to(params[n].dtype))
            params[n].requires_grad_(is_trainable)
    model.__dict__[_ATTR] = config
    return model


def _keep_base_biases(model, names) -> None:
    # BitFit overwrites the base's own biases: keep them, so that adapter_disabled can
    # answer as the base model (biases are a few thousand numbers)
    params = dict(model.named_parameters())
    model.__dict__[_BASE_BIASES] = {n: params[n].detach().clone() for n in names}


def adapter_config_file(directory: str | os.PathLike) -> Path | None:
    """The adapter dir's config: PEFT's ``adapter_config.json`` or our ``fastlora_peft.json``
    (bottleneck adapter, BitFit); None when ``directory`` holds neither."""
    for name in ("adapter_config.json", CONFIG_FILE):
        f = Path(directory) / name
        if f.is_file():
            return f
    return None


def require_lora_adapter(directory: str | os.PathLike, what: str) -> Path:
    """``directory`` when it holds a PEFT LoRA (or DoRA) adapter; else a ValueError naming
    the method it holds. The RL trainers' shared base loads LoRA only, and reading another
    method's ``adapter_config.json`` as a LoRA config would start from an empty LoRA: the
    base model, silently."""
    d = Path(directory)
    f = adapter_config_file(d)
    if f is None:
        raise FileNotFoundError(f"{what} {str(d)!r} is not an adapter directory (no adapter_config.json)")
    if f.name == CONFIG_FILE:
        kind = json.loads(f.read_text()).get("method")
    else:
        kind = str(json.loads(f.read_text()).get("peft_type", "LORA")).lower()
    if kind != "lora":
        raise ValueError(f"{what} {str(d)!r} holds a {kind} adapter ({f.name}); PPO's policy, reference and "
                         "critic are LoRA adapters on one shared base, so it needs an SFT run made with "
                         "--peft lora (or dora)")
    return d


@contextlib.contextmanager
def adapter_disabled(model) -> Iterator[None]:
    """Inside the block ``model`` answers as its base model: PEFT's ``disable_adapter()``,
    the bottleneck adapters switched off, or BitFit's trained biases swapped for the base's."""
    config = own_method(model)
    if config is None:
        with model.disable_adapter():
            yield
        return
    if config["method"] == "adapter":
        adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
        for m in adapters:
            m.enabled = False
        try:
            yield
        finally:
            for m in adapters:
                m.enabled = True
        return
    base = model.__dict__.get(_BASE_BIASES)
    if base is None:
        raise ValueError("this BitFit model does not hold its base biases (they were overwritten before "
                         "fastlora tracked them); load the base model separately to compare")
    params = dict(model.named_parameters())
    trained = {n: params[n].detach().clone() for n in base}
    with torch.no_grad():
        for n, t in base.items():
            params[n].copy_(t)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, t in trained.items():
                params[n].copy_(t)


def load_trainable_state(model, directory: str | os.PathLike) -> None:
    """Copy a checkpoint's saved trainable tensors into ``model`` (resume)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    unexpected = sorted(set(state) - set(params))
    if unexpected:
        raise ValueError(f"checkpoint {str(directory)!r} does not fit this model: unexpected keys {unexpected[:5]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].dtype))


def merge_refusal(peft_type: str, use_dora: bool = False) -> str | None:
    """Why ``fastlora merge`` refuses an adapter of this kind, or None if it merges it.

    ``fastlora merge`` folds plain LoRA deltas into the dequantized NF4 base (see
    ``merge.py``); anything else would be silently dropped from the merged weights, so it
    is refused with the reason."""
    t = peft_type.lower()
    if t == "lora" and not use_dora:
        return None
    why = {
        "lora": "DoRA rescales each output column by a learned magnitude over the merged weight's norm; "
                "fastlora merge folds plain LoRA deltas only (PEFT's merge_and_unload handles DoRA on a "
                "16-bit base)",
        "ia3": "(IA)3 scales activations; it folds into a 16-bit weight (PEFT's merge_and_unload on a 16-bit "
               "base) but fastlora merge folds LoRA deltas only",
        "prefix_tuning": "prefix tuning adds key/value vectors to every attention layer; they are inputs, not "
                         "a weight change, so there is nothing to fold into the base",
        "prompt_tuning": "prompt tuning adds virtual-token embeddings in front of the input; they are inputs, "
                         "not a weight change, so there is nothing to fold into the base",
        "adapter": "a bottleneck adapter has a nonlinearity (GELU) between its projections: it cannot be "
                   "folded into a linear weight",
        "bitfit": "BitFit changes biases only; load the base and the saved biases with "
                  "fastlora.train.peft_methods.load_trainable instead",
        "ln_tuning": "LN tuning trains copies of the norm layers; load them with PEFT "
                     "(PeftModel.from_pretrained) instead of merging",
    }.get(t, f"adapters of type {peft_type!r} are not supported by fastlora merge")
    name = "DoRA" if t == "lora" else peft_type
    return f"cannot merge a {name} adapter: {why}"
