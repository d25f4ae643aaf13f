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

The weights are taken from a `GPT` once and laid out for matrix products with few rows
(`serving.linear_layouts`): on a CPU, oneDNN's weights reordered ahead of time for small
batches serve products of several rows, and single rows go through whichever layout ran
fastest on this machine when the model loaded, chosen per role (every block's query/key/value
matrix, ..., the output layer). The output layer only covers the 50257 real vocabulary rows,
so a padded id can never come out.

With `weights="int8"` every linear layer and the output layer hold int8 weights instead
(`serving.int8`): a quarter of the bytes to read per step. The embeddings stay in fp32,
since a step reads only one of their rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from nanogpt_core.model import GPT, GPT2_VOCAB_SIZE, GPTConfig
from serving.int8 import Int8Linear
from serving.linear_layouts import FloatLinear, OneRowChoice, TimedLayouts, choose_one_row_layouts, onednn_available
from serving.settings import WEIGHT_FORMATS


@dataclass
class _LayerWeights:
    ln_1_weight: torch.Tensor
    ln_1_bias: torch.Tensor
    attn: FloatLinear | Int8Linear  # n_embd -> 3 * n_embd (q, k, v)
    attn_proj: FloatLinear | Int8Linear
    ln_2_weight: torch.Tensor
    ln_2_bias: torch.Tensor
    fc: FloatLinear | Int8Linear  # n_embd -> 4 * n_embd, GELU fused
    mlp_proj: FloatLinear | Int8Linear

    def linears(self) -> tuple[FloatLinear | Int8Linear, ...]:
        return self.attn, self.attn_proj, self.fc, self.mlp_proj


