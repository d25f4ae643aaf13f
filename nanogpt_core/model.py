"""GPT-2 in one file.

The module and parameter names follow OpenAI's GPT-2 (`wte`, `wpe`, `h`, `ln_f`, `c_attn`,
`c_proj`, `c_fc`) so that weights map one-to-one onto the Hugging Face `GPT2LMHeadModel`.
Besides the training forward pass there is a cached forward pass for inference: it keeps
the keys and values of earlier positions so that each new token costs one position's work.
The same forward pass also takes explicit positions and an attention mask, for callers that
pack several sequences into one row (HellaSwag scoring packs a context and its four endings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanogpt_core.losses import linear_cross_entropy
from nanogpt_core.optim import Muon, OptimizerPair

# GPT-2's vocabulary is 50257 tokens; padding it to a multiple of 128 makes the output
# layer's matmuls run on friendlier shapes. The extra rows are never targets and learn to
# produce very low logits.
GPT2_VOCAB_SIZE = 50257
PADDED_VOCAB_SIZE = 50304


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position table covers
    vocab_size: int = PADDED_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # GPT-2 pretraining used none; fine-tuning may want some

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class KVCache:
    """Keys and values of the positions seen so far, for every layer, preallocated.

    All rows of the batch share one position counter: the cache serves a batch that was
    prefilled together and then decodes one token per row per step.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        max_len = max_len or config.block_size
        if max_len > config.block_size:
            raise ValueError(f"cache length {max_len} exceeds block_size {config.block_size}")
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions already stored
        self.max_len = max_len

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values for one layer; return all keys/values so far."""
        end = self.pos + k.size(2)
        self.keys[layer, :, :, self.pos:end] = k
        self.values[layer, :, :, self.pos:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n_positions: int) -> None:
        self.pos += n_positions


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        mask, is_causal = None, True
        if attn_mask is not None:
            mask, is_causal = attn_mask, False
        elif kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.store(layer, k, v)
            if past > 0:
                # Query i sits at absolute position past + i and may see keys 0..past + i.
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return F.dropout(self.c_proj(y), dropout_p, self.training)


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.c_proj(self.gelu(self.c_fc(x))), self.dropout, self.training)


class Block(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer, attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_PROJECTION", False):
                # Each block adds two projections to the residual stream; scaling their init
                # keeps the stream's variance from growing with depth (GPT-2 paper, sec. 2.3).
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, exclude_position_embeddings: bool = False) -> int:
        """Parameter count, the tied embedding counted once (as OpenAI's 124M figure does)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_position_embeddings:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, return_logits: bool = True,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy when targets are given.

        Targets equal to -1 are ignored by the loss (masked prompt tokens, padding).
        With `return_logits=False` the loss is computed without ever materialising the
        full (B, T, vocab) logits tensor, which is what training wants.
        `positions` and `attn_mask` are as in `hidden_states`.
        """
        x = self.hidden_states(idx, kv_cache=kv_cache, positions=positions, attn_mask=attn_mask)
        if targets is not None and not return_logits:
            return None, linear_cross_entropy(x, self.lm_head.weight, targets)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx: torch.Tensor, *, kv_cache: KVCache | None = None,
                      positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                      ) -> torch.Tensor:
        """The final layer norm's output (B, T, n_embd): what the output layer reads.

        By default token t of every row sits at position t (after the positions the cache
        holds) and attends causally to the tokens before it. A caller that packs several
        sequences into one row says otherwise with `positions` (B, T), each token's index
        into the position table, and `attn_mask` (B, 1, T, T), True where a query may attend
        to a key; every query must be allowed at least one key, or its softmax is NaN. The
        two go together and do not combine with a cache.
        """
        B, T = idx.size()
        if (positions is None) != (attn_mask is None):
            raise ValueError("positions and attn_mask must be given together")
        if positions is None:
            start = kv_cache.pos if kv_cache is not None else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        else:
            if kv_cache is not None:
                raise ValueError("explicit positions and attn_mask do not combine with a kv_cache")
            pos = positions
            if pos.shape != idx.shape:
                raise ValueError(f"positions must have the shape of idx {tuple(idx.shape)}, got {tuple(pos.shape)}")
            if pos.numel() and int(pos.max()) >= self.config.block_size:
                raise ValueError(f"position {int(pos.max())} exceeds block_size {self.config.block_size}")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # Given a boolean mask, attention would turn it into an additive one in every layer;
            # once per forward pass is enough.
            attn_mask = torch.zeros(attn_mask.shape, dtype=x.dtype, device=x.device).masked_fill_(
                ~attn_mask.to(x.device), float("-inf"))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer, attn_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.transformer.ln_f(x)

    def configure_optimizer(self, weight_decay: float, learning_rate: float, device_type: str,
                            muon_lr: float = 0.0) -> torch.optim.AdamW | OptimizerPair:
        """AdamW as GPT-2 / nanoGPT set it up: decay matrices and embeddings, not biases or norms.

        With a `muon_lr` above zero, the weight matrices inside the blocks go to Muon at that peak rate instead
        (each parameter group's `lr_scale` tells the schedule so); AdamW keeps the embeddings, the
        output layer they are tied to, the biases and the norms.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        in_blocks = {id(p) for p in self.transformer.h.parameters()}
        to_muon = [p for p in params if muon_lr and p.dim() == 2 and id(p) in in_blocks]
        muon_ids = {id(p) for p in to_muon}
        to_adamw = [p for p in params if id(p) not in muon_ids]
        groups = [
            {"params": [p for p in to_adamw if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in to_adamw if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel does the whole update in one pass per tensor: on a 2-core CPU it is
        # 5-7x faster than the default per-op loop, and on CUDA it saves kernel launches.
        fused = device_type in ("cpu", "cuda")
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)
        if not to_muon:
            return adamw
        muon = Muon(to_muon, lr=muon_lr, weight_decay=weight_decay)
        muon.param_groups[0]["lr_scale"] = muon_lr / learning_rate
        return OptimizerPair(adamw, muon)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B."""
        cfg = self.config
        n = self.num_params(exclude_position_embeddings=True)
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, vocab_limit: int = GPT2_VOCAB_SIZE,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations with the KV cache; temperature 0 means greedy decoding."""
        B, T = idx.size()
        cache = KVCache(self.config, B, min(self.config.block_size, T + max_new_tokens),
                        device=idx.device, dtype=self.lm_head.weight.dtype)
        logits, _ = self(idx, kv_cache=cache)
        out = idx
        for step in range(max_new_tokens):
            next_logits = logits[:, -1, :vocab_limit].float()  # padded rows are never sampled
            if temperature == 0:
                next_token = next_logits.argmax(dim=-1, keepdim=True)
            else:
                next_logits = next_logits / temperature
                if top_k is not None:
                    kth = torch.topk(next_logits, min(top_k, vocab_limit)).values[:, -1:]
                    next_logits = next_logits.masked_fill(next_logits < kth, -math.inf)
                probs = F.softmax(next_logits, dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator)
            out = torch.cat([out, next_token], dim=1)
            if step + 1 < max_new_tokens and cache.pos < cache.max_len:
                logits, _ = self(next_token, kv_cache=cache)
            elif step + 1 < max_new_tokens:
                raise ValueError(f"generation would exceed block_size {self.config.block_size}")
        return out
