"""The chat conversation layout the data stages share: ``[{"role", "content"}, ...]`` turns with ``<|image|>``
placeholders in user turns. One checker, so the shard builder refuses exactly what the trainer's
``data.format: conversation`` would (``training.codecs.conversation_messages`` calls it on every sample).
"""

from __future__ import annotations

from typing import Any

IMAGE_PLACEHOLDER = "<|image|>"
VIDEO_PLACEHOLDER = "<|video|>"
PLACEHOLDERS = (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
CONVERSATION_ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A conversation whose layout is wrong; the message starts with the field (``conversations[1].role ...``)."""


def check_conversation(turns: Any) -> list[tuple[str, str]]:
    """``turns`` checked -> its (role, content) pairs: an optional leading system turn, then user and assistant
    alternating from user to a non-empty assistant answer; contents are strings; ``<|image|>`` and
    ``<|video|>`` in user turns only. Anything else is a `ConversationError` naming the field."""
    if not isinstance(turns, list) or not turns:
        what = "an empty list" if isinstance(turns, list) else "missing" if turns is None else type(turns).__name__
        raise ConversationError(f"conversations is {what}: the sample has no 'conversations' list (a non-empty list "
                                "of {'role', 'content'} turns)")
    out = []
    start = 1 if isinstance(turns[0], dict) and turns[0].get("role") == "system" else 0
    for i, t in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise ConversationError(f"{field} is not a {{'role', 'content'}} object")
        role, content = t.get("role"), t.get("content")
        if role not in CONVERSATION_ROLES:
            raise ConversationError(f"{field}.role {role!r} is not one of {CONVERSATION_ROLES}")
        if not isinstance(content, str):
            what = "missing" if "content" not in t else f"a {type(content).__name__}, not a string"
            raise ConversationError(f"{field}.content is {what}")
        expected = "system" if i < start else ("user", "assistant")[(i - start) % 2]
        if role != expected:
            raise ConversationError(f"{field}.role is {role!r} where {expected!r} belongs (roles out of order: an "
                                    "optional leading system turn, then user and assistant alternating from user)")
        for placeholder in PLACEHOLDERS:
            if role != "user" and placeholder in content:
                raise ConversationError(f"{field}.content: {placeholder} in the {role} turn (images and videos go "
                                        "in user turns)")
        if role == "assistant" and not content.strip():
            raise ConversationError(f"{field}.content: an empty assistant turn, nothing to learn")
        out.append((role, content))
    if out[-1][0] != "assistant":
        raise ConversationError(f"conversations: no assistant turn after conversations[{len(turns) - 1}] (a "
                                f"{out[-1][0]} turn; a conversation ends with the assistant's answer)")
    return out
