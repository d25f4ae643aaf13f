"""Checkpoints to and from the Hugging Face `transformers` GPT-2 format.

    python -m nanogpt_core.hf export CHECKPOINT_OR_RUN_DIR OUTDIR [--scores FILE.json] [--title TEXT]
    python -m nanogpt_core.hf import HF_DIR_OR_HUB_NAME OUT_CHECKPOINT_OR_DIR

Export writes a folder that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load with no network: the weights as `model.safetensors`, a
GPT-2 `config.json`, the tokenizer rebuilt from the project's own verified rank file, a chat
template that renders the fine-tuning prompt, and the checkpoint's lineage (`lineage.json`
and a README model card). Import reads any GPT-2 folder in that format, OpenAI's `gpt2`
included, into a checkpoint that fine-tuning, evaluation and serving accept.

The parameter names are GPT-2's on both sides; two things differ. `transformers` keeps the
projections in `Conv1D` layers, whose weight is the transpose of an `nn.Linear` weight; and
its vocabulary has 50257 rows where ours is padded to 50304. Export drops the padding rows.
Import fills them with the mean of the real rows: their logit is then the mean of the real
logits, which (exp being convex) leaves all 47 together at most 47/50304 of the probability,
where zero rows would take a logit of 0, far above what GPT-2 gives most tokens.

`safetensors`, `tokenizers` and `huggingface_hub` are imported inside the functions that use
them, so the rest of the library runs without them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nanogpt_core.checkpoint import (CheckpointError, checkpoint_name, latest_checkpoint, model_config_of,
                                     read_checkpoint, save_checkpoint)
from nanogpt_core.lineage import code_version, git_commit
from nanogpt_core.model import GPT2_VOCAB_SIZE, GPT, GPTConfig, PADDED_VOCAB_SIZE
from nanogpt_core.prompts import END_OF_TEXT
from nanogpt_core.tokenizer import EOT_TOKEN, get_tokenizer

EXPORT_FORMAT = "nanogpt-pipeline/hf-export"
HF_INIT_PREFIX = "hf:"  # how fine-tuning's --init-from names a Hugging Face folder or hub model
WEIGHTS_FILE = "model.safetensors"
LINEAGE_FILE = "lineage.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
MODEL_CARD_FILE = "README.md"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json",
                   CHAT_TEMPLATE_FILE)
EXPORTED_FILES = (WEIGHTS_FILE, "config.json", "generation_config.json", *TOKENIZER_FILES, LINEAGE_FILE,
                  MODEL_CARD_FILE)

# transformers' GPT-2 stores these as Conv1D weights: (in, out), the transpose of ours.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WTE = "transformer.wte.weight"
LM_HEAD = "lm_head.weight"
# Attention-mask buffers that older transformers versions saved with the weights.
_MASK_BUFFER = re.compile(r"\.attn\.(masked_)?bias$")
# Our blocks use nn.LayerNorm's default epsilon and the tanh GELU; both must match to import.
_LAYER_NORM_EPS = 1e-5
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")

# The project's prompt (nanogpt_core.prompts.chat_to_prompt, after a leading <|endoftext|>) in
# Jinja, so that `apply_chat_template` feeds the model exactly the tokens it was fine-tuned on.
# The prompt always ends with the response header, so add_generation_prompt changes nothing.
CHAT_TEMPLATE = r"""{%- if not messages -%}
    {{- raise_exception('messages must not be empty') -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1, context='') -%}
{%- for message in messages -%}
    {%- if message.get('role') == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- if ns.last_user < 0 -%}
    {{- raise_exception('messages must contain at least one user message') -}}
{%- endif -%}
{%- for message in messages[:ns.last_user] -%}
    {%- set role = message.get('role', 'user') -%}
    {%- set content = (message.get('content') or '') | trim -%}
    {%- if content -%}
        {%- set line = content if role == 'system' else (role | capitalize) ~ ': ' ~ content -%}
        {%- set ns.context = ns.context ~ ('\n' if ns.context else '') ~ line -%}
    {%- endif -%}
{%- endfor -%}
{{- '<|endoftext|>### Instruction:\n' ~ ((messages[ns.last_user].get('content') or '') | trim) ~ '\n\n' -}}
{%- if ns.context | trim -%}
    {{- '### Input:\n' ~ (ns.context | trim) ~ '\n\n' -}}
{%- endif -%}
{{- '### Response:\n' -}}
"""


class HFFormatError(RuntimeError):
    """A folder or hub model that cannot be converted, with the reason in the message."""


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    files: dict[str, int]  # name -> bytes
    content_hash: str  # over every file's name and sha256: equal folders, equal hash
    model_card: str
    parameters: int


# ---------------------------------------------------------------------------------------------
# weights

def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in GPT2LMHeadModel's layout: Conv1D weights transposed, padding rows
    dropped, the tied lm_head left out (transformers ties it back on load)."""
    hf = {}
    for name, tensor in state.items():
        if name == LM_HEAD:
            continue
        tensor = tensor.detach().cpu().float()  # config.json says float32
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        elif name == WTE:
            tensor = tensor[:GPT2_VOCAB_SIZE]
        hf[name] = tensor.contiguous().clone()  # safetensors refuses tensors that share memory
    return hf


