"""Instruction data: the three sources, the prompt template, loss masking, bad rows, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanogpt_core.config import get_profile
from nanogpt_core.data.instructions import (FIELDS, PAD_TOKEN, InstructionDataError, InstructionLoader,
                                            InstructionManifest, encode_example, iter_instruction_rows,
                                            prepare_from_source, prepare_instructions)
from nanogpt_core.model import GPT
from nanogpt_core.prompts import build_prompt, chat_to_prompt, prompt_token_ids
from nanogpt_core.tokenizer import EOT_TOKEN, get_tokenizer

ROWS = [
    {"instruction": "Name a primary colour.", "context": "", "response": "Red.", "category": "open_qa"},
    {"instruction": "Summarise the passage.", "context": "Cats sleep for most of the day.",
     "response": "Cats sleep a lot.", "category": "summarization"},
    {"instruction": "What is two plus two?", "context": "", "response": "Four, as any calculator will confirm.",
     "category": "open_qa"},
    {"instruction": "Say hello.", "context": "", "response": "Hello!", "category": "chat"},
]


def decode(ids) -> str:
    return get_tokenizer().decode([int(i) for i in ids])


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# --------------------------------------------------------------------------------------------- sources


def test_the_local_source_reads_the_real_dolly_sample(shared_data, tmp_path):
    path = shared_data / "dolly" / "dolly_style_1000.jsonl"
    rows = list(iter_instruction_rows("local", path=path))
    assert len(rows) == 1000
    assert all(set(row) == set(FIELDS) and all(isinstance(row[f], str) for f in FIELDS) for row in rows)

    manifest = prepare_from_source("local", tmp_path / "dolly", path=path, context_length=1024)
    assert manifest.rows_read == 1000
    assert sum(manifest.examples.values()) + sum(manifest.skipped.values()) == 1000
    assert set(manifest.skipped) <= {"too_long"}  # the sample is clean; only a few answers run long
    assert manifest.examples["val"] > 0 and manifest.examples["train"] > 900
    assert manifest.source == {"kind": "local", "path": str(path.resolve())}


def test_the_local_source_honours_a_limit(shared_data):
    rows = list(iter_instruction_rows("local", path=shared_data / "dolly" / "dolly_style_1000.jsonl", limit=5))
    assert len(rows) == 5


def test_the_demo_source_is_chatterbot_in_the_dolly_schema_in_a_fixed_order():
    rows = list(iter_instruction_rows("demo"))
    assert rows == list(iter_instruction_rows("demo"))
    conversations = [r for r in rows if isinstance(r, dict)]
    assert len(conversations) > 2000
    assert all(set(r) == set(FIELDS) for r in conversations)
    categories = {r["category"] for r in conversations}
    assert {"AI", "trivia", "greetings", "tech support"} <= categories
    first = conversations[0]
    assert (first["instruction"], first["category"], first["context"]) == ("What is AI?", "AI", "")


def test_a_later_reply_in_a_demo_conversation_carries_the_earlier_turns_as_the_chat_endpoint_renders_them():
    multi_turn = next(r for r in iter_instruction_rows("demo") if isinstance(r, dict) and r["context"])
    turns = multi_turn["context"].split("\n")
    assert turns[0].startswith("User: ") and turns[1].startswith("Assistant: ")
    chat = [{"role": "user" if t.startswith("User: ") else "assistant", "content": t.split(": ", 1)[1]}
            for t in turns] + [{"role": "user", "content": multi_turn["instruction"]}]
    assert chat_to_prompt(chat) == build_prompt(multi_turn["instruction"], multi_turn["context"])


def test_the_dolly_source_fails_fast_in_one_line_pointing_at_the_offline_sources(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InstructionDataError) as failure:
        next(iter_instruction_rows("dolly"))
    message = str(failure.value)
    assert "\n" not in message and "local" in message and "demo" in message


def test_an_unknown_source_or_a_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown instruction source 'alpaca'"):
        iter_instruction_rows("alpaca")
    with pytest.raises(InstructionDataError, match=f"instruction file {tmp_path / 'absent.jsonl'} does not exist"):
        next(iter_instruction_rows("local", path=tmp_path / "absent.jsonl"))


# --------------------------------------------------------------------------------------------- template


def test_training_and_the_chat_endpoint_render_the_same_prompt_token_for_token():
    tokens, prompt_length = encode_example("What is AI?", "", "The science of thinking machines.")
    chat = [{"role": "user", "content": "What is AI?"}]
    assert tokens[:prompt_length] == prompt_token_ids(chat_to_prompt(chat))

    with_context = encode_example("Summarise the passage.", "Cats sleep a lot.", "They sleep.")
    chat = [{"role": "system", "content": "Cats sleep a lot."}, {"role": "user", "content": "Summarise the passage."}]
    assert with_context[0][:with_context[1]] == prompt_token_ids(chat_to_prompt(chat))


def test_an_example_is_endoftext_prompt_response_endoftext():
    tokens, prompt_length = encode_example("Name a primary colour.", "", "Red.")
    assert decode(tokens) == "<|endoftext|>### Instruction:\nName a primary colour.\n\n### Response:\nRed.<|endoftext|>"
    assert decode(tokens[:prompt_length]).endswith("### Response:\n")
    assert tokens[-1] == EOT_TOKEN


# --------------------------------------------------------------------------------------------- masking


@pytest.fixture
def prepared(tmp_path) -> Path:
    prepare_instructions(ROWS, tmp_path / "prepared", context_length=64, val_fraction=0.0)
    return tmp_path / "prepared"


def test_a_batch_trains_on_response_tokens_and_the_closing_endoftext_only(prepared):
    loader = InstructionLoader(prepared, "train", batch_size=len(ROWS), shuffle=False)
    x, y = loader.next_batch()
    assert x.shape == y.shape and x.shape[0] == len(ROWS)
    for inputs, targets, row in zip(x.tolist(), y.tolist(), ROWS):
        prompt = "<|endoftext|>" + build_prompt(row["instruction"], row["context"])
        response = row["response"] + "<|endoftext|>"
        trained = [t for t in targets if t != -1]
        first = targets.index(trained[0])
        # real targets: exactly the response and the closing <|endoftext|>, contiguous
        assert decode(trained) == response
        assert all(t != -1 for t in targets[first:first + len(trained)])
        # every position before them reads the prompt and predicts a prompt token: weight zero
        assert decode(inputs[:first + 1]) == prompt
        assert all(t == -1 for t in targets[:first])
        # the padding after them: pad inputs, weight zero
        end = first + len(trained)
        assert all(t == -1 for t in targets[end:]) and all(i == PAD_TOKEN for i in inputs[end:])
        assert decode(inputs[:end]) == prompt + row["response"]


def test_the_model_loss_is_the_mean_over_response_tokens_and_ignores_prompt_and_padding(prepared):
    x, y = InstructionLoader(prepared, "train", batch_size=len(ROWS), shuffle=False).next_batch()
    torch.manual_seed(0)
    model = GPT(get_profile("micro").model_config())
    _, loss = model(x, y, return_logits=False)  # the training path
    logits, _ = model(x)
    per_position = F.cross_entropy(logits.flatten(0, 1), y.flatten().clamp(min=0), reduction="none")
    weight = (y.flatten() != -1).float()
    assert torch.allclose(loss, (per_position * weight).sum() / weight.sum(), rtol=1e-5)
    padding = (x == PAD_TOKEN) & (torch.arange(x.shape[1]) > 0)  # position 0 is the prompt's <|endoftext|>
    assert padding.any()
    _, loss_other_padding = model(x.masked_fill(padding, 123), y, return_logits=False)
    assert torch.equal(loss, loss_other_padding)  # causal attention: padding only follows the example


# --------------------------------------------------------------------------------------------- bad rows


def test_malformed_rows_are_skipped_and_counted_by_reason(tmp_path):
    lines = [
        ROWS[0],
        "{not json",
        ["a", "list"],
        {"context": "", "response": "no instruction", "category": "x"},
        {"instruction": "no response", "context": ""},
        {"instruction": "Q", "context": "", "response": 42},
        {"instruction": "Q", "context": ["not", "text"], "response": "A"},
        {"instruction": "   ", "context": "", "response": "A"},
        {"instruction": "Q", "context": "", "response": " \n "},
        {"instruction": "Q " * 100, "context": "", "response": "A"},
        ROWS[1],
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", lines)
    manifest = prepare_from_source("local", tmp_path / "out", path=path, context_length=64, val_fraction=0.0)
    assert manifest.skipped == {"empty_instruction": 1, "empty_response": 1, "invalid_json": 1, "missing_field": 2,
                                "not_a_string": 2, "not_an_object": 1, "too_long": 1}
    assert manifest.examples == {"train": 2, "val": 0} and manifest.rows_read == len(lines)
    assert InstructionManifest.load(tmp_path / "out").skipped == manifest.skipped


def test_a_row_just_too_long_for_the_context_is_skipped_not_truncated(tmp_path):
    tokens, _ = encode_example(ROWS[2]["instruction"], "", ROWS[2]["response"])
    fits = len(tokens) - 1  # the last token is only ever a target
    assert prepare_instructions([ROWS[2]], tmp_path / "a", context_length=fits, val_fraction=0).examples["train"] == 1
    with pytest.raises(InstructionDataError, match="too_long"):
        prepare_instructions([ROWS[2]], tmp_path / "b", context_length=fits - 1, val_fraction=0)


def test_input_with_no_usable_row_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Q", "response": ""}, "oops"])
    with pytest.raises(InstructionDataError) as failure:
        prepare_from_source("local", tmp_path / "out", path=path, context_length=64)
    message = str(failure.value)
    assert "no usable instruction rows" in message and "2 row(s) read" in message
    assert "empty_response" in message and "invalid_json" in message
    assert not (tmp_path / "out" / "manifest.json").exists()


# --------------------------------------------------------------------------------------------- prepared data


def numbered_rows(n: int) -> list[dict]:
    return [{"instruction": f"Question {i}?", "context": "", "response": f"Answer {i}.", "category": "t"}
            for i in range(n)]


def test_preparing_the_same_rows_twice_gives_the_same_bytes_and_data_version(tmp_path):
    first = prepare_instructions(numbered_rows(30), tmp_path / "a", context_length=64)
    second = prepare_instructions(numbered_rows(30), tmp_path / "b", context_length=64)
    assert first.data_version == second.data_version
    for file in sorted((tmp_path / "a").glob("*.npy")):
        assert file.read_bytes() == (tmp_path / "b" / file.name).read_bytes()
    assert prepare_instructions(numbered_rows(31), tmp_path / "c", context_length=64).data_version \
        != first.data_version
    assert first.examples == {"train": 29, "val": 1}  # every 20th row held out at 5 %


def answers(batch: tuple[torch.Tensor, torch.Tensor]) -> list[str]:
    return [decode([t for t in row.tolist() if t != -1]) for row in batch[1]]


def test_each_epoch_shows_every_example_once_across_ranks_in_a_new_order(tmp_path):
    prepare_instructions(numbered_rows(40), tmp_path / "p", context_length=64, val_fraction=0.0)
    ranks = [InstructionLoader(tmp_path / "p", "train", 4, rank, 2, seed=7) for rank in range(2)]
    epochs = []
    for _ in range(2):
        seen = [a for _ in range(ranks[0].windows_per_epoch) for loader in ranks for a in answers(loader.next_batch())]
        assert sorted(seen) == sorted(f"Answer {i}.<|endoftext|>" for i in range(40))
        epochs.append(seen)
    assert epochs[0] != epochs[1]


def test_a_restored_loader_continues_with_exactly_the_same_batches(tmp_path):
    prepare_instructions(numbered_rows(37), tmp_path / "p", context_length=64, val_fraction=0.0)
    loader = InstructionLoader(tmp_path / "p", "train", 4, seed=3)
    for _ in range(11):  # into the second epoch (9 full batches of 4 in 37)
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(12)]
    restored = InstructionLoader(tmp_path / "p", "train", 4, seed=3)
    restored.load_state_dict(state)
    for want in expected:
        got = restored.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_batches_pad_to_the_longest_example_in_the_step_or_to_the_context(prepared):
    inputs = [len(encode_example(r["instruction"], r["context"], r["response"])[0]) - 1 for r in ROWS]
    loader = InstructionLoader(prepared, "train", 2, shuffle=False)
    assert loader.next_batch()[0].shape == (2, max(inputs[:2]))
    assert loader.next_batch()[0].shape == (2, max(inputs[2:]))
    x_fixed, _ = InstructionLoader(prepared, "train", 2, shuffle=False, pad_to_context=True).next_batch()
    assert x_fixed.shape == (2, 64)


def test_too_few_examples_for_one_step_is_named(prepared):
    with pytest.raises(InstructionDataError, match="fewer than one step takes"):
        InstructionLoader(prepared, "train", 4, 0, 2)
