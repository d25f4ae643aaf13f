"""The inference engine: one thread that decodes every running request together, step by step.

Requests wait in a bounded queue, one line per caller (`serving.fair_share`), and callers are
served in turn rather than first come first served. Between decode steps the engine prefills
waiting work on a time budget: with nothing decoding, chunks of up to about 0.1 s; beside
running samples, half as much time as the decoding takes, saved up into chunks long enough to
be worth their weight reads. A long prompt thus delays the running streams by part of a step
rather than by the whole prompt, and is set aside for another caller's short one. A request's
samples are admitted as slots free up, in parts if need be, so a request with `n` samples
never waits for `n` free slots at once. When it is done with its prompt, the part joins the
batch. Each step runs one batched forward pass for all running samples, picks each one's next
token, and hands the new text to the request's asyncio queue. A sample leaves the batch as
soon as it ends or its client goes away.

While another caller holds or wants a slot, no caller takes more than its share of them. A
caller who took every slot while alone gives back what it holds beyond its share when someone
else arrives and no slot is free: its most recently started samples are preempted, their
cache copied aside (or, past a batch's worth of copies, rebuilt by prefilling later), and they
resume with their sampling state (generator, counts, stop-string scan) kept, so a preempted
sample continues where it stopped.

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
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from nanogpt_core.tokenizer import EOT_TOKEN, VOCAB_SIZE, get_tokenizer
from serving.fair_share import caller_queue_share, caller_slot_share
from serving.kv_decoder import BatchDecoder, SavedCache
from serving.sampling import SampledToken, SamplingParams, generator_for, sample_token
from serving.text_stream import TextStream

log = logging.getLogger("serving.engine")


class QueueFull(Exception):
    """The engine's queue is at its limit; the client should retry later."""


class CallerOverShare(Exception):
    """The caller already has its share of the queue waiting; others are still admitted."""

    def __init__(self, waiting: int, share: int, retry_after_s: int = 1):
        self.waiting = waiting
        self.share = share
        self.retry_after_s = retry_after_s
        super().__init__(f"{waiting} completions waiting, share {share}")


class EngineClosed(Exception):
    """The engine is draining for a swap (or shutting down) and takes no new requests."""


GENERIC_FAILURE_MESSAGE = "The server had an error while processing your request."
# Beside running samples, prefills get this fraction of the time spent decoding: the running
# samples' steps take half as long again on average, and long prompts still advance.
PREFILL_SHARE_OF_STEP = 0.5
# The smallest prompt chunk prefilled beside running samples. On a CPU a chunk of a few tokens
# costs about as much as a decode step, since both read every weight once; so the time granted
# to prefills is saved up over steps and spent on chunks at least this long.
MIN_PREFILL_CHUNK = 64
# The longest one prefill call should take, whatever else runs: a request that arrives during it
# waits for it to end. 256 tokens of the 124M shape took 0.5 s on two cores.
LONGEST_PREFILL_CALL_S = 0.1


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
    def count_preemption(self) -> None: ...


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
                 loop: asyncio.AbstractEventLoop | None = None, request_id: str | None = None,
                 caller: str = ""):
        self.id = next(_ids)
        self.request_id = request_id or new_request_id()
        self.caller = caller  # whose share of the slots and the queue this counts against
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
        # The logits after the prompt, kept while samples of it wait to start (admitted in parts).
        self.prompt_logits: torch.Tensor | None = None
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
        # The tokens sampled so far that did not end the sample; the cache holds the prompt and
        # all of them but the last, which is `next_input`. What a preempted sample re-prefills.
        self.tokens: list[int] = []
        self.started = 0  # when it (last) joined the batch, in admissions; the newest is preempted first
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
            self.tokens.append(sampled.token)
            if text or gen.params.logprobs:
                self._emit(text, [sampled], None)

    def _emit(self, text: str, tokens: list[SampledToken], finish_reason: str | None) -> None:
        if finish_reason is not None:
            self.finished = True
        self.generation.post(ChoiceEvent(self.index, text, tokens, finish_reason))


