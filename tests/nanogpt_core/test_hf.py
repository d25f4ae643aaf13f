"""Hugging Face format: export loads in transformers with the same logits, tokens and greedy text;
import gives the weights back; fine-tuning starts from an imported folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanogpt_core.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from nanogpt_core.config import get_profile
from nanogpt_core.hf import HF_INIT_PREFIX, HFFormatError, export_checkpoint, import_hf, verify_export
from nanogpt_core.hf.cli import main
from nanogpt_core.hf.importer import locate_hf_model
from nanogpt_core.hf.tokenizer_files import CHAT_TEMPLATE
from nanogpt_core.hf.weights import from_hf_state_dict
from nanogpt_core.model import GPT, GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE
from nanogpt_core.prompts import chat_to_prompt, prompt_token_ids
from nanogpt_core.tokenizer import EOT_TOKEN, get_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test here may reach the hub; set per test so other test files see the environment as it was."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

LINEAGE = {"stage": "finetune", "profile": "micro", "data_version": "instr-0123abcd",
           "parent_checkpoint": "/runs/pre/model_00019.pt", "parent_data_version": "shards-4567ef01",
           "code_version": "c0dec0dec0dec0de", "git_commit": "abc123"}
METRICS = {"val_loss": 4.25, "train_loss": 4.5, "initial_val_loss": 10.9, "rank_weight_fingerprints": ["x", "x"]}
SCORES = {"benchmark": "demo-cloze", "acc": 0.31, "acc_norm": 0.375, "n": 40}

CHATS = [
    [{"role": "user", "content": "Name three primary colors."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Why is the sky blue?\n"}],
    [{"role": "system", "content": "Answer in French."},
     {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Bonjour !"},
     {"role": "user", "content": "How are you?"}],
    [{"role": "user", "content": "first"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "second, with unicode: café ✓"}, {"role": "assistant", "content": "trailing"}],
    [{"role": "user", "content": None}, {"role": "tool", "content": " result "}, {"role": "user", "content": "ok"}],
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A micro model a few optimizer steps past its initialization, padding rows included."""
    torch.manual_seed(0)
    model = GPT(get_profile("micro").model_config())
    optimizer = model.configure_optimizer(weight_decay=0.1, learning_rate=1e-2, device_type="cpu")
    for _ in range(3):
        tokens = torch.randint(0, GPT2_VOCAB_SIZE, (2, 33))
        _, loss = model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("run") / "model_00002.pt"
    return save_checkpoint(path, model, step=2, lineage=LINEAGE, metrics=METRICS)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "export"
    export_checkpoint(checkpoint, out, scores=SCORES)
    return out


@pytest.fixture(scope="module")
def hf_model(exported):
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return transformers.AutoTokenizer.from_pretrained(exported)


