"""The command line of nanogpt_core.hf (its usage is the package's docstring)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nanogpt_core.hf as package
from nanogpt_core.checkpoint import CheckpointError
from nanogpt_core.hf.export import export_checkpoint
from nanogpt_core.hf.files import HFFormatError
from nanogpt_core.hf.importer import import_hf


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanogpt_core.hf", description=package.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=package.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="checkpoint -> transformers folder")
    export.add_argument("checkpoint", help="a checkpoint file, or a run folder (its newest checkpoint)")
    export.add_argument("out_dir", help="folder to write (created if missing)")
    export.add_argument("--scores", help="JSON file of benchmark scores for the model card")
    export.add_argument("--title", default="nanogpt-pipeline GPT-2", help="the model card's heading")
    imp = commands.add_parser("import", help="transformers folder or hub name -> checkpoint")
    imp.add_argument("source", help="a GPT-2 folder in transformers format, or a hub name such as gpt2")
    imp.add_argument("out", help="checkpoint file (.pt) to write, or a folder to write model_00000.pt into")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        if args.command == "export":
            scores = json.loads(Path(args.scores).read_text()) if args.scores else None
            result = export_checkpoint(args.checkpoint, args.out_dir, scores=scores, title=args.title)
            print(f"exported {result.parameters:,} parameters to {result.folder} "
                  f"({sum(result.files.values()) / 1e6:.1f} MB, content hash {result.content_hash})")
        else:
            path = import_hf(args.source, args.out)
            print(f"imported {args.source} as {path}")
    except (HFFormatError, CheckpointError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

