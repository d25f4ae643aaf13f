"""Weights and model config between the project's GPT and transformers' GPT2LMHeadModel.

The parameter names are GPT-2's on both sides; two things differ. `transformers` keeps the
projections in `Conv1D` layers, whose weight is the transpose of an `nn.Linear` weight; and
its vocabulary has 50257 rows where ours is padded to 50304. Export drops the padding rows.
Import fills them with the mean of the real rows: their logit is then the mean of the real
logits, which (exp being convex) leaves all 47 together at most 47/50304 of the probability,
where zero rows would take a logit of 0, far above what GPT-2 gives most tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from nanogpt_core.hf.files import HFFormatError
from nanogpt_core.model import GPT2_VOCAB_SIZE, GPTConfig, PADDED_VOCAB_SIZE
from nanogpt_core.tokenizer import EOT_TOKEN

# transformers' GPT-2 stores these as Conv1D weights: (in, out), the transpose of ours.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WTE = "transformer.wte.weight"
LM_HEAD = "lm_head.weight"
# Attention-mask buffers that older transformers versions saved with the weights.
_MASK_BUFFER = re.compile(r"\.attn\.(masked_)?bias$")
# Our blocks use nn.LayerNorm's default epsilon and the tanh GELU; both must match to import.
_LAYER_NORM_EPS = 1e-5
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in GPT2LMHeadModel's layout: Conv1D weights transposed, padding rows
    dropped, the tied lm_head left out (transformers ties it back on load)."""
    hf = {}
    for name, tensor in state.items():
        if name == LM_HEAD:
            continue
        tensor = tensor.detach().cpu().float()  # config.json says float32
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        elif name == WTE:
            tensor = tensor[:GPT2_VOCAB_SIZE]
        hf[name] = tensor.contiguous().clone()  # safetensors refuses tensors that share memory
    return hf


def from_hf_state_dict(hf: Mapping[str, torch.Tensor], vocab_size: int = PADDED_VOCAB_SIZE,
                       ) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict from transformers (GPT2LMHeadModel or bare GPT2Model key names) in
    our layout, float32, with the embedding padded to `vocab_size` rows by their mean."""
    ours: dict[str, torch.Tensor] = {}
    head = None
    for name, tensor in hf.items():
        if _MASK_BUFFER.search(name):
            continue
        if name == LM_HEAD:
            head = tensor
            continue
        if not name.startswith("transformer."):
            name = "transformer." + name
        tensor = tensor.detach().cpu().float()
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        ours[name] = tensor.contiguous()
    if WTE not in ours:
        raise HFFormatError("the weights hold no token embedding (wte.weight); is this a GPT-2 model?")
    wte = ours[WTE]
    if head is not None and not torch.equal(head.detach().cpu().float(), wte):
        raise HFFormatError("lm_head.weight differs from the token embedding; this model ties the two, "
                            "so an untied output layer cannot be imported")
    if not GPT2_VOCAB_SIZE <= wte.size(0) <= vocab_size:
        raise HFFormatError(f"the embedding has {wte.size(0)} rows; GPT-2's tokenizer needs {GPT2_VOCAB_SIZE} "
                            f"(at most {vocab_size} with padding)")
    padding = wte[:GPT2_VOCAB_SIZE].mean(dim=0, keepdim=True).expand(vocab_size - wte.size(0), -1)
    ours[WTE] = torch.cat([wte, padding])
    ours[LM_HEAD] = ours[WTE]
    return ours


def gpt_config_from_hf(config: Mapping[str, Any], source: str = "config.json") -> GPTConfig:
    """Our model config for a transformers GPT-2 config, refusing what our model cannot represent."""
    if config.get("model_type") != "gpt2":
        raise HFFormatError(f"{source}: model_type is {config.get('model_type')!r}; only GPT-2 ('gpt2') "
                            f"folders can be imported")
    n_embd = config.get("n_embd", 768)
    problems = []
    if config.get("activation_function", "gelu_new") not in _TANH_GELUS:
        problems.append(f"activation_function {config['activation_function']!r} (ours is the tanh GELU)")
    if config.get("layer_norm_epsilon", _LAYER_NORM_EPS) != _LAYER_NORM_EPS:
        problems.append(f"layer_norm_epsilon {config['layer_norm_epsilon']} (ours is {_LAYER_NORM_EPS})")
    if config.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner {config['n_inner']} (ours is 4 x n_embd = {4 * n_embd})")
    if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("attention scaled other than by 1/sqrt(head size)")
    if problems:
        raise HFFormatError(f"{source}: this GPT-2 variant differs from the project's model: " + "; ".join(problems))
    vocab = config.get("vocab_size", GPT2_VOCAB_SIZE)
    try:
        # Dropout is a training choice; fine-tuning sets its own.
        return GPTConfig(block_size=config.get("n_positions", 1024), vocab_size=max(vocab, PADDED_VOCAB_SIZE),
                         n_layer=config.get("n_layer", 12), n_head=config.get("n_head", 12), n_embd=n_embd)
    except ValueError as e:
        raise HFFormatError(f"{source}: {e}") from e


def hf_config(config: GPTConfig) -> dict[str, Any]:
    """config.json for GPT2LMHeadModel, in the fields OpenAI's gpt2 folder uses."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": GPT2_VOCAB_SIZE,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": _LAYER_NORM_EPS,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "torch_dtype": "float32",
    }


def generation_config() -> dict[str, Any]:
    # pad = eos, as for OpenAI's GPT-2, which has no padding token of its own.
    return {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN, "pad_token_id": EOT_TOKEN}