def from_hf_state_dict(hf: Mapping[str, torch.Tensor], vocab_size: int = PADDED_VOCAB_SIZE,
                       ) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict from transformers (GPT2LMHeadModel or bare GPT2Model key names) in
    our layout, float32, with the embedding padded to `vocab_size` rows by their mean."""
    ours: dict[str, torch.Tensor] = {}
    head = None
    for name, tensor in hf.items():
        if _MASK_BUFFER.search(name):
            continue
        if name == LM_HEAD:
            head = tensor
            continue
        if not name.startswith("transformer."):
            name = "transformer." + name
        tensor = tensor.detach().cpu().float()
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        ours[name] = tensor.contiguous()
    if WTE not in ours:
        raise HFFormatError("the weights hold no token embedding (wte.weight); is this a GPT-2 model?")
    wte = ours[WTE]
    if head is not None and not torch.equal(head.detach().cpu().float(), wte):
        raise HFFormatError("lm_head.weight differs from the token embedding; this model ties the two, "
                            "so an untied output layer cannot be imported")
    if not GPT2_VOCAB_SIZE <= wte.size(0) <= vocab_size:
        raise HFFormatError(f"the embedding has {wte.size(0)} rows; GPT-2's tokenizer needs {GPT2_VOCAB_SIZE} "
                            f"(at most {vocab_size} with padding)")
    padding = wte[:GPT2_VOCAB_SIZE].mean(dim=0, keepdim=True).expand(vocab_size - wte.size(0), -1)
    ours[WTE] = torch.cat([wte, padding])
    ours[LM_HEAD] = ours[WTE]
    return ours


def gpt_config_from_hf(config: Mapping[str, Any], source: str = "config.json") -> GPTConfig:
    """Our model config for a transformers GPT-2 config, refusing what our model cannot represent."""
    if config.get("model_type") != "gpt2":
        raise HFFormatError(f"{source}: model_type is {config.get('model_type')!r}; only GPT-2 ('gpt2') "
                            f"folders can be imported")
    n_embd = config.get("n_embd", 768)
    problems = []
    if config.get("activation_function", "gelu_new") not in _TANH_GELUS:
        problems.append(f"activation_function {config['activation_function']!r} (ours is the tanh GELU)")
    if config.get("layer_norm_epsilon", _LAYER_NORM_EPS) != _LAYER_NORM_EPS:
        problems.append(f"layer_norm_epsilon {config['layer_norm_epsilon']} (ours is {_LAYER_NORM_EPS})")
    if config.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner {config['n_inner']} (ours is 4 x n_embd = {4 * n_embd})")
    if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("attention scaled other than by 1/sqrt(head size)")
    if problems:
        raise HFFormatError(f"{source}: this GPT-2 variant differs from the project's model: " + "; ".join(problems))
    vocab = config.get("vocab_size", GPT2_VOCAB_SIZE)
    try:
        # Dropout is a training choice; fine-tuning sets its own.
        return GPTConfig(block_size=config.get("n_positions", 1024), vocab_size=max(vocab, PADDED_VOCAB_SIZE),
                         n_layer=config.get("n_layer", 12), n_head=config.get("n_head", 12), n_embd=n_embd)
    except ValueError as e:
        raise HFFormatError(f"{source}: {e}") from e


def hf_config(config: GPTConfig) -> dict[str, Any]:
    """config.json for GPT2LMHeadModel, in the fields OpenAI's gpt2 folder uses."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": GPT2_VOCAB_SIZE,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": _LAYER_NORM_EPS,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "torch_dtype": "float32",
    }


