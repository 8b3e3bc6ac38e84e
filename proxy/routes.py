"""The agent's API in one list: the routes and their handlers, in the order docs/api.md gives them."""

from __future__ import annotations

from starlette.routing import Route

from .api import (
    cancel_request,
    create_request,
    get_request,
    health,
    list_requests,
    list_secrets,
    openapi,
    retrieve_secret,
)
from .calls_api import create_call, make_call


def routes() -> list[Route]:
    # Status polls first: routes are matched in order and polls are the most frequent call.
    return [
        Route("/v1/requests/{id}", get_request, methods=["GET"]),
        Route("/v1/requests/{id}/secret", retrieve_secret, methods=["GET"]),
        Route("/v1/requests", create_request, methods=["POST"]),
        Route("/v1/requests", list_requests, methods=["GET"]),
        Route("/v1/requests/{id}/cancel", cancel_request, methods=["POST"]),
        Route("/v1/secrets", list_secrets, methods=["GET"]),
        Route("/v1/calls", create_call, methods=["POST"]),
        Route("/v1/requests/{id}/call", make_call, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
