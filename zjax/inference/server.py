"""An OpenAI-compatible HTTP server for an ``Engine`` (starlette on uvicorn).

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``, when
``"stream": true``), ``GET /v1/models`` and ``GET /health``.

Request fields: ``prompt`` (a string, a list of token ids, or a list holding one of these) or
``messages`` (rendered by the tokenizer's chat template); ``max_tokens`` (chat also
``max_completion_tokens``; default 16 for completions, the rest of the model's
``max_seq_len`` for chat), ``temperature`` (default 1, 0 = greedy), ``top_p``, ``top_k``
(an extension; 0 or -1 = off), ``seed`` (taken modulo 2**32), ``stop`` (strings: the text ends
before the first one), ``n`` (1 only), ``logprobs`` (completions: an integer, the legacy
shape; chat: true/false), ``stream``, ``stream_options.include_usage``. The tokenizer's EOS
ids stop a generation. Top alternatives are not computed: ``top_logprobs`` is null
(completions) or empty (chat), and chat's ``top_logprobs`` above 0 is refused. Penalties,
``logit_bias``, ``echo``, ``suffix`` and ``best_of`` above 1 are refused; other unknown
fields (``user``, ``model``) are ignored.

A bad request is HTTP 400 with ``{"error": {"message", "type": "invalid_request_error",
"param"}}`` naming the field: bad JSON, a missing or empty prompt, a sampling value out of
range, a prompt that leaves no room in ``max_seq_len``. Beyond ``max_queue`` requests in
flight the answer is 503 (``Retry-After: 1``).

Threads: uvicorn's event loop parses requests and streams answers; one engine thread owns
the ``Engine`` (the only thread that calls it): it takes new requests and aborts between
passes, runs ``step()`` while anything is unfinished, and hands each request's tokens to
that request's asyncio queue with ``loop.call_soon_threadsafe``. The request's coroutine
detokenizes incrementally and matches stop strings. A client that disconnects aborts its
request. ``Server.stop`` (``serve``: SIGTERM or SIGINT) stops accepting connections, lets
the requests in flight finish for up to ``shutdown_timeout`` seconds, aborts the rest and
joins both threads.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import threading
import time
import uuid
from typing import Any, AsyncIterator

import pydantic
import uvicorn
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from zjax.inference.engine import Engine, RequestOutput
from zjax.inference.sampling import SamplingParams

__all__ = ["DEFAULT_MAX_QUEUE", "DEFAULT_PORT", "Server", "serve"]

DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 64
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
_SEED_MODULUS = 2**32
_log = logging.getLogger(__name__)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, model_name: str = "zjax",
          max_queue: int = DEFAULT_MAX_QUEUE, shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Serves ``engine`` over HTTP until SIGTERM or SIGINT, then shuts down gracefully and returns.

    Prints ``serving MODEL on http://HOST:PORT/v1`` once it listens (``port=0`` picks a free
    port). Arguments as ``Server``.
    """
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = Server(engine, host, port, model_name=model_name, max_queue=max_queue,
                    shutdown_timeout=shutdown_timeout, log_level=log_level)
    try:
        server.start()
        print(f"serving {model_name} on {server.url}/v1 (stop with SIGTERM or Ctrl-C)", flush=True)
        while server.running and not stop.wait(0.2):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Server:
    """The HTTP server and its engine thread, run in background threads (tests, notebooks).

    Args:
      engine: the ``Engine`` to serve; it must have a ``tokenizer`` and be idle. The server
        owns it until ``stop``.
      host, port: where to listen; ``port=0`` picks a free port (``Server.port`` after ``start``).
      model_name: the model id ``/v1/models`` lists and answers carry.
      max_queue: requests in flight (waiting or generating) beyond which a request gets 503.
      shutdown_timeout: seconds ``stop`` lets requests in flight finish before aborting them.
      log_level: uvicorn's.
      warmup: compile the engine's pass with a one-token generation in ``start``, so that the
        first request does not wait for it.

    Example::

        with Server(engine, port=0) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    """

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0, *, model_name: str = "zjax",
                 max_queue: int = DEFAULT_MAX_QUEUE, shutdown_timeout: float = 30.0, log_level: str = "warning",
                 warmup: bool = True):
        if engine.tokenizer is None:
            raise ValueError(f"the engine has no tokenizer (vocab_size={engine.cfg.vocab_size} is below the byte "
                             "tokenizer's 256 and no tokenizer.json was found); give Engine(tokenizer=...)")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue={max_queue!r}: use an integer >= 1")
        self.engine = engine
        self.host, self.port = host, port
        self.shutdown_timeout = shutdown_timeout
        self.warmup = warmup
        self._engine_thread = _EngineThread(engine, max_queue)
        self.app = _Api(self._engine_thread, model_name).app
        self._config = uvicorn.Config(self.app, host=host, port=port, log_level=log_level, log_config=None,
                                      lifespan="off", timeout_graceful_shutdown=shutdown_timeout)
        self._uvicorn: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._http_thread is not None and self._http_thread.is_alive()

    def start(self, timeout: float = 60.0) -> Server:
        """Starts both threads; returns once the server listens."""
        if self.warmup:
            self.engine.generate([[0]], SamplingParams(max_tokens=1))
        self._engine_thread.start()
        self._uvicorn = uvicorn.Server(self._config)  # outside the main thread it installs no signal handlers
        self._http_thread = threading.Thread(target=self._uvicorn.run, name="zjax-http", daemon=True)
        self._http_thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._http_thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"the server did not start listening on {self.host}:{self.port} (uvicorn's log "
                              "says why: a port in use, an address not of this machine)")
            time.sleep(0.01)
        self.port = self._uvicorn.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stops accepting, lets requests in flight finish (``shutdown_timeout``), aborts the rest,
        joins both threads."""
        if self._http_thread is not None:
            self._uvicorn.should_exit = True
            self._http_thread.join(self.shutdown_timeout + 10)
        self._engine_thread.stop(timeout=60)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- the engine thread ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Rejected:
    """The engine refused the request (``add_request``'s ValueError)."""

    message: str


@dataclasses.dataclass(frozen=True)
class _Ended:
    """The request ends without a finish: the engine failed, the server shut down, or the client left."""

    reason: str
    error: str | None = None


_ACCEPTED = object()
_SHUTDOWN = _Ended("abort")
_DISCONNECTED = _Ended("disconnected")


class _Job:
    """One request as the two threads share it: the engine thread writes into ``queue``
    (``RequestOutput``, ``_ACCEPTED``, ``_Rejected`` or ``_Ended``) through the event loop."""

    def __init__(self, prompt_ids: list[int], sampling: SamplingParams):
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_id: int | None = None
        self.watcher: asyncio.Task | None = None

    def deliver(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody waits for this request any more
            pass


class _EngineThread:
    """The one thread that calls the engine; see the module docstring."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self._wake = threading.Condition()
        self._adds: list[_Job] = []
        self._aborts: list[_Job] = []
        self._jobs: dict[int, _Job] = {}  # engine request id -> job
        self._load = 0  # jobs submitted and not ended
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="zjax-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: _Job) -> bool:
        """Queues a job; False when ``max_queue`` jobs are in flight or the server is stopping."""
        with self._wake:
            if self._stopping or self._load >= self.max_queue:
                return False
            self._load += 1
            self._adds.append(job)
            self._wake.notify()
        return True

    def abort(self, job: _Job) -> None:
        """Aborts a job between passes; nothing for one that already ended."""
        with self._wake:
            self._aborts.append(job)
            self._wake.notify()

    def stop(self, timeout: float) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._adds or self._aborts or self._stopping or self.engine.has_unfinished()):
                    self._wake.wait()
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            for job in adds:
                self._add(job)
            for job in aborts:
                self._abort(job)
            if stopping:
                for job in list(self._jobs.values()):
                    self._abort(job)
                    job.deliver(_SHUTDOWN)
                return
            if self.engine.has_unfinished():
                self._step()

    def _add(self, job: _Job) -> None:
        try:
            job.request_id = self.engine.add_request(job.prompt_ids, job.sampling)
        except ValueError as err:
            self._ended()
            job.deliver(_Rejected(str(err)))
            return
        self._jobs[job.request_id] = job
        job.deliver(_ACCEPTED)

    def _abort(self, job: _Job) -> None:
        if self._jobs.pop(job.request_id, None) is not None:
            self.engine.abort(job.request_id)
            self._ended()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:  # a failed pass fails its requests, not the server
            _log.exception("the engine's step failed; aborting the requests in flight")
            for job in list(self._jobs.values()):
                self._abort(job)
                job.deliver(_Ended("error", f"the engine failed: {type(err).__name__}: {err}"))
            return
        for out in outputs:
            job = self._jobs.get(out.request_id)
            if job is None:
                continue
            job.deliver(out)
            if out.finished:
                del self._jobs[out.request_id]
                self._ended()

    def _ended(self) -> None:
        with self._wake:
            self._load -= 1


# -- the HTTP API --------------------------------------------------------------------------

class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class _SamplingFields(BaseModel):
    """What both endpoints take (OpenAI's names; ``top_k`` is an extension)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int | None = None
    seed: int | None = None
    stop: list[str] = []
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n is not None and n != 1:
            raise ValueError("this server returns one choice per request; use n=1 (or send n requests)")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, stop):
        if stop is None:
            return []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError("give a non-empty string or a list of them")
        return stop

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value:
            raise ValueError("penalties are not supported; use 0 or leave it out")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported; leave it out")
        return value


class _CompletionRequest(_SamplingFields):
    prompt: Any = Field(...)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            return prompt
        raise ValueError("give one prompt: a string or a list of token ids")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo):
        if echo:
            raise ValueError("echo is not supported; use false")
        return echo

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix):
        if suffix:
            raise ValueError("suffix (insertion) is not supported; leave it out")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of):
        if best_of not in (None, 1):
            raise ValueError("best_of above 1 is not supported; use 1")
        return best_of


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Any = None

    @field_validator("content")
    @classmethod
    def _text(cls, content):
        if content is None or isinstance(content, str):
            return content or ""
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                              and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise ValueError("give a string or a list of {\"type\": \"text\", \"text\": ...} parts (text only)")


