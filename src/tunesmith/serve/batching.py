"""Generation for concurrent requests: continuous batching.

One worker thread owns the models and keeps one running batch per loaded base model
(:class:`tunesmith.inference.decoding.RowBatch`). Between two decode steps, requests that arrived join the
batch (their prompts are prefilled together into free KV-cache slots) and rows that finished or
were cancelled leave it, so a short request never waits for a long one and a new one waits at
most one step. Rows of one batch may differ in everything: model id (adapters of one base are
applied per row: :mod:`tunesmith.methods.lora_rows`), temperature, top-p, seed, stop strings, token limit.
Each row samples from its own ``torch.Generator`` (seeded from the request's ``seed``), so a seed
gives the same text whatever else is being generated. Streaming and non-streaming requests are
batched alike; each row stops on its own end-of-sequence token, stop string or token limit.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from tunesmith.inference.decoding import Prefix, Row, RowBatch, prefill_length, supports_slots
from tunesmith.serve.pool import ModelPool, Servable

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
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request (its caller went away); its rows leave at the next step."""
        self.cancelled.set()

    def generators(self) -> list[Optional[torch.Generator]]:
        """One random generator per choice: from ``seed`` when given (choice i gets seed + i), else fresh."""
        if self.temperature <= 0:
            return [None] * self.n
        first = self.seed if self.seed is not None else secrets.randbits(62)
        return [torch.Generator().manual_seed((first + index) % 2**63) for index in range(self.n)]


class _Row:
    """One choice being generated: its text side (incremental decoding, stop strings, its own limit)."""

    def __init__(self, request: GenerationRequest, index: int, servable: Servable, eos_ids: set[int],
                 decoding: Row) -> None:
        self.request, self.index, self.servable, self.eos_ids = request, index, servable, eos_ids
        self.tokenizer = servable.tokenizer
        self.decoding = decoding  # the token side: prompt, sampling, KV-cache slot
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
        pass


