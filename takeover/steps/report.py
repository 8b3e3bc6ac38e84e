"""Step 8: the report: `report.json` in the host directory and a summary for the operator."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..host.files import write_json_atomic
from ..host.terminal import printable
from ..journal import Journal

REPORT_NAME = "report.json"


def build_report(journal: Journal, host_dir: Path, titles: Mapping[str, str]) -> dict[str, Any]:
    """`titles`: each step's name and title, in order (`steps.TITLES`; the step table imports this module)."""
    steps = []
    for step, title in titles.items():
        entry = journal.entry(step)
        steps.append(
            {
                "step": step,
                "title": title,
                "status": entry.get("status", "pending"),
                "duration_s": entry.get("duration_s"),
            }
        )
    result = {s: journal.entry(s).get("result") or {} for s in titles}
    source = result["find_vm"]
    scrub = result["scrub"]
    restart = result["restart"]
    return {
        "version": 1,
        "finished": time.time(),
        "host_dir": str(host_dir),
        "steps": steps,
        "source": {
            k: source.get(k)
            for k in ("disk", "monitor", "pid", "uid", "ready_file", "notes", "machine", "machine_proxy")
        },
        "checkpoint": result["checkpoint"],
        "first_boot": result.get("first_boot") or {},
        "disk": result["relocate"],
        "scrub": {
            "changes": scrub.get("changes", []),
            "findings": scrub.get("findings", []),
            "snapshots_removed": scrub.get("snapshots_removed", []),
            "seconds": scrub.get("seconds", {}),
            "not_blocked": scrub.get("not_blocked", []),
        },
        "keys": scrub.get("keys", {}),
        "vm": {
            k: restart.get(k)
            for k in (
                "runner",
                "pid",
                "spec",
                "uri",
                "domain",
                "persistent",
                "autostart",
                "qemu_user",
                "monitor",
                "pidfile",
                "serve_filter",
                "address_free_s",
            )
        },
        "forwards": restart.get("forwards", {}),
        "egress": restart.get("egress", {}),
        "verify": result["verify"],
        "agent_token": result["verify"].get("agent_token"),
        "revoked": result["revoke"],
        "files": {
            "disk": str(host_dir / "disk.qcow2"),
            "host_key": str(host_dir / "host_key"),
            "known_hosts": str(host_dir / "known_hosts"),
            "journal": str(journal.path),
            "report": str(host_dir / REPORT_NAME),
            "serial_log": str(host_dir / "serial.log"),
        },
    }


def write_report(report: dict[str, Any], host_dir: Path) -> Path:
    path = host_dir / REPORT_NAME
    write_json_atomic(path, report)
    return path


def summary(report: dict[str, Any]) -> str:
    """The operator's summary; each line is escaped on its own, so a value with a newline stays one line."""
    return "\n".join(printable(line) for line in _summary_lines(report))


def _endpoint(recorded: object) -> str:
    """HOST:PORT from an endpoint as the journal keeps it ({"host", "port"}; older journals wrote the text)."""
    if isinstance(recorded, dict):
        host = str(recorded.get("host", "-"))
        return f"{f'[{host}]' if ':' in host else host}:{recorded.get('port', '-')}"
    return str(recorded) if recorded else "-:-"