def generation_config() -> dict[str, Any]:
    # pad = eos, as for OpenAI's GPT-2, which has no padding token of its own.
    return {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN, "pad_token_id": EOT_TOKEN}


# ---------------------------------------------------------------------------------------------
# tokenizer

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters, which vocab.json and merges.txt are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def gpt2_ranks() -> dict[bytes, int]:
    """Every ordinary token's bytes and rank (= id), from the Encoding built on the verified rank file."""
    encoding = get_tokenizer()
    return {encoding.decode_single_token_bytes(rank): rank for rank in range(EOT_TOKEN)}


def _bpe_split(ranks: Mapping[bytes, int], token: bytes, below: int) -> list[bytes]:
    """`token` byte-pair encoded with only the merges ranked below `below`."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, below
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], below)
            if rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def vocab_and_merges(ranks: Mapping[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json's token -> id map and merges.txt's pairs, in priority order, from tiktoken ranks.

    tiktoken merges whichever adjacent pair forms the lowest-ranked token; a merges list
    gives each token the one pair it is made from. Encoding a token with only the merges
    ranked below it stops exactly one merge short of the token, at that pair.
    """
    to_unicode = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise HFFormatError(f"token {token!r} (rank {rank}) is not one merge of lower-ranked tokens")
        merges.append((text(parts[0]), text(parts[1])))
    vocab[END_OF_TEXT] = EOT_TOKEN
    return vocab, merges