def test_the_folder_holds_what_transformers_and_other_tools_look_for(exported, checkpoint):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "README.md", "lineage.json"} <= names
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["vocab_size"] == GPT2_VOCAB_SIZE
    assert (config["n_positions"], config["n_layer"], config["n_head"], config["n_embd"]) == (64, 2, 2, 64)
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == EOT_TOKEN
    assert json.loads((exported / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert (exported / "chat_template.jinja").read_text() == CHAT_TEMPLATE

    from safetensors import safe_open
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: transformers restores it from wte
        assert f.get_slice("transformer.wte.weight").get_shape() == [GPT2_VOCAB_SIZE, 64]
        assert f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape() == [64, 192]  # Conv1D: (in, out)

    card = (exported / "README.md").read_text()
    for expected in ("instr-0123abcd", "shards-4567ef01", "c0dec0dec0dec0de", "demo-cloze", "0.3750",
                     "val_loss", "4.2500", '"n_layer": 2', "model_00002.pt", "fine-tuned", "apply_chat_template"):
        assert expected in card, expected
    assert "rank_weight_fingerprints" not in card
    record = json.loads((exported / "lineage.json").read_text())
    assert record["lineage"] == LINEAGE and record["scores"] == SCORES and record["step"] == 2
    assert record["checkpoint"] == str(checkpoint.resolve())


def test_transformers_gives_the_projects_logits(exported, checkpoint, hf_model):
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    tokens = torch.randint(0, GPT2_VOCAB_SIZE, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = hf_model(tokens).logits
    assert theirs.shape == (3, 64, GPT2_VOCAB_SIZE)
    torch.testing.assert_close(theirs, ours[..., :GPT2_VOCAB_SIZE], atol=1e-4, rtol=0)


def test_greedy_generation_agrees_token_for_token(checkpoint, hf_model):
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    prompt = torch.tensor([prompt_token_ids("The capital of France is")])
    ours = model.generate(prompt, max_new_tokens=40, temperature=0)[0].tolist()
    theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                               do_sample=False)[0].tolist()
    # transformers stops at <|endoftext|> (the eos token); ours runs on.
    if EOT_TOKEN in ours[prompt.size(1):]:
        ours = ours[:ours.index(EOT_TOKEN, prompt.size(1)) + 1]
    assert len(ours) > prompt.size(1) + 1
    assert theirs == ours


def test_import_gives_back_the_same_weights_with_padding_rows_at_the_mean(exported, checkpoint, tmp_path):
    back = import_hf(exported, tmp_path / "imported.pt")
    original, imported = read_checkpoint(checkpoint), read_checkpoint(back)
    assert imported["model_config"] == original["model_config"]
    assert imported["step"] == 0 and imported["lineage"]["stage"] == "import"
    assert imported["lineage"]["exported_lineage"]["lineage"] == LINEAGE
    assert len(imported["lineage"]["data_version"]) == 16
    for name, tensor in original["model"].items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            real = tensor[:GPT2_VOCAB_SIZE]
            assert torch.equal(imported["model"][name][:GPT2_VOCAB_SIZE], real), name
            padding = imported["model"][name][GPT2_VOCAB_SIZE:]
            assert padding.shape == (PADDED_VOCAB_SIZE - GPT2_VOCAB_SIZE, 64)
            assert torch.equal(padding, real.mean(dim=0, keepdim=True).expand_as(padding))
        else:
            assert torch.equal(imported["model"][name], tensor), name
    model, _ = load_checkpoint(back)  # what fine-tuning, evaluation and serving call
    assert model.lm_head.weight is model.transformer.wte.weight


def test_import_reads_openai_key_names_buffers_and_half_precision(exported, tmp_path):
    """OpenAI's gpt2 folder: GPT2Model names (no `transformer.`), mask buffers, an explicit lm_head."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(exported / "model.safetensors"))
    openai = {name.removeprefix("transformer."): t.half() for name, t in weights.items()}
    openai["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    openai["lm_head.weight"] = openai["wte.weight"].clone()
    folder = tmp_path / "gpt2"
    folder.mkdir()
    save_file(openai, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text((exported / "config.json").read_text())
    payload = read_checkpoint(import_hf(folder, tmp_path / "out"))  # a folder: model_00000.pt inside
    assert torch.equal(payload["model"]["transformer.h.1.mlp.c_fc.weight"],
                       weights["transformer.h.1.mlp.c_fc.weight"].half().float().t())
    assert payload["model"]["transformer.wte.weight"].dtype == torch.float32


def test_import_refuses_what_the_model_cannot_represent(exported, tmp_path):
    config = json.loads((exported / "config.json").read_text())
    folder = tmp_path / "variant"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(exported / "model.safetensors")
    for change, message in [({"model_type": "llama"}, "only GPT-2"),
                            ({"activation_function": "relu"}, "activation_function 'relu'"),
                            ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
                            ({"n_layer": 3}, "do not fit")]:
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(HFFormatError, match=message):
            import_hf(folder, tmp_path / "x.pt")
    with pytest.raises(HFFormatError, match="untied output layer"):
        from_hf_state_dict({"wte.weight": torch.zeros(GPT2_VOCAB_SIZE, 4), "lm_head.weight": torch.ones(
            GPT2_VOCAB_SIZE, 4)})


def test_a_hub_name_without_the_hub_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(HFFormatError, match="downloading it from the Hugging Face hub failed.*pass that folder"):
        locate_hf_model("gpt2")
    with pytest.raises(HFFormatError, match="is not a folder"):
        locate_hf_model(str(tmp_path / "absent"))


def test_the_tokenizer_gives_tiktokens_ids_on_every_fineweb_edu_document(shared_data, hf_tokenizer):
    import pyarrow.parquet as pq

    path = shared_data / "fineweb_edu" / "fineweb_edu_sample_155.parquet"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    documents = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    assert len(documents) == 155
    encoding = get_tokenizer()
    for i, document in enumerate(documents):
        text = "<|endoftext|>" + document  # as the shards store a document
        ids = hf_tokenizer.encode(text)
        assert ids == encoding.encode(text, allowed_special={"<|endoftext|>"}), f"document {i}"
        assert ids[0] == EOT_TOKEN
        assert hf_tokenizer.decode(ids) == text, f"document {i}"


def test_vocab_json_and_merges_txt_alone_give_the_same_ids(shared_data, exported, tmp_path):
    """Tools that rebuild the tokenizer from vocab.json and merges.txt get the same ids."""
    import pyarrow.parquet as pq

    path = shared_data / "fineweb_edu" / "fineweb_edu_sample_155.parquet"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((exported / name).read_bytes())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    encoding = get_tokenizer()
    for i, document in enumerate(pq.read_table(path, columns=["text"]).column("text").to_pylist()):
        assert tokenizer.encode(document) == encoding.encode(document), f"document {i}"


def test_the_tokenizer_agrees_on_awkward_text(hf_tokenizer):
    encoding = get_tokenizer()
    for text in ["", " ", "a  ", "trailing \n", "hello   world\n\n\n  x", "I'm you'll THEY'RE it's",
                 "3.14159 ١٢٣", "😀 👩‍👩‍👧", "\t\ttabs\r\n", "x<|endoftext|>y", "日本語", "\u00a0nbsp\u3000",
                 "e\u0301", "\u200b"]:
        assert hf_tokenizer.encode(text) == encoding.encode(text, allowed_special={"<|endoftext|>"}), repr(text)


@pytest.mark.parametrize("messages", CHATS)
def test_the_chat_template_renders_the_fine_tuning_prompt(hf_tokenizer, messages):
    prompt = chat_to_prompt(messages)
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|endoftext|>" + prompt
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == prompt_token_ids(prompt)


def test_the_chat_template_refuses_a_chat_without_a_user_message(hf_tokenizer):
    with pytest.raises(Exception, match="at least one user message"):
        hf_tokenizer.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)
    with pytest.raises(Exception, match="empty"):  # newer transformers refuse this before the template runs
        hf_tokenizer.apply_chat_template([], tokenize=False)


def test_the_command_line_exports_and_imports(checkpoint, tmp_path, capsys):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(SCORES))
    assert main(["export", str(checkpoint.parent), str(tmp_path / "out"), "--scores", str(scores)]) == 0
    assert "content hash" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "out"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model_00000.pt").is_file()
    assert main(["import", str(tmp_path / "nowhere"), str(tmp_path / "x.pt")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_the_content_hash_is_repeatable(checkpoint, tmp_path):
    first = export_checkpoint(checkpoint, tmp_path / "a", scores=SCORES)
    second = export_checkpoint(checkpoint, tmp_path / "b", scores=SCORES)
    assert first.content_hash == second.content_hash and first.files == second.files
    assert first.content_hash != export_checkpoint(checkpoint, tmp_path / "c").content_hash


def test_fine_tuning_starts_from_a_hugging_face_folder(exported, tmp_path):
    from nanogpt_core.config import get_finetune_profile
    from nanogpt_core.finetune import finetune

    cfg = get_finetune_profile("micro", max_steps=2, val_steps=1, val_every=1, checkpoint_every=1)
    result = finetune(cfg, HF_INIT_PREFIX + str(exported), tmp_path / "run")
    parent = read_checkpoint(tmp_path / "run" / "init" / "model_00000.pt")
    assert parent["lineage"]["stage"] == "import" and parent["lineage"]["hf_folder"] == str(exported.resolve())
    assert result.lineage["parent_checkpoint"] == str((tmp_path / "run" / "init" / "model_00000.pt").resolve())
    assert result.lineage["parent_data_version"] == parent["lineage"]["data_version"]
    assert result.final_checkpoint == tmp_path / "run" / "model_00001.pt"


def test_verify_export_finds_a_changed_tensor_and_a_missing_file(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file


    folder = tmp_path / "export"
    export_checkpoint(checkpoint, folder)
    assert verify_export(folder, checkpoint) == []
    weights = load_file(str(folder / "model.safetensors"))
    weights["transformer.h.1.ln_2.bias"][0] += 1e-3
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert verify_export(folder, checkpoint) == ["transformer.h.1.ln_2.bias differs"]
    (folder / "merges.txt").unlink()
    assert verify_export(folder, checkpoint) == ["missing merges.txt"]
