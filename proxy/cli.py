"""The operator CLI: `python -m proxy COMMAND`.

Exit 0 on success; otherwise one line on stderr saying what went wrong and a
non-zero code. Secret values come from stdin, never argv, and are never printed.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from . import crypto
from .approval import ApprovalError, ApprovalRule, parse_rule
from .backup import BackupError
from .broker import Call
from .config import ConfigError, Settings, load_settings
from .errors import StoreError
from .grants import GrantError, parse_length
from .policy import Policy, PolicyError, build_policy
from .shown import header_lines, visible
from .store import STATUSES, Store, init_data_dir
from .wake import NoServer, NotOurServer, retry_telegram_now


class CliError(Exception):
    pass


# `telegram retry-now`'s own failures, for the host that runs it over SSH (1 is every other error).
EXIT_NO_SERVER = 3  # no `proxy serve` running (or the pid is gone)
EXIT_NOT_OURS = 4  # the pid is not a `proxy serve` of the caller's uid: not signalled


def operator() -> str:
    # Over SSH, the operator is whoever holds the host key; name the local user and the SSH peer.
    peer = os.environ.get("SSH_CONNECTION", "").split(" ")[0]
    who = f"operator:{getpass.getuser()}"
    return f"{who}@{peer}" if peer else who


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_init(settings: Settings, args: argparse.Namespace) -> None:
    init_data_dir(settings)
    print(f"initialized {settings.data_dir} (master key {settings.key_path}, database {settings.db_path})")


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .config import check_metrics_listen
    from .server import serve

    if args.metrics_listen is not None:
        check_metrics_listen(args.metrics_listen)
        settings = replace(settings, metrics_listen=args.metrics_listen)
    port = args.port or settings.port
    if settings.metrics_listen and check_metrics_listen(settings.metrics_listen)[1] == port:
        raise CliError(f"metrics_listen {settings.metrics_listen} is the API's port; give the metrics their own")
    serve(settings, host=args.host or settings.host, port=port)


def cmd_metrics(settings: Settings, args: argparse.Namespace) -> None:
    """Print the running proxy's figures (Prometheus' text format) from its loopback metrics listener."""
    import urllib.error
    import urllib.request

    from .config import check_metrics_listen

    where = args.source or settings.metrics_listen
    if not where:
        raise CliError("no metrics listener is configured; pass --from 127.0.0.1:PORT or set metrics_listen")
    host, port = check_metrics_listen(where)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as answer:
            sys.stdout.write(answer.read(4 * 1024 * 1024).decode())
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"the metrics listener at {where} did not answer ({exc}); is `proxy serve` running?") from None


def cmd_secrets_set(settings: Settings, args: argparse.Namespace) -> None:
    try:  # checked before the value is read: a typo in a flag must not cost the operator a paste
        policy = build_policy(args.allow, args.allow_private, args.inject, args.allow_header)
        approval = _approval_rule(settings, args)
    except (PolicyError, ApprovalError) as exc:
        raise CliError(f"{exc}; see `python -m proxy secrets set --help`") from None
    if sys.stdin.isatty():
        value = getpass.getpass(f"value for {args.name}: ").encode()
    else:
        value = sys.stdin.buffer.read()
        if value.endswith(b"\n"):
            value = value[:-1]  # `echo value |` adds a newline nobody means as part of a key
    with Store(settings) as store:
        store.set_secret(args.name, value, operator(), policy, approval, _broker_only(args))
        rule = store.get_approval(args.name)
    print(f"stored {args.name}")
    for line in [*(policy.lines() if policy else []), *rule.lines()]:
        print(f"  {line}")
    if policy and any(d.scheme == "http" for d in policy.destinations):
        print("warning: an http:// destination gets the value unencrypted; prefer https://", file=sys.stderr)


def _approval_rule(settings: Settings, args: argparse.Namespace) -> ApprovalRule | None:
    """The rule `--approval`/`--approvers` describe; None when neither is given (the rule stays as it is)."""
    if args.approval is None:
        if args.approvers or args.max_grant or args.grant_calls is not None or args.operator_decides:
            raise ApprovalError(
                "--approvers, --max-grant, --grant-calls and --operator-decides need --approval "
                "(approve, or quorum:N for --approvers and --operator-decides)"
            )
        return None
    try:
        max_grant = parse_length(args.max_grant) if args.max_grant else 0
    except GrantError as exc:
        raise ApprovalError(f"--max-grant: {exc}") from None
    return parse_rule(
        args.approval, args.approvers, settings.telegram_approvers, max_grant, args.operator_decides, args.grant_calls
    )


def _broker_only(args: argparse.Namespace) -> bool | None:
    """Whether `--retrieval` (or its old spelling `--broker-only`) asks for broker-only use; None: not said."""
    return None if args.retrieval is None else args.retrieval == "refused"


def cmd_secrets_approval(settings: Settings, args: argparse.Namespace) -> None:
    """Change only how a secret is approved and whether it may be retrieved; its value and use policy stay."""
    try:
        rule = _approval_rule(settings, args)
    except ApprovalError as exc:
        raise CliError(f"{exc}; see `python -m proxy secrets approval --help`") from None
    if rule is None and args.retrieval is None:
        raise CliError(
            "give --approval auto|approve|quorum:N|deny (and optionally --approvers ID,ID), "
            "or --retrieval allowed|refused"
        )
    with Store(settings) as store:
        rule = store.set_approval(args.name, rule, operator(), _broker_only(args))
    print(f"approval rule of {args.name} set; requests already pending keep the rule they were made under")
    for line in rule.lines():
        print(f"  {line}")


def cmd_secrets_show(settings: Settings, args: argparse.Namespace) -> None:
    with Store(settings) as store:
        if not store.secret_exists(args.name):
            raise StoreError("unknown_secret", f"no secret named {args.name!r}")
        policy = store.get_policy(args.name)
        rule = store.get_approval(args.name)
    print(args.name)
    for line in policy.lines() if policy else ["no use policy: never used in brokered calls"]:
        print(f"  {line}")
    for line in rule.lines():
        print(f"  {line}")


def cmd_secrets_list(settings: Settings, args: argparse.Namespace) -> None:
    with Store(settings) as store:
        for name, updated in store.list_secrets():
            print(f"{name}\t{_when(updated)}")


def cmd_secrets_destinations(settings: Settings, args: argparse.Namespace) -> None:
    """Where the stored policies send calls, as JSON: what the host's egress list must allow."""
    found: dict[str, list[str]] = {}
    with Store(settings) as store:
        for name, _ in store.list_secrets():
            policy = store.get_policy(name)
            for d in policy.destinations if policy else ():
                found.setdefault(f"{d.scheme}://{d.host}:{d.port}", []).append(name)
    print(json.dumps([{"url": url, "secrets": names} for url, names in sorted(found.items())]))


