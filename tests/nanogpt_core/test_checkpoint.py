"""Checkpoints: atomic, safe to load, complete enough to resume, and loud about misuse."""

import os

import pytest
import torch

from nanogpt_core.checkpoint import (CheckpointError, checkpoint_name, config_differences, latest_checkpoint,
                                     list_checkpoints, load_checkpoint, load_model_weights, prune_checkpoints,
                                     read_checkpoint, save_checkpoint)
from nanogpt_core.model import GPT, GPTConfig

CFG = GPTConfig(block_size=16, vocab_size=512, n_layer=1, n_head=2, n_embd=16)


def save(tmp_path, step, **kwargs):
    torch.manual_seed(step)
    return save_checkpoint(tmp_path / checkpoint_name(step), GPT(CFG), step=step, **kwargs)


def test_names_carry_the_zero_padded_step():
    assert checkpoint_name(599) == "model_00599.pt"


def test_a_saved_checkpoint_loads_back_into_an_identical_model(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG)
    optimizer = model.configure_optimizer(0.1, 1e-3, "cpu")
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "model_00007.pt", model, step=7, optimizer=optimizer,
                           lineage={"data_version": "abc"}, loader_state={"shard_index": 0, "offset": 64})
    loaded, payload = load_checkpoint(path)
    assert payload["step"] == 7 and payload["lineage"]["data_version"] == "abc"
    assert payload["loader"] == {"shard_index": 0, "offset": 64}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    fresh = GPT(CFG).configure_optimizer(0.1, 1e-3, "cpu")
    fresh.load_state_dict(payload["optimizer"])  # the optimizer state round-trips too
    assert not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "model_00001.pt"
    torch.save({"format": "nanogpt-pipeline/checkpoint", "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="not allowed to load safely"):
        read_checkpoint(path)


def test_a_truncated_checkpoint_is_named_in_the_error(tmp_path):
    path = save(tmp_path, 3)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model_00003.pt is corrupt or truncated"):
        load_checkpoint(path)


def test_a_checkpoint_of_another_model_shape_is_refused_with_the_differences(tmp_path):
    path = save(tmp_path, 3)
    other = GPT(GPTConfig(block_size=16, vocab_size=512, n_layer=2, n_head=2, n_embd=16))
    with pytest.raises(CheckpointError, match=r"model_00003.pt .*incompatible.*n_layer: checkpoint 1 vs run 2"):
        load_model_weights(other, read_checkpoint(path), path)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model_00001.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a nanogpt-pipeline checkpoint"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


def test_latest_ignores_unfinished_writes_and_falls_back_past_damaged_files(tmp_path):
    for step in (4, 9, 14):
        save(tmp_path, step)
    (tmp_path / "model_00019.pt.tmp").write_bytes(b"half a write")
    assert latest_checkpoint(tmp_path)[0].name == "model_00014.pt"
    (tmp_path / "model_00014.pt").write_bytes(b"damaged later")
    path, payload = latest_checkpoint(tmp_path)
    assert path.name == "model_00009.pt" and payload["step"] == 9
    assert latest_checkpoint(tmp_path / "empty") is None


def test_pruning_keeps_the_newest(tmp_path):
    for step in (9, 19, 29, 100):
        save(tmp_path, step)
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["model_00029.pt", "model_00100.pt"]


def test_a_crash_during_the_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    good = save(tmp_path, 4)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 9)
    assert latest_checkpoint(tmp_path)[0] == good
    assert not (tmp_path / "model_00009.pt").exists()


def test_rng_states_and_lineage_survive_the_safe_loader(tmp_path):
    import random

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    path = save(tmp_path, 1, rng_states=[state, state], lineage={"git_commit": None, "tokens_seen": 10})
    payload = torch.load(path, weights_only=True)
    assert torch.equal(payload["rng"][1]["torch"], state["torch"])
    assert payload["lineage"] == {"git_commit": None, "tokens_seen": 10}


def test_files_under_a_checkpoint_name_that_are_no_checkpoint_are_skipped_with_a_warning(tmp_path, capsys):
    save(tmp_path, 9)
    (tmp_path / "model_00010.pt").write_text("hello world")  # torch's legacy reader raised KeyError on this
    (tmp_path / "model_00011.pt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "model_00012.pt").mkdir()
    torch.save([torch.zeros(2)], tmp_path / "model_00013.pt")
    torch.save({"format": "nanogpt-pipeline/checkpoint", "format_version": 1}, tmp_path / "model_00014.pt")
    path, payload = latest_checkpoint(tmp_path)
    assert path.name == "model_00009.pt" and payload["step"] == 9
    warnings = capsys.readouterr().err
    for step in (10, 11, 12, 13, 14):
        assert "warning: skipping" in warnings and f"model_{step:05d}.pt" in warnings, (step, warnings)
    assert "lacks a usable 'step' field" in warnings


def test_a_resume_skips_a_checkpoint_that_holds_weights_but_no_training_state(tmp_path, capsys):
    full = save(tmp_path, 4, optimizer=torch.optim.AdamW(GPT(CFG).parameters()),
                loader_state={"offset": 0}, rng_states=[{"torch": torch.get_rng_state()}])
    weights_only = save(tmp_path, 9)  # e.g. an imported Hugging Face model copied into the run folder
    assert latest_checkpoint(tmp_path)[0] == weights_only
    assert latest_checkpoint(tmp_path, resumable=True)[0] == full
    assert f"checkpoint {weights_only} lacks a usable 'optimizer' field" in capsys.readouterr().err


def test_config_differences_name_each_changed_field_and_honour_the_ignored_ones():
    saved = {"max_steps": 16, "max_lr": 3e-3, "device": "cpu", "seed": 1}
    current = {"max_steps": 20, "max_lr": 3e-3, "device": "cuda", "n_layer": 4}
    assert config_differences(saved, current, ignore={"device"}) == [
        "max_steps: checkpoint 16 vs run 20", "n_layer: checkpoint (not recorded) vs run 4",
        "seed: checkpoint 1 vs run (not recorded)"]
    assert config_differences(saved, dict(saved)) == []