def write_tokenizer_files(folder: Path, model_max_length: int) -> None:
    """GPT-2's tokenizer (TOKENIZER_FILES) in both the slow (vocab.json, merges.txt) and fast
    (tokenizer.json) forms, built from the verified rank file."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = vocab_and_merges(gpt2_ranks())
    _write_json(folder / "vocab.json", vocab, indent=None)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
    tokenizer.save(str(folder / "tokenizer.json"))

    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer",
        **special,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decoding must give back the text exactly
        "errors": "replace",
        "model_max_length": model_max_length,
        "added_tokens_decoder": {str(EOT_TOKEN): {"content": END_OF_TEXT, "lstrip": False, "normalized": False,
                                                  "rstrip": False, "single_word": False, "special": True}},
        # Newer transformers read chat_template.jinja first; older ones and other tools read this.
        "chat_template": CHAT_TEMPLATE,
    })
    (folder / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# export

def resolve_checkpoint(path: str | Path) -> Path:
    """`path` itself, or the newest complete checkpoint when it is a run folder."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}")
        return found[0]
    return path


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, scores: Mapping[str, Any] | None = None,
                      title: str = "nanogpt-pipeline GPT-2") -> ExportResult:
    """Write `checkpoint` (a file, or a run folder's newest) as a transformers GPT-2 folder.

    `scores`: benchmark results to record in the model card and lineage.json, for example
    the deployment manifest's. Files of the same names in `out_dir` are replaced.
    """
    from safetensors.torch import save_file

    checkpoint = resolve_checkpoint(checkpoint)
    payload = read_checkpoint(checkpoint)
    config = model_config_of(payload, checkpoint)
    if config.vocab_size < GPT2_VOCAB_SIZE:
        raise HFFormatError(f"{checkpoint}: vocab_size {config.vocab_size} is smaller than GPT-2's {GPT2_VOCAB_SIZE}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    weights = to_hf_state_dict(payload["model"])
    save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", hf_config(config))
    _write_json(out_dir / "generation_config.json", generation_config())
    write_tokenizer_files(out_dir, config.block_size)

    parameters = sum(t.numel() for t in weights.values())
    record = {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "checkpoint": str(checkpoint.resolve()),
        "step": payload["step"],
        "created": payload.get("created"),
        "parameters": parameters,
        "model_config": asdict(config),
        "lineage": payload.get("lineage", {}),
        "metrics": payload.get("metrics", {}),
        "train_config": payload.get("train_config", {}),
        "scores": dict(scores or {}),
    }
    _write_json(out_dir / LINEAGE_FILE, record)
    card = model_card(record, title)
    (out_dir / MODEL_CARD_FILE).write_text(card, encoding="utf-8")

    files = {name: (out_dir / name).stat().st_size for name in sorted(EXPORTED_FILES)}
    return ExportResult(out_dir, files, folder_content_hash(out_dir, files), card, parameters)


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


def folder_content_hash(folder: Path, names: Iterable[str]) -> str:
    """The first 16 hex digits of a sha256 over the named files' names and sha256s."""
    return _files_hash([folder / name for name in sorted(names)])


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


# ---------------------------------------------------------------------------------------------
# import

def import_hf(source: str | Path, out: str | Path) -> Path:
    """Convert a GPT-2 folder in transformers format (or a hub name, downloaded when reachable)
    to a project checkpoint; `out` is a `.pt` file or a folder (then `model_00000.pt` in it)."""
    folder = locate_hf_model(source)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HFFormatError(f"{folder} has no config.json; is it a transformers model folder?")
    hf = json.loads(config_path.read_text())
    config = gpt_config_from_hf(hf, str(config_path))
    weight_files = _weight_files(folder)
    state = from_hf_state_dict(_load_weights(weight_files), config.vocab_size)

    model = GPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise HFFormatError(f"the weights in {folder} do not fit the GPT-2 its config.json describes: {e}") from e
    exported = folder / LINEAGE_FILE
    lineage = {
        "stage": "import",
        "hf_folder": str(folder.resolve()),
        # A content hash of the weights, like every other data version in the project.
        "data_version": _files_hash(weight_files),
        "data_source": {"kind": "huggingface", "name_or_path": str(source)},
        "code_version": code_version(),
        "git_commit": git_commit(),
        "parent_checkpoint": None,
        "exported_lineage": json.loads(exported.read_text()) if exported.is_file() else None,
    }
    out = Path(out)
    if out.is_dir() or out.suffix != ".pt":
        out = out / checkpoint_name(0)
    return save_checkpoint(out, model, step=0, lineage=lineage)


def locate_hf_model(source: str | Path) -> Path:
    """A local folder as is; otherwise a hub name, fetched (config and safetensors weights only)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise HFFormatError(f"{source} is not a folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise HFFormatError(f"{source} is not a folder here, and huggingface_hub, which would download it, "
                            f"is not installed") from e
    try:
        return Path(snapshot_download(text, allow_patterns=["config.json", "*.safetensors",
                                                            "model.safetensors.index.json"]))
    except Exception as e:  # offline, unknown name, no access, bad name: all mean the same here
        raise HFFormatError(
            f"{source} is not a folder here, and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {_first_line(e)}). Without a connection to the hub, download it on a machine "
            f"that has one (`hf download openai-community/gpt2 config.json model.safetensors --local-dir gpt2`) "
            f"and pass that folder instead.") from e


def _weight_files(folder: Path) -> list[Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
    raise HFFormatError(f"{folder} holds no weights (model.safetensors or pytorch_model.bin, or a sharded index)")


def _load_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise HFFormatError(f"weights file {path} is missing")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            weights.update(load_file(str(path)))
        else:
            try:
                weights.update(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:
                raise HFFormatError(f"{path} does not load safely as tensors: {_first_line(e)}") from e
    return weights


# ---------------------------------------------------------------------------------------------
# helpers and command line

def _write_json(path: Path, value: Any, indent: int | None = 2) -> None:
    path.write_text(json.dumps(value, indent=indent, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + _sha256_file(path).encode() + b"\0")
    return digest.hexdigest()[:16]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanogpt_core.hf", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
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


if __name__ == "__main__":
    sys.exit(main())
