"""Profiles: typed presets of a whole run that the command line can override field by field."""

import argparse
from dataclasses import replace

import pytest

from nanogpt_core.config import (PROFILES, BenchmarkConfig, FinetuneConfig, Profile, add_config_arguments,
                                 add_profile_argument, config_from_args, finetune_config_from_args,
                                 get_finetune_profile, get_profile, get_run_profile)


def test_the_three_profiles_exist_and_are_consistent():
    assert set(PROFILES) == {"micro", "demo", "gpt2-124m"}
    for name, profile in PROFILES.items():
        assert profile.name == profile.pretrain.profile == profile.finetune.profile == name
        assert profile.pretrain.grad_accum_steps(world_size=1) >= 1
        assert profile.finetune.grad_accum_steps(world_size=1) >= 1


def test_a_profile_names_every_data_source_and_the_benchmark():
    offline = [get_run_profile(name) for name in ("micro", "demo")]
    assert all((p.pretrain.data_source, p.finetune.data_source, p.evaluation.benchmark) ==
               ("demo", "demo", "demo-cloze") for p in offline)
    assert [p.evaluation.limit for p in offline] == [40, 200]
    real = get_run_profile("gpt2-124m")
    assert (real.pretrain.data_source, real.finetune.data_source, real.evaluation) == \
        ("fineweb-edu", "dolly", BenchmarkConfig("hellaswag", None))


def test_a_profile_whose_parts_disagree_on_its_name_or_an_unknown_benchmark_is_refused():
    micro = get_run_profile("micro")
    with pytest.raises(ValueError, match="one name, got 'micro' and 'demo'"):
        Profile(micro.pretrain, replace(micro.finetune, profile="demo"), micro.evaluation)
    with pytest.raises(ValueError, match="benchmark must be one of hellaswag, demo-cloze, got 'mmlu'"):
        BenchmarkConfig("mmlu")
    with pytest.raises(ValueError, match="data_source must be one of dolly, local, demo"):
        FinetuneConfig(data_source="fineweb-edu")


def test_gpt2_124m_is_the_build_nanogpt_schedule():
    cfg = get_profile("gpt2-124m")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (12, 12, 768, 1024, 50304)
    assert (cfg.total_batch_size, cfg.max_steps, cfg.max_lr, cfg.min_lr, cfg.warmup_steps) == \
        (524288, 19073, 6e-4, 6e-5, 715)
    assert cfg.data_source == "fineweb-edu"
    assert cfg.grad_accum_steps(world_size=8) == 1


def test_overrides_replace_single_fields():
    cfg = get_profile("micro", max_steps=7, max_lr=1e-3)
    assert (cfg.max_steps, cfg.max_lr, cfg.n_layer) == (7, 1e-3, get_profile("micro").n_layer)


def test_unknown_profiles_and_fields_are_named():
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        get_profile("huge")
    with pytest.raises(ValueError, match="unknown config field.*n_layers"):
        get_profile("micro", n_layers=3)
    with pytest.raises(ValueError, match="unknown fine-tuning config field.*epoch\\b"):
        get_finetune_profile("micro", epoch=3)


def test_a_batch_that_does_not_divide_is_explained():
    with pytest.raises(ValueError, match="total_batch_size .* must be a multiple"):
        get_profile("micro", total_batch_size=1000).grad_accum_steps(world_size=1)


def test_every_field_has_a_command_line_flag():
    parser = argparse.ArgumentParser()
    add_profile_argument(parser)
    add_config_arguments(parser)
    args = parser.parse_args(["--profile", "micro", "--n-layer", "3", "--max-lr", "2e-3", "--compile", "false"])
    cfg = config_from_args(args)
    assert (cfg.profile, cfg.n_layer, cfg.max_lr, cfg.compile) == ("micro", 3, 2e-3, False)
    assert cfg.n_embd == get_profile("micro").n_embd


def test_fine_tuning_flags_come_from_the_same_builder():
    parser = argparse.ArgumentParser()
    add_profile_argument(parser)
    add_config_arguments(parser, FinetuneConfig)
    args = parser.parse_args(["--profile", "micro", "--epochs", "3", "--compile", "yes", "--max-lr", "5e-3"])
    cfg = finetune_config_from_args(args)
    assert (cfg.profile, cfg.epochs, cfg.compile, cfg.max_lr) == ("micro", 3, True, 5e-3)
    assert cfg.batch_size == get_finetune_profile("micro").batch_size
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile", "maybe"])


def test_the_profile_flag_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("NANOGPT_PROFILE", "micro")
    parser = argparse.ArgumentParser()
    add_profile_argument(parser)
    assert parser.parse_args([]).profile == "micro"


def test_an_unknown_autocast_mode_is_refused_with_the_modes_named():
    with pytest.raises(ValueError, match=r"autocast must be one of auto, bf16, off, got 'fp8'"):
        get_profile("micro", autocast="fp8")