def cmd_secrets_delete(settings: Settings, args: argparse.Namespace) -> None:
    with Store(settings) as store:
        store.delete_secret(args.name, operator())
    print(f"deleted {args.name}")


def cmd_agents_add(settings: Settings, args: argparse.Namespace) -> None:
    with Store(settings) as store:
        token = store.add_agent(args.name, args.secrets.split(","), operator())
    # The one time the token is shown: it is stored only as a hash.
    print(token)


def cmd_agents_list(settings: Settings, args: argparse.Namespace) -> None:
    with Store(settings) as store:
        for agent in store.list_agents():
            print(f"{agent.name}\t{','.join(agent.scopes)}\t{_when(agent.created_at)}")


def cmd_agents_revoke(settings: Settings, args: argparse.Namespace) -> None:
    with Store(settings) as store:
        store.revoke_agent(args.name, operator())
    print(f"revoked {args.name}")


def cmd_requests_list(settings: Settings, args: argparse.Namespace) -> None:
    with Store(settings) as store:
        rows = store.list_requests(args.status)
        calls = {r.id: store.get_call(r.id) for r in rows}
        policies = {r.secret: store.get_policy(r.secret) for r in rows if calls[r.id]}
    if args.json:
        listed = [{**r.__dict__, "call": calls[r.id].__dict__ if calls[r.id] else None} for r in rows]
        print(json.dumps(listed, indent=2))
        return
    for r in rows:
        call = calls[r.id]
        # Everything the agent wrote is escaped: a newline, an escape sequence or a bidi override in a
        # reason or a header must not forge a line of this listing.
        print(
            f"{r.id}\t{r.status}\t{visible(r.agent)}\t{visible(r.secret)}\t{_when(r.created_at)}\t"
            f"reason: {visible(r.reason)}"
        )
        if call is not None:
            for line in _call_lines(call, policies.get(r.secret)):
                print(f"\t{line}")


