"""Result types of the client SDK and the parsing of server payloads into them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict


class TextPart(TypedDict):
    type: Literal["text"]
    text: str


class Message(TypedDict):
    """A chat message as the server accepts it (plain dicts of this shape work too)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None
    name: NotRequired[str]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0

    @classmethod
    def from_payload(cls, payload: Any) -> Usage | None:
        """From an OpenAI `usage` object; None when absent or malformed."""
        if not isinstance(payload, dict):
            return None
        details = payload.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        try:
            prompt = int(payload["prompt_tokens"])
            completion = int(payload["completion_tokens"])
            total = int(payload.get("total_tokens", prompt + completion))
            return cls(prompt, completion, total, int(cached or 0))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class GenerationResult:
    """What a finished generation produced.

    finish_reason: "stop", "length", or "abort" when the client ended the generation early (a stream
        closed before its end, a cancelled websocket conversation).
    usage: None only when the generation was aborted before the server reported it.
    adapter_version: N of the server's system_fingerprint "mace-adapter-vN".
    request_id: the server's id ("chatcmpl-…"/"cmpl-…"); for websocket conversations, the conversation id.
    """

    text: str
    finish_reason: str
    usage: Usage | None
    adapter_version: int | None
    request_id: str
    model: str
    system_fingerprint: str | None = None


@dataclass(frozen=True)
class ChatResult(GenerationResult):
    """Result of a chat completion (HTTP or websocket)."""


@dataclass(frozen=True)
class CompletionResult(GenerationResult):
    """Result of a text completion."""


@dataclass(frozen=True)
class ModelInfo:
    id: str
    owned_by: str | None = None
    created: int | None = None
    max_model_len: int | None = None

    @classmethod
    def from_payload(cls, payload: Any) -> ModelInfo:
        if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
            raise ValueError(f"not a model object: {payload!r}")
        created, max_len = payload.get("created"), payload.get("max_model_len")
        owned_by = payload.get("owned_by")
        return cls(
            id=payload["id"],
            owned_by=owned_by if isinstance(owned_by, str) else None,
            created=created if isinstance(created, int) else None,
            max_model_len=max_len if isinstance(max_len, int) else None,
        )


_FINGERPRINT = re.compile(r"^mace-adapter-v(\d+)$")


def adapter_version_of(system_fingerprint: Any) -> int | None:
    """N of "mace-adapter-vN"; None for any other fingerprint."""
    if not isinstance(system_fingerprint, str):
        return None
    match = _FINGERPRINT.match(system_fingerprint)
    return int(match.group(1)) if match else None
