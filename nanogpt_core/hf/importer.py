"""A GPT-2 folder in transformers format, or a hub name, converted into a project checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nanogpt_core.checkpoint import checkpoint_name, save_checkpoint
from nanogpt_core.content_hash import files_version
from nanogpt_core.hf.files import LINEAGE_FILE, HFFormatError
from nanogpt_core.hf.weights import from_hf_state_dict, gpt_config_from_hf
from nanogpt_core.lineage import code_version, git_commit
from nanogpt_core.model import GPT


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
        "data_version": files_version(weight_files),
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