class _ChatRequest(_SamplingFields):
    messages: list[_Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)

    @field_validator("top_logprobs")
    @classmethod
    def _no_alternatives(cls, value):
        if value:
            raise ValueError("top alternatives are not computed here; use 0 or leave it out (logprobs=true "
                             "still gives each token's own log-probability)")
        return value


@dataclasses.dataclass
class _Piece:
    """New text and tokens of a request, and its finish reason on the last piece."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None


class _Api:
    """The starlette app: parses and validates requests, runs them through the engine thread."""

    def __init__(self, engine_thread: _EngineThread, model_name: str):
        self.engine_thread = engine_thread
        self.engine = engine_thread.engine
        self.tokenizer = self.engine.tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self.app = Starlette(
            routes=[Route("/v1/completions", self.completions, methods=["POST"]),
                    Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route("/health", self.health, methods=["GET"])],
            exception_handlers={_BadRequest: _bad_request, HTTPException: _http_error, Exception: _server_error})

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "zjax"}]})

    async def completions(self, request: Request):
        body = _parse(_CompletionRequest, await _json_body(request))
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            vocab = self.engine.cfg.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise _BadRequest(f"prompt has token id {bad[0]}, outside the model's vocabulary 0..{vocab - 1}",
                                  "prompt")
            prompt_ids = list(prompt)
        sampling = self._sampling(body, prompt_ids, "prompt", body.max_tokens, DEFAULT_COMPLETION_TOKENS,
                                  logprobs=body.logprobs is not None)
        job = await self._submit(request, prompt_ids, sampling)
        reply = _CompletionReply(self.model_name, self.tokenizer, logprobs=body.logprobs is not None)
        pieces = self._pieces(job, prompt_ids, body.stop)
        if body.stream:
            return _event_stream(reply.chunks(pieces, len(prompt_ids), _include_usage(body)))
        return JSONResponse(await reply.whole(pieces, len(prompt_ids)))

    async def chat_completions(self, request: Request):
        body = _parse(_ChatRequest, await _json_body(request))
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        try:
            prompt_ids = self.tokenizer.encode_chat(messages)
        except Exception as err:  # a chat template's raise_exception or a template error
            raise _BadRequest(f"messages do not fit the model's chat template: {err}", "messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        sampling = self._sampling(body, prompt_ids, "messages", max_tokens, None, logprobs=bool(body.logprobs))
        job = await self._submit(request, prompt_ids, sampling)
        reply = _ChatReply(self.model_name, self.tokenizer, logprobs=bool(body.logprobs))
        pieces = self._pieces(job, prompt_ids, body.stop)
        if body.stream:
            return _event_stream(reply.chunks(pieces, len(prompt_ids), _include_usage(body)))
        return JSONResponse(await reply.whole(pieces, len(prompt_ids)))

    def _sampling(self, body: _SamplingFields, prompt_ids: list[int], prompt_param: str, max_tokens: int | None,
                  default_max_tokens: int | None, logprobs: bool) -> SamplingParams:
        limit = self.engine.max_seq_len
        room = limit - len(prompt_ids)
        if not prompt_ids:
            raise _BadRequest(f"{prompt_param} is empty: give at least one token", prompt_param)
        if room < 1:
            raise _BadRequest(f"the prompt has {len(prompt_ids)} tokens, leaving no room for a completion: this "
                              f"model takes at most max_seq_len={limit} tokens, prompt and completion together; "
                              "shorten the prompt", prompt_param)
        if max_tokens is None:
            max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        elif max_tokens > room:
            raise _BadRequest(f"max_tokens={max_tokens} with a prompt of {len(prompt_ids)} tokens is "
                              f"{len(prompt_ids) + max_tokens} tokens, above the model's max_seq_len={limit}; use "
                              f"max_tokens <= {room} or a shorter prompt", "max_tokens")
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p, max_tokens=max_tokens,
            stop_token_ids=self.tokenizer.eos_token_ids,
            seed=None if body.seed is None else body.seed % _SEED_MODULUS, logprobs=logprobs)

    async def _submit(self, request: Request, prompt_ids: list[int], sampling: SamplingParams) -> _Job:
        """Hands the request to the engine thread; returns once the engine took it."""
        job = _Job(prompt_ids, sampling)
        if not self.engine_thread.submit(job):
            raise _BadRequest(f"the server is at its limit of max_queue={self.engine_thread.max_queue} requests in "
                              "flight (or shutting down); retry later", None, status=503)
        answer = await job.queue.get()
        if isinstance(answer, _Rejected):
            raise _BadRequest(answer.message, None)
        job.watcher = asyncio.create_task(self._abort_on_disconnect(request, job))
        return job

    async def _abort_on_disconnect(self, request: Request, job: _Job) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.engine_thread.abort(job)
        job.queue.put_nowait(_DISCONNECTED)

    async def _pieces(self, job: _Job, prompt_ids: list[int], stops: list[str]) -> AsyncIterator[_Piece]:
        """The request's text as the engine makes it: decoded incrementally, cut before a stop string."""
        detokenizer = self.tokenizer.detokenizer(prompt_ids)
        stop = _StopStrings(stops)
        try:
            while True:
                item = await job.queue.get()
                if item is _DISCONNECTED:
                    return
                if isinstance(item, _Ended):
                    if item.error is not None:
                        raise RuntimeError(item.error)
                    yield _Piece(stop.feed(detokenizer.flush(), final=True)[0], [], None, item.reason)
                    return
                out: RequestOutput = item
                text = detokenizer.add(out.token_ids) + (detokenizer.flush() if out.finished else "")
                text, stopped = stop.feed(text, final=out.finished)
                if stopped:
                    yield _Piece(text, out.token_ids, out.logprobs, "stop")
                    return
                yield _Piece(text, out.token_ids, out.logprobs, out.finish_reason)
                if out.finished:
                    return
        finally:
            self.engine_thread.abort(job)  # nothing when it finished
            if job.watcher is not None:
                job.watcher.cancel()


