"""How a stored secret may be used: where it may be sent, and how it is put into the call.

A secret with no policy can only be retrieved (the original flow). A policy lists
destinations (scheme, host, port, optional path prefix) and one injection (a header
template, a query parameter, or basic auth). Whether the value may also be retrieved is
part of the secret's approval rule (`proxy/approval.py`, `broker_only`). The policy is
data the operator writes with the CLI; the agent only ever sees whether a call matches it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from urllib.parse import unquote, urlsplit

HEADER_NAME_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
QUERY_NAME_RE = re.compile(r"[A-Za-z0-9_.~-]{1,64}")
BASIC_USER_RE = re.compile(r"[^:\x00-\x1f\x7f]{0,128}")


class PolicyError(ValueError):
    """A policy or a URL that cannot be used; the message says what to write instead."""


@dataclass(frozen=True)
class Destination:
    scheme: str
    host: str  # lower case; an IP literal in brackets for IPv6
    port: int
    path_prefix: str  # "/" for any path
    allow_private: bool = False  # may resolve to loopback/private/link-local addresses

    def allows(self, url: Target) -> bool:
        if (url.scheme, url.host, url.port) != (self.scheme, self.host, self.port):
            return False
        prefix = self.path_prefix
        return url.path == prefix or url.path.startswith(prefix if prefix.endswith("/") else prefix + "/")

    def show(self) -> str:
        text = f"{self.scheme}://{self.host}:{self.port}{self.path_prefix}"
        return text + (" (private addresses allowed)" if self.allow_private else "")


@dataclass(frozen=True)
class Injection:
    kind: str  # "header", "query" or "basic"
    name: str  # header name, query parameter name, or basic-auth user name
    template: str = "{value}"  # header value template; `{value}` is replaced by the secret

    def show(self) -> str:
        if self.kind == "header":
            return f"header {self.name}: {self.template}"
        if self.kind == "query":
            return f"query parameter {self.name}={{value}}"
        return f"basic auth as user {self.name!r}"


@dataclass(frozen=True)
class Policy:
    destinations: tuple[Destination, ...]
    injection: Injection | None
    # Headers that change how a destination routes a call (`proxy/broker.py` ROUTING_HEADERS) that the
    # operator lets the agent send anyway; lower case.
    allow_headers: tuple[str, ...] = ()

    def destination_for(self, url: Target) -> Destination | None:
        return next((d for d in self.destinations if d.allows(url)), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        raw = json.loads(text)
        injection = Injection(**raw["injection"]) if raw.get("injection") else None
        return cls(  # `broker_only`, in policies stored before schema 7, moved to the approval rule
            tuple(Destination(**d) for d in raw["destinations"]),
            injection,
            tuple(raw.get("allow_headers", ())),  # absent in policies stored before it existed
        )

    def lines(self) -> list[str]:
        out = [f"allow {d.show()}" for d in self.destinations] or ["allow (no destination: cannot be used in calls)"]
        out.append(f"inject {self.injection.show()}" if self.injection else "inject (none)")
        if self.allow_headers:
            out.append(f"routing headers the agent may send: {', '.join(self.allow_headers)}")
        return out


@dataclass(frozen=True)
class Target:
    """A call's URL, split and normalized the one way both the policy check and the connection use."""

    scheme: str
    host: str
    port: int
    path: str
    query: str

    @property
    def host_for_connect(self) -> str:
        return self.host[1:-1] if self.host.startswith("[") else self.host

    @property
    def path_and_query(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")


def parse_url(url: str) -> Target:
    """Split an http(s) URL; refuse what could mean two things (user info, fragments, dot segments, %2F,
    `;` parameters in a path segment, which servers and proxies before them read differently: `/v1/..;/admin`)."""
    if not isinstance(url, str) or len(url) > 4096 or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise PolicyError("a URL must be at most 4096 printable characters without spaces")
    if not url.isascii():
        raise PolicyError("a URL must be ASCII: percent-encode other characters (urllib.parse.quote does)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise PolicyError(f"not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise PolicyError("the URL must start with https:// (or http://)")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise PolicyError("the URL must not carry user info (user@host); the proxy injects credentials")
    if parts.fragment or url.endswith("#"):
        raise PolicyError("the URL must not have a #fragment")
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    if not HOST_RE.fullmatch(host) or host.endswith(".."):
        raise PolicyError("the URL has no valid host name")
    host = host.rstrip(".") if not host.startswith("[") else host
    path = parts.path or "/"
    if not path.startswith("/"):
        raise PolicyError("the URL's path must start with /")
    decoded = unquote(path)
    if "%2f" in path.lower() or "%5c" in path.lower() or "\\" in decoded:
        raise PolicyError("the URL's path must not encode / or \\")
    if ";" in decoded:
        raise PolicyError("the URL's path must not hold ; (a path parameter such as ..;/ or ;jsessionid=)")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise PolicyError("the URL's path must not encode control characters")
    segments = decoded.split("/")
    if "." in segments or ".." in segments or "//" in decoded:
        raise PolicyError("the URL's path must not contain . or .. segments or //")
    if port == 0:
        raise PolicyError("the URL's port must be from 1 to 65535")
    return Target(scheme, host, port if port is not None else (443 if scheme == "https" else 80), path, parts.query)


def parse_destination(url: str, allow_private: bool = False) -> Destination:
    target = parse_url(url)
    if target.query:
        raise PolicyError(f"{url!r}: a destination has no query part; give scheme://host[:port][/path/prefix]")
    return Destination(target.scheme, target.host, target.port, target.path, allow_private)


def parse_injection(spec: str) -> Injection:
    """`Header-Name: template with {value}`, `query:NAME`, or `basic:USER`."""
    if spec.startswith("query:"):
        name = spec[len("query:") :]
        if not QUERY_NAME_RE.fullmatch(name):
            raise PolicyError("query:NAME needs a parameter name of [A-Za-z0-9_.~-]")
        return Injection("query", name)
    if spec.startswith("basic:"):
        user = spec[len("basic:") :]
        if not BASIC_USER_RE.fullmatch(user):
            raise PolicyError("basic:USER needs a user name without ':' or control characters")
        return Injection("basic", user)
    name, sep, template = spec.partition(":")
    template = template.strip()
    if not sep or not HEADER_NAME_RE.fullmatch(name.strip()):
        raise PolicyError("--inject takes 'Header-Name: ...{value}...', 'query:NAME' or 'basic:USER'")
    if template.count("{value}") != 1 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in template):
        raise PolicyError("a header template must contain {value} exactly once and no control characters")
    return Injection("header", name.strip(), template)


def build_policy(
    allow: list[str],
    allow_private: list[str],
    inject: str | None,
    allow_headers: list[str] | None = None,
) -> Policy | None:
    """The policy the CLI's flags describe, or None for a secret never used in calls."""
    destinations = [parse_destination(u) for u in allow] + [parse_destination(u, True) for u in allow_private]
    headers = sorted({h.strip().lower() for h in allow_headers or []})
    bad = [h for h in headers if not HEADER_NAME_RE.fullmatch(h)]
    if bad:
        raise PolicyError(f"--allow-header {bad[0]!r} is not a header name")
    if headers and not destinations:
        raise PolicyError("--allow-header needs at least one --allow destination")
    if not destinations and inject is None:
        return None
    if destinations and inject is None:
        raise PolicyError("--allow needs --inject: say how the value goes into the call")
    if inject is not None and not destinations:
        raise PolicyError("--inject needs at least one --allow destination")
    return Policy(tuple(destinations), parse_injection(inject) if inject else None, tuple(headers))
