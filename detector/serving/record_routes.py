"""/records: the decisions the service recorded, their kept images, and operators' reviews.

A small Starlette app mounted at /records on the API service (BentoML APIs take no path
parameters), calling the same `InspectionEndpoints`; `RequestGate` checks for a key with
the reviewer role and the body size first.

    GET  /records?product=&verdict=&reviewed=&label=&since=&until=&limit=&cursor=
                                      newest first; `next_cursor` pages on
    GET  /records/summary             reviewed counts per product (last 7 days)
    GET  /records/activity            per product: inspections and flags per hour (24 h),
                                      today's inspections, flagged records not yet reviewed
    GET  /records/{id}                one record, and whether its image is still kept
    GET  /records/{id}/image          the kept image
    GET  /records/{id}/heatmap        its overlay, drawn by the product's live bank
    GET  /records/{id}/explanation    its most anomalous region beside the nearest normal
                                      patch of that bank (drawn with the heatmap, once)
    POST /records/{id}/review         JSON: {"label": "false_alarm" | "confirmed_defect" |
                                      "unsure", "note": "..."}; the reviewer is the key's
                                      name, and every review stays in the record's history

To add reviewed false alarms to a bank: POST /products/{name}/images with `records` fields.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from detector.serving.gate import CALLER_SCOPE_KEY
from detector.serving.mounted import as_response, current_endpoints, json_object


async def list_records(request: Request) -> Response:
    return await as_response(current_endpoints().records(dict(request.query_params)))


async def summary(request: Request) -> Response:
    return await as_response(current_endpoints().review_summary())


async def activity(request: Request) -> Response:
    return await as_response(current_endpoints().activity())


async def one(request: Request) -> Response:
    return await as_response(current_endpoints().record(request.path_params["id"]))


async def image(request: Request) -> Response:
    return await as_response(current_endpoints().record_image(request.path_params["id"]))


async def heatmap(request: Request) -> Response:
    return await as_response(current_endpoints().record_heatmap(request.path_params["id"]))


async def explanation(request: Request) -> Response:
    return await as_response(current_endpoints().record_explanation(request.path_params["id"]))


async def review(request: Request) -> Response:
    async def work() -> dict[str, Any]:
        usage = 'Send JSON: {"label": "false_alarm", "note": "..."}.'
        body = await json_object(request, usage)
        who = request.scope.get(CALLER_SCOPE_KEY)
        return await current_endpoints().review(request.path_params["id"], body, who)

    return await as_response(work())


records_app = Starlette(
    routes=[
        Route("/", list_records, methods=["GET"]),
        Route("/summary", summary, methods=["GET"]),
        Route("/activity", activity, methods=["GET"]),
        Route("/{id}", one, methods=["GET"]),
        Route("/{id}/image", image, methods=["GET"]),
        Route("/{id}/heatmap", heatmap, methods=["GET"]),
        Route("/{id}/explanation", explanation, methods=["GET"]),
        Route("/{id}/review", review, methods=["POST"]),
    ]
)
