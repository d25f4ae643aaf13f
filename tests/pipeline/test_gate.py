"""The deployment gate: a worse model is never deployed, however deployed_model is materialized.

Micro models score at chance on 40 cloze items, so "worse" is made certain by serving a
deployment whose recorded score no micro model reaches (acc_norm 1.0), and "better" by one
scored 0.0. The gate compares with whatever `current.json` says is deployed.
"""

from __future__ import annotations

import json
import uuid

import dagster as dg
import pytest

from nanogpt_core.deployment_manifest import Decision, Manifest, new_manifest, read_manifest, write_manifest
from pipeline.config import DeployConfig
from pipeline.gate import Winner, choose_winner, regression_refusal

from .conftest import latest_event, step_failure_text
from .serving_helpers import serve_manifest, still_serving, wait_for_deployment

BENCHMARK = "demo-cloze"


def evaluation(pretrained: float, finetuned: float) -> dict:
    return {"benchmark": BENCHMARK, "scores": {
        "pretrained_checkpoint": {"acc": pretrained, "acc_norm": pretrained, "n": 40, "checkpoint": "/p.pt"},
        "finetuned_checkpoint": {"acc": finetuned, "acc_norm": finetuned, "n": 40, "checkpoint": "/f.pt"}}}


def deployed_at(score: float | None, benchmark: str = BENCHMARK) -> Manifest:
    scores = {} if score is None else {"benchmark": benchmark, "acc_norm": score}
    return new_manifest(checkpoint_path="/old/model_00001.pt", deployment_id="old", scores=scores)


# ---------------------------------------------------------------------------------------------
# The rules, on their own


def test_the_base_model_never_wins_the_chat_deployment_by_default_even_when_it_scores_higher():
    winner = choose_winner(evaluation(pretrained=0.9, finetuned=0.2), DeployConfig().eligible)
    assert winner.asset == "finetuned_checkpoint"
    assert "pretrained_checkpoint 0.9000" in winner.reason and "reference" in winner.reason


def test_an_explicit_eligible_list_can_admit_the_base_model():
    winner = choose_winner(evaluation(pretrained=0.9, finetuned=0.2),
                           ["finetuned_checkpoint", "pretrained_checkpoint"])
    assert winner.asset == "pretrained_checkpoint" and "reference" not in winner.reason
    tie = choose_winner(evaluation(pretrained=0.5, finetuned=0.5), ["finetuned_checkpoint", "pretrained_checkpoint"])
    assert tie.asset == "finetuned_checkpoint"  # on a tie the first listed wins


@pytest.mark.parametrize("deployed, candidate, margin, refused", [
    (None, 0.1, 0.0, False),                        # first deployment
    (deployed_at(None), 0.1, 0.0, False),           # deployed model never scored
    (deployed_at(0.9, "hellaswag"), 0.1, 0.0, False),  # scored on another benchmark: nothing to compare
    (deployed_at(0.30), 0.30, 0.0, False),
    (deployed_at(0.30), 0.29, 0.0, True),
    (deployed_at(0.30), 0.28, 0.025, False),        # within the margin
    (deployed_at(0.30), 0.27, 0.025, True),
])
def test_a_candidate_is_refused_only_when_worse_than_the_deployed_model_by_more_than_the_margin(
        deployed, candidate, margin, refused):
    winner = Winner("finetuned_checkpoint", {"acc_norm": candidate}, "")
    refusal = regression_refusal(BENCHMARK, winner, deployed, margin)
    assert (refusal is not None) == refused
    if refused:
        assert f"{candidate:.4f}" in refusal and "0.3000" in refusal and BENCHMARK in refusal


def test_force_needs_a_reason_and_eligible_only_names_scored_checkpoints():
    with pytest.raises(ValueError, match="force: true needs a reason"):
        DeployConfig(force=True)
    with pytest.raises(ValueError, match="eligible must name"):
        DeployConfig(eligible=["hf_export"])
    assert DeployConfig(force=True, reason="hotfix").force


# ---------------------------------------------------------------------------------------------
# The gate in real materializations, with a real server following current.json


@pytest.fixture(scope="module")
def served(micro_pipeline, tmp_path_factory):
    server = serve_manifest(micro_pipeline.artifacts / "deployment" / "current.json",
                            tmp_path_factory.mktemp("gate") / "server.log")
    yield server
    server.stop()


def deploy_by_hand(micro_pipeline, server, acc_norm: float) -> Manifest:
    """Serve the current checkpoint under a fresh deployment id, recorded as scoring `acc_norm`."""
    path = micro_pipeline.artifacts / "deployment" / "current.json"
    current = read_manifest(path)
    manifest = write_manifest(path, new_manifest(
        checkpoint_path=current.checkpoint_path, deployment_id=f"by-hand-{uuid.uuid4().hex[:8]}",
        scores={"benchmark": BENCHMARK, "acc": acc_norm, "acc_norm": acc_norm, "n": 40},
        decision=Decision("manual", f"test: a deployment scored {acc_norm}")))
    wait_for_deployment(server, manifest.deployment_id)
    return manifest


