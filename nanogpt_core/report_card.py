"""A report card for a checkpoint: what the model can do, in one JSON document.

The card says, for one checkpoint: its final train and validation loss and the loss curve,
its loss on the demo's frozen held-out documents (the same yardstick for every run), its
greedy completions for a fixed set of prompts (the held-out conversation openers, judged by
`nanogpt_core.reply_quality`, for a fine-tuned model; text prompts for a base model), its
benchmark score beside the previously deployed model's, its throughput and wall time (and MFU
on a GPU), the tokens it has seen, and its lineage. The pipeline attaches it to each training
asset's materialization and writes it beside the checkpoint as `report_card.json`; the server
returns it from `/v1/models/{id}`.

    python -m nanogpt_core.report_card --checkpoint PATH [--metrics metrics.jsonl] [--out card.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from nanogpt_core.atomic_file import write_text_atomically
from nanogpt_core.checkpoint import CheckpointError, load_checkpoint
from nanogpt_core.data.held_out import HELD_OUT_OPENERS, held_out_documents
from nanogpt_core.model import GPT
from nanogpt_core.prompts import build_prompt, prompt_token_ids
from nanogpt_core.reply_quality import WORD, judge_replies, repeated_run
from nanogpt_core.tokenizer import EOT_TOKEN, get_tokenizer

FORMAT = "nanogpt-pipeline/report-card"
FORMAT_VERSION = 1
CARD_FILE_NAME = "report_card.json"
# Starts of sentences a base model trained on Python's documentation should be able to go on with.
TEXT_PROMPTS: tuple[str, ...] = (
    "The Python interpreter",
    "A dictionary is",
    "To open a file,",
    "This function returns",
    "The following example shows",
)
MAX_NEW_TOKENS = 48
# The held-out loss is measured over windows of this many tokens (or the model's block size,
# if smaller), so that checkpoints of different shapes are compared on the same positions.
HELD_OUT_WINDOW = 256
HELD_OUT_BATCH = 8
CURVE_POINTS = 200


class ReportCardError(ValueError):
    """A card that cannot be built or read, with the file at fault in the message."""


def build_report_card(checkpoint: str | Path, *, metrics: Sequence[dict[str, Any]] = (),
                      wall_seconds: float | None = None, previous_deployment: dict[str, Any] | None = None,
                      benchmark: dict[str, Any] | None = None, held_out: bool = True,
                      held_out_windows: int | None = None) -> dict[str, Any]:
    """The card for `checkpoint`.

    `metrics`: the run's metrics.jsonl records (for the curve and throughput). `wall_seconds`:
    how long the training took end to end, where the caller measured it. `previous_deployment`:
    the deployed model's manifest fields (`deployment_id`, `model_id`, `scores`), to put its
    benchmark score beside this one. `benchmark`: `{"benchmark", "limit", "data_path"}` to score
    this checkpoint on; None leaves its score out. `held_out`: measure the frozen held-out loss,
    over its first `held_out_windows` windows (None: all of them; the card records how many tokens).
    """
    started = time.perf_counter()
    path = Path(checkpoint)
    try:
        model, payload = load_checkpoint(path)
    except CheckpointError as e:
        raise ReportCardError(f"cannot build a report card: {e}") from e
    model.eval()
    lineage = payload.get("lineage", {})
    stage = "finetuned" if lineage.get("stage") == "finetune" else "pretrained"
    saved = payload.get("metrics", {})
    losses: dict[str, Any] = {"train": saved.get("train_loss"), "val": saved.get("val_loss"),
                              "initial_val": saved.get("initial_val_loss")}
    if held_out:
        losses.update(held_out_loss(model, max_windows=held_out_windows))
    chat = stage == "finetuned"
    completions = greedy_completions(model, HELD_OUT_OPENERS if chat else TEXT_PROMPTS, chat=chat)
    card: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "checkpoint": {"path": str(path.resolve()), "name": path.name, "step": payload.get("step"), "stage": stage,
                       "parameters": model.num_params()},
        "loss": losses,
        "replies": summarize_completions(completions, chat),
        "completions": completions,
        "scores": _scores(path, benchmark, previous_deployment),
        "throughput": throughput(metrics, wall_seconds),
        "tokens_seen": saved.get("tokens_seen", lineage.get("tokens_seen")),
        "curve": loss_curve_points(metrics),
        "lineage": {key: lineage.get(key) for key in ("profile", "stage", "data_version", "parent_checkpoint",
                                                      "parent_data_version", "code_version", "git_commit",
                                                      "world_size")},
    }
    source = lineage.get("data_source") or {}
    if isinstance(source, dict) and source.get("raw_data_version"):
        card["lineage"]["raw_content_hash"] = source["raw_data_version"]
    card["card_seconds"] = round(time.perf_counter() - started, 2)
    return card


@torch.no_grad()
def held_out_loss(model: GPT, window: int = HELD_OUT_WINDOW, batch: int = HELD_OUT_BATCH,
                  max_windows: int | None = None) -> dict[str, Any]:
    """Mean next-token loss over the frozen held-out documents, cut into non-overlapping windows.

    The documents are tokenized as the shards tokenize text (each after `<|endoftext|>`),
    joined, and cut into full windows; the remainder shorter than a window is left out.
    `max_windows` keeps only the first ones (the output layer makes every token cost
    vocabulary x width: about 8 s for the whole set at the demo's shape on 2 cores).
    """
    encoder = get_tokenizer()
    tokens: list[int] = []
    for doc in held_out_documents():
        tokens += [EOT_TOKEN] + encoder.encode_ordinary(doc.text)
    window = min(window, model.config.block_size)
    stream = torch.tensor(tokens, dtype=torch.long)
    n_windows = (len(tokens) - 1) // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ReportCardError(f"the held-out set has fewer than {window + 1} tokens")
    total = 0.0
    for first in range(0, n_windows, batch):
        rows = range(first, min(n_windows, first + batch))
        x = torch.stack([stream[r * window:(r + 1) * window] for r in rows])
        y = torch.stack([stream[r * window + 1:(r + 1) * window + 1] for r in rows])
        _, loss = model(x, y, return_logits=False)
        total += loss.item() * len(rows)
    return {"held_out": total / n_windows, "held_out_tokens": n_windows * window, "held_out_window": window}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Decoding one row at a time is a chain of tiny matmuls: on a busy 2-core machine, two
    threads spent most of their time waiting for each other (14x slower than one, measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def greedy_completions(model: GPT, prompts: Sequence[str], *, chat: bool,
                       max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict[str, Any]]:
    """Each prompt's greedy continuation; for a chat model the prompt goes through the chat template
    and the reply is judged. `finished` says whether the model ended it (`<|endoftext|>`)."""
    encoder = get_tokenizer()
    results: list[dict[str, Any]] = []
    with one_thread():
        for prompt in prompts:
            ids = prompt_token_ids(build_prompt(prompt)) if chat else [EOT_TOKEN] + encoder.encode_ordinary(prompt)
            room = model.config.block_size - len(ids)
            if room <= 0:
                raise ReportCardError(f"prompt {prompt!r} fills the model's {model.config.block_size} positions")
            out = model.generate(torch.tensor([ids]), min(max_new_tokens, room), temperature=0.0)
            new = out[0, len(ids):].tolist()
            finished = EOT_TOKEN in new
            if finished:
                new = new[:new.index(EOT_TOKEN)]
            reply = encoder.decode(new)
            entry: dict[str, Any] = {"prompt": prompt, "reply": reply.strip() if chat else reply,
                                     "finished": finished}
            if not chat:  # a run of blank lines is as much a loop as a repeated word
                entry["loops"] = not reply.strip() or repeated_run(WORD.findall(reply.lower())) is not None
            results.append(entry)
    if chat:
        verdicts = judge_replies([(r["prompt"], r["reply"], r["finished"]) for r in results])
        for entry, verdict in zip(results, verdicts):
            entry.update(acceptable=verdict.acceptable, reason=verdict.reason, prompt_kind=verdict.prompt_kind)
    return results


def summarize_completions(completions: Sequence[dict[str, Any]], chat: bool) -> dict[str, Any]:
    if chat:
        return {"kind": "chat", "prompts": "held-out conversation openers",
                "acceptable": sum(1 for c in completions if c["acceptable"]), "of": len(completions)}
    return {"kind": "text", "prompts": "text prompts",
            "loop_free": sum(1 for c in completions if not c["loops"]), "of": len(completions)}


def throughput(metrics: Sequence[dict[str, Any]], wall_seconds: float | None = None) -> dict[str, Any]:
    """Median tokens/s and MFU over the steps (the first, which warms up, left out), and step time in total."""
    steps = [m for m in metrics if "tokens_per_sec" in m]
    timed = steps[1:] or steps
    summary: dict[str, Any] = {"steps": len(steps), "wall_seconds": wall_seconds,
                               "step_seconds": round(sum(m["dt_ms"] for m in steps) / 1000, 2) if steps else None,
                               "tokens_per_sec": statistics.median(m["tokens_per_sec"] for m in timed)
                               if timed else None,
                               "mfu": statistics.median(m["mfu"] for m in timed) if timed else None}
    if summary["mfu"] is not None and not torch.cuda.is_available():
        summary["mfu_note"] = "on a CPU, against a matmul peak measured at start-up"
    return summary


def loss_curve_points(metrics: Sequence[dict[str, Any]], max_points: int = CURVE_POINTS) -> dict[str, list]:
    """Train loss at evenly spaced steps (at most `max_points`, the last always kept) and every validation loss."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    stride = max(1, math.ceil(len(train) / max_points))
    kept = train[::stride]
    if train and kept[-1] != train[-1]:
        kept.append(train[-1])
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    return {"train": [[s, round(v, 4)] for s, v in kept], "val": [[s, round(v, 4)] for s, v in val]}


def _scores(checkpoint: Path, benchmark: dict[str, Any] | None,
            previous: dict[str, Any] | None) -> dict[str, Any]:
    scores: dict[str, Any] = {"benchmark": None, "this": None, "previous_deployment": None}
    if benchmark is not None:
        from nanogpt_core.eval.hellaswag import evaluate_checkpoint

        report = evaluate_checkpoint(checkpoint, benchmark.get("data_path"), benchmark=benchmark["benchmark"],
                                     limit=benchmark.get("limit"))
        scores["benchmark"] = report["benchmark"]
        scores["this"] = {k: report[k] for k in ("acc", "acc_norm", "n")}
    if previous is not None:
        prev_scores = previous.get("scores") or {}
        comparable = scores["benchmark"] in (None, prev_scores.get("benchmark"))
        scores["previous_deployment"] = {
            "deployment_id": previous.get("deployment_id"), "model_id": previous.get("model_id"),
            "benchmark": prev_scores.get("benchmark"), "acc": prev_scores.get("acc"),
            "acc_norm": prev_scores.get("acc_norm"), "n": prev_scores.get("n"), "comparable": comparable}
    return scores


def write_card(path: str | Path, card: dict[str, Any]) -> Path:
    return write_text_atomically(path, json.dumps(card, indent=2))  # in the order the card reads


def read_card(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportCardError(f"cannot read the report card {path}: {e}") from e
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ReportCardError(f"{path} is not a report card (format {FORMAT!r} expected)")
    return card


def card_beside(checkpoint: str | Path) -> Path:
    """Where the card of a published checkpoint lives: beside it, in the asset's version folder."""
    return Path(checkpoint).parent / CARD_FILE_NAME


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def card_markdown(card: dict[str, Any]) -> str:
    """The card as markdown: a summary table, the scores beside the previous deployment's, the completions."""
    loss, ckpt, rate = card["loss"], card["checkpoint"], card["throughput"]
    replies = card["replies"]
    reply_line = (f"{replies['acceptable']} of {replies['of']} acceptable ({replies['prompts']})"
                  if replies["kind"] == "chat" else f"{replies['loop_free']} of {replies['of']} without loops")
    rows = [
        ("checkpoint", f"{ckpt['name']} ({ckpt['stage']}, step {_fmt(ckpt['step'])}, {_fmt(ckpt['parameters'])} "
                       f"parameters)"),
        ("train loss (final)", _fmt(loss.get("train"))),
        ("val loss (final / step 0)", f"{_fmt(loss.get('val'))} / {_fmt(loss.get('initial_val'))}"),
    ]
    if "held_out" in loss:
        rows.append(("held-out loss (frozen set)",
                     f"{_fmt(loss['held_out'])} over {_fmt(loss['held_out_tokens'])} tokens"))
    rows += [
        ("greedy replies", reply_line),
        ("tokens seen", _fmt(card.get("tokens_seen"))),
        ("throughput", f"{_fmt(rate.get('tokens_per_sec'), 0)} tokens/s (median), MFU {_fmt(rate.get('mfu'), 3)}"),
        ("wall time", f"{_fmt(rate.get('wall_seconds'), 1)} s ({_fmt(rate.get('step_seconds'), 1)} s in steps)"),
        ("data version", _fmt(card["lineage"].get("data_version"))),
        ("raw content hash", _fmt(card["lineage"].get("raw_content_hash"))),
        ("code version / commit", f"{_fmt(card['lineage'].get('code_version'))} / "
                                  f"{_fmt(card['lineage'].get('git_commit'))}"),
        ("parent", _fmt(card["lineage"].get("parent_checkpoint"))),
    ]
    lines = ["| | |", "| --- | --- |", *(f"| {name} | {_cell(value)} |" for name, value in rows)]
    scores = card["scores"]
    previous = scores.get("previous_deployment")
    if scores.get("this") or previous:
        lines += ["", "| benchmark | this checkpoint | previous deployment |", "| --- | ---: | ---: |"]
        this = scores.get("this") or {}
        prev_value = (f"{_fmt(previous.get('acc_norm'))} ({previous.get('benchmark')}, n={previous.get('n')}, "
                      f"{previous.get('deployment_id')})" if previous else "none deployed")
        lines.append(f"| {scores.get('benchmark') or (previous or {}).get('benchmark') or '-'} acc_norm | "
                     f"{_fmt(this.get('acc_norm'))} (n={this.get('n', '-')}) | {_cell(prev_value)} |")
    chat = replies["kind"] == "chat"
    lines += ["", "| prompt | greedy reply | " + ("verdict |" if chat else "ended |"),
              "| --- | --- | --- |"]
    for c in card["completions"]:
        verdict = ("ok" if c["acceptable"] else c["reason"]) if chat else ("yes" if c["finished"] else "no")
        reply = _cell(c["reply"]) or ("(empty)" if not c["reply"] else "(only white space)")
        lines.append(f"| {_cell(c['prompt'])} | {reply} | {_cell(verdict)} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text that stays inside one markdown table cell."""
    return " ".join(str(text).replace("|", "\\|").split())[:300]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanogpt_core.report_card", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="model_NNNNN.pt")
    parser.add_argument("--metrics", help="the run's metrics.jsonl, for the curve and throughput")
    parser.add_argument("--out", help="write the card here (JSON); default: print it")
    parser.add_argument("--markdown", action="store_true", help="print the card as markdown")
    args = parser.parse_args(argv)
    metrics = []
    if args.metrics:
        metrics = [json.loads(line) for line in Path(args.metrics).read_text().splitlines() if line.strip()]
    try:
        card = build_report_card(args.checkpoint, metrics=metrics)
    except ReportCardError as e:
        sys.exit(f"error: {e}")
    if args.out:
        write_card(args.out, card)
    print(card_markdown(card) if args.markdown else json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
