"""An OpenAI-compatible HTTP server over the engine: /v1/models, /v1/completions, /v1/chat/completions, /health.

FastAPI (on Starlette) and uvicorn, the ASGI stack vLLM and SGLang serve on. Each HTTP request becomes one
engine request whose stream callback feeds an asyncio queue on the server's event loop; the text is decoded
piece by piece and cut at the first `stop` string, also when it spans pieces. A client that disconnects
cancels its request, which frees its pages at the engine's next step. Errors carry OpenAI's body
(dsq/protocol.py, with the request bodies)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from dsq.engine import Engine, SamplingError, SamplingParams
from dsq.errors import DsqError
from dsq.memory import CONTEXT
from dsq.protocol import ApiError, ChatBody, CompletionBody, Sampled
from dsq.tokenizer import TextStream, Tokenizer


class StopStrings:
    """Cuts text at the first stop string across pieces, holding back a tail that could be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = [s for s in stops if s], ""

    def push(self, piece: str) -> tuple[str, bool]:
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return text[:min(found)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False


class Generation:
    """One engine request seen from the event loop: its text pieces, then why it finished and token counts."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams,
                 stops: list[str]):
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

        def push(token: int | None) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening
                loop.call_soon_threadsafe(self.queue.put_nowait, token)

        self.engine, self.text, self.stops = engine, TextStream(tokenizer), StopStrings(stops)
        self.prompt_tokens, self.completion_tokens, self.finish_reason = len(prompt), 0, None
        self.req = engine.add_request(prompt, params, push)

    async def pieces(self) -> AsyncIterator[str]:
        try:
            while (token := await self.queue.get()) is not None:
                self.completion_tokens += 1
                piece, stopped = self.stops.push(self.text.push(token))
                if piece:
                    yield piece
                if stopped:
                    self.finish_reason = "stop"
                    return
            # the end: what the text stream held back (an incomplete UTF-8 sequence), then the stop strings
            piece, stopped = self.stops.push(self.text.tokenizer.decode(self.text.ids)[len(self.text.text):])
            if piece + self.stops.held:
                yield piece + self.stops.held
            self.finish_reason = "stop" if stopped or self.req.finish_reason == "cancelled" else self.req.finish_reason
        finally:
            self.engine.cancel(self.req)  # a no-op once it finished; else it stopped on a string or was abandoned

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _ended(gen: Generation) -> ApiError:
    """The error of a request the engine did not finish: it failed, or the server is shutting down."""
    if gen.finish_reason == "shutdown":
        return ApiError(503, "the server shut down before this request finished; retry it", type="server_error")
    return ApiError(500, "the engine failed on this request; the server log has the traceback", type="server_error")


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _cancel_on_disconnect(request: Request, gen: Generation) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gen.engine.cancel(gen.req)


def create_app(engine: Engine, tokenizer: Tokenizer, served_model_name: str, api_key: str | None = None,
               max_model_len: int = CONTEXT, queue_limit: int = 256) -> FastAPI:
    """The app; its lifespan runs the engine's loop thread. At most `queue_limit` requests are in the engine
    (waiting or running) at once; more get 429."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="dsq", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"error": e.body}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first["type"] == "json_invalid":  # its loc is the character position
            where = f" at character {first['loc'][-1]}" if len(first["loc"]) > 1 else ""
            return await api_error(request, ApiError(400, f"the body is not valid JSON ({first['ctx']['error']}"
                                                     f"{where}); send a JSON object"))
        field = ".".join(str(x) for x in first["loc"] if x != "body")
        return await api_error(request, ApiError(400, f"{field or 'body'}: {first['msg']}", param=field or None))

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        wanted = api_key is not None and request.url.path.startswith("/v1/")
        if wanted and request.headers.get("authorization") != f"Bearer {api_key}":
            return await api_error(request, ApiError(401, "invalid or missing API key (Authorization: Bearer)",
                                                     type="authentication_error", code="invalid_api_key"))
        return await call_next(request)

    def sampling(body: Sampled, max_tokens: int | None, prompt: list[int]) -> SamplingParams:
        if body.model not in (None, served_model_name):
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {served_model_name!r}",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise ApiError(400, f"n must be 1, got {body.n}", param="n")
        if (field := body.unsupported()) is not None:
            raise ApiError(400, f"{field}: dsq does not implement it; leave it out", param=field)
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        room, what = max_model_len - len(prompt), "messages" if isinstance(body, ChatBody) else "prompt"
        if not prompt:
            raise ApiError(400, "the prompt is empty; give at least one token", param="prompt")
        if room < 1:
            raise ApiError(400, f"this model's maximum context length is {max_model_len} tokens and the prompt has "
                           f"{len(prompt)}; shorten it", param=what)
        if (max_tokens or 0) > room:
            raise ApiError(400, f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                           f"{len(prompt)} and max_tokens asks for {max_tokens} more", param="max_tokens")
        if any(not 0 <= t < tokenizer.tk.get_vocab_size() for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {tokenizer.tk.get_vocab_size()})", param="prompt")
        try:
            return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                                  max_tokens=max_tokens or room, stop_token_ids=(tokenizer.eos_id,))
        except SamplingError as e:
            raise ApiError(400, str(e), param=e.field) from None

    async def respond(request: Request, body: Sampled, prompt: list[int], max_tokens: int | None, chat: bool):
        params = sampling(body, max_tokens, prompt)
        if len(engine.requests) >= queue_limit:
            raise ApiError(429, f"the server is at its limit of {queue_limit} requests; retry later",
                           type="rate_limit_error")
        if not engine.running:
            raise ApiError(503, "the engine is not running", type="server_error")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        try:
            gen = Generation(engine, tokenizer, prompt, params, stops)
        except DsqError as e:
            raise ApiError(400, str(e), param="max_tokens") from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": served_model_name}

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            message = {"content": text} if delta else {"role": "assistant", "content": text}
            return {"index": 0, "delta" if delta else "message": message, "logprobs": None, "finish_reason": finish}

        if body.stream:
            chunk = dict(head, object="chat.completion.chunk" if chat else "text_completion")

            async def events() -> AsyncIterator[str]:
                if chat:
                    yield _sse(dict(chunk, choices=[dict(choice("", None, True), delta={"role": "assistant"})]))
                async for piece in gen.pieces():
                    yield _sse(dict(chunk, choices=[choice(piece, None, True)]))
                if gen.finish_reason in ("error", "shutdown"):
                    yield _sse({"error": _ended(gen).body})
                    return
                yield _sse(dict(chunk, choices=[choice("", gen.finish_reason, True)]))
                if (body.stream_options or {}).get("include_usage"):
                    yield _sse(dict(chunk, choices=[], usage=gen.usage()))
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        watcher = asyncio.create_task(_cancel_on_disconnect(request, gen))
        try:
            text = "".join([piece async for piece in gen.pieces()])
        finally:
            watcher.cancel()
        if gen.finish_reason in ("error", "shutdown"):
            raise _ended(gen)
        return dict(head, object="chat.completion" if chat else "text_completion",
                    choices=[choice(text, gen.finish_reason, False)], usage=gen.usage())

    @app.get("/health")
    async def health() -> dict:
        if not engine.running:
            raise ApiError(503, "the engine is not running", type="server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "dsq", "max_model_len": max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        prompt = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        return await respond(request, body, prompt, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        try:
            prompt = tokenizer.encode_chat([m.model_dump() for m in body.messages])
        except DsqError as e:
            raise ApiError(400, str(e), param="messages") from None
        return await respond(request, body, prompt, body.max_completion_tokens or body.max_tokens, chat=True)

    return app


def serve(engine: Engine, tokenizer: Tokenizer, served_model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_model_len: int = CONTEXT, queue_limit: int = 256) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly: no new connections, the engine stops and cancels the
    requests in flight, so their responses end (503, or a stream's error event) and the process exits 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            engine.stop()  # else uvicorn's grace period ends by cancelling the response tasks, with tracebacks

    app = create_app(engine, tokenizer, served_model_name, api_key, max_model_len, queue_limit)
    server = Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5))
    # uvicorn re-raises the signal it stopped on once it is done, which under the default handlers kills the
    # process (exit -15 for SIGTERM, KeyboardInterrupt for SIGINT); a stop asked for is not a failure.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