def candidate_score(micro_pipeline) -> float:
    return latest_event(micro_pipeline.instance, "hellaswag_scores").metadata["finetuned_checkpoint_acc_norm"].value



@pytest.mark.slow
def test_the_first_deployment_is_the_finetuned_model_with_the_base_score_kept_as_reference(micro_pipeline):
    first = micro_pipeline.instance.fetch_materializations(dg.AssetKey("deployed_model"), limit=1000).records[-1]
    record = read_manifest(str(first.asset_materialization.metadata["path"].value))
    assert record.source_asset == "finetuned_checkpoint"
    assert record.decision.kind == "gate" and record.decision.details["replaced_deployment_id"] is None
    assert "finetuned_checkpoint scored acc_norm" in record.decision.reason
    assert record.scores["candidates"]["pretrained_checkpoint"]["eligible"] is False
    assert "pretrained_checkpoint" in record.decision.reason  # the reference score is named


@pytest.mark.slow
@pytest.mark.parametrize("selection", [["deployed_model"], "*"], ids=["deployed_model alone", "whole graph"])
def test_a_worse_candidate_is_refused_and_nothing_changes(micro_pipeline, served, selection):
    unbeatable = deploy_by_hand(micro_pipeline, served, acc_norm=1.0)
    manifest_path = micro_pipeline.artifacts / "deployment" / "current.json"
    before = manifest_path.read_bytes()

    result = micro_pipeline.materialize(selection)

    assert not result.success
    failed = [e.step_key for e in result.all_events if e.is_step_failure]
    assert failed == ["deployed_model"]  # everything upstream ran; the gate alone said no
    message = step_failure_text(result, "deployed_model")
    assert f"{candidate_score(micro_pipeline):.4f}" in message and "1.0000" in message and BENCHMARK in message
    assert "deployment refused" in message and unbeatable.deployment_id in message
    assert manifest_path.read_bytes() == before
    still_serving(served, unbeatable.deployment_id)


@pytest.mark.slow
def test_scores_that_failed_their_check_are_never_deployed(micro_pipeline, served, tmp_path):
    beatable = deploy_by_hand(micro_pipeline, served, acc_norm=0.0)
    manifest_path = micro_pipeline.artifacts / "deployment" / "current.json"
    before = manifest_path.read_bytes()
    # A benchmark of two items, so that scoring all of it takes moments; on another benchmark
    # than the deployed one's, nothing but the failed check stands in the way of deploying.
    two_items = tmp_path / "hellaswag_two_items.jsonl"
    two_items.write_text("".join(json.dumps({"ctx": ctx, "endings": endings, "label": 0}) + "\n" for ctx, endings in (
        ("A man sits down at the table. He", ["eats his dinner.", "flies away.", "turns blue.", "melts."]),
        ("The girl opens the book. She", ["reads the first page.", "eats it.", "sings to it.", "freezes."]))))
    try:
        # Asking for more items than the benchmark has fails scores_in_range (n is not as configured).
        scored = micro_pipeline.materialize(["hellaswag_scores"], hellaswag_scores={
            "limit": 100_000, "benchmark": "hellaswag", "data_path": str(two_items)})
        assert not scored.success and "scores_in_range" in step_failure_text(scored, "hellaswag_scores")

        result = micro_pipeline.materialize(["deployed_model"])

        assert not result.success
        message = step_failure_text(result, "deployed_model")
        assert "check scores_in_range failed" in message and "configured_n=100000" in message
        assert manifest_path.read_bytes() == before
        still_serving(served, beatable.deployment_id)
    finally:  # the other tests need scores that passed
        assert micro_pipeline.materialize(["hellaswag_scores"]).success


@pytest.mark.slow
def test_a_better_candidate_deploys_and_the_server_swaps_to_it(micro_pipeline, served):
    beatable = deploy_by_hand(micro_pipeline, served, acc_norm=0.0)

    result = micro_pipeline.materialize(["deployed_model"])

    assert result.success
    current = read_manifest(micro_pipeline.artifacts / "deployment" / "current.json")
    assert current.deployment_id != beatable.deployment_id
    assert current.source_asset == "finetuned_checkpoint" and current.decision.kind == "gate"
    assert current.decision.details["replaced_deployment_id"] == beatable.deployment_id
    assert current.decision.details["replaced_acc_norm"] == 0.0
    assert current.scores["acc_norm"] == candidate_score(micro_pipeline)
    wait_for_deployment(served, current.deployment_id)


@pytest.mark.slow
def test_a_forced_deploy_passes_the_gate_and_the_manifest_says_who_overrode_what(micro_pipeline, served):
    deploy_by_hand(micro_pipeline, served, acc_norm=1.0)

    result = micro_pipeline.materialize(["deployed_model"], deployed_model={
        "force": True, "reason": "the cloze set is broken; ticket 42"})

    assert result.success
    current = read_manifest(micro_pipeline.artifacts / "deployment" / "current.json")
    assert current.decision.kind == "forced" and current.decision.reason == "the cloze set is broken; ticket 42"
    assert any("1.0000" in problem for problem in current.decision.details["gate_problems"])
    wait_for_deployment(served, current.deployment_id)
