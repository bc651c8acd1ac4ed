"""Jinja for strings that come from recipes, flags and the project's launch files: jinja2's immutable sandbox
(a template cannot reach Python internals such as `cycler.__init__.__globals__`, nor change the values it is
given) with undefined names as errors, never as empty text. And `render_chats`, the one place where a tokenizer's
own chat template renders the project's chats."""

from __future__ import annotations

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from alphaalign.errors import UserError


def environment(**options) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, **options)


class ChatRejected(UserError):
    """A tokenizer's chat template refused a chat; ``index`` is the chat's place in the list rendered, so that the
    caller can name the row it came from."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def render_chats(tokenizer, chats: list[list[dict]], **options) -> list:
    """Each chat through the tokenizer's chat template (``options`` go to `apply_chat_template`). Templates refuse
    chats they were not written for, through their `raise_exception` ("System role not supported", "roles must
    alternate user/assistant"): that is an answer about the model and the data, not a crash."""
    rendered = []
    for index, chat in enumerate(chats):
        try:
            rendered.append(tokenizer.apply_chat_template(chat, **options))
        except jinja2.TemplateError as exc:
            roles = ", ".join(str(message.get("role")) for message in chat)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ChatRejected(
                f"the chat template of {tokenizer.name_or_path!r} refuses a chat of roles [{roles}] ({reason})",
                index,
            ) from None
    return rendered
