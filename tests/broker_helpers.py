"""A proxy with brokered-call secrets and the HTTPS destinations they may be sent to, for the brokered-call
tests: a real `proxy serve` on loopback, approvals by the operator's store call."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import httpx

from proxy.policy import build_policy
from proxy.store import Store

from .broker_upstream import CertAuthority, Upstream, make_ca
from .proxy_helpers import SECRET_VALUE, LiveServer, make_settings, provision, start_server


class Rig:
    def __init__(self, tmp: Path, extra_env: dict[str, str] | None = None) -> None:
        self.ca: CertAuthority = make_ca(tmp / "ca")
        self.up = Upstream(self.ca, value=SECRET_VALUE).start()
        self.other = Upstream(self.ca).start()  # never listed anywhere
        self.up.redirect_to = f"https://localhost:{self.other.port}/v1/stolen"
        config = {
            "broker_ca_file": str(self.ca.ca_file),
            "rate_burst": 1000,
            "call_burst": 1000,
            "max_pending_per_agent": 1000,
            "broker_max_request_bytes": 50_000,
            "broker_max_response_bytes": 100_000,
            "broker_timeout_seconds": 2.0,
        }
        self.data = provision(make_settings(tmp), config)
        base = f"https://localhost:{self.up.port}"
        policies = {
            "api-call": build_policy([], [base + "/v1/"], "Authorization: Bearer {value}"),
            "api-query": build_policy([], [base + "/v1/"], "query:key"),
            "api-basic": build_policy([], [base + "/v1/"], "basic:bot"),
            "api-loopback": build_policy([base + "/v1/"], [], "X-Key: {value}"),
        }
        with Store(self.data.settings) as store:
            for name, policy in policies.items():
                store.set_secret(name, SECRET_VALUE.encode(), "operator:test", policy, broker_only=name == "api-call")
        self.server: LiveServer = start_server(self.data.settings, extra_env)
        self.http = httpx.Client(
            base_url=self.server.url, timeout=30, headers={"Authorization": f"Bearer {self.data.token}"}
        )
        self.base = base

    def ask(
        self,
        url: str,
        *,
        secret: str = "api-call",
        method: str = "POST",
        body: bytes = b"{}",
        headers: dict | None = None,
        by_hash: bool = False,
    ) -> httpx.Response:
        call: dict = {
            "secret": secret,
            "reason": "create the release",
            "method": method,
            "url": url,
            "headers": headers or {"Content-Type": "application/json"},
        }
        if by_hash:
            call.update(body_sha256=hashlib.sha256(body).hexdigest(), body_size=len(body))
        else:
            call["body_base64"] = base64.b64encode(body).decode()
        return self.http.post("/v1/calls", json=call)

    def approved(self, url: str, **kw: object) -> str:
        created = self.ask(url, **kw)  # type: ignore[arg-type]
        assert created.status_code == 201, created.text
        with Store(self.data.settings) as store:
            store.decide(created.json()["id"], True, "operator:test")
        return created.json()["id"]

    def make(
        self, request_id: str, url: str, *, method: str = "POST", body: bytes = b"{}", headers: dict | None = None
    ) -> httpx.Response:
        return self.http.post(
            f"/v1/requests/{request_id}/call",
            json={
                "method": method,
                "url": url,
                "headers": headers or {"Content-Type": "application/json"},
                "body_base64": base64.b64encode(body).decode(),
            },
        )

    def audit(self) -> list:
        with Store(self.data.settings) as store:
            return store.audit_entries()

    def stop(self) -> str:
        self.http.close()
        self.server.stop()
        self.up.stop()
        self.other.stop()
        return self.server.process.stderr.read().decode(errors="replace")


def answer_body(response: httpx.Response) -> bytes:
    return base64.b64decode(response.json()["body_base64"])
