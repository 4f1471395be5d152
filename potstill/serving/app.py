"""`potstill serve`'s ASGI app: one local causal LM behind the OpenAI-compatible API (docs/generation.md).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (including vLLM's scoring
form: ``max_tokens: 0, echo: true, logprobs: k``). Requests run one at a time (one model, one lock) in a worker
thread, so the event loop keeps accepting connections and answering /v1/models while the model works. Errors are
``{"error": {"message", "type", "param", "code"}}`` with 400 (bad request), 404 (unknown model or route) or 500.
Log lines name the endpoint and token counts, never a request's body or headers.
"""
from __future__ import annotations

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from potstill.sampling import SamplingSettings
from potstill.serving.engine import Choice, Engine
from potstill.serving.formats import chat_logprobs, completion_logprobs
from potstill.serving.protocol import APIError, ChatRequest, CompletionRequest, SamplingFields, bad_request, now, response_id

log = logging.getLogger("potstill.serve")


def build_app(model, tokenizer, model_name: str, max_logprobs: int = 20) -> FastAPI:
    """The ASGI app serving ``model`` (in eval mode, on its device) as ``model_name``."""
    engine = Engine(model.eval(), tokenizer, model_name, max_logprobs)
    lock = asyncio.Lock()
    app = FastAPI(title="potstill serve", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)

    async def one_at_a_time(work, *args):
        async with lock:
            return await asyncio.to_thread(work, *args)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "potstill"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> dict:
        started = time.perf_counter()
        stops = _checked_common(req, engine)
        prompt = engine.chat_prompt([m.as_template_input() for m in req.messages])
        limit = req.token_limit() or engine.room(prompt)
        engine.check_room(prompt, limit)
        k = (req.top_logprobs or 0) if req.logprobs else None
        if k is not None:
            engine.check_logprobs(k, "top_logprobs")
        choices, scores = await one_at_a_time(_generate_and_score, engine, [prompt], _settings(req, limit), req.n or 1,
                                              req.seed, stops, k)
        body = {"id": response_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": model_name,
                "choices": [_chat_choice(i, c, s, engine) for i, (c, s) in enumerate(zip(choices, scores))],
                "usage": _usage([prompt], choices)}
        _log("chat.completions", [prompt], choices, started)
        return body

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> dict:
        started = time.perf_counter()
        stops = _checked_common(req, engine)
        prompts = engine.completion_prompts(req.prompt)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default, also when sent as null
        for _, ids in prompts:
            engine.check_room(ids, max_tokens)
        if req.logprobs is not None:
            engine.check_logprobs(req.logprobs, "logprobs")
        if max_tokens == 0 and not req.echo:
            raise bad_request("max_tokens=0 returns nothing without echo=true (the scoring form: max_tokens 0, echo "
                              "true, logprobs k)", "max_tokens")
        ids = [p for _, p in prompts]
        choices, scores = await one_at_a_time(_generate_and_score, engine, ids, _settings(req, max_tokens),
                                              req.n or 1, req.seed, stops, req.logprobs)
        texts = [text if text is not None else tokenizer.decode(p) for text, p in prompts]
        n = req.n or 1
        body = {"id": response_id("cmpl"), "object": "text_completion", "created": now(), "model": model_name,
                "choices": [_completion_choice(i, c, s, texts[i // n] if req.echo else None, req, engine)
                            for i, (c, s) in enumerate(zip(choices, scores))],
                "usage": _usage(ids, choices)}
        _log("completions", ids, choices, started)
        return body

    return app


def _checked_common(req: SamplingFields, engine: Engine) -> list[str]:
    if req.model != engine.model_name:
        raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{engine.model_name}`",
                       code="model_not_found", param="model")
    if req.stream:
        raise bad_request("stream=true is not supported by potstill serve", "stream")
    return req.stops()


def _settings(req: SamplingFields, max_tokens: int) -> SamplingSettings | None:
    """What to sample; None when nothing is generated (max_tokens 0: the prompt is only scored)."""
    if max_tokens == 0:
        return None
    return SamplingSettings(max_new_tokens=max_tokens, n=req.n or 1,
                            temperature=1.0 if req.temperature is None else req.temperature,
                            top_p=1.0 if req.top_p is None else req.top_p)


def _generate_and_score(engine: Engine, prompts: list[list[int]], settings: SamplingSettings | None, n: int,
                        seed: int | None, stops: list[str], k: int | None) -> tuple[list[Choice], list]:
    """Sample (unless ``settings`` is None), then score each prompt + completion if log-probs were asked for."""
    if settings is not None:
        choices = engine.generate(prompts, settings, seed, stops)
    else:
        choices = [Choice(p, [], 0, "", "length") for p in prompts for _ in range(n)]
    scores = [engine.score(c.prompt_ids + c.tokens, k) if k is not None else None for c in choices]
    return choices, scores


def _chat_choice(index: int, choice: Choice, scores, engine: Engine) -> dict:
    logprobs = None
    if scores is not None:
        logprobs = chat_logprobs(engine.tokenizer, choice.prompt_ids + choice.tokens, len(choice.prompt_ids), scores)
    return {"index": index, "message": {"role": "assistant", "content": choice.text},
            "logprobs": logprobs, "finish_reason": choice.finish_reason}


def _completion_choice(index: int, choice: Choice, scores, echoed: str | None, req: CompletionRequest,
                       engine: Engine) -> dict:
    logprobs = None
    if scores is not None:
        start = 0 if echoed is not None else len(choice.prompt_ids)
        logprobs = completion_logprobs(engine.tokenizer, choice.prompt_ids + choice.tokens, start, scores,
                                       bool(req.return_tokens_as_token_ids))
    return {"index": index, "text": (echoed or "") + choice.text, "logprobs": logprobs,
            "finish_reason": choice.finish_reason}


def _usage(prompts: list[list[int]], choices: list[Choice]) -> dict:
    prompt_tokens, completion_tokens = sum(map(len, prompts)), sum(c.generated for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _log(endpoint: str, prompts: list[list[int]], choices: list[Choice], started: float) -> None:
    log.info("%s: %d prompt(s), %d prompt tokens, %d choice(s), %d completion tokens, %.2f s", endpoint, len(prompts),
             sum(map(len, prompts)), len(choices), sum(c.generated for c in choices), time.perf_counter() - started)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                             for e in exc.errors()[:5])
        return _error_response(bad_request(f"invalid request: {problems}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s failed: %s: %s", request.url.path, type(exc).__name__, " ".join(str(exc).split()))
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}"))
