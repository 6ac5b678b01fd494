"""Tiny random causal LMs, saved once per session and loaded through the real stack:
transformers + BitsAndBytesConfig(nf4, double quant, fp32 compute) + PEFT LoRA.

Sizes are the smallest where NF4 is meaningful: hidden 128 (two 64-blocks per row),
intermediate 256, vocab 256, 2 layers, 4 heads of 32.
"""
from __future__ import annotations

import contextlib
import io
import logging

import torch

HIDDEN, INTER, VOCAB, LAYERS = 128, 256, 256, 2

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v projections carry biases
    "qwen3": ("Qwen3Config", {}),
    "gemma": ("GemmaConfig", {"tie_word_embeddings": True}),  # tied embeddings, GeGLU
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 2.0, "attn_logit_softcapping": 50.0,
                                "tie_word_embeddings": True}),
}


def make_config(family: str, **overrides):
    import transformers

    cls_name, extra = FAMILIES[family]
    kw = dict(
        hidden_size=HIDDEN, intermediate_size=INTER, vocab_size=VOCAB, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )
    kw.update(extra)
    kw.update(overrides)
    return getattr(transformers, cls_name)(**kw)


def save_random(family: str, path, seed: int = 0, **overrides) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, **overrides), dtype=torch.float32)
    if family == "qwen2":  # random (non-zero) projection biases so they matter
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m.bias is not None:
                    m.bias.normal_(0, 0.5)
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(path)
    return str(path)


def bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def load_4bit(path):
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=bnb_config(), dtype=torch.float32, device_map={"": "cpu"},
            attn_implementation="eager",
        )
    from fastlora.patch import protect_bnb_weights

    protect_bnb_weights(model)  # the reference model must not be repacked either
    return model


def lora_config(**kw):
    from peft import LoraConfig

    base = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    base.update(kw)
    return LoraConfig(**base)


def load_qlora(path, seed: int = 1, **lora_kw):
    """4-bit model + random LoRA (same seed -> identical adapters across loads)."""
    from peft import get_peft_model

    model = load_4bit(path)
    torch.manual_seed(seed)
    return get_peft_model(model, lora_config(**lora_kw))


def batch(seed: int = 0, B: int = 2, T: int = 12, masked: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    labels = ids.clone()
    if masked:
        labels[0, :4] = -100  # a prompt that is not trained on
    attn = torch.ones_like(ids)
    if masked and B > 1:
        labels[1, -3:] = -100  # right padding
        attn[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tokenizer():
    """A character-level tokenizer whose ids fit the tiny vocabulary (pad 0, bos 1, eos 2),
    with a chat template: what TRL's trainers need to tokenize text and messages."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    chars = list(" abcdefghijklmnopqrstuvwxyz0123456789.,?!:;'\"{}()[]_-+=/")
    vocab = {t: i for i, t in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=specials[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
