"""The JSON bodies of the ``/modelseal/v1/`` routes (keys, access, approvals, MFA, policy):
one bounded parse into an object, string fields with a length limit, the optional ``otp``
code, and ``BadRequest``, the one 400 of those routes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from modelseal.errors import GovernanceError
from modelseal.util.bounded import json_loads


class BadRequest(GovernanceError):
    """The request body is not what the route takes (400)."""


async def read_object(request: web.Request, max_depth: int = 6, max_values: int = 1000) -> dict[str, Any]:
    raw = await request.read()  # bounded by the application's client_max_size (413 beyond)
    doc = json_loads(raw or b"{}", max_depth=max_depth, max_values=max_values, error=BadRequest, what="the body")
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    return doc


def string(doc: Mapping[str, Any], name: str, limit: int = 500, default: str | None = None) -> str:
    value = doc.get(name, default)
    if not isinstance(value, str) or len(value) > limit:
        raise BadRequest(f"{name} must be a string of at most {limit} characters")
    return value


def otp(doc: Mapping[str, Any]) -> str | None:
    """The TOTP code sent with the request it authorizes, if any (checked by ``gov_api.step_up``)."""
    code = doc.get("otp")
    if code is not None and not isinstance(code, str):
        raise BadRequest("otp must be a string")
    return code


__all__ = ["BadRequest", "otp", "read_object", "string"]
