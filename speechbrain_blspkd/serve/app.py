"""The OpenAI-compatible app: chat completions with ``input_audio`` parts.

Endpoints
    ``POST /v1/chat/completions``: the Chat Completions API. The last
    ``user`` message is answered. With an ``input_audio`` part
    (``{"type": "input_audio", "input_audio": {"data": BASE64, "format":
    "wav"|"mp3"|"flac"}}``) its text parts are the instruction (none: a
    ``system``/``developer`` message's text, else the model's own
    instruction) and the model answers the speech. Without audio the same
    LLM answers the text (the teacher path: PLoRA off; the instruction is a
    ``system``/``developer`` message's text, else the model's own).
    ``model`` picks a loaded model by name, ``max_tokens`` (or
    ``max_completion_tokens``) caps the answer (default: the model's
    ``max_new_tokens``), ``temperature`` 0 or absent decodes as
    :class:`~speechbrain_blspkd.inference.speech_llm.SpeechLLM` does (its
    ``num_beams``; greedy by default), above 0 samples (with ``top_p``).
    ``stream: true`` sends ``chat.completion.chunk`` server-sent events,
    then ``data: [DONE]``. ``usage`` counts LLM positions: the prompt
    (speech embeddings included) and the answer's tokens.
    ``GET /v1/models``: the loaded models. ``GET /health``: status and the
    batcher's counters, including the batch sizes it formed (the response
    header ``x-blspkd-batch-size`` also gives each answer's batch size).

Errors
    An OpenAI-style ``{"error": {"message", "type", "param", "code"}}``:
    400 for a bad value (not base64, not audio, empty or silent audio, a
    prompt over the LLM context, an unsupported option), 404 for an unknown
    model, 413 for audio over the size or duration limit, 422 for a
    malformed request (schema, no user message, two audio parts ...), 500
    when the model fails on a request. Its batch-mates are still answered.
"""

import asyncio
import functools
import json
import logging
import time
import uuid
from typing import Annotated, Any, Literal

from speechbrain_blspkd.serve.audio import decode_audio
from speechbrain_blspkd.serve.batcher import Batcher, Job
from speechbrain_blspkd.serve.errors import ServeError

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as err:  # pragma: no cover - the extra is missing
    from speechbrain_blspkd.serve import SERVE_EXTRA_HINT

    raise ImportError(SERVE_EXTRA_HINT) from err

__all__ = ["ChatRequest", "create_app"]

logger = logging.getLogger(__name__)

#: Default largest decoded audio file accepted (bytes).
MAX_AUDIO_BYTES = 25 * 1024 * 1024
#: How often a waiting request checks that its client is still there (s).
POLL_SECONDS = 0.25


# ------------------------------------------------------------------ schema
class InputAudio(BaseModel):
    data: str
    format: str


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class AudioPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


