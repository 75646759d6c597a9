"""How errors become HTTP answers: a status and one JSON line `{"error": "..."}`, never a traceback.

UserInputError 400 (a request FastAPI itself cannot parse: 422), NotFoundError 404,
ConflictError and PolicyViolationError 409, CredentialsError and other StorageError 502,
TransientError 503. Anything else is a generic 500 whose details go to the server's log only.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lifecycle.errors import (
    ConflictError,
    DLMError,
    NotFoundError,
    PolicyViolationError,
    StorageError,
    TransientError,
    UserInputError,
)
from lifecycle.redact import redact

log = logging.getLogger("dlm.api")

STATUS: tuple[tuple[type[DLMError], int], ...] = (
    (UserInputError, 400),
    (NotFoundError, 404),
    (ConflictError, 409),
    (PolicyViolationError, 409),
    (TransientError, 503),
    (StorageError, 502),
)


def one_line(message: str) -> str:
    return " ".join(redact(message).split())


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


def status_of(exc: DLMError) -> int:
    return next((code for kind, code in STATUS if isinstance(exc, kind)), 500)


async def _dlm_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DLMError)
    status = status_of(exc)
    if status >= 500:
        log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return error_response(status, str(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header"))
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return error_response(422, f"invalid {where or 'request'}: {msg}")


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error (logged on the server)")


# Every error answer, documented on every operation of the published schema (/api/openapi.json)
# with its one body shape; FastAPI's own 422 body ({"detail": [...]}) is never sent.
DOCUMENTED: dict[str, str] = {
    "400": "Bad input: a value the input models refuse (nothing changed)",
    "401": "No valid bearer token",
    "403": "An admin route without an admin token",
    "404": "Not found, or not yours",
    "409": "A conflict: the item's or storage's state forbids it",
    "422": "A request that is not the right shape",
    "502": "A storage refused",
    "503": "A storage, the catalogue or the Prefect server is briefly unreachable",
}
_ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "properties": {"error": {"type": "string", "title": "Error", "description": "one line"}},
    "required": ["error"],
    "additionalProperties": False,
}


def _document_errors(app: FastAPI) -> None:
    """Publish the error answers (DOCUMENTED, body `Error`) on every operation of the schema."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Error"] = _ERROR_SCHEMA
        body = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                for code, description in DOCUMENTED.items():
                    responses[code] = {"description": description, "content": body}
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    app.add_exception_handler(DLMError, _dlm_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _internal)
    _document_errors(app)
