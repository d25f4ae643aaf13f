"""GPT-2's forward pass as the server runs it: a KV cache with one length per row.

`nanogpt_core.model.GPT` shares one position counter across a batch, which suits a batch
that starts and ends together. A server's batch changes between steps: a request joins
with its own prompt length and leaves when it is done. Here every cache row (a "slot")
has its own length, a prompt is prefilled into its slot on its own, and a decode step
advances every active slot by one token in a single batched forward pass.

Active slots are always 0..n_active-1. When a sequence leaves, the last active slot moves
into its place, so every step reads the cache through plain views and copies nothing. A
prompt is prefilled (in chunks, between decode steps) into one extra staging slot that
decode steps never touch, then copied into as many active slots as it has samples.

The weights are taken from a `GPT` once and laid out for matrix products with few rows.
On a CPU every linear layer, the output layer included, runs through oneDNN with its
weight reordered ahead of time for small batches (`torch.ops.mkldnn`, the kernels that
torch.compile uses on CPUs); elsewhere, or where torch lacks oneDNN, `addmm` on a
transposed copy does the same job. The output layer only covers the 50257 real
vocabulary rows, so a padded id can never come out.

Measured on a 2-core AMD EPYC with torch 2.13: an MLP matrix (3072 x 768) took 0.27 ms
for one row and 0.45 ms for eight through oneDNN's reordered weight, against 0.40 and
1.13 ms through MKL's `addmm`; the output layer took 5.5-8.5 ms for two to eight rows,
against 12-18 ms as `W @ x.T` and more through `F.linear`. A single row is sent through
the output layer twice, as a two-row product, which is faster than the one-row case there.
Where it measures faster when the model loads (with AVX2 kernels, and on some AVX-512
machines), one-row products instead go through MKL on the weights as the model holds them
(`plain_single_rows_faster` has the figures), at the cost of keeping both layouts of the linear
layers (the output layer's plain weight is the embedding table, kept anyway).

With `weights="int8"` every linear layer and the output layer hold int8 weights instead
(`serving.int8`): a quarter of the bytes to read per step. The embeddings stay in fp32,
since a step reads only one of their rows.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from nanogpt_core.model import GPT, GPT2_VOCAB_SIZE, GPTConfig
from serving.int8 import Int8Linear
from serving.settings import WEIGHT_FORMATS


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def plain_single_rows_faster(weights: list[torch.Tensor], batch_hint: int, rounds: int = 5) -> bool:
    """Whether one-row products run faster through MKL on the weights as the model holds them than
    through oneDNN's weights reordered for small batches, timed on `weights` (one block's matrices).

    It depends on the machine, so it is measured when the model loads (a few milliseconds).
    Decode steps timed whole: with AVX2 kernels (forced on a 2-vCPU Xeon, one thread) 97 ms
    through the reordered weights against 78 ms through `F.linear`; on a quiet 2-vCPU Xeon with
    AVX-512 (model 167, two threads) the 48 one-row products of the 124M shape took 17.4 ms
    reordered against 13.9 ms plain, while on another Xeon with AVX-512, under load, the two were
    level. At eight rows the reordered weights stay faster (162 against 193 ms with AVX2), so both
    layouts are kept when this is true. The two are timed in alternation, so that a neighbour's
    load falls on both.
    """
    cases = [(w.contiguous(), torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch_hint),
              torch.randn(1, w.size(1), dtype=w.dtype)) for w in weights]
    plain_s, reordered_s = [], []
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms both up and is not counted
            started = time.perf_counter()
            for plain, _, x in cases:
                F.linear(x, plain)
            plain_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            for _, reordered, x in cases:
                torch.ops.mkldnn._linear_pointwise(x, reordered, None, "none", [], "")
            reordered_s.append(time.perf_counter() - started)
    return statistics.median(plain_s[1:]) < statistics.median(reordered_s[1:])


class _Linear:
    """y = x @ W.T + b, optionally followed by GELU (tanh form), for inputs of a few rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, gelu: bool = False,
                 use_onednn: bool, batch_hint: int, plain_single_row: bool = False):
        weight = weight.detach()
        self.weight_numel, self.weight_itemsize = weight.numel(), weight.element_size()
        self.bias = bias.detach() if bias is not None else None
        self.gelu = gelu
        self.use_onednn = use_onednn
        # The (out, in) weight as the model holds it, for one-row products (no copy: a view).
        self.plain = weight.contiguous() if use_onednn and plain_single_row else None
        if use_onednn:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
        else:
            self.weight = weight.t().contiguous()  # (in, out): addmm reads it row by row

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if self.plain is not None and x.size(0) == 1:
            y = F.linear(x, self.plain, self.bias)
            return F.gelu(y, approximate="tanh") if self.gelu else y
        if self.use_onednn:
            if self.gelu:
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "tanh")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        y = torch.addmm(self.bias, x, self.weight) if self.bias is not None else torch.mm(x, self.weight)
        return F.gelu(y, approximate="tanh") if self.gelu else y

    @property
    def nbytes(self) -> int:
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.weight_numel * self.weight_itemsize + bias


