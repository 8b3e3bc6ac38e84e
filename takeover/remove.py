"""`takeover remove`: the host's VM and everything its runs made on this host, gone for good.

`stop` keeps the VM's nftables table (the next `start` needs it) and its users. Deleting the host
directory after a stop would leave the table keyed by a uid that nothing owns any more: a user
later given that uid would inherit its rules. `remove` reads the run's own records before it
deletes anything (journal.json, egress.json, users.json), then, in this order:

1. the host's VM stopped (and a libvirt domain undefined): only with `--stop` if it runs, since
   its disk and store go too; an unfinished takeover likewise (`rollback` gives the agent its VM
   back instead);
2. the forward proxy stopped, its nftables table and its config deleted (egress.release), and the
   filter of a proxy served to an agent machine (serve_back);
3. the system users the runs created (users.json; never one that existed before), unless another
   host directory's table filters that uid;
4. the host directory.

A failure stops the removal where it is, with the directory and its records kept for a rerun.
"""

from __future__ import annotations

import pwd
import shutil
from pathlib import Path
from typing import Any

from .config import TakeoverConfig
from .errors import JournalError, TakeoverError
from .host import egress, serve_back
from .host.users import created_users, delete_user
from .journal import DONE, IN_PROGRESS, JOURNAL_NAME, Journal
from .models import SourceVM
from .progress import Progress
from .runbook import require_root
from .steps.context import Context, runner_for, vm_spec


class RemoveError(TakeoverError):
    hint = "the host directory and its records are kept; fix the cause and run `python -m takeover remove` again"


def remove_host_vm(cfg: TakeoverConfig, *, stop: bool = False) -> dict[str, Any]:
    require_root()
    host_dir = cfg.host_dir
    if not ((host_dir / JOURNAL_NAME).is_file() or (host_dir / egress.RECORD_NAME).is_file()):
        raise RemoveError(
            f"{host_dir} holds no takeover (no {JOURNAL_NAME}, no {egress.RECORD_NAME}); nothing is removed",
            hint="name the host directory a takeover ran in (--host-dir)",
        )
    journal = Journal.load(host_dir)
    users = created_users(host_dir)  # read now: it goes with the directory
    shown: dict[str, Any] = {"host_dir": str(host_dir), "stopped": _stop_vm(journal, host_dir, stop=stop)}
    plan = egress.load_plan(host_dir)
    shown["egress"] = egress.release(host_dir, drop_rules=True)
    if plan is not None:
        _check_table_gone(plan, host_dir)
    if journal is not None and journal.done("find_vm"):
        source = journal.read("find_vm", SourceVM)
        if source.machine is not None:
            shown["serve_filter_removed"] = serve_back.remove(source.proxy)
    shown["users_removed"], shown["users_kept"] = _remove_users(users, host_dir)
    shutil.rmtree(host_dir)
    shown["removed"] = True
    return shown


def _stop_vm(journal: Journal | None, host_dir: Path, *, stop: bool) -> bool:
    """The host's VM stopped (True) if the runs started one and it runs; refused without `stop`."""
    if journal is None:
        return False
    unfinished = journal.state == IN_PROGRESS and not journal.done("verify")
    if unfinished and not stop:
        raise RemoveError(
            f"the takeover in {host_dir} is unfinished: the agent's VM may need its journal to come back",
            hint=f"`python -m takeover rollback --host-dir {host_dir}` first, or pass --stop to discard it",
        )
    # The cut-over's first boot runs the same disk under the same runner (as rollback stops it).
    if not (journal.state == DONE or journal.done("verify") or journal.entry("restart") or journal.entry("first_boot")):
        return False
    saved = TakeoverConfig.saved(journal.options, host_dir)  # the runner and VM the run used
    try:
        spec = vm_spec(Context(saved, host_dir, journal, Progress()))
    except (JournalError, KeyError):
        return False  # the run never got far enough to have a VM
    runner = runner_for(saved)
    pid = runner.pid(spec)
    if pid is not None and not stop:
        raise RemoveError(
            f"the host's VM in {host_dir} runs (pid {pid}); removing it deletes its disk and the proxy's store",
            hint=f"`python -m takeover stop --host-dir {host_dir}` first, or pass --stop",
        )
    stopped = runner.stop(spec, undefine=True)
    if runner.pid(spec) is not None:
        raise RemoveError(f"the host's VM in {host_dir} still runs after the stop (pid {runner.pid(spec)})")
    return stopped


def _check_table_gone(plan: egress.EgressPlan, host_dir: Path) -> None:
    try:
        uid = pwd.getpwnam(plan.qemu_user).pw_uid
    except KeyError:
        return  # no user, so no table can match it
    if egress.table_owner(uid) == str(host_dir):
        raise RemoveError(
            f"the nftables table {egress.table_name(uid)} of {host_dir} is still there",
            hint=f"`nft delete table inet {egress.table_name(uid)}`, then run `python -m takeover remove` again",
        )


def _remove_users(users: list[str], host_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The recorded users deleted. One whose uid another host directory's table filters (a later run
    reused it) is kept and said; one userdel refuses (a process of its own) stops the removal."""
    removed: list[str] = []
    kept: dict[str, str] = {}
    refused: dict[str, str] = {}
    for name in users:
        try:
            uid = pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
        suffix = name.removeprefix(egress.EGRESS_USER_PREFIX)
        qemu_uid = int(suffix) if name != suffix and suffix.isdigit() else uid  # a forward proxy's: its QEMU's
        owner = egress.table_owner(qemu_uid)
        if owner is not None and owner != str(host_dir):
            kept[name] = f"the egress table of {owner} filters uid {qemu_uid}"
            continue
        why = delete_user(name)
        if why is None:
            removed.append(name)
        else:
            refused[name] = why
    if refused:
        raise RemoveError(
            "userdel refused " + "; ".join(f"{n}: {why}" for n, why in refused.items()),
            hint="end those users' processes (the VM and its forward proxy are stopped already), "
            "then run `python -m takeover remove` again",
        )
    return removed, kept
