"""Asset checks that run beside the data assets (training and score checks are reported by
their assets themselves, since those assets compute them from what the trainer wrote)."""


from pathlib import Path

import dagster as dg

from nanogpt_core.shards import ShardError, ShardManifest, read_shard
from nanogpt_core.tokenizer import VOCAB_SIZE
import numpy as np

from nanogpt_core.data.instructions import (SPLITS, InstructionDataError, InstructionManifest,
                                          example_arrays)
from nanogpt_core.tokenizer import EOT_TOKEN
from pipeline.assets.data import dolly_prompts, token_shards
from pipeline.upstream import latest_output


@dg.asset_check(asset=token_shards, blocking=True,
                description="tokens present, every id inside GPT-2's vocabulary, a validation split present")
def shards_are_valid(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    output = latest_output(context, "token_shards")
    problems, max_id = [], -1
    try:
        manifest = ShardManifest.load(output.path)
        for split in ("train", "val"):
            for path in manifest.shard_paths(output.path, split):
                tokens = read_shard(path)
                if len(tokens):
                    max_id = max(max_id, int(tokens.max()))
    except ShardError as e:
        return dg.AssetCheckResult(passed=False, metadata={"error": str(e)})
    if manifest.tokens["train"] <= 0:
        problems.append("no training tokens")
    if manifest.tokens["val"] <= 0:
        problems.append("no validation split")
    if max_id >= VOCAB_SIZE:
        problems.append(f"token id {max_id} outside the vocabulary of {VOCAB_SIZE}")
    return dg.AssetCheckResult(passed=not problems,
                               metadata={"problems": ", ".join(problems) or "none", "max_token_id": max_id,
                                         "train_tokens": manifest.tokens["train"],
                                         "val_tokens": manifest.tokens["val"]})


def validate_prepared_folder(folder: Path) -> dict:
    """Every example: a prompt, a non-empty response closed by <|endoftext|>, and a loss mask
    that is -1 on exactly the prompt and padding positions."""
    manifest = InstructionManifest.load(folder)
    problems: list[str] = []
    checked = 0
    for split in SPLITS:
        tokens = np.load(folder / f"{split}_tokens.npy")
        offsets = np.load(folder / f"{split}_offsets.npy")
        prompt_lengths = np.load(folder / f"{split}_prompt_lengths.npy")
        for i, prompt_length in enumerate(prompt_lengths.tolist()):
            example = tokens[offsets[i]:offsets[i + 1]].tolist()
            where = f"{split} example {i}"
            if prompt_length < 1 or len(example) - prompt_length < 2:
                problems.append(f"{where}: empty prompt or empty response")
            elif example[-1] != EOT_TOKEN:
                problems.append(f"{where}: response does not end with <|endoftext|>")
            else:
                _, targets = example_arrays(example, prompt_length, manifest.context_length)
                trained = np.flatnonzero(targets != -1)
                if trained.tolist() != list(range(prompt_length - 1, len(example) - 1)):
                    problems.append(f"{where}: loss mask does not cover exactly the response")
            checked += 1
            if len(problems) >= 10:
                break
    return {"problems": problems, "examples_checked": checked, "context_length": manifest.context_length}


@dg.asset_check(asset=dolly_prompts, blocking=True,
                description="every example has a response, and the loss mask covers exactly the responses")
def dolly_prompts_are_valid(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    output = latest_output(context, "dolly_prompts")
    try:
        report = validate_prepared_folder(output.path)
    except InstructionDataError as e:
        return dg.AssetCheckResult(passed=False, metadata={"error": str(e)})
    return dg.AssetCheckResult(passed=not report["problems"],
                               metadata={k: (", ".join(v) or "none") if isinstance(v, list) else v
                                         for k, v in report.items()})
