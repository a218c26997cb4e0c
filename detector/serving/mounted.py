"""What the apps mounted beside the API service (/products, /records) share: the service's
endpoints, their answers as responses, and a JSON body read strictly."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse, Response

from detector.serving.answers import Refusal

if TYPE_CHECKING:  # the endpoints (SQLAlchemy, aiohttp) are imported by the API worker only
    from detector.serving.api import InspectionEndpoints


def current_endpoints() -> InspectionEndpoints:
    """The API service's endpoints, for the routes mounted beside it (/products, /records)."""
    import bentoml

    return bentoml.get_current_service().endpoints


async def as_response(work: Awaitable[Any]) -> Response:
    """A mounted route's answer: `respond`'s JSON error, the response it made, or JSON."""
    from detector.serving.api import InspectionEndpoints

    answer = await InspectionEndpoints.respond(None, work)
    return answer if isinstance(answer, Response) else JSONResponse(answer)


async def json_object(request: Any, usage: str) -> dict[str, Any]:
    """A mounted route's JSON body as an object; anything else is a 400 saying `usage`:
    text that is not JSON, nesting too deep to parse, or text no database can store (a
    lone UTF-16 surrogate)."""
    try:
        body = json.loads(await request.body() or b"{}")
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise Refusal(400, "bad_json", usage) from None
    if not isinstance(body, dict):
        raise Refusal(400, "bad_json", usage)
    return body
