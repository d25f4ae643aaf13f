"""The demo profile, chosen by measurement: short real trainings over shape, batch and schedule.

Every run is the demo's real path on the CPU, capped to AVX2 (ATEN_CPU_CAPABILITY=avx2,
MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2; set here for every process unless
already set): `torchrun --nproc_per_node=2` pretraining on the demo corpus's shards, then
fine-tuning on the chatterbot conversations. Each candidate is scored on what the demo is judged
by: the loss on the frozen held-out documents (nanogpt_core.report_card.held_out_loss) and how
many of the ten held-out conversation openers the fine-tuned model answers acceptably
(nanogpt_core.reply_quality).

Budgeting. A shared machine's speed drifts, so steps are budgeted from step times, not from a
wall clock. `time` measures each shape's pretraining step and a fine-tuning step (a few steps
each, median after the first) together with the reference shape (the old demo profile, 4 x 256,
8 x 256 tokens a micro-batch), whose step took REFERENCE_STEP_S seconds on the 2-core AVX2 machine
the budget is for. A shape's step time there is taken to be its time here times
REFERENCE_STEP_S / (the reference's time here, measured in the same run): the load on this
machine slows both alike, and the ratio between shapes is what carries over. `run` then gives
each candidate as many steps as fit its share of the budget at that extrapolated step time.

    python bench/demo_sweep.py time --shapes 4x256,4x192,4x128 --seq-lens 128,256
    python bench/demo_sweep.py run --name base --n-layer 4 --n-embd 128 --seq-len 256 ...
    python bench/demo_sweep.py table            # every run recorded so far, as markdown

Results go to bench/results/demo_sweep.jsonl (one line per run), so runs can be made one at a
time on a busy machine and the table read at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
for _name, _value in AVX2_CAPS.items():  # before torch is imported, here and in every child
    os.environ.setdefault(_name, _value)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

RESULTS = REPO / "bench" / "results" / "demo_sweep.jsonl"
WORK = Path(os.environ.get("DEMO_SWEEP_DIR", "/tmp/demo_sweep"))
NPROC = 2
# The old demo profile's pretraining step on the 2-core AVX2 machine of issue 12 (5.3 s for
# 4,096 tokens, 4 x 256 model, micro-batches of 8 x 256 on each of 2 processes).
REFERENCE = {"n_layer": 4, "n_embd": 256, "seq_len": 256, "micro_batch_size": 8}
REFERENCE_STEP_S = 5.3


def run_logged(command: list[str], log: Path, timeout: float) -> float:
    """Run a command with its output in `log`; the wall seconds it took."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed ({proc.returncode}); see {log}")
    return time.perf_counter() - started


def torchrun(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
            "-m", module, *args]


def demo_shards() -> Path:
    """The demo corpus's shards, built once per work folder."""
    out = WORK / "shards"
    if not (out / "manifest.json").exists():
        run_logged([sys.executable, "-m", "nanogpt_core.shards", "demo", "--out", str(out)], WORK / "shards.log", 900)
    return out


def chat_data(context_length: int = 256) -> Path:
    out = WORK / f"chat_{context_length}"
    if not (out / "manifest.json").exists():
        run_logged([sys.executable, "-m", "nanogpt_core.data.instructions", "--source", "demo", "--out", str(out),
                    "--context-length", str(context_length)], WORK / "chat.log", 900)
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def median_step_s(metrics: list[dict[str, Any]]) -> float:
    """Median time of the steps without validation, the first (warm-up) left out."""
    times = [m["dt_ms"] / 1000 for m in metrics[1:] if "dt_ms" in m and "val_loss" not in m]
    return statistics.median(times)


