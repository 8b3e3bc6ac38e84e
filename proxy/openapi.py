"""The OpenAPI description served at /openapi.json; docs/api.md says the same in prose."""

from __future__ import annotations

from typing import Any

from . import wire


def _json(description: str, schema: str) -> dict[str, Any]:
    """A response whose JSON body is the named schema."""
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _ref(schema: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{schema}"}


def _error(*codes: str) -> dict[str, Any]:
    return _json(" or ".join(f"`{c}`" for c in codes), "Error")


def _json_body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}


def _asking(ttl_description: str) -> dict[str, Any]:
    """What every new request names: the secret, why, and how long an approval lasts."""
    return {
        "type": "object",
        "required": ["secret", "reason"],
        "properties": {
            "secret": {"type": "string", "pattern": f"^{wire.SECRET_NAME}$"},
            "reason": {"type": "string", "minLength": 1, "maxLength": wire.MAX_REASON_CHARS},
            "ttl_seconds": {
                "type": "integer",
                "minimum": 1,
                # No "default": the operator sets it (default_ttl_seconds, max_ttl_seconds).
                "description": ttl_description + " Absent: the proxy's default_ttl_seconds (300 unless the "
                "operator set another); at most its max_ttl_seconds.",
            },
        },
    }


def _new(summary: str, schema: str, forbidden: tuple[str, ...]) -> dict[str, Any]:
    """POST of a new request (a retrieval or a call): answered 201 with it, pending (approved at once for a
    secret whose approval rule is `auto`; refused with `denied` when it is `deny`)."""
    return {
        "post": {
            "summary": summary,
            "security": _AUTH,
            "requestBody": _json_body(schema),
            "responses": {
                "201": _json("Pending", "Created"),
                "400": _error("invalid_request"),
                "401": _error("unauthorized"),
                "403": _error(*forbidden),
                "404": _error("unknown_secret"),
                "413": _error("too_large"),
                "429": _LIMITED,
            },
        }
    }


