"""HellaSwag: four-way sentence completion, scored the way build-nanogpt scores it.

    python -m nanogpt_core.eval.hellaswag --checkpoint PATH [--data FILE] [--limit N] [--batch-size N] [--json]
    torchrun --standalone --nproc_per_node=2 -m nanogpt_core.eval.hellaswag --checkpoint PATH --data FILE

Where the examples come from (`--data`):
  FILE                   JSON lines, plain or gzipped, with `ctx`, `endings` and `label` on
                         every line: rowanz/hellaswag's `hellaswag_val.jsonl` as published,
                         or a stripped copy of it with only those fields (and `idx`)
  hf:Rowan/hellaswag     the Hugging Face copy, through `datasets.load_dataset`
  (none)                 the original file, downloaded once from the rowanz/hellaswag
                         repository into $NANOGPT_CACHE_DIR (else ~/.cache/nanogpt-pipeline)
  --benchmark demo-cloze an offline cloze set from the demo corpus (see eval/cloze.py),
                         always reported under that name, never as HellaSwag

Scoring. The model reads encode(ctx) followed by encode(" " + ending), and an ending's score
is its cross-entropy summed over the ending's tokens only. Of the four endings, the pick is
the one with
  acc            the lowest summed loss,
  acc_norm       the lowest loss per ending token (build-nanogpt's normalisation),
  acc_char_norm  the lowest loss per character of the ending (lm-eval-harness's).
Losses are taken over GPT-2's 50,257 real tokens. The model's output layer has 50,304 rows
(padded for faster matmuls); admitting the padding rows to the softmax would shift every
loss, and with weights converted from OpenAI's GPT-2, whose logits sit far below zero, the
zero-logit padding rows would swamp them.

Why GPT-2 124M scores 0.2955 acc_norm here and 0.3114 in lm-eval-harness. Two things differ:
  - The normalisation. A token count depends on how the tokenizer happens to split an
    ending's words, and the per-token mean moves with it. The harness divides the
    log-likelihood by the length of the ending string instead, `len(choice)` without the
    joining space: characters, which equal bytes for all but about 0.5% of HellaSwag's
    endings. acc_char_norm applies that rule to the same losses.
  - The prompt. The harness does not score `ctx` as it stands: it builds
    "{activity_label}: {ctx_a} {ctx_b.capitalize()}", then removes WikiHow's bracketed
    markers ("[header]", "[step]", with " [title]" turned into ". ") and doubled spaces from
    the context and from every ending before scoring " " + ending. build-nanogpt, and this
    module, keep `ctx` and the endings exactly as the file has them.
So acc_char_norm isolates the first difference only, and on the raw file it is not expected
to reproduce the harness's number exactly.

Speed. build-nanogpt runs one forward pass per example over four rows, context plus ending,
padded to the longest: the context is computed four times, the padding is computed too, and
the 50,304-wide output layer runs at every position. Here each example becomes one packed
row: the context once, then each ending without its last token. An attention mask lets each
ending see the context and its own earlier tokens but not the other endings, and each
ending's positions restart where the context ends, so every hidden state is the one the
model computes for that ending alone. Many rows go through the model together, sorted by
length so that little padding is needed, and the output layer runs only at positions whose
next token is an ending token (the context's last position once, shared by all endings).
The losses equal the one-example-at-a-time method's up to float rounding; tests hold the two
to the same picks.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.nn import functional as F

from nanogpt_core.checkpoint import CheckpointError, load_checkpoint, unwrap_model
from nanogpt_core.distributed import DistContext, gather_to_all, setup_distributed, teardown_distributed
from nanogpt_core.losses import CHUNK_ROWS
from nanogpt_core.model import GPT, GPT2_VOCAB_SIZE
from nanogpt_core.tokenizer import cache_dir

BENCHMARK = "hellaswag"
BENCHMARKS = ("hellaswag", "demo-cloze")
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_FILENAME = "hellaswag_val.jsonl"
HF_PREFIX = "hf:"
HF_DATASET = "Rowan/hellaswag"
DOWNLOAD_TIMEOUT_S = 30.0
# Examples per forward pass. One example's packed row (90 to 160 tokens on HellaSwag) gives
# a CPU's matmuls too few rows to run at full speed; 16 examples give them 1,500 or more.
DEFAULT_BATCH_SIZE = 16
GZIP_MAGIC = b"\x1f\x8b"
SCORING = ("build-nanogpt: tokens encode(ctx) + encode(' ' + ending), cross-entropy summed over the "
           "ending's tokens; acc_norm per token, acc_char_norm per character of the ending (lm-eval-harness)")


class EvalDataError(ValueError):
    """A benchmark file that cannot be used; the message names the file, and the line where there is one."""


class EvalDataUnavailableError(RuntimeError):
    """No copy of the benchmark could be reached; the message says how to provide one."""


@dataclass(frozen=True)
class Example:
    ctx: str
    endings: tuple[str, ...]
    label: int  # index of the true ending
    id: str  # the record's own index where it has one, else its line


@dataclass(frozen=True)
class EvalData:
    benchmark: str
    examples: list[Example]
    source: str  # file path, URL or hub name: what a report shows as `data`
    file_sha256: str | None = None


# ---------------------------------------------------------------------------------------------
# Loading


def example_from_record(record: Any, where: str) -> Example:
    """One example from a HellaSwag-shaped record; `where` (file:line) prefixes any error."""
    if not isinstance(record, dict):
        raise EvalDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("ctx", "endings", "label") if key not in record]
    if missing:
        raise EvalDataError(f"{where}: missing field(s) {', '.join(missing)}")
    ctx, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise EvalDataError(f"{where}: ctx must be a non-empty string")
    if (not isinstance(endings, list) or len(endings) < 2
            or not all(isinstance(e, str) and e.strip() for e in endings)):
        raise EvalDataError(f"{where}: endings must be a list of at least two non-empty strings")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)  # the Hugging Face copy stores labels as strings
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        hint = " (the test split has no labels)" if label == "" else ""
        raise EvalDataError(f"{where}: label must be an index into the {len(endings)} endings, got {label!r}{hint}")
    record_id = next((record[key] for key in ("ind", "idx", "id") if key in record), where)
    return Example(ctx=ctx, endings=tuple(endings), label=label, id=str(record_id))


def read_examples_file(path: str | Path) -> EvalData:
    """Examples from a JSON-lines file, gzipped or not. A `benchmark` field names a non-HellaSwag set."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file")
    examples, names = [], set()
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise EvalDataError(f"{where}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                examples.append(example_from_record(record, where))
                name = record.get("benchmark", BENCHMARK)
                if name not in BENCHMARKS:
                    raise EvalDataError(f"{where}: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
                names.add(name)
    except (OSError, EOFError) as e:  # gzip reports damage as BadGzipFile (an OSError) or EOFError
        raise EvalDataError(f"{path}: cannot be read after line {lineno} ({e})") from None
    if not examples:
        raise EvalDataError(f"{path}: holds no examples")
    if len(names) > 1:
        raise EvalDataError(f"{path}: mixes examples of several benchmarks ({', '.join(sorted(names))})")
    return EvalData(benchmark=names.pop(), examples=examples, source=str(path), file_sha256=file_sha256(path))


@contextlib.contextmanager
def _open_binary(path: Path) -> Iterator[BinaryIO]:
    with open(path, "rb") as f:
        gzipped = f.read(2) == GZIP_MAGIC
    opener = gzip.open if gzipped else open
    with opener(path, "rb") as f:
        yield f


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def examples_sha256(examples: Sequence[Example]) -> str:
    """A hash of exactly what is scored, whatever file, hub copy or generator it came from."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.ctx, list(ex.endings), ex.label], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def hellaswag_cache_path(directory: str | Path | None = None) -> Path:
    return Path(directory or cache_dir() / "hellaswag") / HELLASWAG_FILENAME


def fetch_hellaswag(url: str = HELLASWAG_URL, directory: str | Path | None = None) -> Path:
    """The original validation file from the cache, downloading it first if it is not there yet."""
    path = hellaswag_cache_path(directory)
    if path.is_file():
        return path
    hint = f"pass --data FILE with a local copy of {HELLASWAG_FILENAME}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise EvalDataUnavailableError(f"cannot write the HellaSwag cache {path.parent} ({e}); {hint}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                shutil.copyfileobj(response, out)
            out.flush()
            os.fsync(out.fileno())
        read_examples_file(tmp)  # a broken download must never take the cache file's name
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException, EvalDataError) as e:  # URLError and timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        reason = " ".join(str(getattr(e, "reason", e)).split()) or type(e).__name__
        raise EvalDataUnavailableError(f"cannot download HellaSwag from {url} ({reason}); {hint}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_hf_hellaswag(name: str = HF_DATASET, split: str = "validation") -> EvalData:
    """The Hugging Face copy. Needs the `datasets` package and the hub (or its local cache)."""
    hint = f"pass --data FILE with a local copy of {HELLASWAG_FILENAME}"
    try:
        import datasets
    except ImportError:
        raise EvalDataUnavailableError(f"loading {name} needs the `datasets` package "
                                       f"(pip install datasets); or {hint}") from None
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, hub outage: each layer raises its own kind
        message = " ".join(str(e).split())[:300]
        raise EvalDataUnavailableError(f"cannot load {name} ({split}) from the Hugging Face hub "
                                       f"({type(e).__name__}: {message}); {hint}") from None
    examples = [example_from_record(dict(row), f"{name}[{split}] row {i}") for i, row in enumerate(rows)]
    if not examples:
        raise EvalDataError(f"{name}[{split}] holds no examples")
    return EvalData(benchmark=BENCHMARK, examples=examples, source=f"{HF_PREFIX}{name}/{split}")


def load_eval_data(data: str | Path | None = None, benchmark: str | None = None) -> EvalData:
    """The examples `data` names (see the module docstring); `benchmark` picks the default and is checked."""
    if benchmark is not None and benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if data is None:
        if benchmark == "demo-cloze":
            from nanogpt_core.eval.cloze import demo_cloze_data
            return demo_cloze_data()
        return read_examples_file(fetch_hellaswag())
    if str(data).startswith(HF_PREFIX):
        loaded = load_hf_hellaswag(str(data)[len(HF_PREFIX):] or HF_DATASET)
    else:
        loaded = read_examples_file(data)
    if benchmark is not None and loaded.benchmark != benchmark:
        raise EvalDataError(f"{loaded.source} holds {loaded.benchmark} examples, not {benchmark}")
    return loaded


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class RenderedExample:
    ctx_tokens: list[int]
    ending_tokens: list[list[int]]
    ending_chars: list[int]
    label: int
    truncated: bool  # the context lost tokens from its start to fit the model

    @property
    def packed_length(self) -> int:
        return len(self.ctx_tokens) + sum(len(e) - 1 for e in self.ending_tokens)


@dataclass(frozen=True)
class ExampleScore:
    label: int
    losses: tuple[float, ...]  # cross-entropy summed over each ending's tokens
    tokens: tuple[int, ...]
    chars: tuple[int, ...]
    truncated: bool = False

    @property
    def pred(self) -> int:
        return _argmin(self.losses)

    @property
    def pred_norm(self) -> int:
        return _argmin([loss / n for loss, n in zip(self.losses, self.tokens)])

    @property
    def pred_char_norm(self) -> int:
        return _argmin([loss / n for loss, n in zip(self.losses, self.chars)])


def _argmin(values: Sequence[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)  # the first of equal values, as torch.argmin


def render_example(example: Example, encoder: Any, block_size: int) -> RenderedExample:
    """Token ids for the context and each ending.

    encode_ordinary gives the same ids as build-nanogpt's encode on any text without
    "<|endoftext|>" in it, and treats that string as text where encode would refuse it.
    A context too long for the model keeps its last tokens, as lm-eval-harness does; HellaSwag
    never needs that at GPT-2's 1,024 positions, the small test models sometimes do.
    """
    ctx = encoder.encode_ordinary(example.ctx)
    endings = [encoder.encode_ordinary(" " + ending) for ending in example.endings]
    longest = max(len(e) for e in endings)
    if longest >= block_size:
        raise EvalDataError(f"example {example.id}: an ending of {longest} tokens leaves no room for its "
                            f"context in the model's {block_size} positions")
    room = block_size - longest
    truncated = len(ctx) > room
    return RenderedExample(ctx_tokens=ctx[-room:] if truncated else ctx, ending_tokens=endings,
                           ending_chars=[len(e) for e in example.endings], label=example.label, truncated=truncated)


def _vocab_size(model: GPT) -> int:
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than GPT-2's "
                         f"({GPT2_VOCAB_SIZE}); it cannot read GPT-2 tokens")
    return GPT2_VOCAB_SIZE


@torch.inference_mode()
def score_example_unbatched(model: GPT, rendered: RenderedExample, device: str | torch.device = "cpu",
                            ) -> ExampleScore:
    """build-nanogpt's method, kept as the reference: one forward pass over the four rows
    context + ending, zero-padded to the longest, losses masked to the ending tokens."""
    vocab = _vocab_size(model)
    rows = [rendered.ctx_tokens + ending for ending in rendered.ending_tokens]
    width = max(len(row) for row in rows)
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(rendered.ctx_tokens):len(row)] = 1
    tokens, mask = tokens.to(device), mask.to(device)
    logits, _ = model(tokens)
    logits = logits[:, :-1, :vocab]
    losses = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1), reduction="none")
    sums = (losses.view(len(rows), -1) * mask[:, 1:]).double().sum(dim=1)
    return ExampleScore(label=rendered.label, losses=tuple(sums.tolist()),
                        tokens=tuple(len(e) for e in rendered.ending_tokens),
                        chars=tuple(rendered.ending_chars), truncated=rendered.truncated)


@dataclass
class PackedBatch:
    """Several examples as packed rows, and where their ending tokens' losses come from."""
    idx: torch.Tensor  # (B, L) token ids
    pos: torch.Tensor  # (B, L) position ids: each ending's restart where the context ends
    attn_mask: torch.Tensor  # (B, 1, L, L) True where a query may attend to a key
    rows: torch.Tensor  # (R,) flat indices into B*L of the hidden states the output layer needs
    pair_row: torch.Tensor  # (P,) for every ending token: which of `rows` predicts it
    pair_target: torch.Tensor  # (P,) the ending token
    pair_ending: torch.Tensor  # (P,) which ending (numbered through the batch) it belongs to
    n_endings: int


CTX_SEGMENT, PAD_SEGMENT = -1, -2


def pack_examples(rendered: Sequence[RenderedExample]) -> PackedBatch:
    width = max(r.packed_length for r in rendered)
    batch = len(rendered)
    idx = torch.zeros((batch, width), dtype=torch.long)
    pos = torch.zeros((batch, width), dtype=torch.long)
    segment = torch.full((batch, width), PAD_SEGMENT, dtype=torch.long)
    rows: list[int] = []
    pair_row: list[int] = []
    pair_target: list[int] = []
    pair_ending: list[int] = []
    n_endings = 0
    for b, r in enumerate(rendered):
        n_ctx = len(r.ctx_tokens)
        tokens, positions, segments = list(r.ctx_tokens), list(range(n_ctx)), [CTX_SEGMENT] * n_ctx
        ctx_last = len(rows)  # the context's last hidden state predicts every ending's first token
        rows.append(b * width + n_ctx - 1)
        for i, ending in enumerate(r.ending_tokens):
            start = len(tokens)
            for j, target in enumerate(ending):
                if j == 0:
                    pair_row.append(ctx_last)
                else:
                    pair_row.append(len(rows))
                    rows.append(b * width + start + j - 1)
                pair_target.append(target)
                pair_ending.append(n_endings)
            tokens += ending[:-1]  # the last token is only ever a target
            positions += range(n_ctx, n_ctx + len(ending) - 1)
            segments += [i] * (len(ending) - 1)
            n_endings += 1
        n = len(tokens)
        idx[b, :n] = torch.tensor(tokens)
        pos[b, :n] = torch.tensor(positions)
        segment[b, :n] = torch.tensor(segments)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    # A query sees earlier context and earlier tokens of its own segment. Padding forms one
    # segment of its own, so no real query sees it and no padding query sees nothing (which
    # would make its softmax NaN).
    visible = (segment[:, None, :] == CTX_SEGMENT) | (segment[:, None, :] == segment[:, :, None])
    return PackedBatch(idx=idx, pos=pos, attn_mask=(causal & visible).unsqueeze(1),
                       rows=torch.tensor(rows), pair_row=torch.tensor(pair_row),
                       pair_target=torch.tensor(pair_target), pair_ending=torch.tensor(pair_ending),
                       n_endings=n_endings)


@torch.inference_mode()
def score_packed(model: GPT, rendered: Sequence[RenderedExample], device: str | torch.device = "cpu",
                 ) -> list[ExampleScore]:
    """Score several examples in one forward pass (see "Speed" in the module docstring)."""
    vocab = _vocab_size(model)
    batch = pack_examples(rendered)
    hidden = model.hidden_states(batch.idx.to(device), positions=batch.pos.to(device),
                                 attn_mask=batch.attn_mask.to(device))
    h = hidden.reshape(-1, hidden.size(-1))[batch.rows.to(device)]
    weight = model.lm_head.weight[:vocab]
    pair_row, pair_target = batch.pair_row.to(device), batch.pair_target.to(device)
    token_loss = torch.empty(len(pair_row), device=h.device)
    # The output layer a block of rows at a time, so only one block's logits exist at once.
    # log_softmax is one fused pass over the logits, several times faster than logsumexp.
    for start in range(0, len(h), CHUNK_ROWS):
        log_probs = F.log_softmax(F.linear(h[start:start + CHUNK_ROWS], weight), dim=-1)
        here = (pair_row >= start) & (pair_row < start + CHUNK_ROWS)
        token_loss[here] = -log_probs[pair_row[here] - start, pair_target[here]]
    sums = torch.zeros(batch.n_endings, dtype=torch.float64, device=h.device)
    sums.index_add_(0, batch.pair_ending.to(device), token_loss.double())
    sums = sums.tolist()
    scores, offset = [], 0
    for r in rendered:
        n = len(r.ending_tokens)
        scores.append(ExampleScore(label=r.label, losses=tuple(sums[offset:offset + n]),
                                   tokens=tuple(len(e) for e in r.ending_tokens),
                                   chars=tuple(r.ending_chars), truncated=r.truncated))
        offset += n
    return scores


def score_rendered(model: GPT, rendered: Sequence[RenderedExample], *, batch_size: int = DEFAULT_BATCH_SIZE,
                   device: str | torch.device = "cpu") -> list[ExampleScore]:
    """Scores in input order, computed in batches of similar length."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(rendered)), key=lambda i: rendered[i].packed_length)
    scores: list[ExampleScore | None] = [None] * len(rendered)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        for i, score in zip(chosen, score_packed(model, [rendered[i] for i in chosen], device)):
            scores[i] = score
    return scores  # type: ignore[return-value]


def score_examples(model: torch.nn.Module, examples: Sequence[Example], *, batch_size: int = DEFAULT_BATCH_SIZE,
                   device: str | torch.device = "cpu", dist_ctx: DistContext | None = None) -> list[ExampleScore]:
    """Every example's scores, in order, on every rank; under torchrun each rank scores its share."""
    from nanogpt_core.tokenizer import get_tokenizer

    bare = unwrap_model(model)
    encoder = get_tokenizer()
    rank, world_size = (dist_ctx.rank, dist_ctx.world_size) if dist_ctx is not None else (0, 1)
    mine = list(range(rank, len(examples), world_size))
    rendered = [render_example(examples[i], encoder, bare.config.block_size) for i in mine]
    was_training = bare.training
    bare.eval()
    try:
        scores = score_rendered(bare, rendered, batch_size=batch_size, device=device)
    finally:
        bare.train(was_training)
    shares = gather_to_all(list(zip(mine, scores)), dist_ctx) if dist_ctx is not None else [list(zip(mine, scores))]
    merged: list[ExampleScore | None] = [None] * len(examples)
    for share in shares:
        for i, score in share:
            merged[i] = score
    return merged  # type: ignore[return-value]


def summarize(scores: Sequence[ExampleScore]) -> dict[str, Any]:
    n = len(scores)
    correct = sum(s.pred == s.label for s in scores)
    correct_norm = sum(s.pred_norm == s.label for s in scores)
    correct_char_norm = sum(s.pred_char_norm == s.label for s in scores)
    return {"n": n, "acc": correct / n, "acc_norm": correct_norm / n, "acc_char_norm": correct_char_norm / n,
            "correct": correct, "correct_norm": correct_norm, "correct_char_norm": correct_char_norm,
            "n_truncated": sum(s.truncated for s in scores)}


def evaluate_model(model: torch.nn.Module, data: EvalData, *, limit: int | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device = "cpu",
                   dist_ctx: DistContext | None = None) -> dict[str, Any]:
    """The report for a model already in memory: scores plus what was scored.

    Holds nothing that varies between identical runs (no timings), so a hash of it can
    serve as a data version.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    examples = data.examples[:limit] if limit is not None else data.examples
    scores = score_examples(model, examples, batch_size=batch_size, device=device, dist_ctx=dist_ctx)
    return {"benchmark": data.benchmark, **summarize(scores), "data": data.source,
            "data_sha256": data.file_sha256, "examples_sha256": examples_sha256(examples),
            "limit": limit, "scoring": SCORING}


def evaluate_checkpoint(checkpoint_path: str | Path, data_path: str | Path | None = None, *,
                        benchmark: str | None = None, limit: int | None = None,
                        batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device = "cpu",
                        dist_ctx: DistContext | None = None) -> dict[str, Any]:
    """Score a checkpoint; the pipeline's entry point.

    `benchmark` is "hellaswag" or "demo-cloze". Without `data_path` it picks the data (the
    cached rowanz file, or the generated cloze set); with one, the file's own benchmark is
    used and a different `benchmark` is an error. None means "hellaswag unless the file says
    otherwise".
    """
    data = load_eval_data(data_path, benchmark)
    model, payload = load_checkpoint(checkpoint_path, map_location=device)
    report = evaluate_model(model, data, limit=limit, batch_size=batch_size, device=device, dist_ctx=dist_ctx)
    return {**report, "checkpoint": str(checkpoint_path), "checkpoint_step": payload.get("step")}


# ---------------------------------------------------------------------------------------------
# Command line


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanogpt_core.eval.hellaswag",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint", required=True, help="model_NNNNN.pt to score")
    parser.add_argument("--data", default=None,
                        help=f"JSON-lines file (.jsonl or .jsonl.gz), or {HF_PREFIX}{HF_DATASET}; "
                             "default: the rowanz file, downloaded into the cache")
    parser.add_argument("--benchmark", choices=BENCHMARKS, default=None,
                        help="default: hellaswag, or whatever the --data file holds")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="examples per forward pass")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_arg_parser().parse_args(argv)
    ctx = setup_distributed(args.device)
    if ctx.device.type == "cpu" and ctx.local_world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    started = time.perf_counter()
    try:
        report = evaluate_checkpoint(args.checkpoint, args.data, benchmark=args.benchmark, limit=args.limit,
                                     batch_size=args.batch_size, device=ctx.device, dist_ctx=ctx)
    except (EvalDataError, EvalDataUnavailableError, CheckpointError, ValueError) as e:
        teardown_distributed(after_error=True)
        sys.exit(f"error: {e}")
    seconds = time.perf_counter() - started
    teardown_distributed()
    if not ctx.is_main:
        return
    report.update(seconds=round(seconds, 3), examples_per_second=round(report["n"] / seconds, 3),
                  world_size=ctx.world_size, device=str(ctx.device), batch_size=args.batch_size)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['benchmark']}: acc {report['acc']:.4f}  acc_norm {report['acc_norm']:.4f}  "
              f"acc_char_norm {report['acc_char_norm']:.4f}  (n={report['n']}, {seconds:.1f} s)")
        print(f"data: {report['data']}  examples sha256 {report['examples_sha256'][:16]}")
        if report["n_truncated"]:
            print(f"contexts shortened to fit the model: {report['n_truncated']}")


if __name__ == "__main__":
    main()
