"""How the fp32 server lays out its weight matrices, and which layout serves single rows.

A decode step multiplies a few rows (one per stream) by every weight matrix once, a prefill
hundreds of rows. Which kernel and weight layout is fastest depends on the number of rows and
on the CPU, and no one layout wins everywhere (figures in docs/BENCHMARKS.md, "Serving"):

  "onednn-batch"    oneDNN's weight reordered ahead of time for a small batch (`batch_hint` rows;
                    the kernels torch.compile uses on CPUs)
  "onednn-one-row"  the same, reordered for a single row
  "plain"           the (out, in) weight as the model holds it, through `F.linear` (MKL)
  "transposed"      an (in, out) copy, through `addmm`

On a 2-vCPU Xeon with AVX-512, streaming the 124M shape's weights from memory one row at a
time, "transposed" ran every matrix fastest (16 ms for all 49 products, against 19 ms for
"onednn-batch" and 21-25 ms for "plain"); at eight rows "onednn-batch" was the fastest (23 ms,
against 31 transposed and 60 plain), and at 256 rows too (178 ms, against 204 and 246). On a
2-vCPU AMD EPYC (Zen 3), the output layer's one-row product was fastest as "onednn-one-row"
(9.9 ms, against 11.7 transposed, 12.5 batch, 15.9 plain). On a 2-vCPU Zen 4 EPYC,
"onednn-one-row" won most roles, "transposed" now and then the output layer, and "plain" ran
at about half their speed (the output layer 13-17 ms against 7-8).

So every matrix keeps its batch layout ("onednn-batch", or "transposed" where torch has no
oneDNN) for products of several rows, and single rows go through whichever layout ran the
fastest when the model loaded (`choose_one_row_layouts`), timed role by role (every block's
query/key/value matrix, every MLP input matrix, ..., the output layer), keeping the batch
layout unless another is at least 3% faster. A one-row layout other than the batch layout
costs a second copy of those matrices ("plain" keeps the model's own weights alive); the
server's `--single-row-layout` fixes one layout for every role instead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from serving.settings import FLOAT_LAYOUTS

Layout = str  # one of LAYOUTS
LAYOUTS: tuple[Layout, ...] = FLOAT_LAYOUTS
ONEDNN_LAYOUTS: tuple[Layout, ...] = ("onednn-batch", "onednn-one-row")

# Time a role over enough of its matrices that they come from memory, as in a decode step,
# rather than from a cache that one matrix timed over and over would sit in.
TIMED_BYTES = 64 * 2**20
# How much faster than the batch layout another layout must be to be worth a second copy.
SECOND_COPY_MARGIN = 0.03


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def check_layout(layout: str, use_onednn: bool) -> Layout:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; the layouts are {', '.join(LAYOUTS)}")
    if layout in ONEDNN_LAYOUTS and not use_onednn:
        raise ValueError(f"weight layout {layout!r} needs oneDNN, which this decoder does not use")
    return layout


def prepare(layout: Layout, weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
    """The (out, in) `weight` laid out for `layout`'s kernel."""
    weight = weight.detach().contiguous()
    if layout == "onednn-batch":
        return torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
    if layout == "onednn-one-row":
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    if layout == "transposed":
        return weight.t().contiguous()
    return weight  # plain: a view of the model's own weight, no copy


def multiply(layout: Layout, prepared: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
             gelu: bool = False) -> torch.Tensor:
    """x @ W.T + bias through `layout`'s kernel, optionally followed by GELU (tanh form)."""
    if layout in ONEDNN_LAYOUTS:  # GELU fused into the product
        return torch.ops.mkldnn._linear_pointwise(x, prepared, bias, "gelu" if gelu else "none", [],
                                                  "tanh" if gelu else "")
    if layout == "plain":
        y = F.linear(x, prepared, bias)
    else:
        y = torch.addmm(bias, x, prepared) if bias is not None else torch.mm(x, prepared)
    return F.gelu(y, approximate="tanh") if gelu else y


