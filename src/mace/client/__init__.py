"""Async client SDK of a mace server: `from mace.client import AsyncClient`."""

from mace.client.client import AsyncClient
from mace.client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    MaceError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    StreamError,
)
from mace.client.retry import RetryPolicy
from mace.client.streams import ChatStream, CompletionStream, GenerationStream
from mace.client.types import (
    AdapterList,
    AdapterVersion,
    ChatResult,
    CompletionResult,
    FeedbackCounts,
    FeedbackSample,
    GenerationResult,
    Message,
    ModelInfo,
    Usage,
)
from mace.client.ws import WsChatSession
from mace.client.ws_conversation import WsConversation

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AdapterList",
    "AdapterVersion",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatResult",
    "ChatStream",
    "CompletionResult",
    "CompletionStream",
    "FeedbackCounts",
    "FeedbackSample",
    "GenerationResult",
    "GenerationStream",
    "MaceError",
    "Message",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailableError",
    "StreamError",
    "Usage",
    "WsChatSession",
    "WsConversation",
]
