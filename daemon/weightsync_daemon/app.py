"""The daemon's HTTP API: vLLM-compatible weight-transfer endpoints over an EngineService.

Every error answer is `models.ErrorBody` ({"detail": str, "field": str | null}) and the OpenAPI
document says so, route by route, with the statuses each route can answer: 401 (bearer token),
408/413 (body too slow or too large, see guard.py), 409 (protocol order, or another call in
progress), 422 (the field at fault), 503 (the transfer itself failed).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar, overload

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from weightsync.errors import ManifestMismatch, PhaseError, ProtocolError, TransferError
from weightsync.limits import printable
from weightsync.protocol import PauseMode
from weightsync.store import combine_digests
from weightsync_daemon.auth import BearerAuth
from weightsync_daemon.bodies import BodyParser
from weightsync_daemon.guard import (
    DEFAULT_BODY_TIMEOUT_SECONDS, DEFAULT_MAX_BODY_BYTES, RequestGuard, error_body,
)
from weightsync_daemon.models import (
    Checksums, Comparison, ErrorBody, FinishRequest, FinishResult, Health, InitRequest, IsPaused, Message,
    PauseStatus, StartRequest, StartResult, UpdateRequest, UpdateResult, WeightCheckRequest, WeightInfo, WorldSize,
)
from weightsync_daemon.service import Busy, ClientGone, EngineService

# Each error kind maps to one status: the caller's input (422), the protocol's order (409), or a
# failure of the transfer itself, which is not the caller's fault (503).
_STATUS = {ProtocolError: 422, ManifestMismatch: 422, PhaseError: 409, TransferError: 503}
HIDDEN_FAILURE = "hidden: send the bearer token to read it"
_BODY_MODELS = (InitRequest, StartRequest, UpdateRequest, FinishRequest, WeightCheckRequest)
M = TypeVar("M", bound=BaseModel)


def _error_response(status: int, message: str, field: str | None = None,
                    headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, field), headers=headers)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, all with the one error body."""
    what = {400: "the Content-Length header is not a byte count", 401: "no valid bearer token",
            408: "the body did not arrive in time (body_timeout_seconds)",
            409: "not allowed in this phase, or another call is in progress",
            413: "the body is larger than max_body_bytes",
            422: "a field is invalid, or the body is not JSON; `field` names it (`body`: the body as a whole)",
            500: "the engine's pause hook failed (`field` is `pause`); nothing else happened",
            503: "the transfer failed (a peer, a timeout, the bytes)"}
    return {status: {"model": ErrorBody, "description": what[status]} for status in statuses}


def _first_validation_problem(error: RequestValidationError) -> tuple[str, str]:
    """A query parameter's problem (bodies are validated by `_body`): its name, and a message."""
    problem = error.errors()[0]
    field = ".".join(str(p) for p in problem.get("loc", ())) or "query"
    return field, f"{field}: {problem.get('msg', 'invalid')}"


def _request_body(model: type[BaseModel], required: bool) -> dict[str, Any]:
    """A route's `openapi_extra` declaring its JSON body (bodies are read by `_body`, not FastAPI)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}


@overload
async def _body(request: Request, model: type[M], required: Literal[True] = True) -> M: ...
@overload
async def _body(request: Request, model: type[M], required: bool) -> M | None: ...
async def _body(request: Request, model: type[M], required: bool = True) -> M | None:
    """The request's body validated as `model` by the app's `BodyParser` (off the event loop when
    large); None for an absent body where it is optional. ProtocolError (422) names the field."""
    raw = await request.body()
    if not raw.strip():
        if required:
            raise ProtocolError("body", f"a JSON body ({model.__name__}) is required")
        return None
    return await request.app.state.bodies.parse(model, raw)


class PauseFailed(Exception):
    """The engine's pause hook failed during a start that was asked to pause first."""


async def _paused(service: EngineService, mode: str) -> None:
    try:
        await service.pause(mode)
    except Exception as error:
        raise PauseFailed(f"pause failed, the round was not started: {type(error).__name__}: {error}") from error


