"""A Telegram Bot API emulator for tests, served over real HTTP.

It speaks the part of https://core.telegram.org/bots/api that the proxy's bot
uses, the way Telegram speaks it: `/bot{TOKEN}/{method}` over GET or POST, with
parameters in the query string or a JSON, form-encoded or multipart body (values
that are objects arrive JSON-encoded inside a form, as python-telegram-bot sends
them); every answer is `{"ok": true, "result": ...}` or `{"ok": false,
"error_code": N, "description": ...}` with Telegram's error texts; `getUpdates`
long-polls with `offset`, `limit`, `timeout` and `allowed_updates`, and a second
concurrent poll ends the first with 409 as Telegram does. HTML `parse_mode` is
parsed into text and entities (offsets in UTF-16 code units), and malformed or
unsupported markup is refused with "can't parse entities", so a proxy that forgot
to escape agent text fails here as it would in production.

Not emulated: Markdown parse modes (refused as unsupported), Telegram's automatic
detection of bare URLs, mentions and hashtags in plain text, files, webhooks'
delivery (setWebhook only blocks getUpdates, as on Telegram), and flood limits.

Tests act as Telegram users with `tap` (a callback_query update, shaped as
Telegram sends it) and `send_text` (a message update, with a bot_command entity
when the text starts with `/`), inspect what the bot did with `messages`,
`answer_for` and `calls`, and take Telegram away with `go_down` / `come_back`.

In-process:
    emu = BotApiEmulator(token)
    emu.add_chat(-1001, "supergroup", "Approvers")
    emu.start("127.0.0.1", 0)          # emu.url -> SECRET_PROXY_TELEGRAM_API_URL
    ...
    emu.stop()

From another process (e.g. a QEMU guest reaches the host as 10.0.2.2):
    python -m tests.telegram_emulator --token T --host 0.0.0.0 --port 8081 \
        --control-port 8082 --chat -1001
and drive it with `EmulatorControl("http://127.0.0.1:8082")`, which offers the
same test methods over a small JSON control API that stays up while the Bot API
side is down.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import itertools
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

T = TypeVar("T")

MAX_TEXT_UTF16 = 4096
MAX_CALLBACK_DATA_BYTES = 64
MAX_POLL_SECONDS = 50  # Telegram caps long polls too; a test never needs more
UPDATE_TYPES = (
    "message",
    "edited_message",
    "channel_post",
    "edited_channel_post",
    "callback_query",
    "inline_query",
    "chosen_inline_result",
    "my_chat_member",
    "chat_member",
)
DEFAULT_UPDATE_TYPES = tuple(t for t in UPDATE_TYPES if t != "chat_member")
DOWN_MODES = ("unreachable", "error", "hang")


class ApiError(Exception):
    """A refusal answered in Telegram's error envelope."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


def bad_request(what: str) -> ApiError:
    return ApiError(400, f"Bad Request: {what}")


# -- HTML parse mode ------------------------------------------------------------

