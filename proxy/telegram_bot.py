"""Human approval in Telegram: one message per request; one tap decides, or as many distinct approvers as
the secret's approval rule needs (proxy/approval.py), the message showing who approved so far.

The bot shares the event loop with uvicorn and long-polls Telegram, so the VM
needs no inbound port. The database is the source of truth for what the chat
should show: a sync loop posts every pending request that no message shows yet
and closes every message whose request left `pending` (a tap, the CLI in another
process, expiry), which is also how missed posts are caught up after Telegram
comes back. Telegram being down or slow only delays that loop; the HTTP API never
waits on it.

A tap decides only when every check passes; see `_refusal` for the order and
docs/telegram.md for what each refusal means to an approver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import warnings
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeAlias

from telegram import (
    BotCommand,
    BotCommandScopeChat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    LinkPreviewOptions,
    MaybeInaccessibleMessage,
    Update,
)
from telegram.constants import ParseMode
from telegram.error import BadRequest, ChatMigrated, Conflict, Forbidden, InvalidToken, RetryAfter, TelegramError
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, ContextTypes, ExtBot

from .approval import ApprovalRule
from .errors import StoreError
from .grants import FOREVER, within
from .state import ProxyState
from .store import REQUEST_ID_RE, Request
from .telegram_render import (
    display_name,
    grant_button_text,
    render_closed,
    render_grants,
    render_pending,
    render_pending_list,
)

log = logging.getLogger("proxy.telegram")

# What Application.builder()...job_queue(None).build() makes: the default bot and context, no job queue.
BotApp: TypeAlias = Application[
    ExtBot[None], ContextTypes.DEFAULT_TYPE, dict[Any, Any], dict[Any, Any], dict[Any, Any], None
]

# Callback data is "a:<id>" (approve once), "t:", "h:" or "r:<id>" (approve with a grant of 15 min, 1 h or
# until revoked) or "d:<id>"; ids are "req_" + 32 URL-safe characters, so 38 bytes (limit 64).
CALLBACK_RE = re.compile(rf"([adthr]):({REQUEST_ID_RE.pattern})")
GRANT_SECONDS = {"a": 0, "t": 15 * 60, "h": 60 * 60, "r": FOREVER}
# "x:<grant id>" ends a grant, from the /grants list.
END_GRANT_RE = re.compile(r"x:(gr_[A-Za-z0-9_-]{16})")
POLL_TIMEOUT_SECONDS = 10  # long-poll length; stop() cancels a poll in flight, so it never waits this out
FIRST_RETRY_SECONDS = 0.5
SYNC_EVERY_SECONDS = 1.0  # catches decisions made by another process (the CLI) and expiry
MAX_ATTEMPTS_PER_MESSAGE = 3  # a message Telegram keeps refusing must not hold up the others
STOP_TIMEOUT_SECONDS = 5.0
NO_PREVIEW = LinkPreviewOptions(is_disabled=True)  # a URL in a reason must not render a preview card

REFUSALS = {
    "not_an_approver": "You are not an approver of this proxy. Nothing was changed.",
    "wrong_chat": "Decisions are taken only in the approvers' chat. Nothing was changed.",
    "bad_callback": "This button is not one of this proxy's. Nothing was changed.",
    "unknown_request": "No such request. Nothing was changed.",
    "message_mismatch": "This button does not belong to this message. Nothing was changed.",
    "already_decided": "This request was already decided; a decision is final.",
    "expired": "This request expired undecided; the agent must ask again.",
    "not_this_secrets_approver": "You are not an approver of this secret. Nothing was changed.",
    "already_voted": "You already approved this request; it needs other approvers. Your approval counts once.",
    "grant_not_allowed": "This secret allows no grant that long. Nothing was changed.",
    "unknown_grant": "No such live grant; it may have ended already. Nothing was changed.",
}


class TelegramUnavailable(Exception):
    """Telegram cannot take our calls right now; `retry_after` is a floor for the next try.

    Messages read after "Telegram: " in the log and say what to do."""

    def __init__(self, why: str, retry_after: float = 0.0) -> None:
        super().__init__(why)
        self.retry_after = retry_after


@dataclass
class Backoff:
    """Exponential waits between attempts while Telegram is down, capped."""

    first: float
    cap: float
    failures: int = 0

    def next_delay(self) -> float:
        delay: float = min(self.cap, self.first * (2**self.failures))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class TokenRedactor(logging.Filter):
    """Replaces the bot token in every log line: the libraries put it in URLs and errors."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's problem, not ours
            return True
        if self.token in message:
            record.msg, record.args = message.replace(self.token, "<telegram-token>"), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and self.token in record.exc_text:
            record.exc_text = record.exc_text.replace(self.token, "<telegram-token>")
        if record.stack_info and self.token in record.stack_info:
            record.stack_info = record.stack_info.replace(self.token, "<telegram-token>")
        return True