def _machine_lines(report: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """For a VM taken from an agent machine: where the agent reaches it now, and who else can."""
    machine = (report.get("source") or {}).get("machine")
    if not machine:
        return []
    told = (report.get("revoked") or {}).get("told_agent") or ["nothing"]
    table = (report.get("vm") or {}).get("serve_filter") or "nftables"
    url = f"http://{_endpoint(spec.get('proxy_listen'))}"
    return [
        f"Agent machine: {machine}, told SECRET_PROXY_URL={url} ({', '.join(told)})",
        f"               only that machine (and root here) reaches it: nftables table {table}",
    ]


def _summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Takeover complete."
        if all(s["status"] == "done" for s in report["steps"][:-1])
        else "Takeover report (incomplete):",
        "",
    ]
    for s in report["steps"]:
        duration = f"{s['duration_s']:.1f} s" if s.get("duration_s") is not None else "-"
        lines.append(f"  {s['title']:<34} {s['status']:<8} {duration:>9}")
    changes = report["scrub"]["changes"]
    by_action: dict[str, int] = {}
    for change in changes:
        by_action[change["action"]] = by_action.get(change["action"], 0) + 1
    lines += _cut_over_lines(report)
    lines += ["", f"Scrub: {len(changes)} changes ({', '.join(f'{n} {a}' for a, n in sorted(by_action.items()))})"]
    for finding in report["scrub"]["findings"]:
        lines.append(f"  seen: {finding}")
    keys = report.get("keys") or {}
    vm = report["vm"]
    spec = vm.get("spec") or {}
    ssh_host, _, ssh_port = _endpoint(spec.get("ssh_listen")).rpartition(":")
    lines += [
        "",
        f"VM host key:   {keys.get('vm_host_key_fingerprint', '-')} (pinned in {keys.get('known_hosts', '-')})",
        f"Host login:    {keys.get('login_key_fingerprint', '-')} ({keys.get('login_key', '-')})",
        f"Proxy:         http://{_endpoint(spec.get('proxy_listen'))} (forwarded to the VM's :3737, "
        f"{_backlog_words(report.get('forwards') or {})})",
        f"SSH:           ssh -i {keys.get('login_key', '-')} -o UserKnownHostsFile={keys.get('known_hosts', '-')} "
        f"-p {ssh_port} proxy@{ssh_host}",
        *_machine_lines(report, spec),
        f"Runner:        {vm.get('runner')} (pid {vm.get('pid')})"
        + (
            f", domain {vm.get('domain')} persistent={vm.get('persistent')} autostart={vm.get('autostart')}"
            if vm.get("runner") == "libvirt"
            else ""
        ),
        f"Egress:        {_egress_line(report.get('egress') or {})}",
        f"Disk:          {report['files']['disk']}",
        f"Report:        {report['files']['report']}",
    ]
    token = report.get("agent_token")
    if token:
        lines.append(f"Agent token:   {token['agent']} ({token['secrets']}) written to {token['token_file']}")
    lines += ["", "Not blocked by the takeover (see docs/takeover.md):"]
    lines += [f"  - {item}" for item in report["scrub"]["not_blocked"]]
    if (report.get("egress") or {}).get("filter") == "off":
        lines.append("  - the VM's outbound network (--no-egress-filter): it can reach anything this host can")
    return lines


def _cut_over_lines(report: dict[str, Any]) -> list[str]:
    """For a cut-over: how the host's VM was prepared, and how long the proxy's address had no listener."""
    first = report.get("first_boot") or {}
    if not first:
        return []
    free = (report.get("vm") or {}).get("address_free_s")
    return [
        "",
        f"Cut-over: the host's VM booted in private while the agent's served (/health after "
        f"{first.get('health_seconds', 0):.0f} s, SSH and audit checked), saved as {first.get('snapshot')};",
        "          resumed on the proxy's address "
        + (f"{free:.2f} s after the agent's QEMU quit" if isinstance(free, (int, float)) else "(time not recorded)"),
    ]


def _backlog_words(forwards: dict[str, Any]) -> str:
    backlogs = forwards.get("backlog") or {}
    if forwards.get("error") or not backlogs:
        return "listen backlog not widened everywhere: " + str(forwards.get("error", "no record"))
    return f"listen backlog {min(backlogs.values())}"


def _egress_line(egress: dict[str, Any]) -> str:
    if egress.get("filter") == "off":
        return "NOT FILTERED (--no-egress-filter)"
    if "listen" not in egress:
        return "-"
    where = ", ".join(egress.get("destinations") or []) or "nothing"
    return f"only {where}, through {egress['listen']} (python -m takeover egress list|allow|remove)"