@dataclass
class _NewSamples:
    """Samples of a request not started yet (all of them, or those a part left waiting)."""

    generation: Generation
    indices: list[int]

    def tokens(self) -> list[int]:
        return self.generation.prompt_tokens


@dataclass
class _Resume:
    """A preempted sample, waiting to get a slot back."""

    sequence: _Sequence
    saved: SavedCache | None = None  # its cache as it was; without one, rebuilt by prefilling

    @property
    def generation(self) -> Generation:
        return self.sequence.generation

    @property
    def indices(self) -> list[int]:
        return [self.sequence.index]

    def tokens(self) -> list[int]:
        return [] if self.saved is not None else self.generation.prompt_tokens + self.sequence.tokens[:-1]


@dataclass
class _Prefill:
    """Work whose tokens go into the staging slot, and the slots kept for it. Set aside for
    another caller's turn, it waits at the front of its caller's line with the staging slot's
    cache saved."""

    caller: str
    work: _NewSamples | _Resume
    tokens: list[int]
    slots: int
    done: int = 0
    done_this_turn: int = 0  # a job is set aside only after a chunk in its turn, so every turn advances it
    saved: SavedCache | None = None

    @property
    def generation(self) -> Generation:
        return self.work.generation

    @property
    def indices(self) -> list[int]:
        return self.work.indices


