"""The OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

Request and response shapes follow https://platform.openai.com/docs/api-reference so that the
official ``openai`` client works unchanged; streaming is server-sent events ending in ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import AsyncIterator, Literal, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tunesmith.serve.batching import GenerationRequest

router = APIRouter(prefix="/v1")


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class SamplingFields(BaseModel):
    """The settings both endpoints share (others the client may send are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[dict] = None  # {"include_usage": true}: a last chunk carries the usage, as OpenAI's

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def token_limit(self) -> int:
        return self.max_tokens or 128


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=4096)

    def token_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 128


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("prompt must be one string (or a list of one)")
        return value


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[str] = None) -> JSONResponse:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


@router.get("/models")
async def list_models(request: Request):
    created = int(time.time())
    return {"object": "list", "data": [{"id": entry["id"], "object": "model", "created": created,
                                        "owned_by": f"tunesmith:{entry['kind']}"}
                                       for entry in request.app.state.pool.list_ids()]}


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    from tunesmith.data.encode import render_prompt

    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    return await _complete(request, body, lambda tokenizer: render_prompt(tokenizer, messages), chat=True)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]

    def render(tokenizer) -> str:
        return (tokenizer.bos_token or "") + prompt

    return await _complete(request, body, render, chat=False)


async def _complete(request: Request, body: SamplingFields, render, chat: bool):
    state = request.app.state
    state.pool.spec(body.model)  # an unknown model fails here, before any streaming starts
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    generation = GenerationRequest(model_id=body.model, render=render, n=body.n, max_tokens=body.token_limit(),
                                   temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop or [],
                                   strip_leading=chat,
                                   sink=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    state.generator.submit(generation)
    response_id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    shape = _Shape(response_id, body.model, chat)
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(events, body.n, shape, generation, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts, reasons, usage = [""] * body.n, [None] * body.n, {"prompt": 0, "completion": 0}
    try:
        async for event in _events(events, body.n, request):
            if event[0] == "error":
                return error_response(500, event[1], "server_error")
            if event[0] == "usage":
                usage["prompt"] = event[1]
            elif event[0] == "delta":
                texts[event[1]] += event[2]
            elif event[0] == "done":
                reasons[event[1]] = event[2]
                usage["completion"] += event[3]
    finally:
        generation.cancel()  # a client that went away frees its batch slots at the next step
    return shape.whole(texts, reasons, usage)


async def _events(events: asyncio.Queue, choices: int, request: Optional[Request] = None) -> AsyncIterator[tuple]:
    """The worker's events for one request, until every choice is done (or an error, or the client left)."""
    done = 0
    while done < choices:
        try:
            event = await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if request is not None and await request.is_disconnected():
                return
            continue
        yield event
        if event[0] == "error":
            return
        done += event[0] == "done"


async def _stream(events: asyncio.Queue, choices: int, shape: "_Shape", generation: GenerationRequest,
                  include_usage: bool = False) -> AsyncIterator[str]:
    usage = {"prompt": 0, "completion": 0}
    try:
        if shape.chat:
            for index in range(choices):
                yield _sse(shape.chunk(index, {"role": "assistant", "content": ""}, None))
        async for event in _events(events, choices):
            if event[0] == "error":
                yield _sse({"error": {"message": event[1], "type": "server_error", "param": None, "code": None}})
                return
            if event[0] == "usage":
                usage["prompt"] = event[1]
            elif event[0] == "delta":
                yield _sse(shape.chunk(event[1], {"content": event[2]} if shape.chat else event[2], None))
            elif event[0] == "done":
                usage["completion"] += event[3]
                yield _sse(shape.chunk(event[1], {} if shape.chat else "", event[2]))
        if include_usage:
            yield _sse(shape.usage_chunk(usage))
        yield "data: [DONE]\n\n"
    finally:
        generation.cancel()  # the client disconnected mid-stream (or all is sent): free the slots


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Shape:
    """Builds response objects of the chat or the completions flavour."""

    def __init__(self, response_id: str, model: str, chat: bool) -> None:
        self.id, self.model, self.chat, self.created = response_id, model, chat, int(time.time())

    def _envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, index: int, delta, finish_reason: Optional[str]) -> dict:
        if self.chat:
            return self._envelope("chat.completion.chunk",
                                  [{"index": index, "delta": delta, "finish_reason": finish_reason}])
        return self._envelope("text_completion",
                              [{"index": index, "text": delta, "logprobs": None, "finish_reason": finish_reason}])

    def usage_chunk(self, usage: dict) -> dict:
        """The last chunk of a stream asked with ``stream_options.include_usage``: no choices, the usage."""
        chunk = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        chunk["usage"] = {"prompt_tokens": usage["prompt"], "completion_tokens": usage["completion"],
                          "total_tokens": usage["prompt"] + usage["completion"]}
        return chunk

    def whole(self, texts: list[str], reasons: list[Optional[str]], usage: dict) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                       for i, (text, reason) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                       for i, (text, reason) in enumerate(zip(texts, reasons))]
        body = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        body["usage"] = {"prompt_tokens": usage["prompt"], "completion_tokens": usage["completion"],
                         "total_tokens": usage["prompt"] + usage["completion"]}
        return body