def _call_lines(call: Call, policy: Policy | None) -> list[str]:
    return [
        f"call {visible(call.method)} {visible(call.url)} body {call.body_size} B sha256 {call.body_sha256}",
        *(f"header {line}" for lines in header_lines(call, policy) for line in lines),
    ]


def _decide(settings: Settings, request_id: str, approve: bool, grant: int = 0, calls: int | None = None) -> None:
    with Store(settings) as store:
        decision = store.decide(request_id, approve, operator(), grant, calls)
        rule = store.request_rule(request_id)
        call = store.get_call(request_id)
        policy = store.get_policy(decision.request.secret) if call else None
    req = decision.request
    if decision.vote == "repeated":
        raise CliError(
            f"the operator already approved {request_id} ({decision.votes} of {rule.needed}); "
            "the CLI counts as one approver: the others approve in Telegram"
        )
    if not decision.changed:
        raise CliError(f"request {request_id} is already {req.status}; a decision is final")
    if req.status == "pending":
        print(
            f"approval counted for {req.id}: {decision.votes} of {rule.needed} distinct approvers; "
            f"{rule.needed - decision.votes} more needed in Telegram"
        )
        return
    print(f"{req.status} {req.id} ({visible(req.agent)} asked for {visible(req.secret)})")
    if req.status == "approved" and decision.votes and decision.votes < rule.needed:
        print(f"  by the operator alone: the rule lets the operator decide ({decision.votes} of {rule.needed} votes)")
    if call is not None:
        for line in _call_lines(call, policy):
            print(f"  {line}")


def cmd_approve(settings: Settings, args: argparse.Namespace) -> None:
    try:
        grant = parse_length(args.grant_for) if args.grant_for else 0
    except GrantError as exc:
        raise CliError(f"--for: {exc}") from None
    if args.calls is not None and (not grant or args.calls < 1):
        raise CliError("--calls N (N >= 1) needs --for: it bounds a grant's calls")
    _decide(settings, args.id, True, grant, args.calls)
    if grant:
        print("  granted: the same agent's next requests for this secret are approved at once until it ends")


def cmd_deny(settings: Settings, args: argparse.Namespace) -> None:
    _decide(settings, args.id, False)


def cmd_grants_list(settings: Settings, args: argparse.Namespace) -> None:
    with Store(settings) as store:
        grants = store.list_grants(live_only=not args.all)
    for g in grants:
        scope = f"{g.method} {g.url_prefix}" if g.method else "retrieval"
        ends = "until revoked" if g.expires_at is None else f"until {_when(g.expires_at)}"
        calls = "-" if g.calls_left is None else str(g.calls_left)
        ended = f"ended {_when(g.ended_at)}: {g.ended_why}" if g.ended_at else "live"
        print(
            f"{g.id}	{visible(g.agent)}	{visible(g.secret)}	{visible(scope)}	calls left {calls}	{ends}	"
            f"by {g.granted_by}	{ended}"
        )


