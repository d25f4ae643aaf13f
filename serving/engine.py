"""The inference engine: one thread that decodes every running request together, step by step.

Requests wait in a bounded queue. Between decode steps the engine prefills up to
`prefill_chunk` prompt tokens of waiting requests whose samples fit in the free slots:
several short prompts at once, or the next chunk of a long one, so that a long prompt
delays the running streams by one chunk per step rather than by the whole prompt. A
request whose prompt is done joins the batch. Each step runs one batched forward pass for
all running samples, picks each one's next token, and hands the new text to the request's
asyncio queue. A sample leaves the batch as soon as it ends or its client goes away.

A failure in one request's own work (its prefill, its sampling, its stop-string scan, its
detokenization) ends that request alone: its samples leave the batch the way finished ones
do, and the other rows of the KV cache are untouched. Only a failure of the shared batched
forward pass fails every running request; the cache is then reset and the engine carries
on with the next ones. Clients are told a request id, never the exception: the log has
the exception under the same id.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from nanogpt_core.tokenizer import EOT_TOKEN, VOCAB_SIZE, get_tokenizer
from serving.kv_decoder import BatchDecoder
from serving.sampling import SampledToken, SamplingParams, generator_for, sample_token
from serving.text_stream import TextStream

log = logging.getLogger("serving.engine")


class QueueFull(Exception):
    """The engine's queue is at its limit; the client should retry later."""


class EngineClosed(Exception):
    """The engine is draining for a swap (or shutting down) and takes no new requests."""


GENERIC_FAILURE_MESSAGE = "The server had an error while processing your request."


class EngineFailed(Exception):
    """The engine hit an internal error while running this request (logged under its request id)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        super().__init__(f"{GENERIC_FAILURE_MESSAGE} Request id: {request_id}.")


class RequestRejected(ValueError):
    """The request asks for something this engine cannot do; the client is at fault."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class EngineMetrics(Protocol):
    def observe_time_to_first_token(self, seconds: float) -> None: ...
    def add_completion_tokens(self, n: int) -> None: ...


@functools.lru_cache(maxsize=1)
def token_bytes_table() -> tuple[bytes, ...]:
    enc = get_tokenizer()
    return tuple(enc.decode_single_token_bytes(i) for i in range(VOCAB_SIZE))


@dataclass
class ChoiceEvent:
    """New output of one sample: text that is final, the tokens behind it, and maybe its end."""

    index: int
    text: str
    tokens: list[SampledToken] = field(default_factory=list)
    finish_reason: str | None = None


_ids = itertools.count()


def new_request_id() -> str:
    return f"req_{secrets.token_hex(16)}"