@dataclass(frozen=True)
class SavedCache:
    """A slot's keys and values, copied out of the cache (all layers, its `length` positions)."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class BatchDecoder:
    """The model's weights plus a per-slot KV cache; not thread-safe (one engine thread owns it)."""

    def __init__(self, model: GPT, max_batch: int, max_len: int | None = None, *, use_onednn: bool | None = None,
                 weights: str = "fp32", one_row: str | Mapping[str, str] | None = None,
                 timed_before: TimedLayouts | None = None):
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

        def make(weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> FloatLinear | Int8Linear:
            if weights == "int8":
                return Int8Linear(weight, bias, gelu=gelu)
            return FloatLinear(weight, bias, gelu=gelu, use_onednn=use_onednn, batch_hint=hint)

        def linear(layer: torch.nn.Linear, gelu: bool = False) -> FloatLinear | Int8Linear:
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
        self.one_row_choices: dict[str, OneRowChoice] = {}  # with the timings, where they were timed
        self.one_row_layouts: dict[str, str] = {}  # role -> layout for single rows (fp32 only)
        # The timed choice (this decoder's, or `timed_before` where the shapes matched); None where
        # the layouts were named rather than timed.
        self.timed_layouts: TimedLayouts | None = None
        if weights == "fp32":
            self._choose_one_row_layouts(model, one_row, timed_before)
        dtype = self.wte.dtype
        shape = (config.n_layer, max_batch + 1, self.n_head, self.max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=self.wte.device)
        self.values = torch.zeros(shape, dtype=dtype, device=self.wte.device)
        self.lengths = [0] * (max_batch + 1)  # positions stored per slot
        self.staging_slot = max_batch
        self.n_active = 0

    @property
    def reused_timed_layouts(self) -> bool:
        """Whether the single-row layouts came from `timed_before` rather than from timing here."""
        return self.timed_layouts is not None and not self.one_row_choices

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights a decode step reads: every linear layer and the output layer once."""
        return sum(linear.nbytes for w in self.layers for linear in w.linears()) + self.lm_head.nbytes

    def _choose_one_row_layouts(self, model: GPT, one_row: str | Mapping[str, str] | None,
                                timed_before: TimedLayouts | None) -> None:
        """Give each role's matrices their layout for single rows: the fastest when timed here
        (on a CPU, when `one_row` is None; `timed_before` instead, when it was timed on matrices
        of the same shapes), or the one `one_row` names (for every role, or by role)."""
        blocks = model.transformer.h
        roles = {
            "attn": [(b.attn.c_attn.weight, w.attn) for b, w in zip(blocks, self.layers)],
            "attn_proj": [(b.attn.c_proj.weight, w.attn_proj) for b, w in zip(blocks, self.layers)],
            "fc": [(b.mlp.c_fc.weight, w.fc) for b, w in zip(blocks, self.layers)],
            "mlp_proj": [(b.mlp.c_proj.weight, w.mlp_proj) for b, w in zip(blocks, self.layers)],
            "lm_head": [(model.lm_head.weight[: self.vocab_size], self.lm_head)],
        }
        shapes = {role: tuple(matrices[0][0].shape) for role, matrices in roles.items() if matrices}
        timed = one_row is None and self.wte.device.type == "cpu"
        # (on an accelerator every role keeps its batch layout: nothing to time on asynchronous kernels)
        if timed and timed_before is not None and timed_before.fits(shapes):
            layouts = dict(timed_before.layouts)
        elif timed:
            self.one_row_choices = choose_one_row_layouts(roles)
            layouts = {role: choice.layout for role, choice in self.one_row_choices.items()}
        elif one_row is None:
            layouts = {}
        elif isinstance(one_row, str):
            layouts = dict.fromkeys(roles, one_row)
        else:
            unknown = set(one_row) - set(roles)
            if unknown:
                raise ValueError(f"no matrices with the role {', '.join(sorted(unknown))}; "
                                 f"the roles are {', '.join(roles)}")
            layouts = dict(one_row)
        for role, layout in layouts.items():
            for weight, linear in roles[role]:
                linear.use_for_one_row(layout, weight)
        self.one_row_layouts = {role: matrices[0][1].one_row_layout for role, matrices in roles.items() if matrices}
        if timed:
            self.timed_layouts = TimedLayouts(shapes=shapes, layouts=dict(self.one_row_layouts))

    # --- slot bookkeeping -------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.n_active

    def allocate(self, copy_from: int | None = None, length: int | None = None) -> int:
        """A new slot at the end of the active range: empty, or holding `copy_from`'s cache (its
        first `length` positions, when given)."""
        if self.n_active >= self.max_batch:
            raise RuntimeError("no free slot")
        slot = self.n_active
        self.n_active += 1
        self.lengths[slot] = 0
        if copy_from is not None:
            self.copy_slot(copy_from, slot, length)
        return slot

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0

    def reset(self) -> None:
        """Forget every slot (after a failed step, when the cache's state is unknown)."""
        self.lengths = [0] * len(self.lengths)
        self.n_active = 0

    @torch.inference_mode()
    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """Give `dst` the cache of `src`, or its first `length` positions: several samples of one
        prompt share a prefill, also when some start later than others."""
        n = self.lengths[src] if length is None else length
        if n > self.lengths[src]:
            raise ValueError(f"slot {src} holds {self.lengths[src]} positions, not {n}")
        self.keys[:, dst, :, :n] = self.keys[:, src, :, :n]
        self.values[:, dst, :, :n] = self.values[:, src, :, :n]
        self.lengths[dst] = n

    @torch.inference_mode()
    def save(self, slot: int) -> SavedCache:
        """A copy of a slot's cache, to set aside while the slot serves something else."""
        n = self.lengths[slot]
        return SavedCache(self.keys[:, slot, :, :n].clone(), self.values[:, slot, :, :n].clone(), n)

    @torch.inference_mode()
    def restore(self, slot: int, saved: SavedCache) -> None:
        """Put a saved cache back into a slot, exactly as it was."""
        self.keys[:, slot, :, :saved.length] = saved.keys
        self.values[:, slot, :, :saved.length] = saved.values
        self.lengths[slot] = saved.length

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
        return self.lm_head(x)
