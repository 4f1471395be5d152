"""The OpenAI-compatible wire format `potstill serve` speaks: request bodies (pydantic), errors, response ids.

Only the fields potstill acts on are declared; unknown fields are ignored (clients send many optional ones), and
a field we cannot honour (``stream``) is refused with HTTP 400 rather than silently ignored.
"""
from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 64  # completions per request: one batch through the sampler


class APIError(Exception):
    """An error the client caused or must know about, sent as ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @property
    def kind(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, code="invalid_request", param=param)


class SamplingFields(BaseModel):
    """Fields shared by both endpoints. ``None`` (sent or omitted) means the default."""

    model_config = ConfigDict(extra="ignore")
    model: str
    n: int | None = Field(None, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise bad_request("stop strings must be non-empty", "stop")
        return stops


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the chat template as given
    role: str
    content: str | list[dict] | None = None

    def as_template_input(self) -> dict:
        """The message with its content as one string (text parts joined; other parts refused)."""
        content = self.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise bad_request("only text content parts are supported", "messages")
            content = "".join(str(part.get("text", "")) for part in content)
        return {**self.model_dump(exclude_none=True), "content": content or ""}


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# A prompt: text, a list of token ids, or a batch of either.
PromptField = str | list[int] | list[list[int]] | list[str]


class CompletionRequest(SamplingFields):
    prompt: PromptField
    max_tokens: int | None = Field(None, ge=0)  # None = 16 (OpenAI's default); 0 + echo: score the prompt only
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0)
    return_tokens_as_token_ids: bool | None = False  # vLLM's extension: tokens as "token_id:<id>"


def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
