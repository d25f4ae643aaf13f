"""Checking an exported folder against its checkpoint without transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nanogpt_core.checkpoint import model_config_of, read_checkpoint
from nanogpt_core.hf.files import EXPORTED_FILES, WEIGHTS_FILE
from nanogpt_core.hf.weights import LM_HEAD, WTE, from_hf_state_dict, hf_config
from nanogpt_core.model import GPT2_VOCAB_SIZE


def verify_export(folder: str | Path, checkpoint: str | Path) -> list[str]:
    """What is wrong with an exported folder, compared with its checkpoint; empty when nothing.

    Reads the weights back without transformers: every tensor must equal the checkpoint's
    (the embedding on its real rows), and config.json and the tokenizer files must be there.
    """
    from safetensors.torch import load_file

    folder, checkpoint = Path(folder), Path(checkpoint)
    missing = [name for name in EXPORTED_FILES if not (folder / name).is_file()]
    if missing:
        return [f"missing {', '.join(missing)}"]
    payload = read_checkpoint(checkpoint)
    config = model_config_of(payload, checkpoint)
    problems = []
    if json.loads((folder / "config.json").read_text()) != hf_config(config):
        problems.append("config.json does not describe the checkpoint's model")
    back = from_hf_state_dict(load_file(str(folder / WEIGHTS_FILE)), config.vocab_size)
    for name, tensor in payload["model"].items():
        if name not in back:
            problems.append(f"{name} is missing")
        elif name in (WTE, LM_HEAD):
            if not torch.equal(back[name][:GPT2_VOCAB_SIZE], tensor[:GPT2_VOCAB_SIZE]):
                problems.append(f"{name} differs")
        elif not torch.equal(back[name], tensor):
            problems.append(f"{name} differs")
    return problems
