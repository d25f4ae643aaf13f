"""HellaSwag and demo-cloze: the file format, loaders, build-nanogpt's scoring, the batched scorer, the command line."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import types

import pytest
import torch

from nanogpt_core.checkpoint import save_checkpoint
from nanogpt_core.config import get_profile
from nanogpt_core.eval import cloze
from nanogpt_core.content_hash import file_sha256
from nanogpt_core.eval.examples import (DEMO_CLOZE, EvalData, EvalDataError, EvalDataUnavailableError, Example,
                                        examples_sha256, read_examples_file, write_examples)
from nanogpt_core.eval.hellaswag import evaluate_checkpoint
from nanogpt_core.eval.loading import fetch_hellaswag, load_eval_data, load_hf_hellaswag
from nanogpt_core.eval.scoring import (ExampleScore, evaluate_model, render_example, score_example_unbatched,
                                       score_rendered, summarize)
from nanogpt_core.model import GPT, GPTConfig
from nanogpt_core.tokenizer import get_tokenizer
from tests.conftest import PROJECT_ROOT, python_env, run_module

MICRO = GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=64)
ORIGINAL = "hellaswag/hellaswag_val_1000.jsonl"
STRIPPED = "hellaswag/hellaswag_val_10042_stripped.jsonl.gz"


def micro_model(seed: int = 0, config: GPTConfig = MICRO) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


@pytest.fixture(scope="module")
def original_examples():
    from tests.conftest import SHARED_DATA
    path = SHARED_DATA / ORIGINAL
    if not path.is_file():
        pytest.skip(f"HellaSwag sample not found at {path}")
    return read_examples_file(path).examples


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"ctx": "A man sits down. he", "endings": ["eats.", "sleeps.", "runs.", "flies."], "label": 0})


# --- loading ----------------------------------------------------------------------------------

def test_the_original_file_loads_with_its_own_indices(shared_data):
    data = read_examples_file(shared_data / ORIGINAL)
    assert data.benchmark == "hellaswag" and len(data.examples) == 1000
    first = data.examples[0]
    assert first.ctx.startswith("Pole vault is a sport") and first.label == 3 and first.id == "20022"
    assert all(len(ex.endings) == 4 and 0 <= ex.label < 4 for ex in data.examples)
    assert data.file_sha256 == file_sha256(shared_data / ORIGINAL)


def test_the_stripped_gzipped_copy_loads_too(shared_data):
    data = read_examples_file(shared_data / STRIPPED)
    assert data.benchmark == "hellaswag" and len(data.examples) == 10042
    assert data.examples[0].ctx == "A man is sitting on a roof. he" and data.examples[0].id == "0"
    assert data.examples[-1].id == "10041"


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(EvalDataError, match=r"nope\.jsonl: no such file"):
        read_examples_file(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("bad_line, problem", [
    ('{"ctx": "x", "endings": ["a", "b"]', "not valid JSON"),
    ('{"ctx": "x", "endings": ["a", "b"]}', "missing field(s) label"),
    ('{"ctx": "x", "endings": ["a", "b"], "label": 2}', "label must be an index into the 2 endings, got 2"),
    ('{"ctx": "x", "endings": ["a", "b"], "label": ""}', "the test split has no labels"),
    ('{"ctx": "x", "endings": "a", "label": 0}', "endings must be a list"),
    ('["ctx", "endings"]', "expected a JSON object"),
    ('{"ctx": "x", "endings": ["a", "b"], "label": 0, "benchmark": "mmlu"}', "unknown benchmark 'mmlu'"),
])
def test_a_malformed_line_is_named_by_file_and_line(tmp_path, bad_line, problem):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", bad_line])
    with pytest.raises(EvalDataError) as caught:
        read_examples_file(path)
    assert f"{path}:3: " in str(caught.value) and problem in str(caught.value)


def test_a_damaged_gzip_file_is_named(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress(("\n".join([GOOD] * 200) + "\n").encode())
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(EvalDataError, match=r"cut\.jsonl\.gz: cannot be read after line"):
        read_examples_file(path)


def test_string_labels_as_in_the_hugging_face_copy_are_read_as_indices(tmp_path):
    record = {"ctx": "x", "endings": ["a", "b", "c", "d"], "label": "2", "ind": 7}
    example = read_examples_file(write_lines(tmp_path / "hf.jsonl", [json.dumps(record)])).examples[0]
    assert example.label == 2 and example.id == "7"


def test_a_cached_download_is_used_and_a_failed_one_says_to_pass_data(tmp_path):
    unreachable = "http://127.0.0.1:9/hellaswag_val.jsonl"  # the discard port: refused at once
    with pytest.raises(EvalDataUnavailableError) as caught:
        fetch_hellaswag(unreachable, tmp_path / "cache")
    message = str(caught.value)
    assert "\n" not in message and unreachable in message and "pass --data FILE" in message
    assert list((tmp_path / "cache").iterdir()) == []  # no partial file left behind

    cached = write_lines(tmp_path / "cache" / "hellaswag_val.jsonl", [GOOD])
    assert fetch_hellaswag(unreachable, tmp_path / "cache") == cached


def test_the_hugging_face_copy_maps_onto_the_same_examples(monkeypatch):
    rows = [{"ind": 24, "ctx": "A man sits down. he", "endings": ["eats.", "sleeps.", "runs.", "flies."],
             "label": "1", "activity_label": "Sitting", "split": "val"}]
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = load_eval_data("hf:Rowan/hellaswag")
    assert calls == [("Rowan/hellaswag", "validation")]
    assert data.benchmark == "hellaswag" and data.source == "hf:Rowan/hellaswag/validation"
    assert data.examples == [Example("A man sits down. he", ("eats.", "sleeps.", "runs.", "flies."), 1, "24")]


def test_the_hugging_face_copy_fails_clearly_offline_or_without_datasets(monkeypatch):
    def offline(name, split):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(EvalDataUnavailableError, match=r"cannot load Rowan/hellaswag .*pass --data FILE"):
        load_hf_hellaswag()
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(EvalDataUnavailableError, match=r"pip install datasets"):
        load_hf_hellaswag()


# --- scoring, as build-nanogpt scores ------------------------------------------------------------

def test_an_example_is_the_context_tokens_then_each_ending_with_a_leading_space():
    encoder = get_tokenizer()
    example = Example("A man sits down. he", ("eats an apple.", "sleeps."), 0, "x")
    rendered = render_example(example, encoder, block_size=64)
    assert rendered.ctx_tokens == encoder.encode("A man sits down. he")
    assert rendered.ending_tokens == [encoder.encode(" eats an apple."), encoder.encode(" sleeps.")]
    assert rendered.ending_chars == [len("eats an apple."), len("sleeps.")] and not rendered.truncated


def test_the_three_picks_normalise_the_summed_loss_differently():
    score = ExampleScore(label=0, losses=(12.0, 10.0, 9.0), tokens=(6, 4, 3), chars=(40, 20, 20))
    assert score.pred == 2  # lowest sum
    assert score.pred_norm == 0  # lowest per token: 2.0 vs 2.5 vs 3.0
    assert score.pred_char_norm == 0  # lowest per character: 0.30 vs 0.50 vs 0.45
    report = summarize([score, ExampleScore(1, (1.0, 0.5), (1, 1), (1, 1))])
    assert (report["acc"], report["acc_norm"], report["acc_char_norm"], report["n"]) == (0.5, 1.0, 1.0, 2)


def test_only_ending_tokens_count_toward_an_endings_loss():
    model = micro_model()
    encoder = get_tokenizer()
    rendered = render_example(Example("The cat sat on the", ("mat.", "roof of the house."), 0, "x"), encoder, 64)
    score = score_example_unbatched(model, rendered)
    for ending, loss in zip(rendered.ending_tokens, score.losses):
        tokens = torch.tensor([rendered.ctx_tokens + ending])
        n_ctx = len(rendered.ctx_tokens)
        logits = model(tokens)[0][0, n_ctx - 1:-1, :50257]
        expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ending), reduction="sum")
        assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_batched_scoring_equals_one_example_at_a_time(original_examples):
    model, encoder = micro_model(), get_tokenizer()
    rendered = [render_example(ex, encoder, MICRO.block_size) for ex in original_examples[:100]]
    reference = [score_example_unbatched(model, r) for r in rendered]
    for batch_size in (1, 32):
        batched = score_rendered(model, rendered, batch_size=batch_size)
        assert [(s.pred, s.pred_norm, s.pred_char_norm) for s in batched] == \
               [(s.pred, s.pred_norm, s.pred_char_norm) for s in reference]
        for got, want in zip(batched, reference):
            assert got.losses == pytest.approx(want.losses, rel=1e-5, abs=1e-5)
    assert summarize(batched) == summarize(reference)


def test_a_context_too_long_for_the_model_keeps_its_end_and_scores_the_same_both_ways(original_examples):
    small = GPTConfig(block_size=48, n_layer=2, n_head=2, n_embd=64)
    model, encoder = micro_model(1, small), get_tokenizer()
    rendered = [render_example(ex, encoder, small.block_size) for ex in original_examples[:20]]
    assert any(r.truncated for r in rendered)
    for r in rendered:
        assert len(r.ctx_tokens) + max(len(e) for e in r.ending_tokens) <= small.block_size
    reference = [score_example_unbatched(model, r) for r in rendered]
    batched = score_rendered(model, rendered, batch_size=8)
    assert [s.pred_norm for s in batched] == [s.pred_norm for s in reference]
    assert summarize(batched)["n_truncated"] == sum(r.truncated for r in rendered)


def test_a_random_model_scores_near_chance(original_examples):
    data = EvalData("hellaswag", original_examples[:400], "sample")
    report = evaluate_model(micro_model(), data, batch_size=32)
    assert report["n"] == 400
    for metric in ("acc", "acc_norm", "acc_char_norm"):
        assert 0.18 <= report[metric] <= 0.32, (metric, report[metric])


REFERENCE_SCORES = PROJECT_ROOT / "tests" / "nanogpt_core" / "reference" / "hellaswag_val_1000_scores.json"


def reference_model() -> GPT:
    """A micro GPT whose weights depend only on a seed and the GPT-2 parameter names.

    The weights are drawn in name order rather than taken from the model's initialisation, so
    a change to how the model initialises or orders its modules leaves them alone. They are
    larger than a fresh model's, so the four endings' losses differ by far more than rounding.
    """
    model = GPT(MICRO).eval()
    generator = torch.Generator().manual_seed(2024)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_((0.1 if p.dim() >= 2 else 0.02) * noise)
    return model


def test_the_scores_on_the_1000_row_sample_are_the_recorded_ones(original_examples):
    recorded = json.loads(REFERENCE_SCORES.read_text())
    encoder = get_tokenizer()
    rendered = [render_example(ex, encoder, MICRO.block_size) for ex in original_examples]
    scores = score_rendered(reference_model(), rendered)
    for metric, pick in (("acc", "pred"), ("acc_norm", "pred_norm"), ("acc_char_norm", "pred_char_norm")):
        assert "".join(str(getattr(s, pick)) for s in scores) == recorded["picks"][metric], metric
    for i, (score, losses) in enumerate(zip(scores, recorded["losses"], strict=True)):
        # rel 1e-5 is float32 rounding over a few hundred summed terms; abs covers the 4 recorded decimals
        assert score.losses == pytest.approx(losses, rel=1e-5, abs=1e-4), f"example {i}"


# --- the command line --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model_00000.pt", micro_model(), step=0)


def test_the_command_line_prints_one_json_object(shared_data, micro_checkpoint):
    data = shared_data / ORIGINAL
    proc = run_module("nanogpt_core.eval.hellaswag", "--checkpoint", str(micro_checkpoint), "--data", str(data),
                      "--limit", "24", "--batch-size", "5", "--json")
    report = json.loads(proc.stdout)
    assert report["benchmark"] == "hellaswag" and report["n"] == 24 and report["checkpoint_step"] == 0
    assert report["data"] == str(data) and report["data_sha256"] == file_sha256(data)
    in_process = evaluate_checkpoint(micro_checkpoint, data, limit=24)
    for key in ("acc", "acc_norm", "acc_char_norm", "examples_sha256"):
        assert report[key] == in_process[key]


def test_the_command_line_reports_a_bad_file_in_one_line(tmp_path, micro_checkpoint):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "{not json"])
    proc = run_module("nanogpt_core.eval.hellaswag", "--checkpoint", str(micro_checkpoint), "--data", str(path),
                      "--json", check=False)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: {path}:2: not valid JSON") and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_two_ranks_split_the_examples_and_agree_with_one(shared_data, micro_checkpoint):
    data = shared_data / ORIGINAL
    args = ("--checkpoint", str(micro_checkpoint), "--data", str(data), "--limit", "30", "--json")
    two = json.loads(run_module("nanogpt_core.eval.hellaswag", *args, nproc=2).stdout)
    assert two["world_size"] == 2 and two["n"] == 30
    one = evaluate_checkpoint(micro_checkpoint, data, limit=30)
    assert {k: two[k] for k in ("acc", "acc_norm", "acc_char_norm", "correct_norm")} == \
           {k: one[k] for k in ("acc", "acc_norm", "acc_char_norm", "correct_norm")}


# --- the offline cloze set ----------------------------------------------------------------------

def test_the_demo_cloze_set_is_hellaswag_shaped_and_cut_from_held_out_documents():
    data = cloze.demo_cloze_data()
    assert data.benchmark == "demo-cloze" and len(data.examples) >= 300
    assert sorted({ex.label for ex in data.examples}) == [0, 1, 2, 3]
    held_out = {doc.id: doc.text for doc in cloze.held_out_documents()}
    for ex in data.examples[:50]:
        doc_id = ex.id.rsplit("#", 1)[0]
        text = held_out[doc_id]
        start = text.find(ex.ctx)
        assert start >= 0 and text[start + len(ex.ctx):].lstrip().startswith(ex.endings[ex.label])
        assert len(set(ex.endings)) == 4 and all(len(e.split()) == cloze.ENDING_WORDS for e in ex.endings)
        assert all("\n\n" not in e for e in ex.endings)
        for i, ending in enumerate(ex.endings):
            if i != ex.label:
                assert any(ending in other for other_id, other in held_out.items() if other_id != doc_id)


def test_the_demo_cloze_set_is_the_same_in_another_process(tmp_path):
    out = tmp_path / "cloze.jsonl"
    env = {**python_env(), "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-m", "nanogpt_core.eval.cloze", "--out", str(out)], check=True,
                   capture_output=True, env=env, cwd=PROJECT_ROOT, timeout=120)
    written = read_examples_file(out)
    assert written.benchmark == "demo-cloze"  # a file of cloze examples keeps its name
    assert examples_sha256(written.examples) == examples_sha256(cloze.demo_cloze_data().examples)


def test_the_micro_profile_scores_the_whole_cloze_set_under_its_own_name(tmp_path):
    model = micro_model(2, get_profile("micro").model_config())  # 64 positions, the smallest we train
    path = save_checkpoint(tmp_path / "model_00001.pt", model, step=1)
    report = evaluate_checkpoint(path, benchmark="demo-cloze")
    assert report["benchmark"] == "demo-cloze" and report["n"] == len(cloze.demo_cloze_data().examples)
    assert "hellaswag" not in json.dumps(report).lower()


def test_a_file_of_cloze_examples_keeps_its_name_and_is_not_scored_as_hellaswag(tmp_path):
    examples = cloze.demo_cloze_data().examples[:3]
    path = write_examples(tmp_path / "cloze.jsonl", examples, DEMO_CLOZE)
    loaded = load_eval_data(path)
    assert loaded.benchmark == "demo-cloze" and loaded.examples == examples
    with pytest.raises(EvalDataError, match="holds demo-cloze examples, not hellaswag"):
        load_eval_data(path, "hellaswag")
