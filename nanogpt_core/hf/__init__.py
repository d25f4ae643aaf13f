"""Checkpoints to and from the Hugging Face `transformers` GPT-2 format.

    python -m nanogpt_core.hf export CHECKPOINT_OR_RUN_DIR OUTDIR [--scores FILE.json] [--title TEXT]
    python -m nanogpt_core.hf import HF_DIR_OR_HUB_NAME OUT_CHECKPOINT_OR_DIR

Export writes a folder that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load with no network: the weights as `model.safetensors`, a
GPT-2 `config.json`, the tokenizer rebuilt from the project's own verified rank file, a chat
template that renders the fine-tuning prompt, and the checkpoint's lineage (`lineage.json`
and a README model card). Import reads any GPT-2 folder in that format, OpenAI's `gpt2`
included, into a checkpoint that fine-tuning, evaluation and serving accept.

One module a job: `weights` (the state dict and config.json; how the two layouts differ),
`tokenizer_files`, `model_card`, `export`, `verify` (an export read back against its
checkpoint), `importer` and `cli`.

`safetensors`, `tokenizers` and `huggingface_hub` are imported inside the functions that use
them, so the rest of the library runs without them.
"""

from nanogpt_core.hf.export import ExportResult, export_checkpoint
from nanogpt_core.hf.files import HF_INIT_PREFIX, HFFormatError
from nanogpt_core.hf.importer import import_hf
from nanogpt_core.hf.verify import verify_export

__all__ = ["HF_INIT_PREFIX", "ExportResult", "HFFormatError", "export_checkpoint", "import_hf", "verify_export"]