Part = Annotated[TextPart | AudioPart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None


class ChatRequest(BaseModel):
    """The fields of a chat completion request the server reads (others,
    e.g. ``user`` or ``seed``, are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None


# ---------------------------------------------------------------- helpers
def _texts(content):
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    return [p.text for p in content if isinstance(p, TextPart)]


def parse_messages(messages):
    """(instruction text or None, user text, audio part, its param name).

    Only the last ``user`` message is answered; the last ``system`` or
    ``developer`` message's text is the fallback instruction.
    """
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise ServeError(
            422,
            "messages: no 'user' message to answer",
            param="messages",
            code="invalid_messages",
        )
    last = users[-1]
    for i, message in enumerate(messages):
        if i == last or isinstance(message.content, (str, type(None))):
            continue
        if any(isinstance(p, AudioPart) for p in message.content):
            raise ServeError(
                422,
                f"messages[{i}]: input_audio is read in the last user "
                "message only",
                param=f"messages[{i}].content",
                code="invalid_messages",
            )
    content = messages[last].content
    audio, where = None, None
    if isinstance(content, list):
        parts = [
            (j, p) for j, p in enumerate(content) if isinstance(p, AudioPart)
        ]
        if len(parts) > 1:
            raise ServeError(
                422,
                f"messages[{last}]: {len(parts)} input_audio parts; send "
                "one clip per request",
                param=f"messages[{last}].content",
                code="invalid_messages",
            )
        if parts:
            j, part = parts[0]
            audio, where = part.input_audio, f"messages[{last}].content[{j}]"
    user_text = "\n".join(t for t in _texts(content) if t.strip()).strip()
    system = None
    for message in messages[:last]:
        if message.role in ("system", "developer"):
            text = "\n".join(_texts(message.content)).strip()
            system = text or system
    return system, user_text, audio, where


def _error_response(err):
    return JSONResponse(err.body(), status_code=err.status)


def _as_serve_error(err):
    from speechbrain_blspkd.prompt import ContextLengthError

    if isinstance(err, ServeError):
        return err
    if isinstance(err, ContextLengthError):
        return ServeError(
            400,
            f"the prompt does not fit in the LLM context: {err}",
            param="messages",
            code="context_length_exceeded",
        )
    logger.error("request failed: %r", err)
    return ServeError(500, f"the model failed on this request: {err}")


def _chunk(rid, created, model, delta, finish=None, usage=None):
    body = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        body["choices"] = []
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def _usage(result):
    return {
        "prompt_tokens": result["prompt_tokens"],
        "completion_tokens": result["completion_tokens"],
        "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
    }


# -------------------------------------------------------------------- app
def create_app(models, max_batch=8, max_wait_ms=20.0, max_audio_bytes=None):
    """The FastAPI app serving ``models``.

    Arguments
    ---------
    models : dict of str to SpeechLLM
        Loaded models by the name clients give as ``model``.
    max_batch : int
        Most requests decoded together (1: one by one).
    max_wait_ms : float
        Longest wait for a batch to fill.
    max_audio_bytes : int, optional
        Largest audio file accepted (default :data:`MAX_AUDIO_BYTES`).

    Returns
    -------
    fastapi.FastAPI
        ``app.state.batcher`` is its :class:`~speechbrain_blspkd.serve.
        batcher.Batcher` (started with the app, stopped at shutdown).
    """
    import contextlib

    if not models:
        raise ValueError("create_app: give at least one model")
    models = dict(models)
    batcher = Batcher(models, max_batch=max_batch, max_wait_ms=max_wait_ms)
    max_bytes = MAX_AUDIO_BYTES if max_audio_bytes is None else max_audio_bytes
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="speechbrain_blspkd speech LLM", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.models = models

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "malformed request")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return _error_response(
            ServeError(
                422,
                f"malformed request: {where or 'body'}: {message}{more}",
                param=where or None,
                code="invalid_request",
            )
        )

    @app.exception_handler(ServeError)
    async def refused(request, exc):
        return _error_response(exc)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "models": list(models),
            "placement": {
                name: {
                    "device": str(llm.device),
                    "dtype": str(next(llm.model.llm.parameters()).dtype),
                }
                for name, llm in models.items()
            },
            "batcher": batcher.stats(),
        }

    @app.get("/v1/models")
    async def list_models():
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "speechbrain_blspkd",
                }
                for name in models
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        job = await _prepare(body)
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()

        def emit(kind, value):
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job.emit = emit
        job.stream = body.stream
        try:
            batcher.submit(job)
        except RuntimeError as err:
            raise ServeError(503, str(err), code="shutting_down") from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        # the first event: an error before any token gets a status code
        first = await _next_event(events, job, request)
        if first is None:
            return JSONResponse({}, status_code=499)
        if first[0] == "error":
            raise _as_serve_error(first[1])
        if not body.stream:
            event = first
            while event[0] == "delta":
                event = await _next_event(events, job, request)
                if event is None:
                    return JSONResponse({}, status_code=499)
            if event[0] == "error":
                raise _as_serve_error(event[1])
            result = event[1]
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": now,
                    "model": body.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": result["answer"],
                            },
                            "finish_reason": result["finish_reason"],
                        }
                    ],
                    "usage": _usage(result),
                },
                headers={"x-blspkd-batch-size": str(result["batch_size"])},
            )
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def sse():
            event = first
            try:
                yield _chunk(
                    rid, now, body.model, {"role": "assistant", "content": ""}
                )
                while True:
                    kind, value = event
                    if kind == "delta":
                        yield _chunk(rid, now, body.model, {"content": value})
                    elif kind == "error":
                        err = _as_serve_error(value)
                        yield f"data: {json.dumps(err.body())}\n\n"
                        return
                    else:
                        yield _chunk(
                            rid, now, body.model, {}, value["finish_reason"]
                        )
                        if include_usage:
                            yield _chunk(
                                rid, now, body.model, {}, usage=_usage(value)
                            )
                        yield "data: [DONE]\n\n"
                        return
                    event = await _next_event(events, job, request)
                    if event is None:
                        return
            finally:
                if not job.finished:
                    job.cancel()

        return StreamingResponse(
            sse(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    async def _next_event(events, job, request):
        """The job's next event; None (and the job cancelled) when the
        client disconnected meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return None
            except asyncio.CancelledError:
                job.cancel()
                raise

    async def _prepare(body):
        if body.model not in models:
            raise ServeError(
                404,
                f"model {body.model!r} is not served here (loaded: "
                f"{', '.join(models)}; see GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        if body.n != 1:
            raise ServeError(
                400, "n: only n=1 is supported", param="n", code="unsupported"
            )
        llm = models[body.model]
        system, user_text, audio, where = parse_messages(body.messages)
        max_new = body.max_completion_tokens or body.max_tokens
        gen = {"max_new_tokens": int(max_new or llm.hparams.max_new_tokens)}
        if body.temperature:
            gen.update(do_sample=True, temperature=float(body.temperature))
            gen["num_beams"] = 1
            if body.top_p is not None:
                gen["top_p"] = float(body.top_p)
        if audio is not None:
            instruction = user_text or system or llm.default_instruction(True)
            _check_fits(llm, instruction, gen, n_speech=0)
            wav = await asyncio.to_thread(
                functools.partial(
                    decode_audio,
                    audio.data,
                    audio.format,
                    sample_rate=int(llm.hparams.sample_rate),
                    max_seconds=llm.hparams.max_audio_seconds,
                    max_bytes=max_bytes,
                    param=where,
                )
            )
            return Job(body.model, instruction, wav=wav, gen=gen)
        if not user_text:
            raise ServeError(
                422,
                "messages: the last user message has neither text nor "
                "input_audio",
                param="messages",
                code="invalid_messages",
            )
        instruction = system or llm.default_instruction(False)
        _check_fits(llm, instruction, gen, transcript=user_text)
        return Job(body.model, instruction, text=user_text, gen=gen)

    def _check_fits(llm, instruction, gen, n_speech=None, transcript=None):
        """The prompt (without the speech, unknown before encoding) plus
        ``max_tokens`` must fit in the LLM context."""
        from speechbrain_blspkd.prompt import ContextLengthError, context_limit

        limit = context_limit(llm.model.llm)
        if limit is None:
            return
        try:
            llm.model.prompts.check_fits(
                limit,
                [instruction],
                transcripts=None if transcript is None else [transcript],
                n_speech=None if n_speech is None else [n_speech],
                max_new_tokens=gen["max_new_tokens"],
                ids=["request"],
                item="request",
            )
        except ContextLengthError as err:
            raise _as_serve_error(err) from None

    return app


def free_port(host="127.0.0.1"):
    """A TCP port free on ``host`` now (for tests and benchmarks)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class BackgroundServer:
    """``app`` served by uvicorn in a thread, on ``host`` (loopback).

    A context manager: entering starts the server and waits until it
    listens; ``url`` is its base address; leaving stops it.

    Arguments
    ---------
    app : fastapi.FastAPI
        From :func:`create_app`.
    host : str
        Address to listen on.
    port : int, optional
        Default: a free port.
    """

    def __init__(self, app, host="127.0.0.1", port=None):
        import uvicorn

        self.app = app
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            app, host=host, port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = None

    def __enter__(self):
        import threading

        self.thread = threading.Thread(
            target=self.server.run, name="blspkd-serve-http", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