def cmd_grants_revoke(settings: Settings, args: argparse.Namespace) -> None:
    with Store(settings) as store:
        store.revoke_grant(args.id, operator())
    print(f"revoked {args.id}: it approves nothing more")


def cmd_audit_show(settings: Settings, args: argparse.Namespace) -> None:
    with Store(settings) as store:
        for e in store.audit_entries(args.limit):
            detail = json.dumps(e.detail, sort_keys=True) if e.detail else ""
            print(f"{e.seq}\t{_when(e.ts)}\t{e.actor}\t{e.action}\t{e.request_id or '-'}\t{e.secret or '-'}\t{detail}")


def cmd_audit_verify(settings: Settings, args: argparse.Namespace) -> None:
    with Store(settings) as store:
        problems = store.audit_verify()
        count = len(store.audit_entries())
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        raise CliError(f"audit log is NOT intact: {len(problems)} problem(s)")
    print(f"audit log intact: {count} entries")


def cmd_backup(settings: Settings, args: argparse.Namespace) -> None:
    """A consistent copy of the store and its master key, as one archive on stdout (for the host to seal)."""
    from .backup import make_archive

    if sys.stdout.isatty():
        raise CliError("the archive holds the master key and is binary; redirect it (the host seals it at once)")
    sys.stdout.buffer.write(make_archive(settings))
    sys.stdout.buffer.flush()


def cmd_restore_stage(settings: Settings, args: argparse.Namespace) -> None:
    from .restore import read_bounded, stage

    print(json.dumps(stage(settings, read_bounded(sys.stdin.buffer)), sort_keys=True))


def cmd_restore_apply_staged(settings: Settings, args: argparse.Namespace) -> None:
    from .restore import apply_staged

    print(json.dumps(apply_staged(settings), sort_keys=True))


def cmd_restore_state(settings: Settings, args: argparse.Namespace) -> None:
    from .restore import state

    print(json.dumps(state(settings), sort_keys=True))


def cmd_rotate(settings: Settings, args: argparse.Namespace) -> None:
    with Store(settings) as store:
        key_id = store.rotate_master_key(operator())
    print(f"master key rotated; new key id {key_id}")


def cmd_telegram_retry_now(settings: Settings, args: argparse.Namespace) -> None:
    """SIGUSR1 to the running `proxy serve`: its Telegram bot stops waiting out a backoff and retries now."""
    done = retry_telegram_now(args.pid)
    if settings.telegram_enabled:
        print(f"asked proxy serve (pid {done.pid}, from {done.how}) to retry Telegram now")
    else:
        print(
            f"signalled proxy serve (pid {done.pid}, from {done.how}); Telegram is not configured in "
            f"{settings.data_dir}, so it has no bot to wake"
        )


