"""Reading a request body's fields: each problem an ApiError with the HTTP status, a one-line
message naming the field and the value, and OpenAI's error `type`/`code`, so a client library
raises its usual exception."""

from __future__ import annotations

import json
import math


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None, detail: dict | None = None):
        """detail: figures another API's wording needs (a prompt over the context: its tokens, the context)."""
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers, self.detail = headers or {}, detail or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    _check_strings(body)
    return body


def _check_strings(value, where: str = "body") -> None:
    """Refuse text that is not Unicode: JSON may escape lone surrogates (\\udc00), which no
    tokenizer can encode."""
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(400, f"{at} holds a lone surrogate (\\u{ord(v[e.start]):04x}) at character {e.start}: "
                                    "not Unicode text", code="invalid_value") from None
        elif isinstance(v, dict):
            stack.extend((x, f"{at}.{k}") for k, x in v.items())
            stack.extend((k, f"{at} key") for k in v)
        elif isinstance(v, list):
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(v))


def _type_name(v) -> str:
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                      list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _get(body: dict, name: str, kinds: tuple, default=None, *, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
        return default
    v = body[name]
    ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
    if not ok:
        want = " or ".join(_type_name(k()) if k is not float else "number" for k in kinds)
        raise ApiError(400, f"'{name}' must be {want}, got {_type_name(v)} {json.dumps(v)[:80]}", param=name,
                       code="invalid_type")
    if isinstance(v, float) and not math.isfinite(v):
        raise ApiError(400, f"'{name}' must be a finite number", param=name, code="invalid_value")
    return v


def _range(name: str, v, lo, hi) -> None:
    if v is not None and not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got {v}", param=name, code="invalid_value")