@dataclass
class _LayerWeights:
    ln_1_weight: torch.Tensor
    ln_1_bias: torch.Tensor
    attn: _Linear | Int8Linear  # n_embd -> 3 * n_embd (q, k, v)
    attn_proj: _Linear | Int8Linear
    ln_2_weight: torch.Tensor
    ln_2_bias: torch.Tensor
    fc: _Linear | Int8Linear  # n_embd -> 4 * n_embd, GELU fused
    mlp_proj: _Linear | Int8Linear

    def linears(self) -> tuple[_Linear | Int8Linear, ...]:
        return self.attn, self.attn_proj, self.fc, self.mlp_proj


class BatchDecoder:
    """The model's weights plus a per-slot KV cache; not thread-safe (one engine thread owns it)."""

    def __init__(self, model: GPT, max_batch: int, max_len: int | None = None, *, use_onednn: bool | None = None,
                 weights: str = "fp32", plain_single_row: bool | None = None):
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, not {weights!r}")
        config: GPTConfig = model.config
        self.weights = weights
        self.config = config
        self.max_batch = max_batch
        self.max_len = min(max_len or config.block_size, config.block_size)
        self.n_embd = config.n_embd
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.vocab_size = min(GPT2_VOCAB_SIZE, config.vocab_size)
        t = model.transformer
        self.wte = t.wte.weight.detach()
        self.wpe = t.wpe.weight.detach()
        if use_onednn is None:
            use_onednn = onednn_available(self.wte.device, self.wte.dtype)
        self.use_onednn = use_onednn
        hint = max(2, max_batch)
        if plain_single_row is None:
            first = t.h[0]
            plain_single_row = use_onednn and weights == "fp32" and plain_single_rows_faster(
                [first.attn.c_attn.weight.detach(), first.attn.c_proj.weight.detach(),
                 first.mlp.c_fc.weight.detach(), first.mlp.c_proj.weight.detach()], hint)
        self.plain_single_row = plain_single_row

        def make(weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> _Linear | Int8Linear:
            if weights == "int8":
                return Int8Linear(weight, bias, gelu=gelu)
            return _Linear(weight, bias, gelu=gelu, use_onednn=use_onednn, batch_hint=hint,
                           plain_single_row=plain_single_row)

        def linear(layer: torch.nn.Linear, gelu: bool = False) -> _Linear | Int8Linear:
            return make(layer.weight, layer.bias, gelu)

        self.lm_head = make(model.lm_head.weight[: self.vocab_size], None)
        self.ln_f = (t.ln_f.weight.detach(), t.ln_f.bias.detach())
        self.eps = t.ln_f.eps
        self.layers = [
            _LayerWeights(
                ln_1_weight=b.ln_1.weight.detach(), ln_1_bias=b.ln_1.bias.detach(),
                attn=linear(b.attn.c_attn), attn_proj=linear(b.attn.c_proj),
                ln_2_weight=b.ln_2.weight.detach(), ln_2_bias=b.ln_2.bias.detach(),
                fc=linear(b.mlp.c_fc, gelu=True), mlp_proj=linear(b.mlp.c_proj),
            )
            for b in t.h
        ]
        dtype = self.wte.dtype
        shape = (config.n_layer, max_batch + 1, self.n_head, self.max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=self.wte.device)
        self.values = torch.zeros(shape, dtype=dtype, device=self.wte.device)
        self.lengths = [0] * (max_batch + 1)  # positions stored per slot
        self.staging_slot = max_batch
        self.n_active = 0

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights a decode step reads: every linear layer and the output layer once."""
        return sum(linear.nbytes for w in self.layers for linear in w.linears()) + self.lm_head.nbytes

    # --- slot bookkeeping -------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.n_active

    def allocate(self, copy_from: int | None = None) -> int:
        """A new slot at the end of the active range: empty, or holding `copy_from`'s cache."""
        if self.n_active >= self.max_batch:
            raise RuntimeError("no free slot")
        slot = self.n_active
        self.n_active += 1
        self.lengths[slot] = 0
        if copy_from is not None:
            self.copy_slot(copy_from, slot)
        return slot

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0

    def reset(self) -> None:
        """Forget every slot (after a failed step, when the cache's state is unknown)."""
        self.lengths = [0] * len(self.lengths)
        self.n_active = 0

    @torch.inference_mode()
    def copy_slot(self, src: int, dst: int) -> None:
        """Give `dst` the cached prompt of `src` (several samples of one prompt share a prefill)."""
        n = self.lengths[src]
        self.keys[:, dst, :, :n] = self.keys[:, src, :, :n]
        self.values[:, dst, :, :n] = self.values[:, src, :, :n]
        self.lengths[dst] = n

    def release(self, slot: int) -> int | None:
        """Free a slot; returns the slot that moved into its place (its old index), if any."""
        last = self.n_active - 1
        moved = None
        if slot != last:
            self.copy_slot(last, slot)
            moved = last
        self.lengths[last] = 0
        self.n_active -= 1
        return moved

    # --- forward passes ---------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int]) -> torch.Tensor:
        """Append `tokens` to a slot's cache; the logits after the last one, shape (vocab,)."""
        return self._logits(self._append(slot, tokens)[-1:])[0]

    @torch.inference_mode()
    def score(self, slot: int, tokens: list[int]) -> torch.Tensor:
        """As `prefill`, but the logits after every token, shape (len(tokens), vocab): for evaluation."""
        return self._logits(self._append(slot, tokens))

    def _append(self, slot: int, tokens: list[int]) -> torch.Tensor:
        """Run `tokens` through the layers into a slot's cache; the final hidden states (T, n_embd)."""
        start = self.lengths[slot]
        T = len(tokens)
        if start + T > self.max_len:
            raise ValueError(f"{start + T} positions exceed the cache length {self.max_len}")
        C, H, D = self.n_embd, self.n_head, self.head_dim
        idx = torch.tensor(tokens, dtype=torch.long, device=self.wte.device)
        x = self.wte[idx] + self.wpe[start:start + T]
        mask = None
        if start > 0:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        for layer, w in enumerate(self.layers):
            h = F.layer_norm(x, (C,), w.ln_1_weight, w.ln_1_bias, self.eps)
            q, k, v = w.attn(h).split(C, dim=1)
            q = q.view(T, H, D).transpose(0, 1)
            self.keys[layer, slot, :, start:start + T] = k.view(T, H, D).transpose(0, 1)
            self.values[layer, slot, :, start:start + T] = v.view(T, H, D).transpose(0, 1)
            keys = self.keys[layer, slot, :, :start + T]
            values = self.values[layer, slot, :, :start + T]
            y = F.scaled_dot_product_attention(q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                               attn_mask=mask, is_causal=mask is None)
            y = y.squeeze(0).transpose(0, 1).reshape(T, C)
            x = x + w.attn_proj(y)
            x = x + self._mlp(x, w)
        self.lengths[slot] = start + T
        return x

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token to each active slot (token i to slot i); logits (n_active, vocab)."""
        B = self.n_active
        if len(tokens) != B:
            raise ValueError(f"{len(tokens)} tokens for {B} active slots")
        lengths = self.lengths[:B]
        if max(lengths) >= self.max_len:
            raise ValueError("a slot's cache is full")
        C, H, D = self.n_embd, self.n_head, self.head_dim
        device = self.wte.device
        idx = torch.tensor(tokens, dtype=torch.long, device=device)
        pos = torch.tensor(lengths, dtype=torch.long, device=device)
        span = max(lengths) + 1
        x = self.wte[idx] + self.wpe[pos]
        mask = None
        if min(lengths) + 1 != span:  # rows of unequal length: hide each row's unused tail
            mask = torch.arange(span, device=device).unsqueeze(0) <= pos.unsqueeze(1)
            mask = mask.view(B, 1, 1, span)
        rows = torch.arange(B, device=device)
        for layer, w in enumerate(self.layers):
            h = F.layer_norm(x, (C,), w.ln_1_weight, w.ln_1_bias, self.eps)
            q, k, v = w.attn(h).split(C, dim=1)
            layer_keys, layer_values = self.keys[layer], self.values[layer]
            layer_keys[rows, :, pos] = k.view(B, H, D)
            layer_values[rows, :, pos] = v.view(B, H, D)
            y = F.scaled_dot_product_attention(q.view(B, H, 1, D), layer_keys[:B, :, :span],
                                               layer_values[:B, :, :span], attn_mask=mask)
            x = x + w.attn_proj(y.view(B, C))
            x = x + self._mlp(x, w)
        for i in range(B):
            self.lengths[i] += 1
        return self._logits(x)

    def _mlp(self, x: torch.Tensor, w: _LayerWeights) -> torch.Tensor:
        h = F.layer_norm(x, (self.n_embd,), w.ln_2_weight, w.ln_2_bias, self.eps)
        return w.mlp_proj(w.fc(h))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (self.n_embd,), self.ln_f[0], self.ln_f[1], self.eps)
        rows = x.size(0)
        if rows == 1 and isinstance(self.lm_head, _Linear) and self.lm_head.plain is None:
            # One row would be a matrix-vector product, which the libraries here run at
            # about half the speed of a two-row product; the duplicate row costs nothing.
            x = torch.cat([x, x])
        return self.lm_head(x)[:rows]