_Work = _NewSamples | _Resume | _Prefill


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
        self.caller_queue_share = caller_queue_share(max_queue)
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics
        self.name = name
        self._token_bytes = token_bytes_table()
        # Waiting work per caller, callers in the order they are served next.
        self._waiting: OrderedDict[str, deque[_Work]] = OrderedDict()
        self._active: list[_Sequence] = []  # index = decoder slot
        self._prefill: _Prefill | None = None
        self._admissions = 0
        self.preemptions = 0
        # Seconds per prefilled token, averaged as measured: how many prompt tokens the saved-up
        # prefill time pays for.
        self._prefill_token_s: float | None = None
        self._prefill_credit_s = 0.0  # prefill time saved up beside running samples
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
            # The caller's own share first: a caller over it is told to slow down (429) even
            # when the queue as a whole is also full.
            waiting = self._waiting_samples(generation.caller)
            if waiting + generation.n > self.caller_queue_share:
                raise CallerOverShare(waiting, self.caller_queue_share)
            if self._waiting_samples() + generation.n > self.max_queue:
                raise QueueFull(self.name)
            generation._engine = self
            self._waiting.setdefault(generation.caller, deque()).append(
                _NewSamples(generation, list(range(generation.n))))
            self._cond.notify()

    def _waiting_samples(self, caller: str | None = None) -> int:
        """Samples waiting for a slot (of one caller, or of all), leaving out requests already given up."""
        lines = self._waiting.values() if caller is None else [self._waiting.get(caller, ())]
        return sum(len(work.indices) for line in lines for work in line if _live(work.generation))

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
        """Samples waiting for a slot: not started yet, or preempted."""
        with self._cond:
            return sum(len(work.indices) for line in self._waiting.values() for work in line)

    @property
    def active_sequences(self) -> int:
        return len(self._active)

    # --- the engine thread ------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefill or self._active)

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
        self._hand_back_slots_beyond_share()
        self._advance_prefill()
        if self._active:
            self._decode()

    def _drop_cancelled(self) -> None:
        with self._cond:
            for caller in list(self._waiting):
                line = self._waiting[caller]
                if not all(_live(work.generation) for work in line):
                    line = deque(work for work in line if _live(work.generation))
                    self._waiting[caller] = line
                if not line:
                    del self._waiting[caller]
        if self._prefill is not None and not _live(self._prefill.work.generation):
            self._prefill = None
        for slot in reversed(range(len(self._active))):
            if self._active[slot].generation.cancelled:
                self._retire(slot)

    # --- sharing the slots ------------------------------------------------------------

    def _held(self) -> Counter[str]:
        """Slots per caller: running samples, and the slots kept for the prefill under way."""
        held = Counter(seq.generation.caller for seq in self._active)
        if self._prefill is not None:
            held[self._prefill.caller] += self._prefill.slots
        return held

    def _free_slots(self) -> int:
        return self.decoder.free_slots - (self._prefill.slots if self._prefill else 0)

    def _slot_share(self, held: Counter[str]) -> int:
        """One caller's share of the slots now: an equal part among the callers holding or wanting them.
        Called with `_cond` held."""
        return caller_slot_share(self.decoder.max_batch, len(held.keys() | self._waiting.keys()))

    def _allowance(self, caller: str, held: Counter[str]) -> int:
        """How many more slots `caller` may take now: any free one when no other caller holds or
        wants a slot, else up to its share. Called with `_cond` held."""
        others = any(c != caller for c in self._waiting) or any(c != caller and n for c, n in held.items())
        if not others:
            return self._free_slots()
        return min(self._free_slots(), self._slot_share(held) - held[caller])

    def _hand_back_slots_beyond_share(self) -> None:
        """With no slot free and a caller under its share waiting, preempt a sample of the caller
        holding the most beyond its share: its most recently started one, which has the least to redo."""
        while self._free_slots() == 0:
            held = self._held()
            with self._cond:
                share = self._slot_share(held)
                deprived = any(held[c] < share for c in self._waiting)
            over = [c for c, n in held.items() if n > share]
            if not deprived or not over:
                return
            most = max(over, key=lambda c: held[c])
            victims = [slot for slot, seq in enumerate(self._active) if seq.generation.caller == most]
            if not victims:  # the excess is in the prefill under way; it joins, then is handed back
                return
            self._preempt(max(victims, key=lambda slot: self._active[slot].started))

    def _preempt(self, slot: int) -> None:
        seq = self._active[slot]
        # Its cache is set aside rather than rebuilt later, while what is set aside stays within
        # one batch's worth of cache; beyond that it is rebuilt by prefilling when it resumes.
        saved = self.decoder.save(slot) if self._can_set_aside(self.decoder.lengths[slot]) else None
        resume = _Resume(seq, saved)
        self._retire(slot)
        self.preemptions += 1
        if self.metrics is not None:
            self.metrics.count_preemption()
        with self._cond:
            # At the front of its caller's line: it is that caller's oldest work.
            self._waiting.setdefault(seq.generation.caller, deque()).appendleft(resume)

    def _can_set_aside(self, positions: int) -> bool:
        """Whether a cache of `positions` may be copied aside without exceeding the cache of `max_batch` slots."""
        per_position = self.decoder.keys[:, 0, :, :1].nbytes * 2
        budget = per_position * self.decoder.max_len * self.decoder.max_batch
        with self._cond:
            held = sum(work.saved.nbytes for line in self._waiting.values() for work in line
                       if isinstance(work, (_Resume, _Prefill)) and work.saved is not None)
        return held + positions * per_position <= budget

    def _take_next_work(self) -> _Prefill | None:
        """The next caller in turn with waiting work and room for it; that caller goes to the back."""
        held = self._held()
        with self._cond:
            for caller, line in self._waiting.items():
                room = self._allowance(caller, held)
                if room <= 0:
                    continue
                work = line[0]
                if isinstance(work, _Prefill) and isinstance(work.work, _NewSamples) and work.slots > room:
                    # A prefill set aside with more samples than may start now: the rest wait behind it.
                    line.insert(1, _NewSamples(work.generation, work.work.indices[room:]))
                    work.work.indices = work.work.indices[:room]
                    work.slots = room
                if isinstance(work, _NewSamples) and len(work.indices) > room:
                    # Admitted in part: the rest waits at the front of the caller's line.
                    taken = _NewSamples(work.generation, work.indices[:room])
                    work.indices = work.indices[room:]
                    work = taken
                else:
                    line.popleft()
                    if not line:
                        del self._waiting[caller]
                if caller in self._waiting:
                    self._waiting.move_to_end(caller)
                if isinstance(work, _Prefill):
                    return work
                return _Prefill(caller, work, work.tokens(), slots=len(work.indices))
        return None

    def _another_caller_can_start(self, caller: str) -> bool:
        """Whether a caller other than `caller` has work waiting and room for it, the prefill under way aside."""
        job, self._prefill = self._prefill, None
        try:
            held = self._held()
            with self._cond:
                return any(c != caller and self._allowance(c, held) > 0 for c in self._waiting)
        finally:
            self._prefill = job

    # --- prefill and decode -----------------------------------------------------------

    def _prefill_budget(self) -> int:
        """Prompt tokens to prefill in this step: as many as take `LONGEST_PREFILL_CALL_S` (within
        `MIN_PREFILL_CHUNK` and `prefill_chunk`) when nothing decodes; beside running samples, what
        the saved-up prefill time pays for, once that is at least `MIN_PREFILL_CHUNK`."""
        if self._prefill_token_s is None:
            return self.prefill_chunk
        shortest = min(MIN_PREFILL_CHUNK, self.prefill_chunk)
        longest = min(self.prefill_chunk, max(shortest, int(LONGEST_PREFILL_CALL_S / self._prefill_token_s)))
        if not self._active:
            self._prefill_credit_s = 0.0
            return longest
        affordable = int(self._prefill_credit_s / self._prefill_token_s)
        return min(longest, affordable) if affordable >= shortest else 0

    def _advance_prefill(self) -> None:
        """Prefill this step's budget of waiting work: several short prompts, or part of a long one.

        Callers take turns here too: before its next chunk, a prefill that has had one is set
        aside (its staging cache saved) when another caller can start something, and continues at
        its caller's next turn. Work that needs no prefill (a preempted sample's saved cache, more
        samples of a running prompt) starts whatever the budget.
        """
        budget = self._prefill_budget()
        beside_decoding = bool(self._active)
        if self._prefill is None:
            self._next_prefill()
        while budget > 0:
            job = self._prefill or self._next_prefill()
            if job is None:
                return
            if job.done_this_turn and self._another_caller_can_start(job.caller) and self._can_set_aside(job.done):
                self._set_aside(job)
                continue
            chunk = job.tokens[job.done:job.done + budget]
            started = time.perf_counter()
            try:
                # Only the staging slot is written, so a failure here touches no running sample.
                logits = self.decoder.prefill(self.decoder.staging_slot, chunk).cpu()
            except Exception as exc:
                self._prefill = None
                self._fail_generation(job.generation, exc, "prefill")
                continue
            elapsed = time.perf_counter() - started
            self._prefill_token_s = _average(self._prefill_token_s, elapsed / len(chunk))
            if beside_decoding:
                self._prefill_credit_s -= elapsed
            job.done += len(chunk)
            job.done_this_turn += len(chunk)
            budget -= len(chunk)
            if job.done == len(job.tokens):
                self._prefill = None
                self._finish_prefill(job, logits)

    def _next_prefill(self) -> _Prefill | None:
        """The next work that needs the staging slot, starting on the way any that does not."""
        while True:
            job = self._take_next_work()
            if job is None or not self._start_without_prefill(job):
                break
        self._prefill = job
        if job is not None:
            if job.saved is not None:
                self.decoder.restore(self.decoder.staging_slot, job.saved)
                job.saved = None
            else:
                self.decoder.clear(self.decoder.staging_slot)
        return job

    def _start_without_prefill(self, job: _Prefill) -> bool:
        """Start work whose cache already exists somewhere: a preempted sample's saved cache, or
        the prompt in a running sibling's slot for samples admitted in parts."""
        work = job.work
        if isinstance(work, _Resume) and work.saved is not None:
            self._join(work.sequence, saved=work.saved)
            return True
        if isinstance(work, _NewSamples) and work.generation.prompt_logits is not None and job.done == 0:
            sibling = next((slot for slot, seq in enumerate(self._active) if seq.generation is work.generation), None)
            if sibling is not None:
                self._start_samples(work.generation, work.indices, work.generation.prompt_logits,
                                    copy_from=sibling, length=len(work.generation.prompt_tokens))
                return True
        return False

    def _set_aside(self, job: _Prefill) -> None:
        job.saved = self.decoder.save(self.decoder.staging_slot)
        job.done_this_turn = 0
        self._prefill = None
        with self._cond:
            self._waiting.setdefault(job.caller, deque()).appendleft(job)
            # Its caller's turn is over: whoever else can start comes first.
            self._waiting.move_to_end(job.caller)

    def _finish_prefill(self, job: _Prefill, logits: torch.Tensor) -> None:
        work = job.work
        if isinstance(work, _Resume):
            # The logits of the re-prefill are not needed: the sample's next input is already chosen.
            self._join(work.sequence, copy_from=self.decoder.staging_slot)
            return
        gen = work.generation
        if len(work.indices) < gen.n:  # others of its samples start later, from a running one's cache
            gen.prompt_logits = logits
        self._start_samples(gen, work.indices, logits, copy_from=self.decoder.staging_slot)

    def _join(self, seq: _Sequence, *, copy_from: int | None = None, length: int | None = None,
              saved: SavedCache | None = None) -> None:
        if saved is not None:
            slot = self.decoder.allocate()
            self.decoder.restore(slot, saved)
        else:
            slot = self.decoder.allocate(copy_from=copy_from, length=length)
        self._active.append(seq)
        assert len(self._active) == slot + 1
        self._admissions += 1
        seq.started = self._admissions

    def _start_samples(self, gen: Generation, indices: list[int], logits: torch.Tensor, *, copy_from: int,
                       length: int | None = None) -> None:
        try:
            sequences = [_Sequence(gen, index) for index in indices]
        except Exception as exc:
            self._fail_generation(gen, exc, "setup")
            return
        for seq in sequences:
            self._join(seq, copy_from=copy_from, length=length)
        for seq in sequences:
            self._sample(seq, logits)
        if gen.first_token_at is None:
            gen.first_token_at = time.monotonic()
            if self.metrics is not None:
                self.metrics.observe_time_to_first_token(gen.first_token_at - gen.submitted_at)
        self._retire_finished()

    def _decode(self) -> None:
        started = time.perf_counter()
        # Sampling runs on the CPU, where each sample's generator lives.
        logits = self.decoder.decode([seq.next_input for seq in self._active]).cpu()
        for seq, row in zip(self._active, logits, strict=True):
            self._sample(seq, row)
        step_s = time.perf_counter() - started
        if self._prefill is not None or self._waiting:
            # Saved up at most for one full chunk, so that no single step takes much longer.
            most = self.prefill_chunk * (self._prefill_token_s or 0.0)
            self._prefill_credit_s = min(self._prefill_credit_s + PREFILL_SHARE_OF_STEP * step_s, most)
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
        """End one request with an error; its samples leave the batch at the next retirement, and
        its waiting ones are dropped at the next step."""
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
        if self._prefill is not None:
            running[id(self._prefill.work.generation)] = self._prefill.work.generation
        return list(running.values())

    def _fail_running(self, error: BaseException | None = None) -> None:
        """Fail every request in the batch or in prefill (each with its own request id) and reset the cache.

        Their samples still waiting go with them (dropped at the next step); other requests'
        preempted samples keep waiting, since they rebuild their cache when they resume.
        """
        for gen in self._running_generations():
            if not gen.failed:
                gen.failed = True
                gen.post(error if error is not None else EngineFailed(gen.request_id))
        self._active.clear()
        self._prefill = None
        if self.decoder is not None:
            self.decoder.reset()

    def _fail_all(self, error: BaseException) -> None:
        self._fail_running(error)
        with self._cond:
            waiting = [work.generation for line in self._waiting.values() for work in line]
            self._waiting.clear()
        for gen in {id(g): g for g in waiting}.values():
            if not gen.failed:
                gen.failed = True
                gen.post(error)


def _live(generation: Generation) -> bool:
    return not (generation.cancelled or generation.failed)


def _average(mean: float | None, value: float, weight: float = 0.2) -> float:
    """A moving average that follows the machine's speed over the last few measurements."""
    return value if mean is None else mean + weight * (value - mean)