@asynccontextmanager
async def _watch_client(request: Request) -> AsyncIterator[asyncio.Event]:
    """An event set once the client disconnects (the body is read: `receive` only reports that)."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.ensure_future(watch())
    try:
        yield gone
    finally:
        watcher.cancel()


async def _still_there(request: Request, what: str) -> None:
    """A call whose client already left does nothing (e.g. a retry given up on while queued)."""
    if await request.is_disconnected():
        raise ClientGone(f"the client left before {what} could run; it did nothing")


def service(request: Request) -> EngineService:
    """The EngineService of the app serving this request (create_app puts it on `app.state`)."""
    return request.app.state.service


# The weight-transfer calls: POSTs that change the engine, so create_app guards each with the
# bearer token. Routes read their service through `service(request)`, as vLLM's RL router reads
# its engine client, so that one module-level router serves every app.
router = APIRouter()
# What probes and Prometheus read: open to anyone, whatever the token.
probes = APIRouter()
_BODY_ERRORS = (400, 408, 413, 422)  # plus 401, which create_app adds where a token guards the routes


@router.post("/init_weight_transfer_engine", response_model=Message,
             responses=_errors(*_BODY_ERRORS, 409, 503), openapi_extra=_request_body(InitRequest, True))
async def init_weight_transfer_engine(request: Request):
    """Join the transfer group. Answers within init_info.init_timeout_seconds; an abort or a
    close meanwhile cancels it (409), as does its client disconnecting."""
    body = await _body(request, InitRequest)
    async with _watch_client(request) as gone:
        return Message(message=await service(request).init(body.init_info, gone))


@router.post("/start_weight_update", response_model=StartResult,
             response_model_exclude_unset=True, responses=_errors(*_BODY_ERRORS, 409, 500),
             openapi_extra=_request_body(StartRequest, False))
async def start_weight_update(request: Request,
                              pause: PauseMode | None = Query(None, description=(
                                  "weightsync's extension: pause the engine first, as /pause does, in the "
                                  "same call (the answer then says paused: true). 500 with field `pause` "
                                  "if the pause failed; the round was not started then."))):
    await _body(request, StartRequest, required=False)
    await _still_there(request, "start_weight_update")
    engine = service(request)
    if pause is None:
        return StartResult(message=await engine.start())
    await _paused(engine, pause)
    return StartResult(message=await engine.start(), paused=True)


async def _update_info(request: Request, engine: EngineService) -> Any:
    """This party's update_info from the body (its own entry where the body lists one per party).
    A body refused during a round (422) is this party's verdict on it: `refuse` fails the round
    at every party, naming the field, and keeps the group ready for the next round."""
    try:
        body = await _body(request, UpdateRequest, required=False)
        info = (body or UpdateRequest()).update_info
        if isinstance(info, list):
            info = engine.own_update_info(info)
    except ProtocolError as refusal:
        await engine.refuse(refusal)
    return info


@router.post("/update_weights", response_model=UpdateResult,
             responses=_errors(*_BODY_ERRORS, 409, 503), openapi_extra=_request_body(UpdateRequest, False))
async def update_weights(request: Request):
    """One update batch. While another call is served (e.g. this round's update), answers
    409 at once: a retry never queues behind, or disturbs, the round in flight. A body refused
    during a round (422) is this party's verdict on it: every party of the round fails it at
    once, naming the field, and the group stays ready for the next round (`service.refuse`)."""
    engine = service(request)
    if engine.call_in_progress:  # refused before its body is even parsed
        raise Busy(f"busy: {engine.describe_call()}; update_weights was refused, retry once it ends")
    info = await _update_info(request, engine)
    await _still_there(request, "update_weights")
    stats = await engine.update(info)
    return UpdateResult(message="weights updated" if engine.role == "receiver" else "weights sent",
                        round_id=stats.round_id, bytes=stats.payload_bytes, seconds=stats.seconds,
                        num_tensors=stats.num_tensors, in_place=stats.in_place, checksum=stats.checksum,
                        update_info=stats.update_info, more=stats.more)


@router.post("/finish_weight_update", response_model=FinishResult,
             response_model_exclude_unset=True, responses=_errors(*_BODY_ERRORS, 409),
             openapi_extra=_request_body(FinishRequest, False))
async def finish_weight_update(request: Request,
                               resume: bool = Query(False, description=(
                                   "weightsync's extension: once finished, resume the engine, as /resume "
                                   "does, in the same call. The answer says resumed: true, or false with "
                                   "resume_error; the round is finished either way."))):
    """Make the round's weights live under `weight_version`. 409 when no update landed in
    the round (use abort), so a label never moves without its bytes."""
    body = await _body(request, FinishRequest, required=False)
    await _still_there(request, "finish_weight_update")
    engine = service(request)
    version = await engine.finish(None if body is None else body.weight_version)
    if not resume:
        return FinishResult(message="weight update finished", weight_version=version)
    try:
        await engine.resume()
    except Exception as error:  # the weights are live: the finish stands, the answer says why
        return FinishResult(message="weight update finished", weight_version=version, resumed=False,
                            resume_error=f"{type(error).__name__}: {error}")
    return FinishResult(message="weight update finished", weight_version=version, resumed=True)


@router.post("/abort_weight_update", response_model=Message, responses=_errors(422))
async def abort_weight_update(request: Request, reason: str = Query("coordinator gave up", max_length=512)):
    """End the round (or cancel a pending init or seed) at once; never waits."""
    try:
        printable(reason)
    except ValueError as error:
        raise ProtocolError("reason", str(error)) from None
    return Message(message=await service(request).abort(reason))


@router.post("/close_weight_transfer_engine", response_model=Message, responses=_errors(409))
async def close_weight_transfer_engine(request: Request):
    """Leave the group. Cancels a pending init or seed; waits (bounded) for an update in
    flight, and does nothing if its client left meanwhile."""
    async with _watch_client(request) as gone:
        return Message(message=await service(request).close(gone))


@router.post("/seed_weights", response_model=UpdateResult,
             responses=_errors(*_BODY_ERRORS, 409, 503), openapi_extra=_request_body(InitRequest, True))
async def seed_weights(request: Request):
    """Send this receiver's weights, once, to late joiners of a one-off group it hosts. While
    it waits for them, an abort or a close cancels it (409), as does its client leaving."""
    engine = service(request)
    if not hasattr(engine, "seed"):
        raise PhaseError(f"a {engine.role} does not seed peers")
    body = await _body(request, InitRequest)
    async with _watch_client(request) as gone:
        stats = await engine.seed(body.init_info, gone)
    return UpdateResult(message="weights sent", round_id=stats.round_id, bytes=stats.payload_bytes,
                        seconds=stats.seconds, num_tensors=stats.num_tensors, checksum=stats.checksum)


@router.post("/pause", response_model=PauseStatus, responses=_errors(422))
async def pause(request: Request, mode: PauseMode = "abort"):
    await service(request).pause(mode)
    return PauseStatus(status="paused")


@router.post("/resume", response_model=PauseStatus)
async def resume(request: Request):
    await service(request).resume()
    return PauseStatus(status="resumed")


@router.post("/weight_checker", response_model=Checksums | Comparison,
             responses=_errors(*_BODY_ERRORS), openapi_extra=_request_body(WeightCheckRequest, False))
async def weight_checker(request: Request):
    engine = service(request)
    body = await _body(request, WeightCheckRequest, required=False) or WeightCheckRequest()
    sums = await asyncio.to_thread(engine.checksums)
    if body.action == "checksum":
        return Checksums(checksums=sums, checksum=combine_digests(sums), weight_version=engine.weight_version)
    if body.baseline is None:
        raise ProtocolError("baseline", "compare needs a baseline of per-parameter checksums")
    differ = sorted(n for n in set(sums) | set(body.baseline) if sums.get(n) != body.baseline.get(n))
    return Comparison(matches=not differ, mismatched=differ)


@probes.get("/is_paused", response_model=IsPaused)
async def is_paused(request: Request):
    return IsPaused(is_paused=service(request).paused)


@probes.get("/get_world_size", response_model=WorldSize, responses=_errors(422))
async def get_world_size(request: Request, include_dp: bool = Query(True, description=(
        "vLLM: count data-parallel replicas too. A daemon is one worker with no data "
        "parallelism, so both answers are the same."))):
    return WorldSize(world_size=service(request).world_size)


@probes.get("/weight_info", response_model=WeightInfo)
async def weight_info(request: Request):
    return WeightInfo(weight_version=service(request).weight_version)


@probes.get("/healthz", response_model=Health)
async def healthz(request: Request):
    """Alive and ready, to anyone (probes); how the last round failed (peers' addresses,
    parameter names) only to a caller with the token, and always to the log."""
    engine = service(request)
    store = getattr(engine, "store", None)
    failure = engine.last_failure
    if failure is not None and not request.app.state.auth.allows(request.headers.get("authorization", "")):
        failure = HIDDEN_FAILURE
    return Health(role=engine.role, backend=engine.backend, phase=engine.phase.value,
                  weight_version=engine.weight_version, paused=engine.paused,
                  weights_intact=engine.weights_intact, last_failure=failure,
                  num_parameters=len(store) if store is not None else 0)


@probes.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text exposition format",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request):
    return Response(generate_latest(service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """On shutdown, stop the body parser's threads, then the service."""
    try:
        yield
    finally:
        app.state.bodies.close()
        await app.state.service.shutdown()


async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
    """A query parameter's problem: 422 naming it (bodies are validated by `_body`)."""
    field, message = _first_validation_problem(error)
    return _error_response(422, message, field)


async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    # 400: a Content-Length that is no byte count (guard.py); bodies are validated by `_body`.
    return _error_response(error.status_code, str(error.detail),
                           "body" if error.status_code in (400, 408, 413) else None, error.headers)


async def _pause_failed(_: Request, error: PauseFailed) -> JSONResponse:
    return _error_response(500, str(error), "pause")


def _status_handler(status: int) -> Callable[[Request, Exception], JSONResponse]:
    """The handler answering one kind of weightsync error with its status (see `_STATUS`)."""
    def handler(_: Request, error: Exception) -> JSONResponse:
        return _error_response(status, str(error), getattr(error, "field", None))
    return handler


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the body models that `_body` validates."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, description=app.description,
                               routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in _BODY_MODELS],
                                     ref_template="#/components/schemas/{model}")
        document.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = document
    return app.openapi_schema