def shape_args(n_layer: int, n_embd: int, seq_len: int, micro_batch: int) -> list[str]:
    heads = max(1, n_embd // 64)
    return ["--n-layer", str(n_layer), "--n-embd", str(n_embd), "--n-head", str(heads), "--seq-len", str(seq_len),
            "--micro-batch-size", str(micro_batch)]


def time_pretrain_step(n_layer: int, n_embd: int, seq_len: int, micro_batch: int, steps: int) -> float:
    """Median pretraining step time of a shape, 2 processes, one micro-batch a step per process."""
    name = f"time_{n_layer}x{n_embd}_T{seq_len}_B{micro_batch}"
    out = WORK / name
    subprocess.run(["rm", "-rf", str(out)], check=True)
    tokens = micro_batch * seq_len * NPROC
    run_logged(torchrun("nanogpt_core.train", "--profile", "demo", "--data", str(demo_shards()), "--out", str(out),
                        *shape_args(n_layer, n_embd, seq_len, micro_batch), "--total-batch-size", str(tokens),
                        "--max-steps", str(steps), "--warmup-steps", "1", "--val-every", str(steps + 1),
                        "--val-steps", "1", "--checkpoint-every", str(steps)),
               WORK / f"{name}.log", 900)
    return median_step_s(read_metrics(out))


def cmd_time(args: argparse.Namespace) -> None:
    rows = []
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    for round_ in range(args.rounds):
        ref = time_pretrain_step(REFERENCE["n_layer"], REFERENCE["n_embd"], REFERENCE["seq_len"],
                                 REFERENCE["micro_batch_size"], args.steps)
        for n_layer, n_embd in shapes:
            for seq_len in seq_lens:
                micro = args.tokens_per_micro_step // seq_len
                here = time_pretrain_step(n_layer, n_embd, seq_len, micro, args.steps)
                rows.append({"round": round_, "shape": f"{n_layer}x{n_embd}", "seq_len": seq_len,
                             "micro_batch": micro, "step_s": here, "reference_step_s": ref,
                             "avx2_step_s": here * REFERENCE_STEP_S / ref})
                print(json.dumps(rows[-1]), flush=True)
    record({"kind": "step_times", "cpu": cpu_model(), "rows": rows, "tokens_per_micro_step": args.tokens_per_micro_step})


def record(entry: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    entry = {"recorded_at": time.strftime("%Y-%m-%d %H:%M:%S"), **entry}
    with RESULTS.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def cmd_run(args: argparse.Namespace) -> None:
    """One candidate: pretrain for the budgeted steps, score held-out loss, fine-tune, judge the replies."""
    import torch

    from nanogpt_core.checkpoint import latest_checkpoint, load_checkpoint
    from nanogpt_core.report_card import held_out_loss

    torch.set_num_threads(NPROC)
    run = WORK / args.name
    subprocess.run(["rm", "-rf", str(run)], check=True)
    if args.from_run:  # fine-tune another run's pretrained model: its pretraining figures are copied over
        earlier = [e for e in read_results() if e.get("name") == args.from_run]
        if not earlier:
            raise SystemExit(f"no recorded run named {args.from_run}")
        run.mkdir(parents=True)
        (run / "pretrain").symlink_to(WORK / args.from_run / "pretrain")
        checkpoint, payload = latest_checkpoint(run / "pretrain")
        entry = {**{k: v for k, v in earlier[-1].items() if k != "recorded_at"}, "name": args.name,
                 "pretrained_by": args.from_run}
        entry["config"] = {**earlier[-1]["config"], **{k: getattr(args, k) for k in ("ft_epochs", "ft_lr", "ft_batch")}}
        finetune_and_judge(args, run, checkpoint, entry)
        return
    tokens_per_micro = args.micro_batch_size * args.seq_len * NPROC
    grad_accum = args.total_batch_size // tokens_per_micro
    steps = args.steps or int(args.pretrain_budget_s / (args.avx2_step_s * grad_accum))
    pre_args = ["--profile", "demo", "--data", str(demo_shards()), "--out", str(run / "pretrain"),
                *shape_args(args.n_layer, args.n_embd, args.seq_len, args.micro_batch_size),
                "--total-batch-size", str(args.total_batch_size), "--max-steps", str(steps),
                "--warmup-steps", str(max(1, steps // 20)), "--max-lr", str(args.lr), "--min-lr", str(args.lr / 10),
                "--muon-lr", str(args.muon_lr), "--val-every", str(args.val_every or steps),
                "--val-steps", str(args.val_steps),
                "--checkpoint-every", str(steps)]
    pre_wall = run_logged(torchrun("nanogpt_core.train", *pre_args), run / "pretrain.log", 3600)
    pre_metrics = read_metrics(run / "pretrain")
    checkpoint, payload = latest_checkpoint(run / "pretrain")
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    started = time.perf_counter()
    held_out = held_out_loss(model)
    held_out_s = time.perf_counter() - started

    entry: dict[str, Any] = {
        "kind": "run", "name": args.name, "cpu": cpu_model(),
        "config": {k: getattr(args, k) for k in ("n_layer", "n_embd", "seq_len", "micro_batch_size",
                                                 "total_batch_size", "lr", "muon_lr", "val_every", "val_steps",
                                                 "ft_epochs", "ft_lr", "ft_batch")},
        "steps": steps, "tokens": steps * args.total_batch_size,
        "pretrain_step_s_here": median_step_s(pre_metrics), "pretrain_wall_s": pre_wall,
        "val_loss": payload["metrics"].get("val_loss"), "train_loss": payload["metrics"].get("train_loss"),
        "held_out_loss": held_out["held_out"], "held_out_s": held_out_s,
    }
    if args.skip_finetune:
        record(entry)
        print(json.dumps(entry, indent=1))
        return
    finetune_and_judge(args, run, checkpoint, entry)


def finetune_and_judge(args: argparse.Namespace, run: Path, checkpoint: Path, entry: dict[str, Any]) -> None:
    """Fine-tune `checkpoint` on the chat data and judge its greedy replies to the held-out openers."""
    from nanogpt_core.checkpoint import latest_checkpoint, load_checkpoint
    from nanogpt_core.data.held_out import HELD_OUT_OPENERS
    from nanogpt_core.report_card import greedy_completions

    ft_args = ["--profile", "demo", "--init", str(checkpoint), "--data", str(chat_data()), "--out",
               str(run / "finetune"), "--epochs", str(args.ft_epochs), "--max-lr", str(args.ft_lr),
               "--min-lr", str(args.ft_lr / 10), "--batch-size", str(args.ft_batch), "--val-every", "100000"]
    ft_wall = run_logged(torchrun("nanogpt_core.finetune", *ft_args), run / "finetune.log", 3600)
    ft_metrics = read_metrics(run / "finetune")
    ft_checkpoint, ft_payload = latest_checkpoint(run / "finetune")
    chat_model, _ = load_checkpoint(ft_checkpoint)
    chat_model.eval()
    started = time.perf_counter()
    replies = greedy_completions(chat_model, HELD_OUT_OPENERS, chat=True)
    replies_s = time.perf_counter() - started
    ft_steps = len([m for m in ft_metrics if "dt_ms" in m])
    entry.update({
        "ft_steps": ft_steps, "ft_step_s_here": median_step_s(ft_metrics), "ft_wall_s": ft_wall,
        "ft_val_loss": ft_payload["metrics"].get("val_loss"),
        "replies_acceptable": sum(r["acceptable"] for r in replies), "replies_s": replies_s,
        "replies": [{k: r[k] for k in ("prompt", "reply", "finished", "acceptable", "reason")} for r in replies],
    })
    record(entry)
    print(json.dumps({k: v for k, v in entry.items() if k != "replies"}, indent=1))
    for r in replies:
        print(f"  {'ok ' if r['acceptable'] else 'NO '} {r['prompt']!r} -> {r['reply']!r} ({r['reason']})")


def read_results() -> list[dict[str, Any]]:
    if not RESULTS.exists():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def rejudged(replies: list[dict[str, Any]]) -> int:
    """Acceptable replies under the current rule (runs recorded before a rule change are judged anew)."""
    from nanogpt_core.reply_quality import judge_replies

    exchanges = [(r["prompt"], r["reply"], r.get("finished", not r["reason"].startswith("unfinished")))
                 for r in replies]
    return sum(v.acceptable for v in judge_replies(exchanges))


def cmd_table(args: argparse.Namespace) -> None:
    entries = read_results()
    for entry in entries:
        if entry["kind"] == "step_times":
            print(f"\nStep times ({entry['cpu']}, {entry['recorded_at']}):\n")
            print("| shape | seq len | micro-batch | step s here | reference s here | AVX2 step s (extrapolated) |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for r in entry["rows"]:
                print(f"| {r['shape']} | {r['seq_len']} | {r['micro_batch']} | {r['step_s']:.3f} | "
                      f"{r['reference_step_s']:.3f} | {r['avx2_step_s']:.3f} |")
    runs = [e for e in entries if e["kind"] == "run"]
    if runs:
        print("\n| run | shape | T | batch | lr | muon lr | steps | tokens | held-out loss | val loss | ft epochs "
              "| ft lr | ft steps | replies ok | pretrain s here | ft s here |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
              "| ---: |")
        for e in runs:
            c = e["config"]
            cells = [e["name"], f"{c['n_layer']}x{c['n_embd']}", c["seq_len"], c["total_batch_size"], f"{c['lr']:g}",
                     f"{c.get('muon_lr', 0):g}", e["steps"], f"{e['tokens']:,}", f"{e['held_out_loss']:.3f}",
                     f"{e['val_loss']:.3f}"]
            if "ft_steps" in e:
                cells += [c["ft_epochs"], f"{c['ft_lr']:g}", e["ft_steps"], f"{rejudged(e['replies'])}/10",
                          f"{e['pretrain_wall_s']:.0f}", f"{e['ft_wall_s']:.0f}"]
            else:
                cells += ["-", "-", "-", "-", f"{e['pretrain_wall_s']:.0f}", "-"]
            print("| " + " | ".join(str(cell) for cell in cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/demo_sweep.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    timing = sub.add_parser("time", help="step time of each shape beside the reference shape")
    timing.add_argument("--shapes", default="4x256,4x192,4x128,6x128,2x256")
    timing.add_argument("--seq-lens", default="256")
    timing.add_argument("--tokens-per-micro-step", type=int, default=2048, help="per process")
    timing.add_argument("--steps", type=int, default=6)
    timing.add_argument("--rounds", type=int, default=1)
    run = sub.add_parser("run", help="one candidate, pretrained and fine-tuned within its budget")
    run.add_argument("--name", required=True)
    run.add_argument("--n-layer", type=int, default=4)
    run.add_argument("--n-embd", type=int, default=128)
    run.add_argument("--seq-len", type=int, default=256)
    run.add_argument("--micro-batch-size", type=int, default=8)
    run.add_argument("--total-batch-size", type=int, default=4096)
    run.add_argument("--lr", type=float, default=2e-3)
    run.add_argument("--muon-lr", type=float, default=0.0, help="Muon for the blocks' matrices at this rate; "
                                                                   "0: AdamW for every parameter")
    run.add_argument("--val-every", type=int, default=0, help="0: validate at the start and the end only")
    run.add_argument("--val-steps", type=int, default=2)
    run.add_argument("--steps", type=int, default=0, help="0: as many as the budget allows")
    run.add_argument("--avx2-step-s", type=float, default=0.0,
                     help="extrapolated AVX2 seconds per micro-step of this shape (from `time`)")
    run.add_argument("--pretrain-budget-s", type=float, default=270.0)
    run.add_argument("--ft-epochs", type=int, default=1)
    run.add_argument("--ft-lr", type=float, default=1.5e-3)
    run.add_argument("--ft-batch", type=int, default=16)
    run.add_argument("--skip-finetune", action="store_true", help="pretrain and score the held-out loss only")
    run.add_argument("--from-run", help="skip pretraining: fine-tune the model of this earlier run")
    sub.add_parser("table", help="print every recorded result as markdown")
    args = parser.parse_args(argv)
    if args.command == "run" and not args.steps and not args.avx2_step_s and not args.from_run:
        parser.error("run needs --steps or --avx2-step-s (measure it with `time`)")
    WORK.mkdir(parents=True, exist_ok=True)
    {"time": cmd_time, "run": cmd_run, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    main()
