"""The report card of a checkpoint (nanogpt_core.report_card)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nanogpt_core.checkpoint import save_checkpoint
from nanogpt_core.data.held_out import HELD_OUT_OPENERS
from nanogpt_core.model import GPT, GPTConfig
from nanogpt_core.report_card import (TEXT_PROMPTS, ReportCardError, build_report_card, card_beside, card_markdown,
                                      held_out_loss, loss_curve_points, read_card, throughput, write_card)

TINY = GPTConfig(block_size=128, n_layer=1, n_head=2, n_embd=32)


def tiny_checkpoint(path: Path, *, stage: str | None = None) -> Path:
    torch.manual_seed(0)
    lineage = {"profile": "micro", "data_version": "shards-v1", "code_version": "c0", "git_commit": "abc",
               "data_source": {"raw_data_version": "raw-v1"}, "world_size": 2,
               **({"stage": stage, "parent_checkpoint": "/runs/base/model_00019.pt"} if stage else {})}
    return save_checkpoint(path, GPT(TINY), step=19, lineage=lineage,
                           metrics={"train_loss": 9.1, "val_loss": 9.3, "initial_val_loss": 10.9, "tokens_seen": 20480})


def step_records(n: int) -> list[dict]:
    return [{"step": i, "loss": 10.0 - i / n, "dt_ms": 500.0 if i else 3000.0, "tokens_per_sec": 2000.0 + i,
             "mfu": 0.1, **({"val_loss": 10.5 - i / n} if i % 10 == 0 else {})} for i in range(n)]


@pytest.fixture(scope="module")
def chat_card(tmp_path_factory) -> dict:
    path = tiny_checkpoint(tmp_path_factory.mktemp("chat") / "model_00019.pt", stage="finetune")
    previous = {"deployment_id": "d-1", "model_id": "nanogpt",
                "scores": {"benchmark": "demo-cloze", "acc": 0.3, "acc_norm": 0.31, "n": 40}}
    return build_report_card(path, metrics=step_records(20), wall_seconds=42.0, previous_deployment=previous,
                             benchmark={"benchmark": "demo-cloze", "limit": 40}, held_out=False)


def test_a_fine_tuned_checkpoint_is_judged_on_the_held_out_openers(chat_card):
    assert chat_card["checkpoint"]["stage"] == "finetuned" and chat_card["checkpoint"]["step"] == 19
    assert [c["prompt"] for c in chat_card["completions"]] == list(HELD_OUT_OPENERS)
    for completion in chat_card["completions"]:
        assert set(completion) >= {"reply", "finished", "acceptable", "reason", "prompt_kind"}
    replies = chat_card["replies"]
    assert replies["kind"] == "chat" and replies["of"] == 10
    assert replies["acceptable"] == sum(c["acceptable"] for c in chat_card["completions"])


def test_scores_stand_beside_the_previous_deployments_on_the_same_benchmark(chat_card):
    scores = chat_card["scores"]
    assert scores["benchmark"] == "demo-cloze" and scores["this"]["n"] == 40
    assert 0.0 <= scores["this"]["acc_norm"] <= 1.0
    assert scores["previous_deployment"] == {"deployment_id": "d-1", "model_id": "nanogpt", "benchmark": "demo-cloze",
                                             "acc": 0.3, "acc_norm": 0.31, "n": 40, "comparable": True}


def test_losses_throughput_tokens_and_lineage_come_from_the_checkpoint_and_its_metrics(chat_card):
    assert chat_card["loss"] == {"train": 9.1, "val": 9.3, "initial_val": 10.9}
    assert chat_card["tokens_seen"] == 20480
    assert chat_card["throughput"]["wall_seconds"] == 42.0
    assert chat_card["throughput"]["tokens_per_sec"] == 2010.0  # median of steps 1..19: the first warms up
    assert chat_card["lineage"]["raw_content_hash"] == "raw-v1"
    assert chat_card["lineage"]["parent_checkpoint"] == "/runs/base/model_00019.pt"
    assert chat_card["curve"]["val"][0] == [0, 10.5]


def test_a_base_checkpoint_continues_text_prompts_and_has_a_held_out_loss(tmp_path):
    card = build_report_card(tiny_checkpoint(tmp_path / "model_00019.pt"), held_out_windows=20)
    assert card["checkpoint"]["stage"] == "pretrained"
    assert [c["prompt"] for c in card["completions"]] == list(TEXT_PROMPTS)
    assert card["replies"]["kind"] == "text" and "acceptable" not in card["completions"][0]
    # an untrained model predicts about uniformly: its loss is near ln(vocabulary)
    assert abs(card["loss"]["held_out"] - math.log(TINY.vocab_size)) < 0.5
    assert card["loss"]["held_out_window"] == 128 and card["loss"]["held_out_tokens"] == 20 * 128
    assert card["scores"] == {"benchmark": None, "this": None, "previous_deployment": None}


def test_the_held_out_loss_uses_full_windows_no_longer_than_the_model_sees():
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=1, n_embd=16)).eval()
    assert held_out_loss(model, max_windows=3) | {"held_out": 0} == {"held_out": 0, "held_out_window": 64,
                                                                      "held_out_tokens": 3 * 64}
    first = held_out_loss(model, max_windows=2)["held_out"]
    assert held_out_loss(model, max_windows=2, batch=1)["held_out"] == pytest.approx(first, rel=1e-5)


def test_the_curve_keeps_every_validation_and_at_most_the_given_number_of_train_points():
    curve = loss_curve_points(step_records(1000), max_points=100)
    assert len(curve["train"]) <= 101 and curve["train"][-1][0] == 999
    assert len(curve["val"]) == 100


def test_throughput_without_steps_is_empty_not_an_error():
    assert throughput([], None)["tokens_per_sec"] is None


def test_the_card_reads_as_markdown_tables(chat_card):
    text = card_markdown(chat_card)
    assert "| val loss (final / step 0) | 9.3000 / 10.9000 |" in text
    assert "| benchmark | this checkpoint | previous deployment |" in text
    assert text.count("\n| ") >= 10 + 3
    for completion in chat_card["completions"]:
        assert completion["prompt"] in text


def test_the_card_is_written_beside_its_checkpoint_and_read_back(tmp_path, chat_card):
    checkpoint = tmp_path / "v1" / "model_00019.pt"
    path = write_card(card_beside(checkpoint), chat_card)
    assert path == tmp_path / "v1" / "report_card.json"
    assert read_card(path) == json.loads(json.dumps(chat_card))


def test_a_file_that_is_not_a_card_is_refused_naming_it(tmp_path):
    path = tmp_path / "report_card.json"
    path.write_text('{"format": "something else"}')
    with pytest.raises(ReportCardError, match="is not a report card"):
        read_card(path)
    path.write_text("{not json")
    with pytest.raises(ReportCardError, match=str(path)):
        read_card(path)


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ReportCardError, match="model_00001.pt"):
        build_report_card(tmp_path / "model_00001.pt")
