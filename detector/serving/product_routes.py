"""/products: list products, add images to a bank, roll back, read a bank's history.

BentoML APIs take no path parameters, so these routes are a small Starlette app mounted at
/products on the API service; they call the same `InspectionEndpoints` as every other
endpoint, and the same `RequestGate` checks keys (the admin key for changes) and sizes first.

    GET  /products                        every product, its live version, threshold, drift
    POST /products                        multipart: name, images (files), sessions (one per
                                          image, or none), target (false-alarm rate, 0.01),
                                          coreset_ratio, reason: a new product fitted in the
                                          background; 202 and the job (Location: its URL)
    GET  /products/{name}/jobs/{id}       the fit job: state, stage, progress, version, error
    DELETE /products/{name}/jobs/{id}     cancel it: nothing of it is saved
    GET  /products/{name}/history         ?limit=50&before=N: versions, newest last: what
                                          changed, why, when (`next_before` pages back)
    POST /products/{name}/images          multipart: images (files), reason, calibration_images,
                                          records (ids of reviewed false alarms: their images);
                                          or images of a later capture session: session (its
                                          name), join (both, bank or calibration)
    POST /products/{name}/rollback        JSON: {"version": "v2", "reason": "..."}
    POST /products/{name}/threshold       JSON: {"target": 0.02} or {"threshold": 0.31},
                                          and "reason": a new version, nothing refitted;
                                          "confirm": true for a threshold far outside the
                                          calibration scores
    GET  /products/{name}/suggestion      ?target=0.01&days=7: false-alarm and detection
                                          rates of reviewed records at the live threshold
                                          and at a suggested one (apply it with /threshold)
    PUT  /products/{name}/mask            multipart: mask (an image: white = inspect, black =
                                          ignore), reason: a new version (detector.masks)
    DELETE /products/{name}/mask          ?reason=...: inspect every patch again
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from detector.serving.answers import Refusal
from detector.serving.gate import CALLER_SCOPE_KEY
from detector.serving.mounted import as_response, current_endpoints, json_object


async def list_products(request: Request) -> Response:
    return await as_response(current_endpoints().products())


async def history(request: Request) -> Response:
    name, params = request.path_params["name"], dict(request.query_params)
    return await as_response(current_endpoints().history(name, params))


async def _files(form: Any, field: str) -> list[bytes]:
    return [await item.read() for item in form.getlist(field) if isinstance(item, UploadFile)]


def _listed(form: Any, field: str) -> list[str]:
    """A text field's items: the field repeated, or one comma-separated value, or both."""
    return [
        part.strip()
        for value in form.getlist(field)
        if isinstance(value, str)
        for part in value.split(",")
        if part.strip()
    ]


async def add_images(request: Request) -> Response:
    async def work() -> dict[str, Any]:
        endpoints = current_endpoints()
        limit = endpoints.settings.max_batch_files
        try:
            async with request.form(max_files=2 * limit, max_fields=limit + 16) as form:
                images = await _files(form, "images")
                calibration = await _files(form, "calibration_images")
                reason = str(form.get("reason") or "")[:500]
                session_fields = {k: str(form[k]) for k in ("session", "join") if form.get(k)}
                records = _listed(form, "records")
        except MultiPartException as error:
            raise Refusal(400, "bad_multipart", f"Malformed multipart: {error}") from None
        name, by = request.path_params["name"], request.scope.get(CALLER_SCOPE_KEY)
        return await endpoints.add_images(
            name, images, reason, calibration, records, **session_fields, by=by
        )

    return await as_response(work())


FIT_FIELDS = ("name", "target", "coreset_ratio", "resolution", "reason")


async def create_product(request: Request) -> Response:
    async def work() -> Response:
        endpoints = current_endpoints()
        limit = endpoints.settings.max_batch_files
        try:
            async with request.form(max_files=limit, max_fields=limit + 16) as form:
                images = await _files(form, "images")
                fields = {name: str(form.get(name) or "")[:500] for name in FIT_FIELDS}
                sessions = _listed(form, "sessions")
        except MultiPartException as error:
            raise Refusal(400, "bad_multipart", f"Malformed multipart: {error}") from None
        by = request.scope.get(CALLER_SCOPE_KEY)
        job = await endpoints.create_product(images, fields, sessions, by)
        where = f"/products/{job['product']}/jobs/{job['job']}"
        return JSONResponse(job, status_code=202, headers={"Location": where})

    return await as_response(work())


async def fit_job(request: Request) -> Response:
    name, job = request.path_params["name"], request.path_params["job"]
    cancel = request.method == "DELETE"
    return await as_response(current_endpoints().fit_job(name, job, cancel))


async def rollback(request: Request) -> Response:
    async def work() -> dict[str, Any]:
        body = await json_object(request, 'Send JSON: {"version": "v2", "reason": "..."}.')
        version, reason = str(body.get("version") or ""), str(body.get("reason") or "")[:500]
        by = request.scope.get(CALLER_SCOPE_KEY)
        return await current_endpoints().rollback(request.path_params["name"], version, reason, by)

    return await as_response(work())


async def threshold(request: Request) -> Response:
    async def work() -> dict[str, Any]:
        usage = 'Send JSON: {"target": 0.02, "reason": "..."} or {"threshold": 0.31}.'
        body = await json_object(request, usage)
        by = request.scope.get(CALLER_SCOPE_KEY)
        return await current_endpoints().set_threshold(request.path_params["name"], body, by)

    return await as_response(work())


async def mask(request: Request) -> Response:
    async def work() -> dict[str, Any]:
        endpoints, name = current_endpoints(), request.path_params["name"]
        by = request.scope.get(CALLER_SCOPE_KEY)
        if request.method == "DELETE":
            reason = str(request.query_params.get("reason") or "")[:500]
            return await endpoints.set_mask(name, None, reason, by)
        try:
            async with request.form(max_files=1, max_fields=2) as form:
                files, reason = await _files(form, "mask"), str(form.get("reason") or "")[:500]
        except MultiPartException as error:
            raise Refusal(400, "bad_multipart", f"Malformed multipart: {error}") from None
        if len(files) != 1:
            usage = "Send the mask as the file field 'mask' (white = inspect, black = ignore)."
            raise Refusal(400, "no_mask", usage)
        return await endpoints.set_mask(name, files[0], reason, by)

    return await as_response(work())


async def suggestion(request: Request) -> Response:
    name, params = request.path_params["name"], dict(request.query_params)
    return await as_response(current_endpoints().suggestion(name, params))


products_app = Starlette(
    routes=[
        Route("/", list_products, methods=["GET"]),
        Route("/", create_product, methods=["POST"]),
        Route("/{name}/jobs/{job}", fit_job, methods=["GET", "DELETE"]),
        Route("/{name}/history", history, methods=["GET"]),
        Route("/{name}/images", add_images, methods=["POST"]),
        Route("/{name}/rollback", rollback, methods=["POST"]),
        Route("/{name}/threshold", threshold, methods=["POST"]),
        Route("/{name}/suggestion", suggestion, methods=["GET"]),
        Route("/{name}/mask", mask, methods=["PUT", "DELETE"]),
    ]
)
