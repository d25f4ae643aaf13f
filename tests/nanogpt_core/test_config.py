"""Profiles: typed presets that the command line can override field by field."""

import argparse

import pytest

from nanogpt_core.config import PROFILES, add_config_arguments, config_from_args, get_profile


def test_the_three_profiles_exist_and_are_consistent():
    assert set(PROFILES) == {"micro", "demo", "gpt2-124m"}
    for name, cfg in PROFILES.items():
        assert cfg.profile == name
        assert cfg.grad_accum_steps(world_size=1) >= 1


def test_gpt2_124m_is_the_build_nanogpt_schedule():
    cfg = get_profile("gpt2-124m")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (12, 12, 768, 1024, 50304)
    assert (cfg.total_batch_size, cfg.max_steps, cfg.max_lr, cfg.min_lr, cfg.warmup_steps) == \
        (524288, 19073, 6e-4, 6e-5, 715)
    assert cfg.data_source == "fineweb-edu"
    assert cfg.grad_accum_steps(world_size=8) == 1


def test_overrides_replace_single_fields():
    cfg = get_profile("micro", max_steps=7, max_lr=1e-3)
    assert (cfg.max_steps, cfg.max_lr, cfg.n_layer) == (7, 1e-3, PROFILES["micro"].n_layer)


def test_unknown_profiles_and_fields_are_named():
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        get_profile("huge")
    with pytest.raises(ValueError, match="unknown config field.*n_layers"):
        get_profile("micro", n_layers=3)


def test_a_batch_that_does_not_divide_is_explained():
    with pytest.raises(ValueError, match="total_batch_size .* must be a multiple"):
        get_profile("micro", total_batch_size=1000).grad_accum_steps(world_size=1)


def test_every_field_has_a_command_line_flag():
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="demo")
    add_config_arguments(parser)
    args = parser.parse_args(["--profile", "micro", "--n-layer", "3", "--max-lr", "2e-3", "--compile", "false"])
    cfg = config_from_args(args)
    assert (cfg.profile, cfg.n_layer, cfg.max_lr, cfg.compile) == ("micro", 3, 2e-3, False)
    assert cfg.n_embd == PROFILES["micro"].n_embd


def test_an_unknown_autocast_mode_is_refused_with_the_modes_named():
    with pytest.raises(ValueError, match=r"autocast must be one of auto, bf16, off, got 'fp8'"):
        get_profile("micro", autocast="fp8")
