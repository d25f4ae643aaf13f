"""The int8 engine: per-row int8 weights through fbgemm, selected with --weights and shown on /v1/models."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from nanogpt_core.model import GPT, GPTConfig
from serving.app import create_app
from serving.int8 import Int8Linear, int8_available, quantize_rows
from serving.kv_decoder import BatchDecoder
from serving.linear_layouts import LAYOUTS
from serving.settings import ServerSettings, SettingsError, settings_from_environment
from tests.serving.conftest import API_KEYS, ServerProcess, make_checkpoint
from tests.serving.engine_helpers import (
    CHAT,
    FAULT_SEED,
    QUESTIONS,
    assert_generic_500,
    chat_body,
    decisive_model,
    fail_sampling_of_marked_requests,
    streamed_text,
)

pytestmark = pytest.mark.skipif(not int8_available(), reason="this torch build has no fbgemm int8 kernels")


@pytest.fixture(scope="module")
def model() -> GPT:
    return decisive_model(GPTConfig(block_size=96, n_layer=2, n_head=4, n_embd=64), seed=5)


def test_rows_are_quantized_symmetrically_each_with_its_own_scale():
    weight = torch.tensor([[0.5, -1.0, 0.25], [100.0, 50.0, -25.0], [0.0, 0.0, 0.0]])
    values, scales = quantize_rows(weight)
    assert values.dtype == torch.int8
    torch.testing.assert_close(scales[:2], torch.tensor([1.0 / 127, 100.0 / 127]))
    assert values[0].tolist() == [64, -127, 32] and values[1].tolist() == [127, 64, -32]
    assert values[2].tolist() == [0, 0, 0] and scales[2] > 0  # an all-zero row is still valid
    assert ((values.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 + 1e-6).all()


def test_an_int8_linear_layer_is_close_to_fp32_and_fuses_gelu():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 64) * 0.05, torch.randn(96) * 0.1, torch.randn(3, 64)
    exact = x @ weight.T + bias
    error = (Int8Linear(weight, bias)(x) - exact).abs().max()
    assert error < 0.02 * exact.abs().max()
    torch.testing.assert_close(Int8Linear(weight, bias, gelu=True)(x),
                               torch.nn.functional.gelu(Int8Linear(weight, bias)(x), approximate="tanh"))


def test_the_int8_decoder_reads_a_quarter_of_the_bytes_and_picks_the_same_tokens(model):
    fp32 = BatchDecoder(model, max_batch=2, weights="fp32")
    int8 = BatchDecoder(model, max_batch=2, weights="int8")
    # A quarter, plus one scale per row (8 bytes a row against 64 int8 weights at this width).
    assert 0.25 < int8.weight_bytes_per_step() / fp32.weight_bytes_per_step() < 0.3
    prompt = [7, 300, 4000, 12, 9, 40000, 3]
    for decoder in (fp32, int8):
        decoder.clear(decoder.staging_slot)
    exact = fp32.score(fp32.staging_slot, prompt)
    approx = int8.score(int8.staging_slot, prompt)
    assert approx.shape == exact.shape == (len(prompt), 50257)
    assert (approx.argmax(-1) == exact.argmax(-1)).all()
    assert (approx - exact).abs().max() < 0.05 * exact.abs().max()
    # Decoding continues the cache that prefill wrote, as with fp32 weights.
    int8.allocate(copy_from=int8.staging_slot)
    fp32.allocate(copy_from=fp32.staging_slot)
    assert int8.decode([5]).argmax() == fp32.decode([5]).argmax()


def test_an_unknown_weight_format_is_refused_by_name():
    with pytest.raises(SettingsError, match="weights must be one of fp32, int8, got 'int4'"):
        settings_from_environment({"NANOGPT_CHECKPOINT": "x.pt", "NANOGPT_WEIGHTS": "int4"})
    with pytest.raises(SettingsError, match="int8 weights run on the CPU only"):
        ServerSettings(checkpoint="x.pt", weights="int8", device="cuda")


def test_a_sampling_fault_in_int8_mode_fails_only_its_request(tmp_path, monkeypatch):
    checkpoint = make_checkpoint(tmp_path / "model_00003.pt", seed=3, step=3)

    async def main():
        app = create_app(ServerSettings(checkpoint=checkpoint, max_batch=8, weights="int8"))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
                assert isinstance(app.state.registry.current.engine.decoder.lm_head, Int8Linear)
                batch_sizes = fail_sampling_of_marked_requests(monkeypatch, app)
                responses = await asyncio.gather(
                    *(client.post(CHAT, json=chat_body(q, stream=True)) for q in QUESTIONS[:4]),
                    client.post(CHAT, json=chat_body("Count to ten.", seed=FAULT_SEED)))
                return responses, batch_sizes

    (*streams, faulty), batch_sizes = asyncio.run(main())
    assert_generic_500(faulty)
    assert batch_sizes and batch_sizes[0] >= 2  # the fault hit while others were decoding
    for response in streams:
        streamed_text(response)  # each neighbour ran to its own end without an error event


@pytest.mark.slow
def test_a_server_started_with_int8_weights_says_so_and_answers(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "model_00004.pt", seed=4, step=4)
    server = ServerProcess(args=["--checkpoint", str(checkpoint), "--weights", "int8", "--threads", "1"],
                           env={"NANOGPT_API_KEYS": API_KEYS[0]}, log_path=tmp_path / "server.log").start()
    try:
        headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
        card = httpx.get(f"{server.url}/v1/models/nanogpt", headers=headers, timeout=10).json()
        assert card["weights"] == "int8"
        assert card["weight_layouts"] == {}
        reply = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=60, json={
            "model": "nanogpt", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
            "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()


@pytest.mark.slow
def test_the_default_server_serves_fp32_weights(deployment):
    card = httpx.get(f"{deployment.base_url}/models/nanogpt", headers=deployment.headers(), timeout=10).json()
    assert card["weights"] == "fp32"
    # where single rows go, as timed when the model loaded, for every role of matrix
    assert set(card["weight_layouts"]) == {"attn", "attn_proj", "fc", "mlp_proj", "lm_head"}
    assert set(card["weight_layouts"].values()) <= set(LAYOUTS)
