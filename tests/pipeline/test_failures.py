"""When training fails inside a rank, the Dagster run says why."""

from __future__ import annotations

import dagster as dg
import pytest

from pipeline.definitions import defs
from pipeline.pipes_messages import training_pipes_client
from pipeline.resources import ArtifactStore

from .conftest import micro_run_config

pytestmark = pytest.mark.slow


def test_a_failing_rank_surfaces_its_exception_text_in_the_run_failure(tmp_path):
    with dg.instance_for_test() as instance:
        selection = ["raw_fineweb", "token_shards", "pretrained_checkpoint"]
        result = dg.materialize(
            [*defs.assets], selection=selection, instance=instance,
            resources={"artifacts": ArtifactStore(root=str(tmp_path / "artifacts")),
                       "pipes_subprocess_client": training_pipes_client()},
            run_config=micro_run_config(selection, pretrained_checkpoint={"extra_args": ["--n-head", "3"]}),
            raise_on_error=False)
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    assert len(failures) == 1 and failures[0].step_key == "pretrained_checkpoint"
    error = failures[0].event_specific_data.error
    text = str(error)
    assert "n_embd (64) must be divisible by n_head (3)" in text
    assert "failed with code" not in text.splitlines()[0]
