"""The daemon's HTTP API: vLLM-compatible weight-transfer endpoints over an EngineService."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from weightsync.errors import ManifestMismatch, PhaseError, ProtocolError, TransferError
from weightsync.store import combine_digests
from weightsync_daemon.auth import BearerAuth
from weightsync_daemon.models import (
    FinishRequest, FinishResult, Health, InitRequest, Message, StartRequest, UpdateRequest,
    UpdateResult, WeightCheckRequest,
)
from weightsync_daemon.service import EngineService

# Each error kind maps to one status: the caller's input (422), the protocol's order (409), or a
# failure of the transfer itself, which is not the caller's fault (503).
_STATUS = {ProtocolError: 422, ManifestMismatch: 422, PhaseError: 409, TransferError: 503}


def _error_response(status: int, message: str, field: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"detail": message}
    if field:
        body["field"] = field
    return JSONResponse(status_code=status, content=body, headers=headers)


def _first_validation_problem(error: RequestValidationError) -> tuple[str, str]:
    problem = error.errors()[0]
    if problem.get("type") == "json_invalid":
        return "body", f"body: not valid JSON ({problem.get('ctx', {}).get('error', 'decode error')})"
    loc = [str(p) for p in problem.get("loc", ()) if p != "body"]
    # pydantic names the union member it tried; those labels are noise to a caller.
    loc = [p for p in loc if not p.startswith(("list[", "UpdateInfo", "function-"))]
    field = ".".join(loc) or "body"
    return field, f"{field}: {problem.get('msg', 'invalid')}"


def create_app(service: EngineService, extra_routers: list[APIRouter] | None = None,
               token: str | None = None) -> FastAPI:
    """The HTTP app for one party (a receiver daemon or the trainer's agent).

    With a `token`, every POST needs `Authorization: Bearer <token>` (401 otherwise).
    """
    auth = BearerAuth(token)
    guarded = [Depends(auth)]
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await service.shutdown()

    app = FastAPI(title="weightsync daemon", version="0.1.0", lifespan=lifespan,
                  description="Weight-transfer protocol endpoints, compatible with vLLM's.")
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError):
        field, message = _first_validation_problem(error)
        return _error_response(422, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException):
        # 400 is FastAPI's answer to a body it cannot even decode (e.g. binary, pickled bytes).
        return _error_response(error.status_code, str(error.detail),
                               "body" if error.status_code == 400 else None, error.headers)

    for kind, status in _STATUS.items():
        def handler(_: Request, error: Exception, status=status):
            return _error_response(status, str(error), getattr(error, "field", None))
        app.add_exception_handler(kind, handler)

    @app.post("/init_weight_transfer_engine", dependencies=guarded, response_model=Message)
    async def init_weight_transfer_engine(body: InitRequest):
        return Message(message=await service.init(body.init_info))

    @app.post("/start_weight_update", dependencies=guarded, response_model=Message)
    async def start_weight_update(body: StartRequest | None = None):
        return Message(message=await service.start())

    @app.post("/update_weights", dependencies=guarded, response_model=UpdateResult)
    async def update_weights(body: UpdateRequest | None = None):
        info = (body or UpdateRequest()).update_info
        if isinstance(info, list):
            if not info:
                raise ProtocolError("update_info", "an empty list names no worker's update")
            info = info[0]  # this engine has one worker
        stats = await service.update(info)
        return UpdateResult(message="weights updated" if service.role == "receiver" else "weights sent",
                            round_id=stats.round_id, bytes=stats.payload_bytes, seconds=stats.seconds,
                            num_tensors=stats.num_tensors, in_place=stats.in_place, checksum=stats.checksum,
                            update_info=stats.update_info, more=stats.more)

    @app.post("/finish_weight_update", dependencies=guarded, response_model=FinishResult)
    async def finish_weight_update(body: FinishRequest | None = None):
        version = await service.finish(None if body is None or body.weight_version is None
                                       else str(body.weight_version))
        return FinishResult(message="weight update finished", weight_version=version)

    @app.post("/abort_weight_update", dependencies=guarded, response_model=Message)
    async def abort_weight_update(reason: str = Query("coordinator gave up", max_length=512)):
        return Message(message=await service.abort(reason))

    @app.post("/close_weight_transfer_engine", dependencies=guarded, response_model=Message)
    async def close_weight_transfer_engine():
        return Message(message=await service.close())

    @app.post("/seed_weights", dependencies=guarded, response_model=UpdateResult)
    async def seed_weights(body: InitRequest):
        """Send this receiver's weights, once, to late joiners of a one-off group it hosts."""
        if not hasattr(service, "seed"):
            raise PhaseError(f"a {service.role} does not seed peers")
        stats = await service.seed(body.init_info)
        return UpdateResult(message="weights sent", round_id=stats.round_id, bytes=stats.payload_bytes,
                            seconds=stats.seconds, num_tensors=stats.num_tensors, checksum=stats.checksum)

    @app.post("/pause", dependencies=guarded)
    async def pause(mode: Literal["abort", "wait", "keep"] = "abort"):
        await service.pause(mode)
        return {"status": "paused"}

    @app.post("/resume", dependencies=guarded)
    async def resume():
        await service.resume()
        return {"status": "resumed"}

    @app.get("/is_paused")
    async def is_paused():
        return {"is_paused": service.paused}

    @app.get("/get_world_size")
    async def get_world_size(include_dp: bool = True):
        return {"world_size": service.world_size}

    @app.get("/weight_info")
    async def weight_info():
        return {"weight_version": service.weight_version}

    @app.get("/healthz", response_model=Health)
    async def healthz():
        store = getattr(service, "store", None)
        return Health(role=service.role, backend=service.backend, phase=service.phase.value,
                      weight_version=service.weight_version, paused=service.paused,
                      weights_intact=service.weights_intact, last_failure=service.last_failure,
                      num_parameters=len(store) if store is not None else 0)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/weight_checker", dependencies=guarded)
    async def weight_checker(body: WeightCheckRequest):
        sums = await asyncio.to_thread(service.checksums)
        if body.action == "checksum":
            return {"checksums": sums, "checksum": combine_digests(sums),
                    "weight_version": service.weight_version}
        if body.baseline is None:
            raise ProtocolError("baseline", "compare needs a baseline of per-parameter checksums")
        differ = sorted(n for n in set(sums) | set(body.baseline) if sums.get(n) != body.baseline.get(n))
        return {"matches": not differ, "mismatched": differ}

    for router in extra_routers or []:
        app.include_router(router, dependencies=guarded)

    return app
