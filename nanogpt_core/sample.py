"""Sample text from a checkpoint: `python -m nanogpt_core.sample --checkpoint PATH --prompt TEXT`."""

from __future__ import annotations

import argparse
import sys

import torch

from nanogpt_core.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from nanogpt_core.tokenizer import EOT_TOKEN, get_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanogpt_core.sample", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a model_*.pt file")
    source.add_argument("--checkpoint-dir", help="a run folder: its newest checkpoint is used")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    try:
        path = args.checkpoint
        if path is None:
            found = latest_checkpoint(args.checkpoint_dir)
            if found is None:
                raise CheckpointError(f"no checkpoint in {args.checkpoint_dir}")
            path = found[0]
        model, payload = load_checkpoint(path)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    model.eval()
    enc = get_tokenizer()
    prompt = [EOT_TOKEN] + enc.encode_ordinary(args.prompt)
    idx = torch.tensor([prompt] * args.num_samples)
    generator = torch.Generator().manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=generator)
    print(f"# {path} (step {payload['step']}, val loss {payload['metrics'].get('val_loss')})")
    for row in out.tolist():
        text = enc.decode([t for t in row[1:] if t != EOT_TOKEN])
        print("---\n" + text)


if __name__ == "__main__":
    main()