_AUTH: list[dict[str, list[str]]] = [{"bearer": []}]
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": f"^{wire.REQUEST_ID}$"}}
_LIMITED = {**_error("rate_limited"), "headers": {"Retry-After": {"schema": {"type": "integer"}}}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "secret-proxy",
        "version": "1",
        "description": "Ask for a named secret with a reason; a human approves in Telegram; retrieve the value once.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "detail"],
                "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
            },
            "NewRequest": _asking("How long an approved value stays retrievable."),
            "Created": {
                "type": "object",
                "required": ["id", "status", "secret", "expires_at"],
                "properties": {
                    "id": {"type": "string"},
                    "status": {"type": "string", "enum": ["pending"]},
                    "secret": {"type": "string"},
                    "expires_at": {"type": "string", "format": "date-time"},
                },
            },
            "RequestStatus": {
                "type": "object",
                "required": [
                    "id",
                    "secret",
                    "status",
                    "reason",
                    "created_at",
                    "expires_at",
                    "decided_at",
                    "decided_by",
                ],
                "properties": {
                    "id": {"type": "string"},
                    "secret": {"type": "string"},
                    "status": {
                        "type": "string",
                        "enum": ["pending", "approved", "denied", "expired", "retrieved", "used", "cancelled"],
                        "description": "`used`: an approved brokered call was made; `cancelled`: the agent "
                        "withdrew it while pending.",
                    },
                    "reason": {"type": "string"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "expires_at": {"type": "string", "format": "date-time"},
                    "decided_at": {"type": "string", "format": "date-time", "nullable": True},
                    "decided_by": {
                        "type": "string",
                        "nullable": True,
                        "enum": ["approver", "operator", "agent", None],
                        "description": "The role that decided, not the person (`agent`: it cancelled).",
                    },
                    "call": {
                        "type": "object",
                        "nullable": True,
                        "properties": {"method": {"type": "string"}, "url": {"type": "string"}},
                        "description": "For a call request, the call's method and URL; null for a retrieval.",
                    },
                },
            },
            "Cancelled": {
                "allOf": [
                    _ref("RequestStatus"),
                    {
                        "type": "object",
                        "properties": {
                            "cancelled": {
                                "type": "boolean",
                                "description": "false: it was no longer pending and is left as it was",
                            }
                        },
                    },
                ]
            },
            "SecretUse": {
                "type": "object",
                "required": ["name", "retrieve", "call", "destinations", "inject"],
                "properties": {
                    "name": {"type": "string"},
                    "retrieve": {
                        "type": "boolean",
                        "description": "false for a broker-only secret, or one whose rule is deny",
                    },
                    "call": {"type": "boolean", "description": "it may be used in brokered calls"},
                    "destinations": {"type": "array", "items": {"type": "string"}},
                    "inject": {
                        "type": "object",
                        "nullable": True,
                        "properties": {
                            "kind": {"type": "string", "enum": ["header", "query", "basic"]},
                            "name": {"type": "string"},
                        },
                    },
                },
            },
            "CallSpec": {
                "type": "object",
                "required": ["method", "url"],
                "properties": {
                    "method": {"type": "string", "enum": ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]},
                    "url": {
                        "type": "string",
                        "description": "http(s) URL within a destination of the secret's "
                        "policy; no user info, fragment, dot segments or encoded slashes",
                    },
                    "headers": {
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                        "description": "Not Host, framing headers, nor the header the secret goes in.",
                    },
                    "body_base64": {"type": "string", "format": "byte"},
                    "body_sha256": {
                        "type": "string",
                        "pattern": "^[0-9a-f]{64}$",
                        "description": "Instead of body_base64 when asking (with body_size).",
                    },
                    "body_size": {"type": "integer", "minimum": 0},
                },
            },
            "NewCall": {"allOf": [_ref("CallSpec"), _asking("How long the approved call may be made.")]},
            "CallAnswer": {
                "type": "object",
                "required": ["status", "headers", "body_base64", "redactions"],
                "properties": {
                    "status": {"type": "integer", "description": "The destination's HTTP status"},
                    "headers": {
                        "type": "array",
                        "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
                    },
                    "body_base64": {"type": "string", "format": "byte"},
                    "redactions": {"type": "integer", "description": "How many occurrences of the secret were removed"},
                },
            },
            "SecretValue": {
                "type": "object",
                "required": ["secret", "value"],
                "properties": {"secret": {"type": "string"}, "value": {"type": "string"}},
            },
        },
    },
    "paths": {
        "/health": {
            "get": {
                "summary": "Liveness; no token needed",
                "responses": {"200": {"description": '`{"status": "ok"}`'}},
            }
        },
        "/v1/requests": {
            **_new("Ask for a secret", "NewRequest", ("forbidden", "denied")),
            "get": {
                "summary": "This agent's own requests, newest first",
                "security": _AUTH,
                "parameters": [
                    {"name": "status", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}},
                ],
                "responses": {
                    "200": {
                        "description": '`{"requests": [RequestStatus, ...]}`',
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"requests": {"type": "array", "items": _ref("RequestStatus")}},
                                }
                            }
                        },
                    },
                    "400": _error("invalid_request"),
                    "401": _error("unauthorized"),
                    "429": _LIMITED,
                },
            },
        },
        "/v1/requests/{id}/cancel": {
            "post": {
                "summary": "Withdraw a pending request; one no longer pending is left as it is",
                "security": _AUTH,
                "parameters": [_ID],
                "responses": {
                    "200": _json("The request after", "Cancelled"),
                    "400": _error("malformed_id"),
                    "401": _error("unauthorized"),
                    "404": _error("not_found"),
                    "429": _LIMITED,
                },
            }
        },
        "/v1/secrets": {
            "get": {
                "summary": "The secrets this agent may ask for, and how each may be used; never a value",
                "security": _AUTH,
                "responses": {
                    "200": {
                        "description": '`{"secrets": [SecretUse, ...]}`',
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"secrets": {"type": "array", "items": _ref("SecretUse")}},
                                }
                            }
                        },
                    },
                    "401": _error("unauthorized"),
                    "429": _LIMITED,
                },
            }
        },
        "/v1/requests/{id}": {
            "get": {
                "summary": "A request's status; `?wait=N` holds until it leaves pending",
                "security": _AUTH,
                "parameters": [
                    _ID,
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "number", "minimum": 0, "maximum": wire.MAX_WAIT_SECONDS},
                    },
                ],
                "responses": {
                    "200": _json("Status", "RequestStatus"),
                    "400": _error("invalid_request", "malformed_id"),
                    "401": _error("unauthorized"),
                    "404": _error("not_found"),
                    "429": _LIMITED,
                },
            }
        },
        "/v1/requests/{id}/secret": {
            "get": {
                "summary": "The approved value, exactly once",
                "security": _AUTH,
                "parameters": [_ID],
                "responses": {
                    "200": _json("The value", "SecretValue"),
                    "400": _error("malformed_id"),
                    "401": _error("unauthorized"),
                    "403": _error("denied"),
                    "404": _error("not_found"),
                    "409": _error("pending"),
                    "410": _error("expired", "already_retrieved"),
                    "429": _LIMITED,
                    "500": _error("internal_error"),
                },
            }
        },
        "/v1/calls": _new(
            "Ask to use a secret in one exact HTTP call that the proxy will make",
            "NewCall",
            ("forbidden", "denied", "no_policy", "destination_not_allowed"),
        ),
        "/v1/requests/{id}/call": {
            "post": {
                "summary": "Make the approved call, exactly once; the answer has the secret redacted. An empty "
                "body `{}` makes the call as asked (the proxy kept it).",
                "security": _AUTH,
                "parameters": [_ID],
                "requestBody": _json_body("CallSpec"),
                "responses": {
                    "200": _json("The destination's answer", "CallAnswer"),
                    "400": _error("invalid_request", "malformed_id"),
                    "401": _error("unauthorized"),
                    "403": _error(
                        "denied",
                        "call_mismatch",
                        "destination_not_allowed",
                        "address_not_allowed",
                        "egress_refused",
                        "no_policy",
                    ),
                    "404": _error("not_found"),
                    "409": _error("pending"),
                    "410": _error("expired", "already_used"),
                    "413": _error("too_large"),
                    "429": {**_LIMITED, **_error("rate_limited", "too_many_calls")},
                    "502": _error(
                        "upstream_unreachable", "tls_failed", "response_too_large", "bad_response", "encoded_response"
                    ),
                    "504": _error("upstream_timeout"),
                },
            }
        },
    },
}