class FloatLinear:
    """y = x @ W.T + b (optionally then GELU) for fp32 inputs of any number of rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, gelu: bool = False,
                 use_onednn: bool, batch_hint: int):
        weight = weight.detach()
        self.weight_numel, self.weight_itemsize = weight.numel(), weight.element_size()
        self.bias = bias.detach() if bias is not None else None
        self.gelu = gelu
        self.use_onednn = use_onednn
        self.batch_hint = batch_hint
        self.batch_layout: Layout = "onednn-batch" if use_onednn else "transposed"
        self.batch_weight = prepare(self.batch_layout, weight, batch_hint)
        self.one_row_layout: Layout = self.batch_layout
        self.one_row_weight = self.batch_weight

    def use_for_one_row(self, layout: str, weight: torch.Tensor) -> None:
        """Send single rows through `layout`, prepared from `weight` (the one given at construction)."""
        layout = check_layout(layout, self.use_onednn)
        self.one_row_layout = layout
        self.one_row_weight = self.batch_weight if layout == self.batch_layout else prepare(
            layout, weight, self.batch_hint)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if x.size(0) == 1:
            return multiply(self.one_row_layout, self.one_row_weight, x, self.bias, self.gelu)
        return multiply(self.batch_layout, self.batch_weight, x, self.bias, self.gelu)

    @property
    def nbytes(self) -> int:
        """Bytes of weight (and bias) one product reads."""
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.weight_numel * self.weight_itemsize + bias


@dataclass(frozen=True)
class OneRowChoice:
    """The layout chosen for one role's single rows, and each candidate's time per matrix (ms)."""
    layout: Layout
    ms_per_matrix: dict[str, float]


@dataclass(frozen=True)
class TimedLayouts:
    """The single-row layouts a decoder chose by timing, with the shape of each role's matrices.

    Which layout is fastest depends on the CPU and the shapes, not on the weights' values, so a
    server swapping in a model of the same shape takes the previous model's choice instead of
    timing again: a swap saves the second or so of timing, and keeps the choice made on a quiet
    machine rather than one made while the old model is still serving traffic.
    """
    shapes: Mapping[str, tuple[int, ...]]
    layouts: Mapping[str, str]

    def fits(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        return dict(self.shapes) == dict(shapes)


def one_row_candidates(use_onednn: bool) -> tuple[Layout, ...]:
    return LAYOUTS if use_onednn else ("transposed", "plain")


def pick_layout(ms_per_matrix: Mapping[str, float], batch_layout: str) -> Layout:
    """The fastest layout, unless the batch layout is within SECOND_COPY_MARGIN of it: a second
    copy of the weights must buy a clear gain, and a near tie should not flip between loads."""
    fastest = min(ms_per_matrix, key=ms_per_matrix.__getitem__)
    if ms_per_matrix[batch_layout] <= ms_per_matrix[fastest] * (1 + SECOND_COPY_MARGIN):
        return batch_layout
    return fastest


def choose_one_row_layouts(roles: Mapping[str, Sequence[tuple[torch.Tensor, FloatLinear]]], *,
                           rounds: int = 5, timed_bytes: int = TIMED_BYTES) -> dict[str, OneRowChoice]:
    """Time every candidate layout on single rows, role by role, and pick the fastest for each
    (the batch layout when it is within SECOND_COPY_MARGIN of the fastest: see `pick_layout`).

    `roles` maps a role's name to its matrices, each as (the (out, in) weight, its FloatLinear).
    Each candidate runs over as many of a role's matrices as make up `timed_bytes` (all of them
    if they are fewer), one after the other. The candidates' extra copies live only while their
    role is timed. About a second for the 124M shape, copies included. The winner's copies are
    not kept for reuse on purpose: made afresh once the others are freed, they left the 124M
    decoder's resident memory 1.50 GB in three loads, against 1.52-1.64 GB when kept (the heap
    keeps the holes between interleaved copies), for 0.2 s more load time.
    """
    choices: dict[str, OneRowChoice] = {}
    for role, matrices in roles.items():
        if not matrices:
            continue
        timed = _enough_matrices(matrices, timed_bytes)
        batch_layout = timed[0][1].batch_layout
        ms = _ms_per_matrix(timed, one_row_candidates(timed[0][1].use_onednn), rounds)
        choices[role] = OneRowChoice(layout=pick_layout(ms, batch_layout), ms_per_matrix=ms)
    return choices


def _enough_matrices(matrices: Sequence[tuple[torch.Tensor, FloatLinear]],
                     timed_bytes: int) -> list[tuple[torch.Tensor, FloatLinear]]:
    """The first of `matrices` that together hold at least `timed_bytes` (or all of them)."""
    timed, size = [], 0
    for weight, linear in matrices:
        timed.append((weight, linear))
        size += linear.nbytes
        if size >= timed_bytes:
            break
    return timed


def _ms_per_matrix(timed: list[tuple[torch.Tensor, FloatLinear]], candidates: tuple[Layout, ...],
                   rounds: int) -> dict[str, float]:
    """Median milliseconds per one-row product through each candidate layout over `timed`.

    Rounds rotate the order of the candidates, so that a neighbour's load falls on all of them
    alike; the first round warms every kernel up and is not counted.
    """
    prepared = {layout: [linear.batch_weight if layout == linear.batch_layout
                         else prepare(layout, weight, linear.batch_hint) for weight, linear in timed]
                for layout in candidates}
    rows = [torch.randn(1, weight.size(1), dtype=weight.dtype) for weight, _ in timed]
    seconds: dict[str, list[float]] = {layout: [] for layout in candidates}
    with torch.inference_mode():
        for round_ in range(rounds + 1):
            order = candidates[round_ % len(candidates):] + candidates[:round_ % len(candidates)]
            for layout in order:
                started = time.perf_counter()
                for (_, linear), weight, x in zip(timed, prepared[layout], rows):
                    multiply(layout, weight, x, linear.bias, linear.gelu)
                if round_:
                    seconds[layout].append(time.perf_counter() - started)
    return {layout: 1000 * statistics.median(s) / len(timed) for layout, s in seconds.items()}