class BatchingGenerator:
    """The worker thread that runs continuous batching.

    Args:
        pool: Where models come from.
        window_s: How long an idle worker waits for more requests after the first arrives, so that
            requests sent together are prefilled together.
        max_batch: Most rows decoded together per base model; more wait for a free slot.
        prefill_tokens: Most prompt tokens prefilled between two decode steps (at least one row):
            a crowd of new requests is prefilled in parts, the running rows stepping in between. Tokens
            of a shared start already computed for the row's adapter (prefix caching) are not counted.
    """

    def __init__(self, pool: ModelPool, window_s: float = 0.01, max_batch: int = 32, prefill_tokens: int = 512) -> None:
        self.pool, self.window_s, self.max_batch, self.prefill_tokens = pool, window_s, max_batch, prefill_tokens
        self.queue: queue.Queue[Optional[GenerationRequest]] = queue.Queue()
        self.serials = itertools.count()
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)  # rows per decode step (recent)
        self.batches: dict[int, RowBatch] = {}  # id of the base model -> its running batch
        self.rows: dict[int, list[_Row]] = {}  # the same key -> the rows of that batch, in no order
        # the same key -> the shared prompt starts per adapter (prefix caching), kept while the batch is gone: a crowd
        # after an idle spell, or a lone request, then skips the chat template's start (computed once per adapter)
        self.prefixes: dict[int, dict[Optional[str], Prefix]] = {}
        self.waiting: collections.deque[_Row] = collections.deque()  # rows without a slot yet
        self.thread = threading.Thread(target=self._run, name="tunesmith-generate", daemon=True)
        self.thread.start()

    def submit(self, request: GenerationRequest) -> None:
        request.serial = next(self.serials)
        self.queue.put(request)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def active_rows(self) -> int:
        """Rows holding a KV-cache slot now."""
        return sum(len(batch) for batch in self.batches.values())

    def _run(self) -> None:
        while True:
            arrived = self._collect()
            if arrived is None:
                return
            for request in arrived:
                self._admit(request)
            self._join_waiting()
            for key in list(self.batches):
                self._step_safely(key)

    def _collect(self) -> Optional[list[GenerationRequest]]:
        """Requests that arrived since the last step; blocks while there is nothing to do. None: closing."""
        arrived: list[GenerationRequest] = []
        if not self.active_rows() and not self.waiting:
            first = self.queue.get()
            if first is None:
                return None
            arrived.append(first)
            time.sleep(self.window_s)
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return arrived
            if item is None:
                return None
            arrived.append(item)

    def _admit(self, request: GenerationRequest) -> None:
        """Tokenize a request into its rows (one per choice), which then wait for slots."""
        if request.cancelled.is_set():
            return
        try:
            from tunesmith.inference.generate import stop_token_ids

            servable = self.pool.get(request.model_id)
            tokenizer = servable.tokenizer
            prompt = request.render(tokenizer)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            eos_ids = set(stop_token_ids(tokenizer))
        except Exception as error:  # a bad request must not stop the worker: tell its caller why
            logger.exception("request failed")
            request.sink(("error", f"{type(error).__name__}: {error}"))
            return
        request.sink(("usage", len(ids)))
        choices = [_Row(request, index, servable, eos_ids, Row(list(ids), request.temperature, request.top_p, 0,
                                                                 generator, servable.adapter_name))
                   for index, generator in enumerate(request.generators())]
        if supports_slots(servable.model):
            self.waiting.extend(choices)
        else:
            self._generate_alone(servable, choices)

    def _generate_alone(self, servable: Servable, choices: list[_Row]) -> None:
        """Models the slot cache does not fit (prompt or prefix tuning, other families): ``generate``, alone."""
        request = choices[0].request
        kwargs = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p} \
            if request.temperature > 0 else {"do_sample": False}
        if request.seed is not None:
            torch.manual_seed(request.seed)
        device = next(servable.model.parameters()).device
        ids = torch.tensor([choice.decoding.prompt for choice in choices], device=device)
        try:
            with torch.no_grad(), servable.active():
                servable.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        streamer=_RowStreamer(choices),
                                        max_new_tokens=request.max_tokens, eos_token_id=sorted(choices[0].eos_ids),
                                        pad_token_id=servable.tokenizer.pad_token_id, **kwargs)
        except Exception as error:
            logger.exception("generation failed")
            request.sink(("error", f"{type(error).__name__}: {error}"))
        for choice in choices:
            choice.finish("length")

    def _join_waiting(self) -> None:
        """Prefill waiting rows into free slots of their base model's batch (one forward per base)."""
        joining: dict[int, list[_Row]] = {}
        budget = self.prefill_tokens
        while self.waiting and (budget > 0 or not joining):
            choice = self.waiting[0]
            key = _base_key(choice.servable)
            taken = len(self.batches[key]) if key in self.batches else 0
            if taken + len(joining.get(key, [])) >= self.max_batch:
                break
            budget -= prefill_length(self.prefixes.get(key, {}), choice.decoding)
            self.waiting.popleft()
            if not choice.request.cancelled.is_set():
                joining.setdefault(key, []).append(choice)
        for key, choices in joining.items():
            try:
                self._join(key, choices)
            except Exception as error:
                logger.exception("prefill failed")
                for choice in choices:
                    choice.request.sink(("error", f"{type(error).__name__}: {error}"))
                self._drop(key, error)

    @torch.no_grad()
    def _join(self, key: int, choices: list[_Row]) -> None:
        from peft import PeftModel

        model = choices[0].servable.model  # the newest wrapper of this base (an adapter may have just been added)
        batch = self.batches.get(key)
        if batch is None:
            batch = self.batches[key] = RowBatch(model, invariant=choices[0].servable.invariant,
                                                 prefixes=self.prefixes.setdefault(key, {}))
            self.rows[key] = []
        batch.model, batch.mixed_adapters = model, isinstance(model, PeftModel)
        batch.join([choice.decoding for choice in choices], room=max(c.request.max_tokens for c in choices) + 1)
        self.rows[key] += choices
        for choice in choices:
            choice.feed(choice.decoding.tokens[-1])
        self._leave_finished(key)

    def _step_safely(self, key: int) -> None:
        try:
            self._step(key)
        except Exception as error:  # a failing step ends its batch's requests with the reason
            logger.exception("generation failed")
            self._drop(key, error)

    @torch.no_grad()
    def _step(self, key: int) -> None:
        batch = self.batches[key]
        self._leave_finished(key)
        if not len(batch):
            return
        self.batch_sizes.append(len(batch))
        batch.step()
        for choice in self.rows[key]:
            choice.feed(choice.decoding.tokens[-1])
        self._leave_finished(key)

    def _leave_finished(self, key: int) -> None:
        batch, kept = self.batches[key], []
        for choice in self.rows[key]:
            if choice.finished or choice.request.cancelled.is_set():
                batch.leave(choice.decoding)
            else:
                kept.append(choice)
        self.rows[key] = kept
        if not kept:
            del self.batches[key], self.rows[key]  # an idle batch gives its KV cache back

    def _drop(self, key: int, error: Exception) -> None:
        for choice in self.rows.pop(key, []):
            if not choice.finished:
                choice.request.sink(("error", f"{type(error).__name__}: {error}"))
                choice.finished = True
        self.batches.pop(key, None)
        self.prefixes.pop(key, None)  # computed by a failing batch: not trusted


def _base_key(servable: Servable) -> int:
    """Adapters of one base share a batch: the key is the base model under any peft wrapper."""
    model = servable.model
    return id(model.get_base_model() if hasattr(model, "get_base_model") else model)