def cmd_demo(settings: Settings, args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(port=args.port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m proxy", description="secret-proxy operator CLI")
    p.add_argument("--data-dir", help="data directory (default: $SECRET_PROXY_DATA_DIR or /var/lib/secret-proxy)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("init", help="create the data directory, master key and database").set_defaults(fn=cmd_init)
    s = sub.add_parser("serve", help="run the HTTP API (and the Telegram bot when configured)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--metrics-listen", metavar="IP:PORT", help="serve the metrics there (a loopback address only)")
    s.set_defaults(fn=cmd_serve)
    s = sub.add_parser("metrics", help="print the running proxy's figures from its loopback metrics listener")
    s.add_argument("--from", dest="source", metavar="IP:PORT", help="the listener (default: metrics_listen)")
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(fn=cmd_metrics)

    secrets = sub.add_parser("secrets", help="manage secret values").add_subparsers(dest="sub", required=True)
    s = secrets.add_parser("set", help="store a value read from stdin, with how it may be used")
    s.add_argument("name")
    s.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="URL",
        help="a destination for brokered calls: https://host[:port][/path/prefix] (repeatable)",
    )
    s.add_argument(
        "--allow-private",
        action="append",
        default=[],
        metavar="URL",
        help="like --allow, and the host may resolve to a loopback or private address",
    )
    s.add_argument(
        "--inject",
        metavar="SPEC",
        help="how the value goes into a call: 'Header: ...{value}...', 'query:NAME' or 'basic:USER'",
    )
    s.add_argument(
        "--allow-header",
        action="append",
        default=[],
        metavar="NAME",
        help="let the agent send this routing header (X-HTTP-Method-Override, X-Forwarded-Host, ...); "
        "refused by default because it changes where or how the destination routes the call (repeatable)",
    )
    _approval_flags(s)
    s.set_defaults(fn=cmd_secrets_set)
    s = secrets.add_parser(
        "approval",
        help="change how much approval a secret needs or whether it may be retrieved (value and policy stay)",
    )
    s.add_argument("name")
    _approval_flags(s)
    s.set_defaults(fn=cmd_secrets_approval)
    s = secrets.add_parser("show", help="a secret's use policy and approval rule (never its value)")
    s.add_argument("name")
    s.set_defaults(fn=cmd_secrets_show)
    secrets.add_parser("list", help="list names (never values)").set_defaults(fn=cmd_secrets_list)
    secrets.add_parser(
        "destinations", help="scheme://host:port of every policy, as JSON (for the host's egress list)"
    ).set_defaults(fn=cmd_secrets_destinations)
    s = secrets.add_parser("delete")
    s.add_argument("name")
    s.set_defaults(fn=cmd_secrets_delete)

    agents = sub.add_parser("agents", help="manage agent tokens").add_subparsers(dest="sub", required=True)
    s = agents.add_parser("add", help="create an agent; prints its token once")
    s.add_argument("name")
    s.add_argument("--secrets", required=True, help="comma-separated glob patterns of secret names")
    s.set_defaults(fn=cmd_agents_add)
    agents.add_parser("list").set_defaults(fn=cmd_agents_list)
    s = agents.add_parser("revoke")
    s.add_argument("name")
    s.set_defaults(fn=cmd_agents_revoke)

    requests = sub.add_parser("requests", help="list requests").add_subparsers(dest="sub", required=True)
    s = requests.add_parser("list")
    s.add_argument("--status", choices=STATUSES)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_requests_list)

    for name, fn in (("approve", cmd_approve), ("deny", cmd_deny)):
        s = sub.add_parser(name, help=f"{name} a pending request")
        s.add_argument("id")
        s.set_defaults(fn=fn)
        if name == "approve":
            s.add_argument(
                "--for",
                dest="grant_for",
                metavar="LENGTH",
                help="also grant the agent this secret (for a call: the same method and destination prefix) for "
                "15m, 1h or forever (until revoked), within the secret's --max-grant",
            )
            s.add_argument("--calls", type=int, metavar="N", help="with --for: at most N more calls under the grant")

    grants = sub.add_parser("grants", help="time-boxed grants").add_subparsers(dest="sub", required=True)
    s = grants.add_parser("list", help="live grants (--all: ended ones too)")
    s.add_argument("--all", action="store_true")
    s.set_defaults(fn=cmd_grants_list)
    s = grants.add_parser("revoke", help="end a grant: it approves nothing more")
    s.add_argument("id")
    s.set_defaults(fn=cmd_grants_revoke)

    aud = sub.add_parser("audit", help="the audit log").add_subparsers(dest="sub", required=True)
    s = aud.add_parser("show")
    s.add_argument("--limit", type=int)
    s.set_defaults(fn=cmd_audit_show)
    aud.add_parser("verify", help="check the hash chain").set_defaults(fn=cmd_audit_verify)

    telegram = sub.add_parser("telegram", help="the running proxy's Telegram bot").add_subparsers(
        dest="sub", required=True
    )
    s = telegram.add_parser(
        "retry-now",
        help="make the running `proxy serve` retry Telegram now instead of waiting out its backoff (SIGUSR1)",
    )
    s.add_argument(
        "--pid",
        type=int,
        help="the server's pid (default: secret-proxy.service's MainPID); signalled only if it is a "
        "`proxy serve` of your own uid",
    )
    s.set_defaults(fn=cmd_telegram_retry_now)

    sub.add_parser(
        "backup", help="a consistent copy of the store and its master key, as an archive on stdout"
    ).set_defaults(fn=cmd_backup)
    restore = sub.add_parser("restore", help="put a backup back (staged now, applied at the next start)")
    steps = restore.add_subparsers(dest="sub", required=True)
    steps.add_parser("stage", help="check the archive on stdin whole, then stage it for the next start").set_defaults(
        fn=cmd_restore_stage
    )
    steps.add_parser(
        "apply-staged", help="swap a staged copy in (the unit's ExecStartPre: only while the proxy is down)"
    ).set_defaults(fn=cmd_restore_apply_staged)
    steps.add_parser("state", help="whether a copy is staged, and the last restore (JSON)").set_defaults(
        fn=cmd_restore_state
    )
    sub.add_parser("rotate-master-key", help="re-wrap all data keys under a new master key").set_defaults(fn=cmd_rotate)
    s = sub.add_parser("demo", help="a local round trip: request, approve, retrieve once")
    s.add_argument("--port", type=int, default=0)
    s.set_defaults(fn=cmd_demo)
    return p


def _approval_flags(s: argparse.ArgumentParser) -> None:
    retrieval = s.add_mutually_exclusive_group()
    retrieval.add_argument(
        "--retrieval",
        choices=("allowed", "refused"),
        help="whether the value may be handed out with approval (allowed, a new secret's default) or only used "
        "in brokered calls (refused); without it the secret keeps its setting, whatever else changes",
    )
    retrieval.add_argument(
        "--broker-only",
        dest="retrieval",
        action="store_const",
        const="refused",
        help="the same as --retrieval refused: never hand the value out; only use it in calls",
    )
    s.add_argument(
        "--approval",
        metavar="RULE",
        help="how much approval a request needs: auto (none; still audited and rate limited), approve "
        "(one approver, the default), quorum:N (N distinct approvers; one deny ends it; the CLI counts as one) "
        "or deny (never); without it `secrets set` keeps the secret's rule",
    )
    s.add_argument(
        "--approvers",
        metavar="ID,ID",
        help="only these Telegram user ids (from SECRET_PROXY_TELEGRAM_APPROVERS) may decide; the operator's CLI "
        "always may",
    )
    s.add_argument(
        "--operator-decides",
        action="store_true",
        help="with --approval quorum:N: the operator's CLI approval alone approves (without it the CLI is one "
        "approver of the N)",
    )
    s.add_argument(
        "--max-grant",
        metavar="LENGTH",
        help="with --approval approve: the longest grant an approver may give, 15m, 1h or forever (until revoked); "
        "without it every approval is for one use",
    )
    s.add_argument(
        "--grant-calls",
        type=int,
        metavar="N",
        help="with --max-grant: every grant approves at most N requests (calls, or retrievals); a Telegram grant "
        "button gives N, `approve --for ... --calls M` at most N",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(data_dir=args.data_dir)
        args.fn(settings, args)
    except (CliError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"error: {exc.detail} ({exc.code})", file=sys.stderr)
        return 1
    except (crypto.CryptoError, BackupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"error: permission denied: {exc.filename}; run as the proxy's user", file=sys.stderr)
        return 1
    except NoServer as exc:
        print(f"error: no server to signal: {exc}", file=sys.stderr)
        return EXIT_NO_SERVER
    except NotOurServer as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOT_OURS
    except KeyboardInterrupt:
        return 130
    return 0