def buttons(request_id: str, rule: ApprovalRule | None = None) -> InlineKeyboardMarkup:
    """Approve and Deny, and a button per grant length the request's rule allows."""
    rows = [
        [
            InlineKeyboardButton("Approve", callback_data=f"a:{request_id}"),
            InlineKeyboardButton("Deny", callback_data=f"d:{request_id}"),
        ]
    ]
    if rule is not None and rule.kind == "approve" and rule.max_grant:
        lengths = [
            InlineKeyboardButton(grant_button_text(seconds, rule.grant_calls), callback_data=f"{letter}:{request_id}")
            for letter, seconds in GRANT_SECONDS.items()
            if seconds and within(seconds, rule.max_grant)
        ]
        rows.append(lengths)
    return InlineKeyboardMarkup(rows)


def _retry_after_seconds(exc: RetryAfter) -> float:
    with warnings.catch_warnings():  # PTB 22 warns when the value is read as an int
        warnings.simplefilter("ignore")
        value = exc.retry_after
    return value.total_seconds() if hasattr(value, "total_seconds") else float(value)


def _unavailable(exc: TelegramError, chat_id: int) -> TelegramUnavailable:
    """Turn a call's failure into what the operator should know and do."""
    if isinstance(exc, RetryAfter):
        seconds = _retry_after_seconds(exc)
        return TelegramUnavailable(f"asks us to slow down for {seconds:g} s", seconds)
    if isinstance(exc, ChatMigrated):
        return TelegramUnavailable(
            f"chat {chat_id} became a supergroup; set SECRET_PROXY_TELEGRAM_CHAT_ID "
            f"to {exc.new_chat_id} and restart the proxy"
        )
    if isinstance(exc, InvalidToken):
        return TelegramUnavailable(
            "rejected the bot token; check SECRET_PROXY_TELEGRAM_TOKEN (BotFather's /token) and restart the proxy"
        )
    if isinstance(exc, (Forbidden, BadRequest)):
        return TelegramUnavailable(
            f"refused to write in chat {chat_id} ({_short(exc.message)}); "
            "add the bot to that chat and check SECRET_PROXY_TELEGRAM_CHAT_ID"
        )
    if isinstance(exc, Conflict):
        return TelegramUnavailable(
            "another process is polling with this bot token (409 Conflict); "
            "run one proxy per bot, or give each its own bot"
        )
    return TelegramUnavailable(f"unreachable ({type(exc).__name__}: {_short(exc.message)})")


def _short(text: str, limit: int = 160) -> str:
    # Errors may quote a whole HTML error page from a proxy in front of Telegram.
    return text if len(text) <= limit else text[:limit] + "…"


def _chat_level(exc: BadRequest) -> bool:
    text = exc.message.lower()
    return any(
        s in text
        for s in (
            "chat not found",
            "rights",
            "chat_write_forbidden",
            "bot is not a member",
            "have no rights",
            "not enough rights",
        )
    )