class Generation:
    """A request's `n` samples of one prompt, as the API handler sees them.

    The engine thread posts `ChoiceEvent`s (or an exception) onto `events`, an asyncio
    queue of the handler's event loop. `cancel()` is safe from any thread.
    """

    def __init__(self, prompt_tokens: list[int], params: SamplingParams, n: int = 1,
                 loop: asyncio.AbstractEventLoop | None = None, request_id: str | None = None):
        self.id = next(_ids)
        self.request_id = request_id or new_request_id()
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.n = n
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue[ChoiceEvent | BaseException] = asyncio.Queue()
        self.cancelled = False
        self.failed = False
        self.completion_tokens = 0
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self._engine: Engine | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self._engine is not None:
            self._engine.wake()

    async def stream(self):
        """The events in order until every sample has finished; an engine error is raised."""
        remaining = self.n
        while remaining:
            item = await self.events.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                remaining -= 1
            yield item

    def post(self, item: ChoiceEvent | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the handler's loop has closed: nobody is listening any more
            pass


class _Sequence:
    """One sample of a generation while it runs in the batch."""

    def __init__(self, generation: Generation, index: int):
        self.generation = generation
        self.index = index
        params = generation.params
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        self.generator = generator_for(seed, index)
        self.text = TextStream(params.stop)
        self.counts = params.token_counts()
        self.generated = 0
        self.next_input = -1
        self.finished = False

    def accept(self, sampled: SampledToken, token_bytes: tuple[bytes, ...]) -> None:
        gen = self.generation
        self.generated += 1
        gen.completion_tokens += 1
        if sampled.token == EOT_TOKEN:
            self._emit(self.text.finish(), [], "stop")
            return
        self.counts.add(sampled.token)
        text = self.text.push(token_bytes[sampled.token])
        if self.text.stopped:
            self._emit(text, [sampled], "stop")
        elif self.generated >= gen.params.max_tokens:
            self._emit(text + self.text.finish(), [sampled], "length")
        else:
            self.next_input = sampled.token
            if text or gen.params.logprobs:
                self._emit(text, [sampled], None)

    def _emit(self, text: str, tokens: list[SampledToken], finish_reason: str | None) -> None:
        if finish_reason is not None:
            self.finished = True
        self.generation.post(ChoiceEvent(self.index, text, tokens, finish_reason))


class Engine:
    """Owns a `BatchDecoder` and the thread that drives it.

    Give it a function that builds the decoder rather than a built one, and the decoder is built
    in the engine's own thread, which `start()` waits for. Weights prepared in one thread and
    multiplied in another ran slower: one-row decode steps of the 124M shape took 27.8 ms when
    the decoder was built on the main thread and stepped on another, against 20.5-21.9 ms when
    one thread did both (2-vCPU Xeon, AVX-512, 2 torch threads, OpenMP; the engine's own thread
    is the other thread here, since the server's main thread runs the event loop).
    """

    def __init__(self, decoder: BatchDecoder | Callable[[], BatchDecoder], *, max_queue: int = 64,
                 prefill_chunk: int = 256, metrics: EngineMetrics | None = None, name: str = "engine"):
        self._build = decoder if callable(decoder) else None
        self.decoder = None if self._build else decoder
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics
        self.name = name
        self._token_bytes = token_bytes_table()
        self._pending: deque[Generation] = deque()
        self._active: list[_Sequence] = []  # index = decoder slot
        self._prefilling: Generation | None = None
        self._prefilled = 0
        self._cond = threading.Condition()
        self._closing = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"nanogpt-{name}", daemon=True)
        self.drained = threading.Event()

    # --- called from the API side -----------------------------------------------------

    def start(self) -> Engine:
        """Start the engine's thread; with a decoder to build, return once it is built (or raise
        what building it raised)."""
        building = self._build is not None
        self._thread.start()
        if building:
            self._built.wait()
            if self._build_error is not None:
                raise self._build_error
        return self

    def submit(self, generation: Generation) -> None:
        with self._cond:
            # Closed first: a swap releases a drained engine's decoder (`decoder = None`) after
            # closing it, and a request that picked this engine just before the swap must be
            # told to resubmit, not fail on the missing decoder.
            if self._closing or self._stopping:
                raise EngineClosed(self.name)
            self._check_fits(generation)
            if len(self._pending) >= self.max_queue:
                raise QueueFull(self.name)
            generation._engine = self
            self._pending.append(generation)
            self._cond.notify()

    def _check_fits(self, generation: Generation) -> None:
        if generation.n > self.decoder.max_batch:
            raise RequestRejected(f"n={generation.n} exceeds this server's batch size {self.decoder.max_batch}.",
                                  param="n")
        if not generation.prompt_tokens:
            raise RequestRejected("The prompt is empty.", param="prompt")
        # The last sampled token is never fed back, so the cache holds at most this many.
        needed = len(generation.prompt_tokens) + generation.params.max_tokens - 1
        if needed > self.decoder.max_len:
            raise RequestRejected(
                f"The prompt ({len(generation.prompt_tokens)} tokens) and max_tokens "
                f"({generation.params.max_tokens}) exceed the context of {self.decoder.max_len} tokens.",
                param="max_tokens", code="context_length_exceeded")

    def close(self) -> None:
        """Take no new requests; finish those already accepted, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop now: requests still queued or running get an error."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active_sequences(self) -> int:
        return len(self._active)

    # --- the engine thread ------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._pending or self._prefilling or self._active)

    def _run(self) -> None:
        if self._build is not None:
            try:
                self.decoder = self._build()
            except BaseException as e:  # handed to start(), which raises it in the caller's thread
                self._build_error = e
                self.drained.set()
                return
            finally:
                self._build = None  # nor keep what the function held (the model's weights)
                self._built.set()
        try:
            while True:
                with self._cond:
                    while not self._has_work() and not self._stopping:
                        if self._closing:
                            return
                        self._cond.wait(0.5)
                    if self._stopping:
                        return
                try:
                    with torch.inference_mode():
                        self._step()
                except Exception:
                    running = sorted(self._running_generations(), key=lambda g: g.id)
                    log.exception("%s: a generation step failed; failing requests %s", self.name,
                                  ", ".join(g.request_id for g in running) or "(none)")
                    self._fail_running()
        finally:
            self._fail_all(EngineClosed(f"{self.name} stopped"))
            self.drained.set()

    def _step(self) -> None:
        self._drop_cancelled()
        self._advance_prefill()
        if self._active:
            self._decode()

    def _drop_cancelled(self) -> None:
        with self._cond:
            if any(g.cancelled for g in self._pending):
                self._pending = deque(g for g in self._pending if not g.cancelled)
        for slot in reversed(range(len(self._active))):
            if self._active[slot].generation.cancelled:
                self._retire(slot)

    def _advance_prefill(self) -> None:
        """Prefill up to `prefill_chunk` prompt tokens: several short prompts, or part of a long one."""
        budget = self.prefill_chunk
        while budget > 0:
            if self._prefilling is None and not self._admit():
                return
            gen = self._prefilling
            if gen.cancelled:
                self._prefilling = None
                continue
            chunk = gen.prompt_tokens[self._prefilled:self._prefilled + budget]
            try:
                # Only the staging slot is written, so a failure here touches no running sample.
                logits = self.decoder.prefill(self.decoder.staging_slot, chunk).cpu()
            except Exception as exc:
                self._prefilling = None
                self._fail_generation(gen, exc, "prefill")
                continue
            self._prefilled += len(chunk)
            budget -= len(chunk)
            if self._prefilled == len(gen.prompt_tokens):
                self._prefilling = None
                self._start_samples(gen, logits)

    def _admit(self) -> bool:
        with self._cond:
            if not self._pending or self.decoder.free_slots < self._pending[0].n:
                return False
            self._prefilling = self._pending.popleft()
        self._prefilled = 0
        self.decoder.clear(self.decoder.staging_slot)
        return True

    def _start_samples(self, gen: Generation, logits: torch.Tensor) -> None:
        try:
            sequences = [_Sequence(gen, index) for index in range(gen.n)]
        except Exception as exc:
            self._fail_generation(gen, exc, "setup")
            return
        for seq in sequences:
            slot = self.decoder.allocate(copy_from=self.decoder.staging_slot)
            self._active.append(seq)
            assert len(self._active) == slot + 1
        for seq in sequences:
            self._sample(seq, logits)
        gen.first_token_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.observe_time_to_first_token(gen.first_token_at - gen.submitted_at)
        self._retire_finished()

    def _decode(self) -> None:
        # Sampling runs on the CPU, where each sample's generator lives.
        logits = self.decoder.decode([seq.next_input for seq in self._active]).cpu()
        for seq, row in zip(self._active, logits, strict=True):
            self._sample(seq, row)
        if self.metrics is not None:
            self.metrics.add_completion_tokens(len(self._active))
        self._retire_finished()

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Pick and hand over one sample's next token; a failure here is that request's alone."""
        if seq.finished:  # another sample of its request failed in this step
            return
        try:
            seq.accept(sample_token(logits, seq.generation.params, seq.generator, seq.counts), self._token_bytes)
        except Exception as exc:
            self._fail_generation(seq.generation, exc, "sampling")

    def _fail_generation(self, gen: Generation, exc: Exception, stage: str) -> None:
        """End one request with an error; its samples leave the batch at the next retirement."""
        if isinstance(exc, RequestRejected):
            error: BaseException = exc
            log.info("%s: request %s rejected during %s: %s", self.name, gen.request_id, stage, exc.message)
        else:
            error = EngineFailed(gen.request_id)
            log.error("%s: request %s failed during %s", self.name, gen.request_id, stage, exc_info=exc)
        for seq in self._active:
            if seq.generation is gen:
                seq.finished = True
        if not gen.failed:
            gen.failed = True
            gen.post(error)

    def _retire_finished(self) -> None:
        for slot in reversed(range(len(self._active))):
            if self._active[slot].finished:
                self._retire(slot)

    def _retire(self, slot: int) -> None:
        moved = self.decoder.release(slot)
        if moved is not None:
            self._active[slot] = self._active[moved]
        self._active.pop()

    def _running_generations(self) -> list[Generation]:
        running = {id(seq.generation): seq.generation for seq in self._active}
        if self._prefilling is not None:
            running[id(self._prefilling)] = self._prefilling
        return list(running.values())

    def _fail_running(self, error: BaseException | None = None) -> None:
        """Fail every request in the batch or in prefill (each with its own request id) and reset the cache."""
        for gen in self._running_generations():
            if not gen.failed:
                gen.failed = True
                gen.post(error if error is not None else EngineFailed(gen.request_id))
        self._active.clear()
        self._prefilling = None
        if self.decoder is not None:
            self.decoder.reset()

    def _fail_all(self, error: BaseException) -> None:
        self._fail_running(error)
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for gen in pending:
            gen.post(error)
