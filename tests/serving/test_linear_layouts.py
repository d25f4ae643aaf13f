"""The fp32 weight layouts compute the same products, and single rows get the layout timed fastest."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn import functional as F

from nanogpt_core.model import GPT, GPTConfig
from nanogpt_core.deployment_manifest import new_manifest, write_manifest
from serving.deployments import ManifestWatcher, ModelRegistry, initial_model, load_served_model
from serving.int8 import int8_available
from serving.kv_decoder import BatchDecoder
from serving.linear_layouts import (LAYOUTS, FloatLinear, TimedLayouts, choose_one_row_layouts, onednn_available,
                                    pick_layout)
from serving.settings import ServerSettings, SettingsError, settings_from_environment
from tests.serving.conftest import make_checkpoint

needs_onednn = pytest.mark.skipif(not onednn_available(torch.device("cpu"), torch.float32),
                                  reason="this torch build has no oneDNN")
ROLES = {"attn", "attn_proj", "fc", "mlp_proj", "lm_head"}


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=32)).eval()


@needs_onednn
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "linear+gelu"])
def test_every_layout_computes_the_same_product(layout, rows, gelu):
    torch.manual_seed(1)
    weight, bias, x = torch.randn(48, 16), torch.randn(48), torch.randn(rows, 16)
    expected = F.linear(x, weight, bias)
    if gelu:
        expected = F.gelu(expected, approximate="tanh")
    linear = FloatLinear(weight, bias, gelu=gelu, use_onednn=True, batch_hint=4)
    linear.use_for_one_row(layout, weight)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x), expected, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_single_rows_and_batches_go_through_their_own_layouts():
    weight = torch.randn(24, 8)
    linear = FloatLinear(weight, None, use_onednn=True, batch_hint=4)
    assert (linear.batch_layout, linear.one_row_layout) == ("onednn-batch", "onednn-batch")
    assert linear.one_row_weight is linear.batch_weight  # no second copy until another layout is chosen
    linear.use_for_one_row("transposed", weight)
    assert linear.one_row_weight.shape == (8, 24)
    assert linear.batch_layout == "onednn-batch"


def test_a_layout_that_does_not_exist_or_needs_missing_onednn_is_refused_by_name():
    weight = torch.randn(8, 8)
    linear = FloatLinear(weight, None, use_onednn=False, batch_hint=4)
    with pytest.raises(ValueError, match="'sparse'.*onednn-batch, onednn-one-row, plain, transposed"):
        linear.use_for_one_row("sparse", weight)
    with pytest.raises(ValueError, match="'onednn-one-row' needs oneDNN"):
        linear.use_for_one_row("onednn-one-row", weight)


@pytest.mark.parametrize("use_onednn", [pytest.param(True, marks=needs_onednn), False], ids=["onednn", "no-onednn"])
def test_the_choice_times_every_candidate_and_takes_the_fastest(use_onednn):
    weights = [torch.randn(64, 32) for _ in range(3)]
    linears = [FloatLinear(w, None, use_onednn=use_onednn, batch_hint=8) for w in weights]
    choices = choose_one_row_layouts({"fc": list(zip(weights, linears)), "none": []}, rounds=2)
    assert set(choices) == {"fc"}
    timed = choices["fc"].ms_per_matrix
    assert set(timed) == (set(LAYOUTS) if use_onednn else {"transposed", "plain"})
    assert all(ms > 0 for ms in timed.values())
    assert choices["fc"].layout == pick_layout(timed, linears[0].batch_layout)


def test_another_layout_must_beat_the_batch_layout_clearly_to_be_worth_a_second_copy():
    assert pick_layout({"onednn-batch": 1.00, "transposed": 0.80, "plain": 0.90}, "onednn-batch") == "transposed"
    assert pick_layout({"onednn-batch": 1.00, "transposed": 0.98, "plain": 0.99}, "onednn-batch") == "onednn-batch"
    assert pick_layout({"transposed": 1.00, "plain": 1.01}, "transposed") == "transposed"


@needs_onednn
def test_the_decoder_times_each_role_when_it_loads_and_uses_the_choice_for_every_layer(model):
    decoder = BatchDecoder(model, max_batch=4)
    assert set(decoder.one_row_choices) == ROLES
    assert decoder.one_row_layouts == {role: c.layout for role, c in decoder.one_row_choices.items()}
    for w in decoder.layers:
        assert w.fc.one_row_layout == decoder.one_row_layouts["fc"]
        assert w.attn.one_row_layout == decoder.one_row_layouts["attn"]


@needs_onednn
def test_layouts_can_be_named_for_every_role_or_role_by_role(model):
    everywhere = BatchDecoder(model, max_batch=4, one_row="plain")
    assert everywhere.one_row_choices == {}  # nothing was timed
    assert set(everywhere.one_row_layouts.values()) == {"plain"}
    by_role = BatchDecoder(model, max_batch=4, one_row={"lm_head": "transposed"})
    assert by_role.one_row_layouts["lm_head"] == "transposed"
    assert by_role.one_row_layouts["fc"] == "onednn-batch"
    with pytest.raises(ValueError, match="no matrices with the role mlp; the roles are attn, attn_proj"):
        BatchDecoder(model, max_batch=4, one_row={"mlp": "plain"})


def test_a_model_of_the_same_shape_takes_the_layouts_timed_before_and_another_shape_is_timed(model):
    first = BatchDecoder(model, max_batch=4)
    assert first.timed_layouts.layouts == first.one_row_layouts and not first.reused_timed_layouts
    # Pretend the first timing chose otherwise, to see the choice carried over rather than retimed.
    chosen = dict.fromkeys(first.one_row_layouts, "transposed")
    timed_before = TimedLayouts(shapes=first.timed_layouts.shapes, layouts=chosen)

    torch.manual_seed(5)
    same_shape = BatchDecoder(GPT(model.config).eval(), max_batch=4, timed_before=timed_before)
    assert same_shape.reused_timed_layouts and same_shape.one_row_choices == {}  # nothing was timed
    assert same_shape.one_row_layouts == chosen and same_shape.timed_layouts == timed_before
    assert same_shape.lm_head.one_row_layout == "transposed"

    wider = GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=48)).eval()
    retimed = BatchDecoder(wider, max_batch=4, timed_before=timed_before)
    assert not retimed.reused_timed_layouts and set(retimed.one_row_choices) == ROLES
    named = BatchDecoder(model, max_batch=4, one_row="transposed", timed_before=first.timed_layouts)
    assert named.timed_layouts is None and not named.reused_timed_layouts  # a named layout wins


def test_a_swap_to_a_model_of_the_same_shape_keeps_the_layouts_timed_for_the_first(tmp_path, caplog):
    manifest = tmp_path / "deployment" / "current.json"
    first = make_checkpoint(tmp_path / "model_00001.pt", seed=1, step=1)
    write_manifest(manifest, new_manifest(checkpoint_path=first, deployment_id="deploy-1"))
    settings = ServerSettings(manifest=manifest)
    registry = ModelRegistry(initial_model(settings))
    try:
        timed = registry.current.timed_layouts
        assert timed.layouts == registry.current.weight_layouts
        second = make_checkpoint(tmp_path / "model_00002.pt", seed=2, step=2)
        write_manifest(manifest, new_manifest(checkpoint_path=second, deployment_id="deploy-2"))
        with caplog.at_level(logging.INFO, logger="serving.deployments"):
            assert ManifestWatcher(manifest, registry, settings).check_now()
        assert registry.current.checkpoint_name == "model_00002.pt"
        assert registry.current.timed_layouts == timed
        assert registry.current.card("nanogpt").weight_layouts == timed.layouts
        assert "as timed for the previous model of this shape" in caplog.text
    finally:
        registry.shutdown()


def test_int8_weights_have_no_float_layouts(model):
    if not int8_available():
        pytest.skip("this torch build has no fbgemm int8 kernels")
    decoder = BatchDecoder(model, max_batch=2, weights="int8")
    assert decoder.one_row_layouts == {} and decoder.one_row_choices == {}


def test_the_server_setting_fixes_the_layout_or_leaves_it_to_timing(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "model_00001.pt", seed=1, step=1)
    for setting, expected in (("plain", {"plain"}), ("timed", set(LAYOUTS))):
        served = load_served_model(checkpoint, ServerSettings(checkpoint=checkpoint, single_row_layout=setting))
        try:
            layouts = served.card("nanogpt").weight_layouts
            assert set(layouts) == ROLES and set(layouts.values()) <= expected
        finally:
            served.engine.stop()


def test_a_single_row_layout_setting_is_checked_by_name():
    with pytest.raises(SettingsError, match="single_row_layout must be one of timed, onednn-batch, onednn-one-row, "
                                            "plain, transposed, got 'fastest'"):
        settings_from_environment({"NANOGPT_CHECKPOINT": "x.pt", "NANOGPT_SINGLE_ROW_LAYOUT": "fastest"})
    with pytest.raises(SettingsError, match="'plain' applies to fp32 weights only, not int8"):
        ServerSettings(checkpoint="x.pt", weights="int8", single_row_layout="plain")
    settings = settings_from_environment({"NANOGPT_CHECKPOINT": "x.pt", "NANOGPT_SINGLE_ROW_LAYOUT": "transposed"})
    assert settings.single_row_layout == "transposed"
