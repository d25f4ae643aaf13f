"""`/v1/models/{id}` returns the report card written beside the deployed checkpoint."""

from __future__ import annotations

import httpx
import pytest

from nanogpt_core.report_card import TEXT_PROMPTS

pytestmark = pytest.mark.slow  # against a real server process


def test_the_model_object_carries_its_report_card(deployment):
    with httpx.Client(base_url=deployment.server.url, headers=deployment.headers(), timeout=30) as http:
        for name in ("nanogpt", "model_00001.pt"):
            card = http.get(f"/v1/models/{name}").json()["report_card"]
            assert card["format"] == "nanogpt-pipeline/report-card"
            assert card["checkpoint"]["name"] == "model_00001.pt" and card["checkpoint"]["step"] == 1
            # a random base model: its greedy continuations of the text prompts are on record
            assert card["replies"]["kind"] == "text"
            assert [c["prompt"] for c in card["completions"]] == list(TEXT_PROMPTS)
            assert card["scores"]["previous_deployment"]["acc_norm"] == 0.25
        listed = http.get("/v1/models").json()["data"]
        assert all(model["report_card"] == card for model in listed)
