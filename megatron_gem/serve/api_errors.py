"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}`` with the status
a client can act on (400 bad request, 401 no or wrong key, 404 unknown model, 429 queue full, 503
not ready or stopped). Raised anywhere in a request's handling; the app turns it into the
response and keeps serving."""

from __future__ import annotations


class APIError(Exception):
    """One refused request. ``message`` says what was wrong and what to do about it."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unknown_model(name: str, served: str) -> APIError:
    return APIError(
        404, f"The model {name!r} does not exist; this server serves {served!r} (GET /v1/models)", type="not_found_error", param="model", code="model_not_found"
    )


def overloaded(what: str) -> APIError:
    return APIError(429, f"the server is at capacity: {what}; retry later", type="rate_limit_error", code="queue_full")


def unavailable(why: str) -> APIError:
    return APIError(503, why, type="service_unavailable", code="unavailable")


def unauthorized() -> APIError:
    return APIError(
        401,
        "missing or wrong API key: send the header 'Authorization: Bearer <key>' (the server's --api-key)",
        type="authentication_error",
        code="invalid_api_key",
    )
