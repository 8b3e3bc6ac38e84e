"""A small agent-side client for the proxy's HTTP API (standard library only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]  # names lower-cased


@dataclass(frozen=True)
class AgentClient:
    base_url: str
    token: str = ""
    timeout: float = 75.0

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Reply:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url.rstrip("/") + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return Reply(resp.status, json.loads(resp.read() or b"{}"), _lower(resp.headers))
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = {"error": "not_json", "detail": raw[:200].decode("utf-8", "replace")}
            return Reply(err.code, parsed, _lower(err.headers))

    def health(self) -> Reply:
        return self.call("GET", "/health")

    def ask(self, secret: str, reason: str, ttl_seconds: int | None = None) -> Reply:
        body: dict[str, Any] = {"secret": secret, "reason": reason}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        return self.call("POST", "/v1/requests", body)

    def status(self, request_id: str, wait: float = 0) -> Reply:
        suffix = f"?wait={wait:g}" if wait else ""
        return self.call("GET", f"/v1/requests/{request_id}{suffix}")

    def retrieve(self, request_id: str) -> Reply:
        return self.call("GET", f"/v1/requests/{request_id}/secret")


def _lower(headers: object) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}  # type: ignore[attr-defined]
