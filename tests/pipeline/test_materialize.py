"""The whole graph in-process on the micro profile, with real torchrun launched through Pipes."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from nanogpt_core.checkpoint import read_checkpoint
from pipeline.definitions import defs

from .conftest import data_version, latest_event, materialize

pytestmark = pytest.mark.slow


def stale_status(instance, asset: str) -> StaleStatus:
    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    return resolver.get_status(dg.AssetKey(asset))


def test_definitions_load_and_every_asset_has_group_kinds_and_code_version():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"raw_fineweb", "token_shards", "dolly_prompts", "pretrained_checkpoint", "finetuned_checkpoint",
                    "hellaswag_scores", "deployed_model", "hf_export"}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.group_name and node.group_name != "default", key
        assert node.code_version, key
        assert node.kinds, key


def test_the_whole_graph_materializes_on_micro_and_records_lineage(tmp_path):
    root = tmp_path / "artifacts"
    with dg.instance_for_test() as instance:
        result = materialize("*", instance, root)
        assert result.success, [str(e.event_specific_data.error) for e in result.all_events if e.is_step_failure]
        for check in result.get_asset_check_evaluations():
            assert check.passed, check

        shards_version = data_version(instance, "token_shards")
        pretrained = latest_event(instance, "pretrained_checkpoint")
        assert pretrained.metadata["upstream_token_shards_data_version"].value == shards_version
        checkpoint = pretrained.metadata["path"].value
        lineage = read_checkpoint(checkpoint)["lineage"]
        assert lineage["data_version"] == shards_version  # the file carries the same lineage
        assert lineage["world_size"] == 2  # trained by a real 2-process torchrun
        assert "loss_curve" in pretrained.metadata and "median_tokens_per_sec" in pretrained.metadata

        finetuned = read_checkpoint(latest_event(instance, "finetuned_checkpoint").metadata["path"].value)
        assert finetuned["lineage"]["parent_checkpoint"]

        # Each training asset carries its report card, also written beside its checkpoint.
        base_card = pretrained.metadata["report_card_json"].value
        held_out = pretrained.metadata["held_out_loss"].value
        assert base_card["loss"]["held_out"] == held_out < base_card["loss"]["initial_val"]
        assert base_card["replies"]["kind"] == "text" and base_card["scores"]["this"]["n"] == 40
        assert "| held-out loss (frozen set) |" in pretrained.metadata["report_card"].value
        chat = latest_event(instance, "finetuned_checkpoint").metadata
        chat_card = json.loads((Path(chat["path"].value).parent / "report_card.json").read_text())
        assert chat_card == chat["report_card_json"].value and chat_card["replies"]["of"] == 10
        assert chat["replies_acceptable"].value == chat_card["replies"]["acceptable"]

        manifest = json.loads((root / "deployment" / "current.json").read_text())
        assert manifest["checkpoint_path"] in (checkpoint, latest_event(instance, "finetuned_checkpoint")
                                               .metadata["path"].value)
        assert manifest["scores"]["benchmark"] == "demo-cloze"  # offline: never called HellaSwag

        # Unchanged input: identical data versions, nothing downstream goes stale.
        before = {a: data_version(instance, a) for a in ("raw_fineweb", "token_shards")}
        assert materialize(["raw_fineweb", "token_shards"], instance, root).success
        assert {a: data_version(instance, a) for a in before} == before
        assert stale_status(instance, "pretrained_checkpoint") == StaleStatus.FRESH

        # Changed input: new versions, and what was trained on the old ones is stale.
        assert materialize(["raw_fineweb", "token_shards"], instance, root, raw_fineweb={"limit": 300}).success
        assert data_version(instance, "raw_fineweb") != before["raw_fineweb"]
        assert data_version(instance, "token_shards") != before["token_shards"]
        assert stale_status(instance, "pretrained_checkpoint") == StaleStatus.STALE
