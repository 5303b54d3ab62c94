"""The OpenAI API's request bodies as dsq's server reads them, and its error body
({"error": {"message", "type", "param", "code"}})."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": type, "param": param, "code": code}


# OpenAI fields that change the answer and that dsq does not implement: refused unless left neutral, so that a
# client never gets, say, an unpenalized answer to a presence_penalty it asked for. Other unknown fields are ignored.
UNSUPPORTED = ("frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "best_of", "echo",
               "suffix", "tools", "functions", "response_format")
NEUTRAL = {"best_of": (None, 1), "response_format": (None, {"type": "text"})}  # the rest: None, 0 (or False), {}, []


class Sampled(BaseModel):
    """The fields both endpoints share; known ones must have their type, unknown ones are kept (`unsupported`)."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None

    @field_validator("temperature", "top_p", "top_k", "n", "stream", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        """Clients (LangChain among them) send null for a field they leave unset."""
        return cls.model_fields[info.field_name].default if value is None else value

    def unsupported(self) -> str | None:
        """The first field of UNSUPPORTED this request sets to something other than a neutral value."""
        extra = self.model_extra or {}
        neutral = lambda k: any(extra[k] == v for v in NEUTRAL.get(k, (None, 0, {}, [])))  # 0 == False
        return next((k for k in UNSUPPORTED if k in extra and not neutral(k)), None)


class CompletionBody(Sampled):
    prompt: str | list[int]


class Message(BaseModel):
    """One chat message; content as a string or as OpenAI's text parts ([{"type": "text", "text": ...}])."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]  # what the DeepSeek-V2 chat template renders
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content: str | list[dict[str, Any]]) -> str:
        if isinstance(content, str):
            return content
        kinds = [p.get("type") for p in content if p.get("type") != "text"]
        if kinds:
            raise ValueError(f"only text parts ({{'type': 'text', 'text': ...}}) are read, not {kinds[0]!r}")
        if not all(isinstance(p.get("text"), str) for p in content):
            raise ValueError("a text part's 'text' must be a string")
        return "".join(p["text"] for p in content)


class ChatBody(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
