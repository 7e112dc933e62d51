"""zjax.inference.server through the official openai client: concurrent requests, streamed or not, give
the engine's own text; chat, stop strings and logprobs; malformed requests are 400 naming the field; a
full queue is 503; a client that leaves aborts its request; stopping lets requests in flight finish."""
import concurrent.futures
import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from flax import nnx

from zjax.config.schema import ModelConfig
from zjax.inference.engine import Engine
from zjax.inference.sampling import SamplingParams
from zjax.inference.server import Server
from zjax.inference.tokenizer import ByteTokenizer
from zjax.models import make_gpt

CFG = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=96)
ENGINE = dict(max_seqs=4, token_budget=32, page_size=8)
BYTES = ByteTokenizer()
TIMEOUT = 30


@pytest.fixture(scope="module")
def params():
    return nnx.to_pure_dict(nnx.state(make_gpt(CFG, seed=0), nnx.Param))


@pytest.fixture(scope="module")
def alone(params):
    """The engine without a server: what each request must give."""
    engine = Engine.from_params(params, CFG, **ENGINE)

    def generate(prompt_ids, **sampling):
        return engine.generate([prompt_ids], SamplingParams(**sampling))[0]

    return generate


@pytest.fixture(scope="module")
def server(params):
    with Server(Engine.from_params(params, CFG, **ENGINE), model_name="tiny", max_queue=16) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def post(url, body, timeout=TIMEOUT):
    """``(status, parsed JSON)`` of a raw POST; ``body`` bytes as they are, else JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_concurrent_requests_stream_or_not_give_the_engines_text(client, alone):
    requests = [("Hello", 20, 0.0, None, False), ("The quick brown fox", 9, 1.0, 7, True),
                ("a", 31, 0.8, 11, False), ("Zürich €", 14, 0.0, None, True),
                ("JAX serving", 25, 1.2, 5, True), ("1 2 3", 3, 1.0, 2, False)]

    def complete(prompt, max_tokens, temperature, seed, stream):
        kw = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
        if not stream:
            choice = client.completions.create(**kw).choices[0]
            return choice.text, choice.finish_reason
        chunks = list(client.completions.create(**kw, stream=True))
        assert all(c.object == "text_completion" and len(c.choices) == 1 for c in chunks)
        assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(lambda r: complete(*r), requests))
    for (prompt, max_tokens, temperature, seed, _), (text, finish) in zip(requests, got):
        expected = alone(BYTES.encode(prompt), max_tokens=max_tokens, temperature=temperature, seed=seed)
        assert text == BYTES.decode(expected.token_ids) and finish == "length"
    assert len({text for text, _ in got}) == len(requests)


def test_chat_completions_use_the_chat_template_and_return_logprobs(client, alone):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    expected = alone(BYTES.encode_chat(messages), max_tokens=12, temperature=1.0, seed=3, logprobs=True)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=1.0, seed=3,
                                           logprobs=True)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == BYTES.decode(expected.token_ids)
    assert reply.usage.prompt_tokens == len(BYTES.encode_chat(messages)) and reply.usage.completion_tokens == 12
    np.testing.assert_allclose([t.logprob for t in reply.choices[0].logprobs.content], expected.logprobs, rtol=1e-5)

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=1.0,
                                                 seed=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == BYTES.decode(
        expected.token_ids)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completion_logprobs_have_openais_legacy_shape(client, alone):
    expected = alone(BYTES.encode("Hello"), max_tokens=6, logprobs=True)
    choice = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0,
                                       logprobs=1).choices[0]
    np.testing.assert_allclose(choice.logprobs.token_logprobs, expected.logprobs, rtol=1e-5)
    assert choice.logprobs.tokens == [BYTES.token_text(t) for t in expected.token_ids]
    assert len(choice.logprobs.text_offset) == 6 and choice.logprobs.text_offset[0] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text_before_them(client, alone, stream):
    full = BYTES.decode(alone(BYTES.encode("stop here"), max_tokens=40, temperature=1.0, seed=9).token_ids)
    stop = full[12:14]
    kw = dict(model="tiny", prompt="stop here", max_tokens=40, temperature=1.0, seed=9, stop=[stop, "never!"])
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        choice = client.completions.create(**kw).choices[0]
        text, finish = choice.text, choice.finish_reason
    assert text == full[:full.index(stop)] and finish == "stop"


def test_the_stream_is_openais_server_sent_events(server):
    request = urllib.request.Request(f"{server.url}/v1/completions", data=json.dumps(
        {"prompt": [72, 105], "max_tokens": 4, "temperature": 0, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(set(c) == {"id", "object", "created", "model", "choices"} for c in chunks)
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["model"] == "tiny"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path,body,param,says", [
    ("completions", b"{not json", None, "not valid JSON"),
    ("completions", {"max_tokens": 5}, "prompt", "prompt is required"),
    ("completions", {"prompt": "hi", "temperature": -0.5}, "temperature", "greater than or equal to 0"),
    ("completions", {"prompt": "hi", "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ("completions", {"prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ("completions", {"prompt": "x" * 96}, "prompt", "max_seq_len=96"),
    ("completions", {"prompt": "x" * 90, "max_tokens": 10}, "max_tokens", "use max_tokens <= 6"),
    ("completions", {"prompt": [1, 256]}, "prompt", "token id 256"),
    ("completions", {"prompt": ""}, "prompt", "prompt is empty"),
    ("completions", {"prompt": ["a", "b"]}, "prompt", "give one prompt"),
    ("completions", {"prompt": "hi", "n": 2}, "n", "use n=1"),
    ("chat/completions", {"messages": []}, "messages", "at least 1 item"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, "messages", "messages.0.role is required"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_k": -2}, "top_k", "top_k=-2"),
])
def test_malformed_requests_are_400_naming_the_field(server, path, body, param, says):
    status, reply = post(f"{server.url}/v1/{path}", body)
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param
    assert says in reply["error"]["message"]


def test_the_openai_client_raises_bad_request_and_the_server_goes_on(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=-1)
    assert err.value.status_code == 400 and err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="max_seq_len=96"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "y" * 100}])
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).usage.completion_tokens == 2
    assert [m.id for m in client.models.list().data] == ["tiny"]


class Gate:
    """Holds the engine thread before each pass until a test lets it through."""

    def __init__(self, engine):
        self.step, self.passes = engine.step, 0
        self.entered, self.allowed, self.open = threading.Event(), threading.Semaphore(0), False
        engine.step = self

    def __call__(self):
        self.entered.set()
        if not self.open:
            assert self.allowed.acquire(timeout=TIMEOUT), "the test never let the pass through"
        self.passes += 1
        return self.step()


@pytest.fixture(scope="module")
def gated(params):
    engine = Engine.from_params(params, CFG, **ENGINE)
    server = Server(engine, model_name="tiny", max_queue=1, shutdown_timeout=TIMEOUT).start()
    yield server, Gate(engine)
    server.stop()


def test_a_client_that_disconnects_aborts_its_request(gated):
    server, gate = gated
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    connection.request("POST", "/v1/completions", json.dumps({"prompt": "go", "max_tokens": 40, "stream": True}))
    gate.allowed.release()
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()
    for _ in range(30):  # one pass at a time until the abort lands between two
        if not server.engine.has_unfinished():
            break
        gate.allowed.release()
        time.sleep(0.05)
    assert not server.engine.has_unfinished() and gate.passes < 40


def test_a_full_queue_is_503_and_stop_finishes_the_request_in_flight(gated):
    server, gate = gated
    gate.entered.clear()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, f"{server.url}/v1/completions", {"prompt": "one", "max_tokens": 5})
        assert gate.entered.wait(TIMEOUT)  # the first request holds the only place (max_queue=1)
        status, reply = post(f"{server.url}/v1/completions", {"prompt": "two", "max_tokens": 5})
        assert status == 503 and "max_queue=1" in reply["error"]["message"]
        stopping = pool.submit(server.stop)
        time.sleep(0.3)
        assert not stopping.done()  # it waits for the request in flight
        gate.open = True
        gate.allowed.release()
        status, reply = first.result(TIMEOUT)
        assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
        stopping.result(TIMEOUT)
    assert not server.running
    with pytest.raises(urllib.error.URLError):
        post(f"{server.url}/v1/completions", {"prompt": "three"}, timeout=5)