def create_app(service: EngineService, extra_routers: list[APIRouter] | None = None,
               token: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT_SECONDS) -> FastAPI:
    """The HTTP app for one party (a receiver daemon or the trainer's agent).

    With a `token`, every POST needs `Authorization: Bearer <token>` (401 otherwise, checked
    before the body is read). A body over `max_body_bytes` gets 413; one that does not arrive
    within `body_timeout_seconds` gets 408.
    """
    auth = BearerAuth(token)
    guarded = [Depends(auth)] if auth.enabled else []
    need_token = _errors(401) if auth.enabled else {}
    app = FastAPI(title="weightsync daemon", version="0.1.0", lifespan=_lifespan,
                  description="Weight-transfer protocol endpoints, compatible with vLLM's.")
    app.state.service = service
    app.state.bodies = BodyParser()
    app.state.auth = auth
    app.add_middleware(RequestGuard, auth=auth, max_body_bytes=max_body_bytes,
                       body_timeout_seconds=body_timeout_seconds)
    # Starlette types a handler as taking any Exception; it calls each with the class registered.
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(PauseFailed, _pause_failed)  # type: ignore[arg-type]
    for kind, status in _STATUS.items():
        app.add_exception_handler(kind, _status_handler(status))
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    app.include_router(router, dependencies=guarded, responses=need_token)
    app.include_router(probes)
    for extra in extra_routers or []:
        app.include_router(extra, dependencies=guarded, responses=need_token)
    return app
