"""Result types of the client SDK and the parsing of server payloads into them."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


class FeedbackSample(TypedDict, total=False):
    """A training sample for POST /v1/feedback (plain dicts of this shape work too): either `prompt` and
    `completion`, or `messages` ending with the wanted assistant answer.

    weight: how much it counts (default 1, at most 100).
    request_id: the generation it corrects, for the record.
    user: the end user it speaks for (OpenAI's `user`): it then trains that user's tenant. Needs a key
        with the `act_for_users` scope (403 otherwise); on a server without keys, `user` alone names it.
    Other fields the server reads pass through as given.
    """

    prompt: str
    completion: str
    messages: Sequence[Message | Mapping[str, Any]]
    weight: float
    request_id: str
    user: str


@dataclass(frozen=True)
class ChatResult(GenerationResult):
    """Result of a chat completion (HTTP or websocket). `messages` is the conversation it answered, as
    sent, so that `correction()` can turn the result into a feedback sample."""

    messages: tuple[Mapping[str, Any], ...] = field(default=(), hash=False)

    def correction(self, answer: str, weight: float | None = None, user: str | None = None) -> FeedbackSample:
        """The feedback sample saying that `answer` should have been the reply: the same conversation
        ending with it, linked to this result by its request id. Send it with `client.feedback()` (or
        `client.correct(result, answer)`, which does both)."""
        if not self.messages:
            raise ValueError("this result does not carry the conversation it answered")
        sample: FeedbackSample = {"messages": [*self.messages, {"role": "assistant", "content": answer}]}
        if self.request_id:
            sample["request_id"] = self.request_id
        if weight is not None:
            sample["weight"] = weight
        if user is not None:
            sample["user"] = user
        return sample


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


def feedback_payload(
    samples: FeedbackSample | Mapping[str, Any] | Sequence[Mapping[str, Any]], user: str | None = None
) -> list[dict[str, Any]]:
    """One sample or several, as the JSON list POST /v1/feedback (and the websocket) take; `user` goes
    on each sample that does not name its own."""
    if isinstance(samples, str | bytes):
        raise TypeError("feedback takes a sample (a mapping) or a sequence of them, not a string")
    items = [samples] if isinstance(samples, Mapping) else list(samples)
    payload = []
    for item in items:
        sample = dict(item)
        messages = sample.get("messages")
        if isinstance(messages, list | tuple):  # Message TypedDicts or other mappings: JSON needs dicts
            sample["messages"] = [dict(m) if isinstance(m, Mapping) else m for m in messages]
        if user is not None:
            sample.setdefault("user", user)
        payload.append(sample)
    return payload


def acknowledged_ids(payload: Any) -> list[int] | None:
    """The `ids` of a feedback acknowledgement; None when it has none."""
    ids = payload.get("ids") if isinstance(payload, dict) else None
    if not isinstance(ids, list) or not all(_is_int(i) for i in ids):
        return None
    return list(ids)


@dataclass(frozen=True)
class FeedbackCounts:
    """GET /v1/feedback: the journal's samples. `pending` wait for training, `held_out` are kept for the
    publish gate, `cursor` is the newest sample id the trainer has seen. `training` is whether the
    server learns from them (None when it does not say)."""

    total: int
    pending: int
    trained: int
    held_out: int
    cursor: int
    training: bool | None = None

    @classmethod
    def from_payload(cls, payload: Any) -> FeedbackCounts:
        if not isinstance(payload, dict) or not _is_int(payload.get("total")):
            raise ValueError(f"not journal counts: {payload!r}")
        return cls(
            total=payload["total"],
            pending=_int(payload.get("pending")),
            trained=_int(payload.get("trained")),
            held_out=_int(payload.get("held_out")),
            cursor=_int(payload.get("cursor")),
            training=_on_off(payload.get("training")),
        )


@dataclass(frozen=True)
class AdapterVersion:
    """One adapter version (0 is the base model). Losses are on held-out samples at publish time:
    `learner_loss` this version's, `serving_loss` the one it replaced (None when not measured)."""

    version: int
    is_active: bool
    serving_loss: float | None = None
    learner_loss: float | None = None
    name: str | None = None
    created_at: float | None = None
    num_optimizer_steps: int | None = None
    reason: str | None = None

    @classmethod
    def from_payload(cls, payload: Any) -> AdapterVersion:
        if not isinstance(payload, dict) or not _is_int(payload.get("version")):
            raise ValueError(f"not an adapter version: {payload!r}")
        steps = payload.get("num_optimizer_steps")
        return cls(
            version=payload["version"],
            is_active=payload.get("active") is True,
            serving_loss=_loss(payload.get("serving_loss")),
            learner_loss=_loss(payload.get("learner_loss")),
            name=_str_or_none(payload.get("name")),
            created_at=_loss(payload.get("created_at")),
            num_optimizer_steps=steps if _is_int(steps) else None,
            reason=_str_or_none(payload.get("reason")),
        )


@dataclass(frozen=True)
class AdapterList:
    """GET /v1/adapters: one tenant's versions, oldest first, and the active one. `auto_publish` is False
    while publishing is held (a version was activated by hand; activating the newest resumes it) or when
    the server does not train. `tenant` is whose lineage it is ("" the shared one; None when the server
    does not say)."""

    active: int
    auto_publish: bool
    versions: tuple[AdapterVersion, ...]
    tenant: str | None = None

    @property
    def newest(self) -> AdapterVersion:
        return max(self.versions, key=lambda version: version.version)

    @classmethod
    def from_payload(cls, payload: Any) -> AdapterList:
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list) or not data or not _is_int(payload.get("active")):
            raise ValueError(f"not an adapter list: {payload!r}")
        return cls(
            active=payload["active"],
            auto_publish=payload.get("auto_publish") is True,
            versions=tuple(AdapterVersion.from_payload(item) for item in data),
            tenant=_str_or_none(payload.get("tenant")),
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any) -> int:
    return value if _is_int(value) else 0


def _loss(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _on_off(value: Any) -> bool | None:
    if value == "on" or value is True:
        return True
    return False if value == "off" or value is False else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