class TelegramChannel:
    """The Telegram approval channel of one running proxy.

    `start()` returns at once: connecting, polling and posting run as tasks on
    the running loop and retry with backoff while Telegram is unreachable.
    `announce(request)` only wakes the sync loop, so the HTTP handler that calls it
    never waits on Telegram. `retry_now()` (SIGUSR1) ends a backoff's wait at once. `stop()` ends
    polling and the tasks within a few seconds.
    """

    def __init__(self, state: ProxyState, *, sync_every: float = SYNC_EVERY_SECONDS) -> None:
        settings = state.settings
        self.state = state
        self.store = state.store
        self.chat_id = settings.telegram_chat_id
        self.approvers = frozenset(settings.telegram_approvers)
        self.api_url = settings.telegram_api_url.rstrip("/")
        self.sync_every = sync_every
        self._token = settings.telegram_token
        self._retry_cap = settings.telegram_retry_max_seconds
        self._redactor = TokenRedactor(self._token)
        self._redacted: list[logging.Handler] = []
        self._names: dict[int, str] = {}  # who decided, for the closed message; lost on restart
        self._attempts: dict[str, int] = {}  # per request or message: refusals that are not outages
        self._given_up: set[str] = set()
        self._posting: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._retry_now: asyncio.Event | None = None  # set by `retry_now` (SIGUSR1): end a backoff early
        self._retrying_at: float | None = None  # when the backoff being slept out ends (monotonic)
        self._ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._app: BotApp | None = None
        self._last_poll_warning = 0.0

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._hide_token_from_logs()
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._ready = asyncio.Event()
        self._app = self._build_application()
        if not self.approvers:
            log.warning(
                "SECRET_PROXY_TELEGRAM_APPROVERS is empty: every tap will be refused; set it to the "
                "approvers' Telegram user ids (comma-separated)"
            )
        log.info(
            "Telegram approvals in chat %s by %d approver(s) via %s (long polling)",
            self.chat_id,
            len(self.approvers),
            self.api_url,
        )
        self._tasks = [
            asyncio.create_task(self._connect(), name="telegram-connect"),
            asyncio.create_task(self._sync_forever(), name="telegram-sync"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        app = self._app
        if app is not None:
            if app.updater is not None and app.updater.running:
                await self._bounded(app.updater.stop(), "stopping the poll")
            if app.running:
                await self._bounded(app.stop(), "stopping update handling")
            await self._bounded(app.shutdown(), "closing connections")
        self._show_logs_again()

    async def _bounded(self, step: Awaitable[object], what: str) -> None:
        try:
            await asyncio.wait_for(step, STOP_TIMEOUT_SECONDS)
        except Exception as exc:  # stopping must finish even when Telegram hangs
            log.warning("Telegram: %s did not finish cleanly (%s)", what, type(exc).__name__)

    def announce(self, request: Request) -> None:
        """Called by the HTTP handler that created the request: wake the poster, never wait."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return  # not started: the first sync after start posts it
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:
            pass  # the loop is closing; the next start posts it

    def retry_now(self) -> None:
        """Stop waiting out a backoff: the network was just fixed, or the VM was resumed from a snapshot
        taken where Telegram was out of reach (the cut-over). Called on the loop (SIGUSR1's handler).

        The wake is kept until a backoff's wait takes it, so one that arrives during an attempt ends the
        wait after that attempt; a loop that gets through to Telegram drops it."""
        if self._retry_now is None:
            return  # not started
        self._retry_now.set()
        left = self.backoff_left()
        if left is None:
            log.info("Telegram: asked to retry now (SIGUSR1); not waiting out a backoff, nothing to cut short")
        else:
            log.info("Telegram: asked to retry now (SIGUSR1); retrying instead of in %.1f s", left)

    def backoff_left(self) -> float | None:
        """Seconds until the next attempt while a backoff is being waited out; None otherwise."""
        if self._retrying_at is None:
            return None
        return max(0.0, self._retrying_at - time.monotonic())

    async def _back_off(self, backoff: Backoff, delay: float) -> None:
        """Sleep `delay` seconds before the next attempt, or until `retry_now`.

        A wake starts the backoff again from its first delay: it says the way out has changed, and a network
        that has just come back (an egress proxy starting, a route appearing) is then found again within a
        second or two, not after the cap; a network still broken costs a few quick attempts on the way back up."""
        assert self._retry_now is not None
        self._retrying_at = time.monotonic() + delay
        try:
            await asyncio.wait_for(self._retry_now.wait(), delay)
        except TimeoutError:
            return
        finally:
            self._retrying_at = None
        self._retry_now.clear()
        backoff.reset()

    def _reached(self) -> None:
        """Telegram answered: a wake asked for before this attempt has been served."""
        if self._retry_now is not None:
            self._retry_now.clear()

    def _build_application(self) -> BotApp:
        builder = Application.builder()
        egress = self.state.settings.egress_proxy
        if egress:  # in the taken-over VM, the host's forward proxy is the only way out
            builder = builder.proxy(egress).get_updates_proxy(egress)
        app = (
            builder.token(self._token)
            .base_url(f"{self.api_url}/bot")
            .base_file_url(f"{self.api_url}/file/bot")
            .connect_timeout(5)
            .read_timeout(10)
            .write_timeout(10)
            .pool_timeout(5)
            .get_updates_connect_timeout(5)
            .get_updates_read_timeout(5)
            .get_updates_pool_timeout(5)
            .job_queue(None)
            .build()
        )
        app.add_handler(CallbackQueryHandler(self._on_tap))
        app.add_handler(CommandHandler("pending", self._on_pending))
        app.add_handler(CommandHandler("grants", self._on_grants))
        app.add_error_handler(self._on_handler_error)
        return app

    def _hide_token_from_logs(self) -> None:
        # httpx logs every request URL, which holds the token, at INFO.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)
        # PTB logs a traceback for every non-JSON answer (an HTML 502 page during an outage); the same
        # failure reaches us as a NetworkError and is logged once per outage.
        logging.getLogger("telegram.request").setLevel(logging.CRITICAL)
        handlers = {h for h in logging.getLogger().handlers}
        for logger in list(logging.Logger.manager.loggerDict.values()):
            if isinstance(logger, logging.Logger):
                handlers.update(logger.handlers)
        if logging.lastResort is not None:
            handlers.add(logging.lastResort)
        for handler in handlers:
            handler.addFilter(self._redactor)
            self._redacted.append(handler)

    def _show_logs_again(self) -> None:
        for handler in self._redacted:
            handler.removeFilter(self._redactor)
        self._redacted.clear()

    # -- connecting and polling ------------------------------------------------------------
    async def _connect(self) -> None:
        """Log in (getMe), start handling updates and long-poll; retry until it works."""
        app = self._app
        assert app is not None and self._ready is not None
        backoff = Backoff(FIRST_RETRY_SECONDS, self._retry_cap)
        last_problem = ""
        while True:
            try:
                await app.initialize()
                if not app.running:
                    await app.start()
                assert app.updater is not None
                await app.updater.start_polling(
                    timeout=POLL_TIMEOUT_SECONDS,
                    allowed_updates=["message", "callback_query"],
                    error_callback=self._on_poll_error,
                )
                break
            except (TelegramError, OSError) as exc:
                self.state.metrics.telegram_reachable.set(0)
                problem = (
                    _unavailable(exc, self.chat_id)
                    if isinstance(exc, TelegramError)
                    else TelegramUnavailable(f"unreachable ({type(exc).__name__})")
                )
                delay = max(backoff.next_delay(), problem.retry_after)
                # Once per kind of problem: an outage must not flood the log.
                level = (
                    logging.DEBUG
                    if str(problem) == last_problem
                    else (logging.ERROR if isinstance(exc, InvalidToken) else logging.WARNING)
                )
                last_problem = str(problem)
                log.log(
                    level,
                    "Telegram: cannot start the bot: %s; retrying in %.1f s. Requests are still "
                    "created and `python -m proxy approve|deny ID` still decides them.",
                    problem,
                    delay,
                )
                await self._back_off(backoff, delay)
        self._reached()
        log.info("Telegram: bot @%s is polling for updates", app.bot.username)
        self.state.metrics.telegram_reachable.set(1)
        self._ready.set()
        try:
            # Only a convenience (the command menu); /pending works without it.
            await app.bot.set_my_commands(
                [
                    BotCommand("pending", "List requests waiting for a decision"),
                    BotCommand("grants", "List live grants and end them"),
                ],
                scope=BotCommandScopeChat(self.chat_id),
            )
        except TelegramError as exc:
            log.debug("Telegram: could not register the /pending command (%s)", exc.message)

    def _on_poll_error(self, exc: TelegramError) -> None:
        # PTB retries polling on its own (up to 30 s apart); one warning a minute is enough.
        now = time.monotonic()
        self.state.metrics.telegram_reachable.set(0)
        if now - self._last_poll_warning > 60:
            self._last_poll_warning = now
            log.warning("Telegram: polling for taps failed: %s; retrying", _unavailable(exc, self.chat_id))

    async def _on_handler_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        error = context.error
        log.error(
            "Telegram: handling an update failed: %s: %s",
            type(error).__name__,
            error,
            exc_info=error if not isinstance(error, TelegramError) else None,
        )

    # -- keeping the chat in step with the database -----------------------------------------
    async def _sync_forever(self) -> None:
        assert self._ready is not None and self._wake is not None
        await self._ready.wait()
        backoff = Backoff(FIRST_RETRY_SECONDS, self._retry_cap)
        outage = False  # not backoff.failures: a wake starts the backoff again mid-outage
        while True:
            self._wake.clear()
            try:
                await self.sync_once()
            except TelegramUnavailable as problem:
                self.state.metrics.telegram_reachable.set(0)
                outage = True
                delay = max(backoff.next_delay(), problem.retry_after)
                level = logging.WARNING if backoff.failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "Telegram: %s; retrying in %.1f s. Requests are still created and "
                    "`python -m proxy approve|deny ID` still decides them.",
                    problem,
                    delay,
                )
                await self._back_off(backoff, delay)
                continue
            except Exception:  # a bug here must not end the loop that keeps the chat honest
                delay = backoff.next_delay()
                log.exception("Telegram: sync failed; retrying in %.1f s", delay)
                await self._back_off(backoff, delay)
                continue
            self._reached()
            self.state.metrics.telegram_reachable.set(1)
            if outage:
                log.info("Telegram: reachable again; the chat is up to date")
                outage = False
            backoff.reset()
            await self._wait_for_work()

    async def _wait_for_work(self) -> None:
        assert self._wake is not None
        woken = asyncio.ensure_future(self._wake.wait())
        changed = asyncio.ensure_future(self.state.changes.wait_any(self.sync_every))
        try:
            await asyncio.wait({woken, changed}, timeout=self.sync_every, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            changed.cancel()

    async def sync_once(self) -> None:
        """Close messages of requests no longer pending, then post pending requests not yet shown."""
        # Store calls go through the writer thread: they may record an expiry, a disk write.
        for req, chat_id, message_id in await self.state.write(self.store.messages_to_close):
            await self._close(req, chat_id, message_id)
        for req, chat_id, message_id, votes in await self.state.write(self.store.messages_to_refresh):
            await self._refresh(req, chat_id, message_id, votes)
        for grant, req, chat_id, message_id in await self.state.write(self.store.grants_ended_unshown):
            await self._close(req, chat_id, message_id)  # the closed message, now saying the grant ended
            await self.state.write(self.store.mark_grant_end_shown, grant.id)
        for req in await self.state.write(self.store.unposted_pending):
            if req.id not in self._given_up:
                await self._post(req)

    async def _post(self, req: Request) -> None:
        # A tap can arrive between Telegram storing the message and our recording where it is;
        # the tap handler waits on this instead of refusing the binding it cannot see yet.
        posted = self._posting[req.id] = asyncio.Event()
        try:
            await self._send(req)
        finally:
            posted.set()
            del self._posting[req.id]

    async def _send(self, req: Request) -> None:
        assert self._app is not None
        try:
            message = await self._app.bot.send_message(
                self.chat_id,
                self._pending_text(req),
                parse_mode=ParseMode.HTML,
                reply_markup=buttons(req.id, self.store.request_rule(req.id)),
                link_preview_options=NO_PREVIEW,
            )
        except BadRequest as exc:
            if _chat_level(exc):
                raise _unavailable(exc, self.chat_id) from None
            self._refused_once(req.id, f"posting request {req.id}", exc)
            return
        except TelegramError as exc:
            raise _unavailable(exc, self.chat_id) from None
        await self.state.write(self.store.remember_message, req.id, message.chat_id, message.message_id)

    def _pending_text(self, req: Request) -> str:
        return render_pending(
            req,
            self.store.get_call(req.id),
            self.store.get_policy(req.secret),
            self.store.request_rule(req.id),
            self.store.votes(req.id),
            self._names,
        )

    async def _refresh(self, req: Request, chat_id: int, message_id: int, votes: int) -> None:
        """Show a quorum's new approvals on its message, buttons kept: who approved so far, how many more."""
        assert self._app is not None
        try:
            await self._app.bot.edit_message_text(
                self._pending_text(req),
                chat_id=chat_id,
                message_id=message_id,
                parse_mode=ParseMode.HTML,
                link_preview_options=NO_PREVIEW,
                reply_markup=buttons(req.id, self.store.request_rule(req.id)),
            )
        except BadRequest as exc:
            text = exc.message.lower()
            if _chat_level(exc):
                raise _unavailable(exc, chat_id) from None
            if "not modified" not in text and not self._refused_once(
                f"refresh:{req.id}", f"updating the message for {req.id}", exc
            ):
                return
        except TelegramError as exc:
            raise _unavailable(exc, chat_id) from None
        await self.state.write(self.store.mark_votes_shown, req.id, votes)

    async def _close(self, req: Request, chat_id: int, message_id: int) -> None:
        assert self._app is not None
        try:
            await self._app.bot.edit_message_text(
                render_closed(
                    req,
                    self._names,
                    self.store.get_call(req.id),
                    self.store.get_policy(req.secret),
                    self.store.request_rule(req.id),
                    self.store.votes(req.id),
                    self.store.grant_of(req.id),
                ),
                chat_id=chat_id,
                message_id=message_id,
                parse_mode=ParseMode.HTML,
                link_preview_options=NO_PREVIEW,
                reply_markup=None,
            )
        except BadRequest as exc:
            text = exc.message.lower()
            if "not modified" in text:
                pass  # already shows the outcome (an edit whose answer was lost)
            elif "not found" in text or "can't be edited" in text:
                log.warning(
                    "Telegram: the message for %s is gone or too old to edit (%s); leaving it", req.id, exc.message
                )
            elif _chat_level(exc):
                raise _unavailable(exc, chat_id) from None
            elif not self._refused_once(f"close:{req.id}", f"closing the message for {req.id}", exc):
                return
        except TelegramError as exc:
            raise _unavailable(exc, chat_id) from None
        await self.state.write(self.store.mark_message_closed, req.id)

    def _refused_once(self, key: str, what: str, exc: BadRequest) -> bool:
        """Count a refusal aimed at one message; True once we stop retrying it."""
        self._attempts[key] = self._attempts.get(key, 0) + 1
        if self._attempts[key] < MAX_ATTEMPTS_PER_MESSAGE:
            log.warning("Telegram refused %s (%s); will retry", what, exc.message)
            return False
        self._given_up.add(key)
        log.error(
            "Telegram refused %s %d times (%s); giving up on it. Decide with `python -m proxy approve|deny ID`.",
            what,
            self._attempts[key],
            exc.message,
        )
        return True

    # -- taps -----------------------------------------------------------------------------
    async def _on_tap(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        user = query.from_user
        self._names[user.id] = display_name(user)
        actor = f"telegram:{user.id}"
        message: MaybeInaccessibleMessage | None = query.message
        chat_id = message.chat.id if message is not None else None
        message_id = message.message_id if message is not None else None
        data = query.data or ""
        if (ending := END_GRANT_RE.fullmatch(data)) is not None:
            await self._end_grant(query.id, user.id, actor, chat_id, ending.group(1))
            return
        parsed = CALLBACK_RE.fullmatch(data)
        request_id = parsed.group(2) if parsed else None
        if request_id in self._posting:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._posting[request_id].wait(), STOP_TIMEOUT_SECONDS)
        req = self.store.get_request(request_id) if request_id else None

        code = self._refusal(user.id, chat_id, message_id, parsed is not None, request_id, req)
        if code is None:
            assert request_id is not None
            letter = parsed.group(1)  # type: ignore[union-attr]
            approve = letter != "d"
            # Durable before the approver hears back: the writer returns after the COMMIT.
            # The write wakes the agent's `?wait=` when it returns (ProxyState.write).
            try:
                decision = await self.state.write(
                    self.store.decide, request_id, approve, actor, GRANT_SECONDS.get(letter, 0)
                )
            except StoreError as exc:  # a grant longer than the rule allows: a forged button; audited by decide
                if exc.kind != "grant_not_allowed":
                    raise
                await self._answer(query.id, REFUSALS["grant_not_allowed"], alert=True)
                return
            self._wake_sync()
            if decision.changed and decision.request.status == "pending":  # a quorum's vote, counted
                needed = self.store.request_rule(request_id).needed
                await self._answer(
                    query.id, f"Approval counted: {decision.votes} of {needed}. Nothing is approved yet.", alert=False
                )
                return
            if decision.changed:
                granted = " A grant started: see the message." if GRANT_SECONDS.get(letter) else ""
                await self._answer(query.id, ("Approved." + granted) if approve else "Denied.", alert=False)
                return
            # Decided or expired between our check and the write, or a vote that does not count;
            # `decide` audited that refusal.
            if decision.vote == "repeated":
                code = "already_voted"
            elif decision.vote == "not_allowed":
                code = "not_this_secrets_approver"
            else:
                code = "expired" if decision.request.status == "expired" else "already_decided"
            await self._answer(query.id, REFUSALS[code], alert=True)
            return

        detail: dict[str, object] = {"code": code, "chat_id": chat_id, "message_id": message_id}
        if code == "bad_callback":
            detail["data"] = data[:64]
        if req is not None and code in ("already_decided", "expired"):
            detail["status"] = req.status
        await self.state.write(
            self.store.record, actor, "decision.refused", request_id, req.secret if req is not None else None, **detail
        )
        await self._answer(query.id, REFUSALS[code], alert=True)

    def _refusal(
        self,
        user_id: int,
        chat_id: int | None,
        message_id: int | None,
        parsed: bool,
        request_id: str | None,
        req: Request | None,
    ) -> str | None:
        """Who, where, what, which message, then whether it is still open; None accepts the tap."""
        if user_id not in self.approvers:
            return "not_an_approver"
        if chat_id != self.chat_id:
            return "wrong_chat"
        if not parsed:
            return "bad_callback"
        if req is None:
            return "unknown_request"
        # A modified client can send any callback data with a tap; it decides only the request
        # this message was posted for, so nobody decides a request they were not shown.
        if self.store.telegram_message(req.id) != (chat_id, message_id):
            return "message_mismatch"
        # The rule the request was created under names who may decide it; a later change never widens it.
        if not self.store.request_rule(req.id).allows_approver(user_id):
            return "not_this_secrets_approver"
        if req.status == "expired":
            return "expired"
        if req.status != "pending":
            return "already_decided"
        return None

    async def _end_grant(self, query_id: str, user_id: int, actor: str, chat_id: int | None, grant_id: str) -> None:
        """An approver taps End under a grant in the /grants list: it approves nothing more."""
        code = self._outsider(user_id, chat_id)
        if code is None:
            try:
                await self.state.write(self.store.revoke_grant, grant_id, actor)
            except StoreError:
                code = "unknown_grant"
            else:
                self._wake_sync()
                await self._answer(query_id, "Grant ended: it approves nothing more.", alert=False)
                return
        await self.state.write(self.store.record, actor, "grant.refused", None, None, code=code, grant=grant_id)
        await self._answer(query_id, REFUSALS[code], alert=True)

    async def _answer(self, query_id: str, text: str, *, alert: bool) -> None:
        assert self._app is not None
        try:
            await self._app.bot.answer_callback_query(query_id, text=text, show_alert=alert)
        except TelegramError as exc:
            # The decision (or refusal) already stands; an old query simply cannot be answered any more.
            log.warning("Telegram: could not answer a tap (%s)", exc.message)

    def _outsider(self, user_id: int, chat_id: int | None) -> str | None:
        """Why a command or a grant's End button is refused: not an approver, or not in their chat."""
        if user_id not in self.approvers:
            return "not_an_approver"
        return "wrong_chat" if chat_id != self.chat_id else None

    def _wake_sync(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- /pending ---------------------------------------------------------------------------
    async def _on_pending(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user, chat = update.effective_message, update.effective_user, update.effective_chat
        if message is None or user is None or chat is None:
            return
        code = self._outsider(user.id, chat.id)
        if code is not None:
            await self.state.write(
                self.store.record, f"telegram:{user.id}", "pending.refused", None, None, code=code, chat_id=chat.id
            )
            text = (
                "Only approvers can list pending requests."
                if code == "not_an_approver"
                else "Pending requests are listed only in the approvers' chat."
            )
        else:
            text = render_pending_list(await self.state.write(self.store.list_requests, "pending"))
        try:
            await message.reply_text(text, parse_mode=ParseMode.HTML, link_preview_options=NO_PREVIEW, do_quote=False)
        except TelegramError as exc:
            log.warning("Telegram: could not answer /pending (%s)", exc.message)

    # -- /grants ----------------------------------------------------------------------------
    async def _on_grants(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The live grants, each with a button that ends it; for approvers in the approvers' chat only."""
        message, user, chat = update.effective_message, update.effective_user, update.effective_chat
        if message is None or user is None or chat is None:
            return
        code = self._outsider(user.id, chat.id)
        markup = None
        if code is not None:
            await self.state.write(
                self.store.record, f"telegram:{user.id}", "grants.refused", None, None, code=code, chat_id=chat.id
            )
            text = "Only approvers can list grants, in the approvers' chat."
        else:
            grants = await self.state.write(self.store.list_grants)
            text = render_grants(grants)
            if grants:
                markup = InlineKeyboardMarkup(
                    [[InlineKeyboardButton(f"End {g.id}", callback_data=f"x:{g.id}")] for g in grants[:20]]
                )
        try:
            await message.reply_text(
                text, parse_mode=ParseMode.HTML, link_preview_options=NO_PREVIEW, do_quote=False, reply_markup=markup
            )
        except TelegramError as exc:
            log.warning("Telegram: could not answer /grants (%s)", exc.message)
