"""Generation for concurrent requests: collected for a few milliseconds, then generated together.

One worker thread owns the models. Requests that can share a batch (same model id and the same
sampling settings; a request with a ``seed`` is generated alone so that its seed means the same
every time) are left-padded into one ``model.generate`` call. A streamer splits each new token
column back into the rows, so streaming and non-streaming requests are batched alike; each row
stops on its own end-of-sequence token, stop string or token limit.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from tunesmith.serve.pool import ModelPool

logger = logging.getLogger(__name__)

Sink = Callable[[tuple], None]  # receives ("delta", row, text) / ("done", row, reason, tokens) / ("usage", n) / ("error", msg)


@dataclass
class GenerationRequest:
    """One API request: ``render(tokenizer)`` gives its prompt text, generated ``n`` times."""

    model_id: str
    render: Callable[[object], str]
    sink: Sink
    n: int = 1
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    strip_leading: bool = False  # chat replies start without the template's separating space
    serial: int = 0

    def batch_key(self) -> tuple:
        sampling = self.temperature > 0
        alone = self.serial if self.seed is not None else None
        return (self.model_id, sampling, self.temperature if sampling else 0.0, self.top_p if sampling else 1.0, alone)


class _Row:
    """One choice being generated: incremental decoding, stop strings, its own limit."""

    def __init__(self, request: GenerationRequest, index: int, tokenizer, eos_ids: set[int]) -> None:
        self.request, self.index, self.tokenizer, self.eos_ids = request, index, tokenizer, eos_ids
        self.ids: list[int] = []
        self.sent = ""
        self.finished = False

    def feed(self, token: int) -> None:
        if self.finished:
            return
        if token in self.eos_ids:
            return self.finish("stop")
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.request.strip_leading:
            text = text.lstrip()
        for stop in self.request.stop:
            position = text.find(stop)
            if position >= 0:
                self._send(text[:position])
                return self.finish("stop")
        if len(self.ids) >= self.request.max_tokens:
            self._send(text)
            return self.finish("length")
        if text.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        self._send(text[: len(text) - self._held_back(text)])

    def _held_back(self, text: str) -> int:
        """Characters kept back because they could be the start of a stop string."""
        longest = 0
        for stop in self.request.stop:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    longest = max(longest, size)
                    break
        return longest

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.request.sink(("delta", self.index, text[len(self.sent):]))
            self.sent = text

    def finish(self, reason: str) -> None:
        if not self.finished:
            self.finished = True
            self.request.sink(("done", self.index, reason, len(self.ids)))


class _RowStreamer:
    """The ``streamer`` of ``model.generate``: the first call is the prompt, then one token column per step."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows, self.prompt_seen = rows, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(len(self.rows), -1)[:, -1].tolist()):
            row.feed(token)

    def end(self) -> None:
        for row in self.rows:
            row.finish("length")


class _RowsDone:
    """A stopping criterion: a row is done once it hit its own stop; generation ends when all are."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([row.finished for row in self.rows], device=input_ids.device)


class BatchingGenerator:
    """The worker thread that collects requests and generates them in batches.

    Args:
        pool: Where models come from.
        window_s: How long the worker waits for more requests after the first arrives.
        max_batch: Most rows generated together.
    """

    def __init__(self, pool: ModelPool, window_s: float = 0.01, max_batch: int = 32) -> None:
        self.pool, self.window_s, self.max_batch = pool, window_s, max_batch
        self.queue: queue.Queue[Optional[GenerationRequest]] = queue.Queue()
        self.serials = itertools.count()
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)  # rows per generate call (recent)
        self.thread = threading.Thread(target=self._run, name="tunesmith-generate", daemon=True)
        self.thread.start()

    def submit(self, request: GenerationRequest) -> None:
        request.serial = next(self.serials)
        self.queue.put(request)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            time.sleep(self.window_s)
            pending, closing = [first], False
            while True:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                pending.append(item)
            for group in self._groups(pending):
                self._generate_safely(group)
            if closing:
                return

    def _groups(self, pending: list[GenerationRequest]) -> list[list[GenerationRequest]]:
        by_key: dict[tuple, list[list[GenerationRequest]]] = {}
        for request in pending:
            batches = by_key.setdefault(request.batch_key(), [[]])
            if batches[-1] and sum(r.n for r in batches[-1]) + request.n > self.max_batch:
                batches.append([])
            batches[-1].append(request)
        return [batch for batches in by_key.values() for batch in batches]

    def _generate_safely(self, group: list[GenerationRequest]) -> None:
        try:
            self._generate(group)
        except Exception as error:  # a bad request must not stop the worker: tell its callers why
            logger.exception("generation failed")
            for request in group:
                request.sink(("error", f"{type(error).__name__}: {error}"))

    @torch.no_grad()
    def _generate(self, group: list[GenerationRequest]) -> None:
        from tunesmith.inference import _generation_kwargs  # the same stop tokens and padding as tunesmith generate

        servable = self.pool.get(group[0].model_id)
        tokenizer, model = servable.tokenizer, servable.model
        tokenizer.padding_side = "left"
        kwargs = _generation_kwargs(tokenizer, max(r.max_tokens for r in group), group[0].temperature)
        if group[0].temperature > 0:
            kwargs["top_p"] = group[0].top_p
        eos_ids = set(kwargs["eos_token_id"])
        rendered = [request.render(tokenizer) for request in group]
        prompts = [prompt for request, prompt in zip(group, rendered) for _ in range(request.n)]
        rows = [_Row(request, index, tokenizer, eos_ids) for request in group for index in range(request.n)]
        device = next(model.parameters()).device
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        for request, prompt in zip(group, rendered):
            request.sink(("usage", _prompt_tokens(tokenizer, prompt)))
        if group[0].seed is not None:
            torch.manual_seed(group[0].seed)
        from transformers import StoppingCriteriaList

        self.batch_sizes.append(len(rows))
        with servable.active():
            model.generate(**inputs, **kwargs, streamer=_RowStreamer(rows),
                           stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]))
        for row in rows:
            row.finish("length")


def _prompt_tokens(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