class _StopStrings:
    """Cuts text before the first stop string; holds back a tail that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""

    def feed(self, text: str, final: bool) -> tuple[str, bool]:
        """``(text safe to send, whether a stop string was reached)``."""
        text, self.held = self.held + text, ""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return text[:min(hits)], True
        if final:
            return text, False
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False


class _Reply:
    """Builds a completion's JSON, whole or as stream chunks; the subclasses give the shapes."""

    object_name: str
    chunk_object_name: str
    id_prefix: str

    def __init__(self, model_name: str, tokenizer, logprobs: bool):
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def whole(self, pieces: AsyncIterator[_Piece], prompt_tokens: int) -> dict:
        text, tokens, logprobs, offsets, finish = "", [], [], [], None
        async for piece in pieces:
            offsets += [len(text)] * len(piece.token_ids)
            text += piece.text
            tokens += piece.token_ids
            logprobs += piece.logprobs or []
            finish = piece.finish_reason
        choice = self.choice(text, self.logprobs_of(tokens, logprobs, offsets), finish)
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model_name,
                "choices": [choice], "usage": _usage(prompt_tokens, len(tokens))}

    async def chunks(self, pieces: AsyncIterator[_Piece], prompt_tokens: int, include_usage: bool):
        """The stream's JSON chunks: the text as it comes, then a chunk with the finish reason."""
        first = self.first_delta()
        if first is not None:
            yield self.chunk(first, None, None, include_usage)
        sent, generated = 0, 0
        async for piece in pieces:
            generated += len(piece.token_ids)
            logprobs = self.logprobs_of(piece.token_ids, piece.logprobs or [], [sent] * len(piece.token_ids))
            if piece.text or logprobs is not None:
                yield self.chunk(self.delta(piece.text), logprobs, None, include_usage)
            sent += len(piece.text)
            if piece.finish_reason is not None:
                yield self.chunk(self.delta(None), None, piece.finish_reason, include_usage)
        if include_usage:
            yield {"id": self.id, "object": self.chunk_object_name, "created": self.created,
                   "model": self.model_name, "choices": [], "usage": _usage(prompt_tokens, generated)}

    def chunk(self, delta: dict, logprobs, finish_reason, include_usage: bool) -> dict:
        out = {"id": self.id, "object": self.chunk_object_name, "created": self.created, "model": self.model_name,
               "choices": [{"index": 0, **delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            out["usage"] = None
        return out

    def first_delta(self) -> dict | None:
        return None


class _CompletionReply(_Reply):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def choice(self, text, logprobs, finish_reason) -> dict:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def delta(self, text) -> dict:
        return {"text": text or ""}

    def logprobs_of(self, tokens, logprobs, offsets) -> dict | None:
        """OpenAI's legacy shape; the alternatives (``top_logprobs``) are not computed."""
        if not self.logprobs or not tokens:
            return None
        return {"tokens": [self.tokenizer.token_text(t) for t in tokens], "token_logprobs": list(logprobs),
                "top_logprobs": None, "text_offset": list(offsets)}


class _ChatReply(_Reply):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def choice(self, text, logprobs, finish_reason) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def first_delta(self) -> dict:
        return {"delta": {"role": "assistant", "content": ""}}

    def delta(self, text) -> dict:
        return {"delta": {} if text is None else {"content": text}}

    def logprobs_of(self, tokens, logprobs, offsets) -> dict | None:
        if not self.logprobs or not tokens:
            return None
        return {"content": [{"token": self.tokenizer.token_text(t), "logprob": lp, "bytes": None, "top_logprobs": []}
                            for t, lp in zip(tokens, logprobs)]}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _include_usage(body: _SamplingFields) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


def _event_stream(chunks) -> StreamingResponse:
    async def events():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _BadRequest(f"the request body is not valid JSON ({err}); send a JSON object", None) from None
    if not isinstance(body, dict):
        raise _BadRequest(f"the request body is a JSON {type(body).__name__}; send a JSON object", None)
    return body


def _parse(model: type[BaseModel], body: dict):
    """The validated request, or a 400 naming the first bad field."""
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as err:
        first = err.errors(include_url=False)[0]
        loc = [str(part) for part in first["loc"]]
        where = ".".join(loc) or "the request"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            raise _BadRequest(f"{where} is required", loc[0] if loc else None) from None
        raise _BadRequest(f"{where}={first['input']!r} is invalid: {message}", loc[0] if loc else None) from None


def _error_body(message: str, param: str | None, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


async def _bad_request(request: Request, err: _BadRequest) -> JSONResponse:
    kind = "invalid_request_error" if err.status == 400 else "server_overloaded"
    headers = {"Retry-After": "1"} if err.status == 503 else None
    return JSONResponse(_error_body(err.message, err.param, kind), status_code=err.status, headers=headers)


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    return JSONResponse(_error_body(f"{request.method} {request.url.path}: {err.detail}", None,
                                    "invalid_request_error"), status_code=err.status_code)


async def _server_error(request: Request, err: Exception) -> JSONResponse:
    return JSONResponse(_error_body(f"internal error: {type(err).__name__}: {err}", None, "server_error"),
                        status_code=500)