_ATTR = r"""\s+[A-Za-z-]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s>"']+))?"""
_TAG_RE = re.compile(rf"<(/?)([A-Za-z][A-Za-z0-9-]*)((?:{_ATTR})*)\s*(/?)>")
_ATTR_RE = re.compile(r"([A-Za-z-]+)(?:\s*=\s*(\"[^\"]*\"|'[^']*'|[^\s>\"']+))?")
_ENTITY_RE = re.compile(r"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|lt|gt|amp|quot);")
_SIMPLE_TAGS = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "tg-spoiler": "spoiler",
    "code": "code",
    "pre": "pre",
    "blockquote": "blockquote",
}
_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def parse_html(source: str) -> tuple[str, list[dict]]:
    """Telegram's HTML parse mode: returns (text, entities) or raises "can't parse entities"."""
    out: list[str] = []
    length = 0  # UTF-16 length of the text so far
    stack: list[tuple[str, dict]] = []
    entities: list[dict] = []
    pos = 0

    def fail(what: str) -> ApiError:
        return bad_request(f"can't parse entities: {what}")

    def byte_offset(index: int) -> int:
        return len(source[:index].encode())

    while pos < len(source):
        ch = source[pos]
        if ch == "<":
            m = _TAG_RE.match(source, pos)
            if m is None:
                raise fail(
                    f'Unsupported start tag "{source[pos + 1 : pos + 11]}" at byte offset {byte_offset(pos)}'
                    if source[pos + 1 : pos + 2] != "/"
                    else f"Unexpected end tag at byte offset {byte_offset(pos)}"
                )
            closing, name, attrs = m.group(1), m.group(2).lower(), m.group(3)
            if closing:
                if not stack or stack[-1][0] != name:
                    raise fail(f"Unexpected end tag at byte offset {byte_offset(pos)}")
                _, entity = stack.pop()
                entity["length"] = length - entity["offset"]
                if entity["length"] > 0 and entity["type"] != "_ignored":
                    entities.append(entity)
            else:
                entity = _start_entity(name, dict(_attrs(attrs)), stack, length)
                if entity is None:
                    raise fail(f'Unsupported start tag "{name}" at byte offset {byte_offset(pos)}')
                stack.append((name, entity))
            pos = m.end()
            continue
        if ch == "&":
            m = _ENTITY_RE.match(source, pos)
            if m is not None:
                ref = m.group(1)
                if ref.startswith("#"):
                    code = int(ref[2:], 16) if ref[1:2] in "xX" else int(ref[1:])
                    try:
                        decoded = chr(code)
                    except (ValueError, OverflowError):
                        raise fail(f"Invalid numeric entity at byte offset {byte_offset(pos)}") from None
                else:
                    decoded = _NAMED[ref]
                out.append(decoded)
                length += utf16_len(decoded)
                pos = m.end()
                continue
        out.append(ch)
        length += utf16_len(ch)
        pos += 1
    if stack:
        raise fail(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    return "".join(out), _sorted(entities)


def _attrs(raw: str) -> list[tuple[str, str]]:
    found = []
    for m in _ATTR_RE.finditer(raw):
        value = m.group(2) or ""
        if value[:1] in ("'", '"'):
            value = value[1:-1]
        found.append((m.group(1).lower(), _ENTITY_RE.sub(lambda e: _NAMED.get(e.group(1), e.group(0)), value)))
    return found


def _start_entity(name: str, attrs: dict[str, str], stack: list[tuple[str, dict]], offset: int) -> dict | None:
    if name in _SIMPLE_TAGS:
        kind = _SIMPLE_TAGS[name]
        if name == "blockquote" and "expandable" in attrs:
            kind = "expandable_blockquote"
        if name == "code" and stack and stack[-1][0] == "pre" and attrs.get("class", "").startswith("language-"):
            stack[-1][1]["language"] = attrs["class"][len("language-") :]
            return {"type": "_ignored", "offset": offset}
        return {"type": kind, "offset": offset}
    if name == "span":
        return {"type": "spoiler", "offset": offset} if attrs.get("class") == "tg-spoiler" else None
    if name == "a":
        href = attrs.get("href", "")
        user = re.fullmatch(r"tg://user\?id=(\d+)", href)
        if user:
            return {
                "type": "text_mention",
                "offset": offset,
                "user": {"id": int(user.group(1)), "is_bot": False, "first_name": f"User {user.group(1)}"},
            }
        return {"type": "text_link", "offset": offset, "url": href} if href else {"type": "_ignored", "offset": offset}
    if name == "tg-emoji":
        return {"type": "custom_emoji", "offset": offset, "custom_emoji_id": attrs.get("emoji-id", "")}
    return None


def _sorted(entities: list[dict]) -> list[dict]:
    return sorted(entities, key=lambda e: (e["offset"], -e["length"]))


def _strip(text: str, entities: list[dict]) -> tuple[str, list[dict]]:
    """Telegram trims surrounding whitespace and moves entities with the text."""
    lead = utf16_len(text) - utf16_len(text.lstrip())
    text = text.strip()
    total = utf16_len(text)
    kept = []
    for e in entities:
        start = max(0, e["offset"] - lead)
        end = min(total, e["offset"] - lead + e["length"])
        if end > start:
            kept.append(dict(e, offset=start, length=end - start))
    return text, kept


# -- the emulated world ---------------------------------------------------------


class BotApiEmulator:
    """One bot, its chats and users, served at `url` while started."""

    def __init__(
        self, token: str, *, bot_username: str = "secret_proxy_test_bot", bot_name: str = "Secret Proxy"
    ) -> None:
        self.token = token
        prefix = token.split(":", 1)[0]
        self.bot = {
            "id": int(prefix) if prefix.isdigit() else 777000001,
            "is_bot": True,
            "first_name": bot_name,
            "username": bot_username,
        }
        self._cond = threading.Condition()
        self._chats: dict[int, dict] = {}
        self._users: dict[int, dict] = {}
        self._messages: dict[tuple[int, int], dict] = {}
        self._sent_params: dict[tuple[int, int], list[dict]] = {}
        self._next_message_id: dict[int, int] = {}
        self._updates: list[dict] = []
        self._next_update_id = 500_000_001
        self._allowed_updates: tuple[str, ...] = DEFAULT_UPDATE_TYPES
        self._queries: dict[str, dict] = {}  # callback_query id -> the query, answered or not
        self._answers: dict[str, dict] = {}
        self._query_ids = itertools.count(4_200_000_000_000_000_001)
        self._calls: list[dict] = []
        self._poll_generation = 0
        self._webhook_url = ""
        self._commands: list[dict] = []
        self._down: str | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._control: ThreadingHTTPServer | None = None
        self._control_thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0, *, control_port: int | None = None) -> BotApiEmulator:
        """Listen on host:port (0 picks a free port); with control_port, also serve the control API."""
        self._host = host
        self._listen(port)
        if control_port is not None:
            self._control = _Server((host, control_port), _control_handler(self))
            self._control_thread = threading.Thread(
                target=self._control.serve_forever, name="tg-emu-control", daemon=True
            )
            self._control_thread.start()
        return self

    def _listen(self, port: int) -> None:
        server = _Server((self._host, port), _api_handler(self))
        self._server = server
        self._port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="tg-emu-api", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """What the bot is configured with: SECRET_PROXY_TELEGRAM_API_URL."""
        host = "127.0.0.1" if self._host in ("0.0.0.0", "") else self._host
        return f"http://{host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def control_url(self) -> str | None:
        if self._control is None:
            return None
        host = "127.0.0.1" if self._host in ("0.0.0.0", "") else self._host
        return f"http://{host}:{self._control.server_address[1]}"

    def stop(self) -> None:
        with self._cond:
            self._down = "unreachable"  # releases calls held by "hang"
        self._close_listener()
        if self._control is not None:
            self._control.shutdown()
            self._control.server_close()
            self._control = None

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._conn_lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()
        with self._cond:
            self._cond.notify_all()

    def go_down(self, mode: str = "unreachable") -> None:
        """Take Telegram away: "unreachable" refuses connections (and drops open ones),
        "error" answers every call with 502 Bad Gateway from the front end, "hang"
        accepts calls and answers none until `come_back`."""
        if mode not in DOWN_MODES:
            raise ValueError(f"mode must be one of {DOWN_MODES}, not {mode!r}")
        with self._cond:
            self._down = mode
            self._cond.notify_all()
        if mode == "unreachable":
            self._close_listener()

    def come_back(self) -> None:
        """Telegram is back on the same host and port; calls held by "hang" proceed."""
        with self._cond:
            was = self._down
            self._down = None
            self._cond.notify_all()
        if was == "unreachable":
            self._listen(self._port)

    @property
    def is_down(self) -> bool:
        return self._down is not None

    # -- the world: chats and users --------------------------------------------------
    def add_chat(self, chat_id: int, type: str = "supergroup", title: str | None = None) -> dict:
        with self._cond:
            chat = {"id": chat_id, "type": type}
            if type == "private":
                user = self._user(chat_id)
                chat.update({k: v for k, v in user.items() if k in ("first_name", "last_name", "username")})
            else:
                chat["title"] = title or f"Chat {chat_id}"
            self._chats[chat_id] = chat
            return dict(chat)

    def add_user(
        self, user_id: int, first_name: str, username: str | None = None, last_name: str | None = None
    ) -> dict:
        with self._cond:
            user = {"id": user_id, "is_bot": False, "first_name": first_name}
            if last_name:
                user["last_name"] = last_name
            if username:
                user["username"] = username
            user["language_code"] = "en"
            self._users[user_id] = user
            return dict(user)

    def _user(self, user_id: int) -> dict:
        if user_id not in self._users:
            self._users[user_id] = {
                "id": user_id,
                "is_bot": False,
                "first_name": f"User{user_id}",
                "username": f"user{user_id}",
                "language_code": "en",
            }
        return self._users[user_id]

    def _chat(self, chat_id: int) -> dict:
        chat = self._chats.get(chat_id)
        if chat is None:
            raise bad_request("chat not found")
        return chat

    # -- acting as Telegram users ---------------------------------------------------
    def tap(self, user_id: int, chat_id: int, message_id: int, data: str) -> str:
        """A user taps an inline button: enqueue the callback_query update Telegram would
        send (any data, as a modified client can send); returns the query id."""
        with self._cond:
            self._user(user_id)
            chat = self._chats.get(chat_id) or {"id": chat_id, "type": "supergroup", "title": f"Chat {chat_id}"}
            message = self._messages.get((chat_id, message_id))
            if message is None:
                # What Telegram sends for a message the bot can no longer see.
                message = {"chat": chat, "message_id": message_id, "date": 0}
            query_id = str(next(self._query_ids))
            query = {
                "id": query_id,
                "from": dict(self._users[user_id]),
                "message": json.loads(json.dumps(message)),
                "chat_instance": str((abs(chat_id) * 7919) % 10**18 + 10**17),
                "data": data,
            }
            self._queries[query_id] = query
            self._enqueue({"callback_query": query})
            return query_id

    def send_text(self, user_id: int, chat_id: int, text: str) -> int:
        """A user writes in a chat; a leading /command gets its bot_command entity."""
        with self._cond:
            user = self._user(user_id)
            if chat_id not in self._chats and chat_id == user_id:
                self.add_chat(chat_id, "private")
            chat = self._chat(chat_id)
            message = self._new_message(chat, dict(user), text)
            command = re.match(r"/[A-Za-z0-9_]{1,32}(@[A-Za-z0-9_]{3,32})?", text)
            if command:
                message["entities"] = [{"type": "bot_command", "offset": 0, "length": utf16_len(command.group(0))}]
            self._enqueue({"message": json.loads(json.dumps(message))})
            return message["message_id"]

    def post_as_bot(self, chat_id: int, text: str, reply_markup: dict | None = None) -> dict:
        """A message from this bot that the proxy did not send (another deployment, an old one)."""
        with self._cond:
            message = self._new_message(self._chat(chat_id), dict(self.bot), text)
            if reply_markup:
                message["reply_markup"] = reply_markup
            return json.loads(json.dumps(message))

    def _new_message(self, chat: dict, sender: dict, text: str) -> dict:
        message_id = self._next_message_id.get(chat["id"], 1)
        self._next_message_id[chat["id"]] = message_id + 1
        message = {"message_id": message_id, "from": sender, "chat": dict(chat), "date": int(time.time()), "text": text}
        self._messages[(chat["id"], message_id)] = message
        return message

    def _enqueue(self, body: dict) -> None:
        update = {"update_id": self._next_update_id, **body}
        self._next_update_id += 1
        self._updates.append(update)
        self._cond.notify_all()

    # -- inspection ------------------------------------------------------------------
    def messages(self, chat_id: int | None = None, *, from_bot: bool = True) -> list[dict]:
        """Messages as Telegram holds them now (after edits), oldest first."""
        with self._cond:
            found = [
                m
                for (c, _), m in sorted(self._messages.items())
                if (chat_id is None or c == chat_id) and (not from_bot or m.get("from", {}).get("id") == self.bot["id"])
            ]
            return json.loads(json.dumps(found))

    def message(self, chat_id: int, message_id: int) -> dict | None:
        with self._cond:
            found = self._messages.get((chat_id, message_id))
            return json.loads(json.dumps(found)) if found else None

    def sent_params(self, chat_id: int, message_id: int) -> list[dict]:
        """The parameters of the sendMessage and every edit of one message (parse_mode, ...)."""
        with self._cond:
            return json.loads(json.dumps(self._sent_params.get((chat_id, message_id), [])))

    def answer_for(self, callback_query_id: str) -> dict | None:
        with self._cond:
            found = self._answers.get(callback_query_id)
            return dict(found) if found else None

    def calls(self, method: str | None = None) -> list[dict]:
        """Every Bot API call that reached the emulator: {"method", "params", "status"}."""
        with self._cond:
            return [dict(c) for c in self._calls if method is None or c["method"].lower() == method.lower()]

    def pending_updates(self) -> int:
        with self._cond:
            return len(self._updates)

    def wait_for(self, predicate: Callable[[], T], timeout: float = 10.0, what: str = "the condition") -> T:
        """Poll predicate until it returns something truthy; fail after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.02)

    # -- the Bot API -------------------------------------------------------------------
    def handle(self, token: str, method: str, params: dict[str, Any]) -> Any:
        if token != self.token:
            raise ApiError(401, "Unauthorized")
        fn = _METHODS.get(method.lower())
        if fn is None:
            raise ApiError(404, "Not Found")
        return fn(self, params)

    def _log_call(self, method: str, params: dict) -> dict:
        """Record a call as it arrives (a long poll shows before it ends); status is set when answered."""
        call = {"method": method, "params": params, "status": None, "at": time.time()}
        with self._cond:
            self._calls.append(call)
        return call

    def _wait_while_hanging(self) -> bool:
        """Hold a call while Telegram hangs; False when the listener closed meanwhile."""
        with self._cond:
            while self._down == "hang":
                self._cond.wait(0.5)
            return self._down != "unreachable"

    # Methods: each takes the decoded parameters and returns `result` or raises ApiError.
    def m_get_me(self, p: dict) -> dict:
        return dict(
            self.bot,
            can_join_groups=True,
            can_read_all_group_messages=False,
            supports_inline_queries=False,
            can_connect_to_business=False,
            has_main_web_app=False,
        )

    def m_log_out(self, p: dict) -> bool:
        return True

    def m_close(self, p: dict) -> bool:
        return True

    def m_delete_webhook(self, p: dict) -> bool:
        with self._cond:
            self._webhook_url = ""
            if _bool(p.get("drop_pending_updates")):
                self._updates.clear()
        return True

    def m_set_webhook(self, p: dict) -> bool:
        url = _str(p, "url", required=False)
        if url and not url.startswith("https://"):
            raise bad_request("bad webhook: HTTPS url must be provided for webhook")
        with self._cond:
            self._webhook_url = url
        return True

    def m_get_webhook_info(self, p: dict) -> dict:
        with self._cond:
            return {
                "url": self._webhook_url,
                "has_custom_certificate": False,
                "pending_update_count": len(self._updates),
            }

    def m_get_updates(self, p: dict) -> list[dict]:
        offset = _int(p, "offset", required=False)
        limit = _int(p, "limit", required=False) or 100
        timeout = min(max(_int(p, "timeout", required=False) or 0, 0), MAX_POLL_SECONDS)
        allowed = _json(p, "allowed_updates")
        if not 1 <= limit <= 100:
            limit = 100
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._webhook_url:
                raise ApiError(
                    409,
                    "Conflict: can't use getUpdates method while webhook is active; "
                    "use deleteWebhook to delete the webhook first",
                )
            if isinstance(allowed, list):
                # Like Telegram, the setting persists until a call changes it; [] means the default set.
                self._allowed_updates = tuple(t for t in allowed if t in UPDATE_TYPES) or DEFAULT_UPDATE_TYPES
            self._poll_generation += 1
            mine = self._poll_generation
            if offset is not None:
                if offset < 0:
                    del self._updates[: max(0, len(self._updates) + offset)]
                else:
                    self._updates = [u for u in self._updates if u["update_id"] >= offset]
            while True:
                if self._poll_generation != mine:
                    raise ApiError(
                        409,
                        "Conflict: terminated by other getUpdates request; "
                        "make sure that only one bot instance is running",
                    )
                if self._down is not None:
                    raise _Dropped()
                ready = [u for u in self._updates if _update_type(u) in self._allowed_updates]
                remaining = deadline - time.monotonic()
                if ready or remaining <= 0:
                    # Updates of types the bot did not ask for are dropped, as Telegram never delivers them.
                    self._updates = [u for u in self._updates if _update_type(u) in self._allowed_updates]
                    return json.loads(json.dumps(ready[:limit]))
                self._cond.wait(min(remaining, 0.5))

    def m_send_message(self, p: dict) -> dict:
        chat_id = _chat_id(p)
        text, entities = self._formatted(p)
        markup = _markup(p)
        with self._cond:
            chat = self._chat(chat_id)
            message = self._new_message(chat, dict(self.bot), text)
            if entities:
                message["entities"] = entities
            if markup:
                message["reply_markup"] = markup
            preview = _json(p, "link_preview_options")
            if isinstance(preview, dict) and preview:
                message["link_preview_options"] = preview
            self._sent_params[(chat_id, message["message_id"])] = [dict(p, _method="sendMessage")]
            return json.loads(json.dumps(message))

    def m_edit_message_text(self, p: dict) -> dict:
        if p.get("inline_message_id"):
            raise bad_request("inline messages are not emulated")
        chat_id, message_id = _chat_id(p), _int(p, "message_id")
        text, entities = self._formatted(p)
        markup = _markup(p)
        with self._cond:
            self._chat(chat_id)
            message = self._editable(chat_id, message_id)
            if (
                message.get("text") == text
                and message.get("entities", []) == entities
                and message.get("reply_markup") == markup
            ):
                raise bad_request(
                    "message is not modified: specified new message content and reply markup "
                    "are exactly the same as a current content and reply markup of the message"
                )
            message["text"] = text
            message.pop("entities", None)
            if entities:
                message["entities"] = entities
            # Editing the text without a reply_markup removes the inline keyboard, as on Telegram.
            message.pop("reply_markup", None)
            if markup:
                message["reply_markup"] = markup
            preview = _json(p, "link_preview_options")
            if isinstance(preview, dict) and preview:
                message["link_preview_options"] = preview
            message["edit_date"] = int(time.time())
            self._sent_params.setdefault((chat_id, message_id), []).append(dict(p, _method="editMessageText"))
            return json.loads(json.dumps(message))

    def m_edit_message_reply_markup(self, p: dict) -> dict:
        if p.get("inline_message_id"):
            raise bad_request("inline messages are not emulated")
        chat_id, message_id = _chat_id(p), _int(p, "message_id")
        markup = _markup(p)
        with self._cond:
            self._chat(chat_id)
            message = self._editable(chat_id, message_id)
            if message.get("reply_markup") == markup:
                raise bad_request(
                    "message is not modified: specified new message content and reply markup "
                    "are exactly the same as a current content and reply markup of the message"
                )
            message.pop("reply_markup", None)
            if markup:
                message["reply_markup"] = markup
            message["edit_date"] = int(time.time())
            self._sent_params.setdefault((chat_id, message_id), []).append(dict(p, _method="editMessageReplyMarkup"))
            return json.loads(json.dumps(message))

    def m_delete_message(self, p: dict) -> bool:
        chat_id, message_id = _chat_id(p), _int(p, "message_id")
        with self._cond:
            self._chat(chat_id)
            if self._messages.pop((chat_id, message_id), None) is None:
                raise bad_request("message to delete not found")
        return True

    def m_answer_callback_query(self, p: dict) -> bool:
        query_id = _str(p, "callback_query_id")
        text = _str(p, "text", required=False)
        if len(text) > 200:
            raise bad_request("MESSAGE_TOO_LONG")
        with self._cond:
            if query_id not in self._queries or query_id in self._answers:
                raise bad_request("query is too old and response timeout expired or query ID is invalid")
            self._answers[query_id] = {
                "callback_query_id": query_id,
                "text": text,
                "show_alert": _bool(p.get("show_alert")),
                "url": p.get("url"),
                "at": time.time(),
            }
        return True

    def m_set_my_commands(self, p: dict) -> bool:
        commands = _json(p, "commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise bad_request("commands must be a list of at most 100 BotCommand objects")
        for c in commands:
            if (
                not isinstance(c, dict)
                or not re.fullmatch(r"[a-z0-9_]{1,32}", str(c.get("command", "")))
                or not 1 <= len(str(c.get("description", ""))) <= 256
            ):
                raise bad_request("BOT_COMMAND_INVALID")
        with self._cond:
            self._commands = commands
        return True

    def m_get_my_commands(self, p: dict) -> list[dict]:
        with self._cond:
            return list(self._commands)

    def m_delete_my_commands(self, p: dict) -> bool:
        with self._cond:
            self._commands = []
        return True

    # -- helpers for the methods -------------------------------------------------------
    def _formatted(self, p: dict) -> tuple[str, list[dict]]:
        raw = _str(p, "text")
        mode = _str(p, "parse_mode", required=False)
        explicit = _json(p, "entities")
        if isinstance(explicit, list):
            text, entities = raw, _sorted([dict(e) for e in explicit])
        elif mode == "":
            text, entities = raw, []
        elif mode.lower() == "html":
            text, entities = parse_html(raw)
        else:
            raise bad_request(
                "unsupported parse_mode"
                if mode.lower() not in ("markdown", "markdownv2")
                else f"{mode} is not emulated; use HTML or no parse_mode"
            )
        text, entities = _strip(text, entities)
        if not text:
            raise bad_request("message text is empty")
        if utf16_len(text) > MAX_TEXT_UTF16:
            raise bad_request("message is too long")
        return text, entities

    def _editable(self, chat_id: int, message_id: int) -> dict:
        message = self._messages.get((chat_id, message_id))
        if message is None:
            raise bad_request("message to edit not found")
        if message.get("from", {}).get("id") != self.bot["id"]:
            raise bad_request("message can't be edited")
        return message


class _Dropped(Exception):
    """The connection goes away without an answer (Telegram became unreachable)."""


def _method_name(fn_name: str) -> str:
    parts = fn_name[2:].split("_")
    return (parts[0] + "".join(p.title() for p in parts[1:])).lower()


_METHODS: dict[str, Callable[[BotApiEmulator, dict], Any]] = {
    _method_name(name): fn for name, fn in vars(BotApiEmulator).items() if name.startswith("m_")
}


def _update_type(update: dict) -> str:
    return next(k for k in update if k != "update_id")


def _str(p: dict, name: str, *, required: bool = True) -> str:
    value = p.get(name)
    if value is None:
        if required:
            raise bad_request(f"{name} is empty" if name == "text" else f'parameter "{name}" is required')
        return ""
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _int(p: dict, name: str, *, required: bool = True) -> int | None:
    value = p.get(name)
    if value is None or value == "":
        if required:
            raise bad_request(f'parameter "{name}" is required')
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise bad_request(f"invalid {name} specified") from None


def _chat_id(p: dict) -> int:
    value = p.get("chat_id")
    if isinstance(value, str) and value.startswith("@"):
        raise bad_request("chat not found")
    chat_id = _int(p, "chat_id")
    assert chat_id is not None
    return chat_id


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("true", "1")


def _json(p: dict, name: str) -> Any:
    """Object-valued parameters arrive as JSON text inside forms and as objects in JSON bodies."""
    value = p.get(name)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise bad_request(f"can't parse {name} JSON object") from None
    return value


def _markup(p: dict) -> dict | None:
    markup = _json(p, "reply_markup")
    if markup is None:
        return None
    if not isinstance(markup, dict):
        raise bad_request("can't parse reply keyboard markup JSON object")
    keyboard = markup.get("inline_keyboard")
    if keyboard is None:
        raise bad_request("only inline keyboards are emulated")
    if not isinstance(keyboard, list) or not all(isinstance(row, list) for row in keyboard):
        raise bad_request('field "inline_keyboard" of the InlineKeyboardMarkup must be an Array of Arrays')
    for row in keyboard:
        for button in row:
            if not isinstance(button, dict) or not button.get("text"):
                raise bad_request("BUTTON_TEXT_INVALID" if isinstance(button, dict) else "can't parse button")
            kinds = [
                k
                for k in (
                    "callback_data",
                    "url",
                    "switch_inline_query",
                    "switch_inline_query_current_chat",
                    "web_app",
                    "login_url",
                    "pay",
                    "copy_text",
                    "callback_game",
                )
                if k in button
            ]
            if len(kinds) != 1:
                raise bad_request('can\'t find field "callback_data"' if not kinds else "BUTTON_TYPE_INVALID")
            if "callback_data" in button:
                data = button["callback_data"]
                if not isinstance(data, str) or not 1 <= len(data.encode()) <= MAX_CALLBACK_DATA_BYTES:
                    raise bad_request("BUTTON_DATA_INVALID")
            if "url" in button and not re.match(r"^(https?|tg)://", str(button["url"])):
                raise bad_request("BUTTON_URL_INVALID")
    if not any(keyboard):
        return None  # an empty keyboard is no keyboard
    return {"inline_keyboard": keyboard}


# -- HTTP ---------------------------------------------------------------------------

_PATH_RE = re.compile(r"^/bot([^/]*)/([A-Za-z]+)$")


def _decode_params(handler: BaseHTTPRequestHandler, body: bytes) -> dict[str, Any]:
    """Query string, then the body: JSON, form-encoded or multipart, as Telegram accepts."""
    params: dict[str, Any] = {}
    query = urllib.parse.urlsplit(handler.path).query
    params.update({k: v[-1] for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items()})
    ctype = handler.headers.get("Content-Type", "")
    if not body:
        return params
    if ctype.startswith("application/json"):
        try:
            decoded = json.loads(body)
        except ValueError:
            raise bad_request("can't parse JSON") from None
        if not isinstance(decoded, dict):
            raise bad_request("can't parse JSON object")
        params.update(decoded)
    elif ctype.startswith("application/x-www-form-urlencoded"):
        params.update(
            {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}
        )
    elif ctype.startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body
        )
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name:
                payload = part.get_payload(decode=True) or b""
                params[name] = payload.decode("utf-8", "replace") if part.get_filename() is None else payload
    return params


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up mid-answer (a cancelled long poll, go_down); that is not news


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx's pool expects from Telegram
    emulator: BotApiEmulator
    dropped_when_down = False  # Bot API connections die with Telegram; control connections do not

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # the request line holds the token; tests inspect `calls()` instead

    def setup(self) -> None:
        super().setup()
        if self.dropped_when_down:
            with self.emulator._conn_lock:
                self.emulator._connections.add(self.connection)

    def finish(self) -> None:
        if self.dropped_when_down:
            with self.emulator._conn_lock:
                self.emulator._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def _api_handler(emulator: BotApiEmulator) -> type[BaseHTTPRequestHandler]:
    class ApiHandler(_Handler):
        dropped_when_down = True

        def do_GET(self) -> None:
            self._dispatch()

        def do_POST(self) -> None:
            self._dispatch()

        def _dispatch(self) -> None:
            body = self._body()
            emu = self.emulator
            if emu._down == "hang" and not emu._wait_while_hanging():
                self.close_connection = True
                return
            if emu._down == "unreachable":
                self.close_connection = True
                return
            if emu._down == "error":
                self._send(
                    502,
                    b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>"
                    b"502 Bad Gateway</h1></center><hr><center>nginx/1.18.0</center></body></html>\r\n",
                    "text/html",
                )
                return
            m = _PATH_RE.match(urllib.parse.urlsplit(self.path).path)
            if m is None:
                self._send(404, json.dumps({"ok": False, "error_code": 404, "description": "Not Found"}).encode())
                return
            token, method = m.group(1), m.group(2)
            call: dict = {}
            try:
                params = _decode_params(self, body)
                if token == emu.token:
                    call = emu._log_call(method, params)
                result = emu.handle(token, method, params)
            except _Dropped:
                call["status"] = "dropped"
                self.close_connection = True
                return
            except ApiError as err:
                call["status"] = err.code
                self._send(
                    err.code, json.dumps({"ok": False, "error_code": err.code, "description": err.description}).encode()
                )
                return
            call["status"] = 200
            self._send(200, json.dumps({"ok": True, "result": result}).encode())

    ApiHandler.emulator = emulator
    return ApiHandler


def _control_handler(emulator: BotApiEmulator) -> type[BaseHTTPRequestHandler]:
    """POST /tap, /send_text, /chats, /users, /down, /up; GET /messages, /answers/{id}, /calls."""

    class ControlHandler(_Handler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            emu = self.emulator
            if url.path == "/messages":
                chat = int(query["chat_id"]) if "chat_id" in query else None
                self._json(200, emu.messages(chat, from_bot=query.get("from_bot", "1") == "1"))
            elif url.path.startswith("/answers/"):
                self._json(200, emu.answer_for(url.path.rsplit("/", 1)[1]))
            elif url.path == "/calls":
                self._json(200, emu.calls(query.get("method")))
            else:
                self._json(404, {"error": "not_found"})

        def do_POST(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            try:
                body = json.loads(self._body() or b"{}")
            except ValueError:
                self._json(400, {"error": "send a JSON object"})
                return
            emu = self.emulator
            try:
                if path == "/tap":
                    result: Any = {
                        "callback_query_id": emu.tap(
                            int(body["user_id"]), int(body["chat_id"]), int(body["message_id"]), str(body["data"])
                        )
                    }
                elif path == "/send_text":
                    result = {
                        "message_id": emu.send_text(int(body["user_id"]), int(body["chat_id"]), str(body["text"]))
                    }
                elif path == "/chats":
                    result = emu.add_chat(int(body["chat_id"]), body.get("type", "supergroup"), body.get("title"))
                elif path == "/users":
                    result = emu.add_user(int(body["user_id"]), str(body["first_name"]), body.get("username"))
                elif path == "/down":
                    emu.go_down(body.get("mode", "unreachable"))
                    result = {"down": True}
                elif path == "/up":
                    emu.come_back()
                    result = {"down": False}
                else:
                    self._json(404, {"error": "not_found"})
                    return
            except (KeyError, ValueError, ApiError) as exc:
                self._json(400, {"error": str(exc)})
                return
            self._json(200, result)

        def _json(self, status: int, value: Any) -> None:
            self._send(status, json.dumps(value).encode())

    ControlHandler.emulator = emulator
    return ControlHandler


class EmulatorControl:
    """The test methods of a BotApiEmulator running in another process, over its control API."""

    def __init__(self, control_url: str, timeout: float = 10.0) -> None:
        self.base = control_url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"emulator control {path}: {err.code} {err.read()[:200]!r}") from None

    def tap(self, user_id: int, chat_id: int, message_id: int, data: str) -> str:
        return self._call(
            "POST", "/tap", {"user_id": user_id, "chat_id": chat_id, "message_id": message_id, "data": data}
        )["callback_query_id"]

    def send_text(self, user_id: int, chat_id: int, text: str) -> int:
        return self._call("POST", "/send_text", {"user_id": user_id, "chat_id": chat_id, "text": text})["message_id"]

    def add_chat(self, chat_id: int, type: str = "supergroup", title: str | None = None) -> dict:
        return self._call("POST", "/chats", {"chat_id": chat_id, "type": type, "title": title})

    def add_user(self, user_id: int, first_name: str, username: str | None = None) -> dict:
        return self._call("POST", "/users", {"user_id": user_id, "first_name": first_name, "username": username})

    def messages(self, chat_id: int | None = None, *, from_bot: bool = True) -> list[dict]:
        query = {"from_bot": "1" if from_bot else "0"}
        if chat_id is not None:
            query["chat_id"] = str(chat_id)
        return self._call("GET", "/messages?" + urllib.parse.urlencode(query))

    def answer_for(self, callback_query_id: str) -> dict | None:
        return self._call("GET", f"/answers/{callback_query_id}")

    def calls(self, method: str | None = None) -> list[dict]:
        return self._call("GET", "/calls" + (f"?method={method}" if method else ""))

    def go_down(self, mode: str = "unreachable") -> None:
        self._call("POST", "/down", {"mode": mode})

    def come_back(self) -> None:
        self._call("POST", "/up", {})

    def wait_for(self, predicate: Callable[[], T], timeout: float = 10.0, what: str = "the condition") -> T:
        return BotApiEmulator.wait_for(self, predicate, timeout, what)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tests.telegram_emulator", description="Serve a Telegram Bot API emulator until interrupted."
    )
    p.add_argument("--token", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--control-port", type=int, default=8082)
    p.add_argument("--chat", type=int, action="append", default=[], help="a group chat the bot is in (repeatable)")
    args = p.parse_args(argv)
    emu = BotApiEmulator(args.token)
    for chat in args.chat:
        emu.add_chat(chat, "supergroup", "Approvers")
    emu.start(args.host, args.port, control_port=args.control_port)
    print(f"Bot API at {emu.url} (listening on {args.host}:{emu.port}), control at {emu.control_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        emu.stop()


if __name__ == "__main__":
    main()
