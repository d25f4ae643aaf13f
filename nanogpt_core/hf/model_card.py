"""The exported folder's README: what the model is, how to run it, where it came from."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nanogpt_core.hf.files import LINEAGE_FILE


def model_card(record: Mapping[str, Any], title: str = "nanogpt-pipeline GPT-2") -> str:
    """README.md for the exported folder: what the model is, how to run it, where it came from."""
    config, lineage = record["model_config"], record["lineage"]
    stage = lineage.get("stage", "pretrain")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- gpt2",
        "- nanogpt-pipeline",
        "---",
        "",
        f"# {title}",
        "",
        f"A GPT-2 with {record['parameters']:,} parameters ({config['n_layer']} layers, {config['n_head']} heads, "
        f"{config['n_embd']}-wide, {config['block_size']}-token context), {_stage_words(stage)}, "
        f"exported from `{Path(record['checkpoint']).name}` (optimizer step {record['step']}).",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'messages = [{"role": "user", "content": "Name three primary colors."}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
        "                                       return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=64)",
        "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "The chat template renders the project's instruction prompt, after a leading `<|endoftext|>`"
        + (":" if stage == "finetune" else " (this checkpoint has not been fine-tuned on it, so expect it to "
                                           "continue the text rather than answer):"),
        "",
        "```",
        "### Instruction:",
        "{last user message}",
        "",
        "### Input:",
        "{system message and earlier turns, one \"Role: text\" line each; the section is left out when empty}",
        "",
        "### Response:",
        "```",
        "",
        "A fine-tuned model ends its answer with `<|endoftext|>`, the end-of-sequence token. The tokenizer is "
        "OpenAI's GPT-2 byte-level BPE (50257 tokens; the project pads the embedding to 50304 rows for speed, "
        "and the export leaves the padding out).",
    ]
    scores = _flatten(record.get("scores") or {})
    if scores:
        lines += ["", "## Scores", "", *_table(scores)]
    metrics = {k: v for k, v in _flatten(record.get("metrics") or {}).items() if not isinstance(v, str)}
    if metrics:
        lines += ["", "## Training metrics", "", *_table(metrics)]
    lines += ["", "## Lineage", "", *_table({"checkpoint": record["checkpoint"], "step": record["step"],
                                             "created": record.get("created"), **lineage})]
    lines += ["", "## Configuration", "", "Model:", "", "```json", json.dumps(config, indent=2), "```"]
    if record.get("train_config"):
        lines += ["", "Training:", "", "```json", json.dumps(record["train_config"], indent=2, default=str), "```"]
    lines += ["", f"The same record, machine-readable, is in `{LINEAGE_FILE}`.", ""]
    return "\n".join(lines)


def _stage_words(stage: str) -> str:
    return {"finetune": "fine-tuned on instruction data", "import": "imported from Hugging Face format"}.get(
        stage, "pretrained")


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key == "rank_weight_fingerprints":
            continue  # a consistency check between processes, not a property of the model
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _table(values: Mapping[str, Any]) -> list[str]:
    rows = ["| field | value |", "| --- | --- |"]
    for key, value in values.items():
        if isinstance(value, float):
            shown = f"{value:.4f}"
        elif isinstance(value, (dict, list)):
            shown = f"`{json.dumps(value, default=str)}`"
        elif value is None:
            shown = "—"
        else:
            shown = f"`{value}`" if isinstance(value, str) and value else str(value)
        shown = shown.replace("|", "\\|")  # a bare | would end the table cell, even in backticks
        rows.append(f"| {key} | {shown} |")
    return rows
