"""The FastAPI application (routes, error mapping) and the ``python -m jaxpaged.serve`` CLI."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import time
from typing import TypeVar

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from jaxpaged.distributed import distributed_config
from jaxpaged.engine_args import EngineArgs
from jaxpaged.gc_heap import freeze_gc_heap
from jaxpaged.model_source import DEFAULT_SERVED_MODEL_NAME
from jaxpaged.server.async_engine import AsyncEngine
from jaxpaged.server.engine_client import EngineClient
from jaxpaged.server.engine_process_client import EngineProcessClient
from jaxpaged.server.chat_template import ChatTemplate, ChatTemplateError, load_template_arg, tokenizer_template
from jaxpaged.server.errors import APIError, bad_request, error_body, status_phrase
from jaxpaged.server.metrics import ServerMetrics
from jaxpaged.server.middleware import BearerAuthMiddleware, BodyLimitMiddleware
from jaxpaged.server.process_limits import raise_open_files_limit
from jaxpaged.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from jaxpaged.server.server_config import ModelInfo, ServerConfig
from jaxpaged.server.server_tokenizer import ServerTokenizer
from jaxpaged.server.serving_chat import ServingChat
from jaxpaged.server.serving_completions import ServingCompletions

logger = logging.getLogger("jaxpaged.serve")
ModelT = TypeVar("ModelT", bound=BaseModel)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400 parses as inf: no field takes an infinite number
        raise ValueError(f"the number {text[:32]} is out of range")
    return value


async def parse_body(request: Request, model: type[ModelT]) -> ModelT:
    """The JSON body as ``model``; every way it can be wrong is a 400 naming the field."""
    raw = await request.body()
    if not raw.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        data = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
        # "\ud800" escapes decode to lone surrogates, which no tokenizer or UTF-8 response takes.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request("the request body contains an unpaired UTF-16 surrogate (\\ud800-\\udfff)",
                          code="invalid_json") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, NaN, too deep
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = [str(p) for p in err["loc"]]
        where = ".".join(loc) or "body"
        return_param = loc[0] if loc else None
        raise bad_request(f"{where}: {err['msg']}", return_param) from exc
    except RecursionError as exc:
        raise bad_request("the request body is nested too deeply") from exc


def create_app(async_engine: EngineClient, tokenizer: ServerTokenizer | None, config: ServerConfig,
               model: ModelInfo, metrics: ServerMetrics) -> FastAPI:
    """The app for one engine loop. The caller owns ``async_engine``'s lifecycle (several apps
    may share one loop). ``tokenizer`` None: token-id prompts only (no chat, no /tokenize)."""
    template = None
    if tokenizer is not None:
        template_src = config.chat_template or tokenizer_template(tokenizer.tokenizer)
        template = ChatTemplate(template_src, tokenizer.tokenizer) if template_src else None
    max_model_len = model.max_model_len
    common = (async_engine, tokenizer, config, model, metrics)
    completions = ServingCompletions(*common)
    chat = ServingChat(*common, template=template)
    created = int(time.time())

    app = FastAPI(title="jaxpaged", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else status_phrase(exc.status_code)
        return JSONResponse(error_body(message, "invalid_request_error", None, exc.status_code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error")
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}", "server_error", None, 500),
                            status_code=500)

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine loop is alive and keeps making progress; 503 with the reason."""
        problem = async_engine.health_problem
        if problem is not None:
            code = "engine_dead" if async_engine.dead_reason is not None else "engine_stalled"
            return JSONResponse(error_body(problem, "server_error", None, code), status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        try:
            version_str = importlib.metadata.version("jaxpaged")
        except importlib.metadata.PackageNotFoundError:
            version_str = "unknown"
        return JSONResponse({"version": version_str})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        data = [{"id": name, "object": "model", "created": created, "owned_by": "jaxpaged", "root": model.model_path,
                 "parent": None, "max_model_len": max_model_len} for name in config.served_model_names]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(async_engine.stats()), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        return await completions.create(await parse_body(request, CompletionRequest), request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await chat.create(await parse_body(request, ChatCompletionRequest), request)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        req = await parse_body(request, TokenizeRequest)
        completions.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        tok = completions.tokenizer("prompt", "/tokenize")
        if req.messages is not None:
            text = chat.render(req.messages, req.add_generation_prompt)
            ids = await tok.encode(text, add_special_tokens=False)
        else:
            ids = await tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": max_model_len, "tokens": ids})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req = await parse_body(request, DetokenizeRequest)
        completions.check_model(req.model)
        tok = completions.tokenizer("tokens", "/detokenize")
        bad = [t for t in req.tokens if not 0 <= t < tok.vocab_size]
        if bad:
            raise bad_request(f"tokens must be in [0, {tok.vocab_size}), got {bad[0]}", "tokens")
        return JSONResponse({"prompt": await tok.decode(req.tokens)})

    # Starlette wraps in reverse order: auth ends up outermost, so bodies are only buffered for
    # authenticated clients.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_body_bytes)
    if config.api_key is not None:
        public = {"/health"} if config.metrics_require_auth else {"/health", "/metrics"}
        app.add_middleware(BearerAuthMiddleware, api_key=config.api_key, public_paths=frozenset(public))
    return app


def make_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxpaged.serve",
        description="OpenAI-compatible server for jaxpaged. Without --model it serves the default model "
                    "(SmolLM2-135M-Instruct, fetched once from PyPI).")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' (default: $JAXPAGED_API_KEY; prefer the "
                             "variable, a flag is visible in the process list)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help=f"model name(s) clients may ask for (default: --model, or {DEFAULT_SERVED_MODEL_NAME!r})")
    parser.add_argument("--chat-template", default=None, help="Jinja chat template file (or text) overriding the tokenizer's")
    parser.add_argument("--max-waiting-requests", type=int, default=1024,
                        help="requests allowed to wait for the engine; beyond it new requests get 503")
    parser.add_argument("--max-n", type=int, default=16)
    parser.add_argument("--max-stop-strings", type=int, default=16)
    parser.add_argument("--max-prompts-per-request", type=int, default=64)
    parser.add_argument("--max-request-body-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish on shutdown before they are aborted")
    parser.add_argument("--metrics-require-auth", action=argparse.BooleanOptionalAction, default=False,
                        help="also require the API key on /metrics (default: /metrics is open, as in vLLM)")
    parser.add_argument("--timeout-keep-alive", type=float, default=5.0,
                        help="seconds an idle keep-alive connection stays open (uvicorn's and vLLM's default: 5)")
    parser.add_argument("--health-stall-timeout", type=float, default=60.0,
                        help="seconds one engine step may run before /health answers 503 (stalled loop)")
    parser.add_argument("--separate-engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="run the engine loop in a process of its own (default), so HTTP streaming and "
                             "the engine never wait on one GIL; --no-separate-engine-process: a thread of "
                             "this process. Multi-host engines always use a thread")
    parser.add_argument("--log-step-timeline", action="store_true",
                        help="time each engine step's phases per bucket (StepTimeline) and log them as JSON "
                             "when the server stops")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--disable-access-log", action="store_true")
    EngineArgs.add_cli_args(parser)
    return parser


def server_config_from_args(args: argparse.Namespace, default_name: str) -> ServerConfig:
    api_key = args.api_key if args.api_key is not None else os.environ.get("JAXPAGED_API_KEY") or None
    return ServerConfig(
        served_model_names=tuple(args.served_model_name or [default_name]),
        api_key=api_key,
        metrics_require_auth=args.metrics_require_auth,
        chat_template=load_template_arg(args.chat_template),
        max_waiting_requests=args.max_waiting_requests,
        max_n=args.max_n,
        max_logprobs=args.max_logprobs,
        max_stop_strings=args.max_stop_strings,
        max_stop_token_ids=args.max_stop_token_ids,
        max_logit_bias=args.max_logit_bias,
        max_prompts_per_request=args.max_prompts_per_request,
        max_request_body_bytes=args.max_request_body_bytes,
        shutdown_timeout=args.shutdown_timeout,
    )


def main(argv: list[str] | None = None) -> None:
    args = make_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    open_files = raise_open_files_limit()
    if open_files < 4096:  # one socket per connected client, streaming or queued
        logger.warning("open files limit %d: at most about that many clients can connect at once", open_files)
    shown = {k: v for k, v in vars(args).items() if k != "api_key"}
    logger.info("arguments: %s (api key %s)", shown,
                "set" if (args.api_key or os.environ.get("JAXPAGED_API_KEY")) else "not set")
    try:
        engine_args = EngineArgs.from_cli_args(args)
        if args.chat_template is not None:
            load_template_arg(args.chat_template)  # fail before the (slow) engine start
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc

    default_name = engine_args.model or DEFAULT_SERVED_MODEL_NAME
    config = server_config_from_args(args, default_name)
    metrics = ServerMetrics(config.model_name)
    server: uvicorn.Server | None = None

    def engine_died(exc: BaseException) -> None:
        # The engine cannot serve any more (see jaxpaged.step_errors): stop taking connections and
        # exit non-zero below, so a supervisor restarts the process instead of it lingering at 503.
        logger.critical("the engine loop died (%s: %s); shutting the server down", type(exc).__name__, exc)
        if server is not None:
            server.should_exit = True

    logger.info("loading %s and compiling the step functions (the port opens when warm)...",
                engine_args.model or "the default model")
    try:
        multi_host = distributed_config(engine_args) is not None
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    if args.separate_engine_process and not multi_host:
        async_engine: EngineClient = EngineProcessClient(
            engine_args, metrics, stall_timeout_s=args.health_stall_timeout, on_dead=engine_died,
            log_level=args.log_level, step_timeline=args.log_step_timeline)
        try:
            async_engine.launch()
        except RuntimeError as exc:
            raise SystemExit(f"error: {exc}") from exc
        info = async_engine.info
        model, engine_tokenizer, stats = info["model_info"], info["tokenizer"], info["stats"]
        seconds = info["startup_seconds"]
    else:
        from jaxpaged.llm_engine import LLMEngine  # heavy import (JAX) only once arguments are valid

        start = time.monotonic()
        engine = LLMEngine.from_engine_args(engine_args)
        if engine.distributed is not None and not engine.distributed.is_leader:
            logger.info("process %d of a multi-host engine: replaying process 0's steps (no HTTP here)",
                        engine.distributed.process_id)
            engine.serve_worker()
            return
        seconds = time.monotonic() - start
        async_engine = AsyncEngine(engine, metrics, stall_timeout_s=args.health_stall_timeout, on_dead=engine_died)
        if args.log_step_timeline:
            engine.timeline.enable()
        model, engine_tokenizer, stats = ModelInfo.for_engine(engine), engine.tokenizer, engine.get_stats()
    logger.info("engine ready in %.1f s (%s): %s, max_model_len %d, %s KV blocks of %d tokens, %s programs compiled",
                seconds, "own process" if isinstance(async_engine, EngineProcessClient) else "thread",
                model.model_path, model.max_model_len, stats.get("num_gpu_blocks", "?"), engine_args.block_size,
                stats.get("num_compilations", "?"))
    try:
        tokenizer = _server_tokenizer(engine_tokenizer, config)
    except SystemExit:
        async_engine.shutdown(timeout=0.0)
        raise
    app = create_app(async_engine, tokenizer, config, model, metrics)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=not args.disable_access_log,
        timeout_graceful_shutdown=config.shutdown_timeout, timeout_keep_alive=args.timeout_keep_alive))
    freeze_gc_heap()  # the start-up heap (with the engine's, when it runs on a thread) is never garbage
    async_engine.start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled (uvicorn.run swallows it too)
        pass
    finally:
        # uvicorn has drained (or cancelled) the HTTP requests; abort whatever the engine still holds
        async_engine.shutdown(timeout=0.0)
        if isinstance(async_engine, AsyncEngine) and async_engine.engine.timeline.enabled:
            logger.info("engine step timeline: %s", json.dumps({"buckets": async_engine.engine.timeline.summary()}))
        if tokenizer is not None:
            tokenizer.close()
        logger.info("server stopped")
    if async_engine.died_of is not None:
        raise SystemExit(f"error: the engine died: {async_engine.dead_reason}")


def _server_tokenizer(engine_tokenizer: object | None, config: ServerConfig) -> ServerTokenizer | None:
    """The HTTP side's tokenizer, once its chat template is known to compile (else exits)."""
    if engine_tokenizer is None:
        logger.warning("no tokenizer (--skip-tokenizer-init): prompts must be token ids; chat and /tokenize answer 400")
        return None
    try:
        template_src = config.chat_template or tokenizer_template(engine_tokenizer)
        if template_src:
            ChatTemplate(template_src, engine_tokenizer)
    except ChatTemplateError as exc:
        raise SystemExit(f"error: {exc}") from exc
    if template_src is None:
        logger.warning("the tokenizer has no chat template: /v1/chat/completions will answer 400 (see --chat-template)")
    return ServerTokenizer.for_engine(engine_tokenizer)
