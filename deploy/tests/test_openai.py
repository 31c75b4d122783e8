"""The router's OpenAI-compatible HTTP front, seen through the official `openai` client.

Runs against a live Orchard cluster (or `cargo run -p orchard-router --example
http_fake_server`):

    pip install -r deploy/tests/requirements.txt
    ORCHARD_HTTP_URL=http://127.0.0.1:8000 pytest deploy/tests/test_openai.py

Environment:
    ORCHARD_HTTP_URL  the router's HTTP address, with or without the trailing /v1 (required;
                      every test is skipped without it)
    ORCHARD_API_KEY   bearer token, if the router requires one
    ORCHARD_MODEL     model to use (default: the first one GET /v1/models lists)
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

import openai
import pytest

BASE_URL = os.environ.get("ORCHARD_HTTP_URL", "").rstrip("/")
API_KEY = os.environ.get("ORCHARD_API_KEY", "orchard")
# How long the worker load may take to reflect a change: the worker frees blocks within one
# engine step; the router polls worker load every health.poll_interval (500 ms by default).
# Far shorter than generating the rest of the disconnected request would take.
LOAD_TIMEOUT_S = 10.0
POLL_S = 0.1

pytestmark = pytest.mark.skipif(not BASE_URL, reason="ORCHARD_HTTP_URL is not set")


def api_root() -> str:
    """The URL the OpenAI client wants: the router's address plus /v1."""
    return BASE_URL if BASE_URL.endswith("/v1") else BASE_URL + "/v1"


@pytest.fixture(scope="module")
def client() -> openai.OpenAI:
    # No client-side retries: a 429 or 503 must fail the test, not be hidden by a retry.
    return openai.OpenAI(base_url=api_root(), api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    if os.environ.get("ORCHARD_MODEL"):
        return os.environ["ORCHARD_MODEL"]
    models = client.models.list().data
    assert models, "GET /v1/models lists no model"
    return models[0].id


def kv_blocks_used() -> int:
    """KV blocks in use over all workers, from the router's GET /v1/orchard/workers."""
    request = urllib.request.Request(
        api_root() + "/orchard/workers", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        workers = json.load(response)["workers"]
    return sum((w.get("load") or {}).get("kv_blocks_used", 0) for w in workers)


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {LOAD_TIMEOUT_S}s waiting for {what}")
        time.sleep(POLL_S)


def max_model_len(client: openai.OpenAI, model: str) -> int:
    card = next(m for m in client.models.list().data if m.id == model)
    return int((card.model_extra or {})["max_model_len"])


def test_streamed_chat_completion(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name three fruits."}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks, "no chunks"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1, "chunks of one response share an id"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip(), "empty answer"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length"), finishes
    timings = (chunks[-1].model_extra or {}).get("orchard_timings")
    assert timings and timings["worker_id"], f"no orchard_timings on the last chunk: {chunks[-1]}"


def test_non_streamed_completion(client: openai.OpenAI, model: str) -> None:
    completion = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert completion.object == "text_completion"
    choice = completion.choices[0]
    assert isinstance(choice.text, str) and choice.text, completion
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    timings = (completion.model_extra or {}).get("orchard_timings")
    assert timings and timings["e2e_s"] >= timings["ttft_s"] >= 0, completion


def test_streamed_usage_counts_the_tokens_produced(client: openai.OpenAI, model: str) -> None:
    # ignore_eos makes the length exact, so the count cannot pass by coincidence with EOS.
    max_tokens = 12
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=max_tokens,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    produced = sum(
        len(c.choices[0].logprobs.content)
        for c in chunks
        if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content
    )
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == [], chunks[-1]
    assert usage.completion_tokens == produced == max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens


def test_non_streamed_usage_counts_the_tokens_produced(client: openai.OpenAI, model: str) -> None:
    completion = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=10, logprobs=0,
        extra_body={"ignore_eos": True},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == completion.usage.completion_tokens == 10


@pytest.mark.parametrize("param, value", [("top_p", 5.0), ("n", 2), ("temperature", -1.0)])
def test_invalid_parameter_is_a_400_naming_it(
    client: openai.OpenAI, model: str, param: str, value: float
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            **{param: value},
        )
    assert caught.value.status_code == 400
    assert param in str(caught.value.message), caught.value.message


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)


def test_disconnect_mid_stream_frees_the_kv_blocks(client: openai.OpenAI, model: str) -> None:
    wait_until(lambda: kv_blocks_used() == 0, "an idle cluster before the test")
    # As long as the context allows: finishing it would take far longer than LOAD_TIMEOUT_S,
    # so blocks freed in time can only come from the cancellation.
    max_tokens = max_model_len(client, model) - 64
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a very long essay about orchards."}],
        max_tokens=max_tokens,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
        if received >= 3:
            break
    # The request is still generating, so it holds KV blocks...
    wait_until(lambda: kv_blocks_used() > 0, "the running request to show in the worker load")
    stream.close()
    # ...until the closed connection cancels it on the worker.
    wait_until(lambda: kv_blocks_used() == 0, "KV blocks to be freed after the disconnect")
