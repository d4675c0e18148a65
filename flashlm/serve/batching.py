"""Continuous batching: one scheduler thread owns the model and decodes every running request as one batch.

At every decode step the scheduler retires rows that finished or were cancelled, admits waiting
requests (each newcomer's prompt runs through the model alone, then its cache row joins the batch), and
feeds one token per row through `DecodeStep`. Requests arrive, finish and leave at any step, so no
request waits for the others to end (vLLM's and TGI's continuous batching, on a simpler cache).

The cache layout is the generator's left-padded batch: one `KVCache` whose rows share the slot of the
next token, each row's prompt ending at that slot behind its own left padding. Masks and RoPE positions
come from slots and padding, so a row decodes exactly as it would alone whatever else is in the batch.
Membership changes move rows in slot space (`shift_cache`): a newcomer's cache is shifted right to end
where the batch ends (or the batch to end where a longer newcomer ends), and once the rows that held
the oldest slots leave, the batch is shifted left, so the cache never needs more than the context.

Each request keeps its own sampling settings (temperature, top-k, top-p, repetition penalty, seed: a
seeded request draws from its own generator, as it would alone), `<eos>` and token budget; its tokens
go to its own queue, which `Ticket.steps` reads in the caller's thread (`generate_tokens`' protocol:
one ``[token]`` list a step). Stop strings are matched on text by the caller (`Engine.pieces`), which
then closes the ticket; a closed or cancelled row is retired at the next step.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from flashlm.generation import Sampling, next_token_scores, pick
from flashlm.model.cache import KVCache
from flashlm.model.decoding import DecodeStep
from flashlm.model.transformer import FlashLM

DEFAULT_MAX_BATCH = 16
DEFAULT_KV_BUDGET_MB = 1024
_END = object()  # a ticket's queue: no more tokens


@dataclass(eq=False)
class Ticket:
    """One request in the scheduler: its prompt, settings, produced tokens and output queue."""

    ids: list[int]
    sampling: Sampling
    budget: int
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    closed: threading.Event = field(default_factory=threading.Event)
    produced: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    ended: bool = False  # the end marker is in the queue

    def end(self, item: object = _END) -> None:
        """Put the end marker (or an exception) after the last token, once."""
        if not self.ended:
            self.ended = True
            self.out.put(item)

    def close(self) -> None:
        """Stop this request; the scheduler retires its row at the next step."""
        self.closed.set()

    def steps(self, cancel: threading.Event | None = None, poll: float = 0.25) -> Iterator[list[int]]:
        """The request's tokens as they come, one ``[token]`` list a step; closing the iterator (or
        setting `cancel`) retires the request. A failure of the scheduler is raised here."""
        try:
            while True:
                try:
                    item = self.out.get(timeout=poll)
                except queue.Empty:
                    if cancel is not None and cancel.is_set():
                        return
                    continue
                if item is _END or (cancel is not None and cancel.is_set()):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield [item]
        finally:
            self.close()


def shift_cache(cache: KVCache, d: int) -> None:
    """Move every row `d` slots later (d > 0) or earlier (d < 0), in place: keys, values and slots
    move, left padding grows (or shrinks) by `d`. Slots moved below 0 are dropped (they must be padding
    of every row); RoPE positions (slot - padding) and masks are unchanged."""
    if d == 0:
        return
    seen = cache.seen
    if not 0 <= seen + d <= cache.max_len:
        raise ValueError(f"cannot move a cache of {seen} slots by {d} within {cache.max_len}")
    for layer, ring in enumerate(cache.rings):
        keys, values = cache.keys[layer], cache.values[layer]
        new_keys, new_values = torch.zeros_like(keys), torch.zeros_like(values)
        slots = torch.full_like(cache.slots[layer], -1)
        if ring is None:
            lo = max(0, -d)  # the first old slot that survives
            new_keys[:, :, lo + d : seen + d] = keys[:, :, lo:seen]
            new_values[:, :, lo + d : seen + d] = values[:, :, lo:seen]
            slots[: seen + d] = torch.arange(seen + d, device=slots.device)
        else:
            old = cache.slots[layer]
            held = (old >= 0) & (old + d >= 0)
            entries = (old[held] + d) % ring  # a ring holds consecutive slots: distinct entries again
            new_keys[:, :, entries] = keys[:, :, held]
            new_values[:, :, entries] = values[:, :, held]
            slots[entries] = old[held] + d
        cache.keys[layer], cache.values[layer], cache.slots[layer] = new_keys, new_values, slots
    cache.pad_left = cache.pad_left + d
    cache.seen = seen + d


def append_rows(cache: KVCache, other: KVCache) -> None:
    """Add the rows of `other` (same slots written: `seen` equal) to `cache`, in place. Where the
    newcomer holds padding, the batch's slots stand; its keys there are zeros and masked as padding."""
    if other.seen != cache.seen:
        raise ValueError(f"caches end at different slots ({cache.seen} and {other.seen})")
    cache.keys = [torch.cat([a, b]) for a, b in zip(cache.keys, other.keys, strict=True)]
    # both hold the last slots before `seen`; the batch lacks those below its own rows' padding
    cache.slots = [torch.maximum(a, b) for a, b in zip(cache.slots, other.slots, strict=True)]
    cache.values = [torch.cat([a, b]) for a, b in zip(cache.values, other.values, strict=True)]
    cache.pad_left = torch.cat([cache.pad_left, other.pad_left])


def keep_rows(cache: KVCache, rows: list[int]) -> None:
    index = torch.tensor(rows, dtype=torch.long, device=cache.pad_left.device)
    cache.keys = [k.index_select(0, index) for k in cache.keys]
    cache.values = [v.index_select(0, index) for v in cache.values]
    cache.pad_left = cache.pad_left.index_select(0, index)


class Scheduler:
    """A thread that owns `model` (it holds `lock` during each step) and batches every submitted request.

    At most `max_batch` rows run at once, fewer when their caches would pass `kv_budget_bytes` (a row
    keeps a cache of the model's whole context: global layers in full, local layers a ring of their
    window); the rest wait in arrival order. With ``thread=False`` nothing runs until the caller calls
    `step` (tests drive the batch step by step)."""

    def __init__(
        self,
        model: FlashLM,
        eos_id: int | None,
        lock: threading.Lock | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        kv_budget_bytes: int = DEFAULT_KV_BUDGET_MB * 2**20,
        thread: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.eos_id = model, eos_id
        self.lock = lock or threading.Lock()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.context = model.cfg.max_seq_len
        row_bytes = KVCache(model.cfg, 1, self.context, "meta", self.dtype).nbytes()
        self.max_rows = max(1, min(max_batch, kv_budget_bytes // max(row_bytes, 1)))
        self.row_bytes = row_bytes
        self.waiting: deque[Ticket] = deque()
        self.rows: list[Ticket] = []  # the running batch, in cache-row order
        self.last: list[int] = []  # each row's latest token, fed at the next step
        self.cache: KVCache | None = None
        self.decoder: DecodeStep | None = None
        self.peak_rows = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._joining: Ticket | None = None  # the newcomer being prefilled (in no list meanwhile)
        self._stopping = False
        self._threaded = thread

    # ---- the callers' side ------------------------------------------------------------------------
    def submit(self, ids: list[int], sampling: Sampling) -> Ticket:
        """Queue a request; read its tokens with `Ticket.steps`."""
        if not ids:
            raise ValueError("every prompt needs at least one token (start from <bos>)")
        budget = min(sampling.max_new_tokens, self.context - len(ids))
        ticket = Ticket(list(ids), sampling, budget)
        if sampling.seed is not None:
            ticket.generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        if budget <= 0:
            ticket.end()
            return ticket
        with self._wake:
            if self._threaded and (self._thread is None or not self._thread.is_alive()):
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="flashlm-scheduler", daemon=True)
                self._thread.start()
            self.waiting.append(ticket)
            self._wake.notify()
        return ticket

    def close(self) -> None:
        """Stop the thread after its current step; requests still queued or running end there."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def running(self) -> int:
        return len(self.rows)

    # ---- the scheduler thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self.waiting and not self.rows and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error, the thread goes on
                self._fail(exc)
        self._fail(RuntimeError("the server is shutting down"))

    def step(self) -> None:
        """One scheduling step under the model lock: retire closed rows, admit waiting requests (their
        first token comes from their prompt's pass), then one decode step for every running row."""
        with self.lock, torch.no_grad():
            self._retire([i for i, t in enumerate(self.rows) if t.closed.is_set()])
            self._admit()
            if self.rows:
                self._decode()

    def _admit(self) -> None:
        while len(self.rows) < self.max_rows:
            with self._wake:
                if not self.waiting:
                    return
                ticket = self.waiting.popleft()
            if ticket.closed.is_set():
                ticket.end()
                continue
            self._joining = ticket
            self._join(ticket)
            self._joining = None

    def _join(self, ticket: Ticket) -> None:
        """Run the newcomer's prompt alone, emit its first token, and add its cache row to the batch."""
        ids = ticket.ids
        cache = KVCache(
            self.model.cfg, 1, self.context, self.device, self.dtype, pad_left=torch.zeros(1, dtype=torch.long)
        )
        logits = self.model(torch.tensor([ids], device=self.device), cache=cache).logits[:, -1]
        token = self._sample(ticket, logits)
        if self._emit(ticket, token):
            return
        if self.cache is None:
            self.cache, self.rows, self.last = cache, [], []
            self.decoder = DecodeStep(self.model, self.cache)
        else:
            if cache.seen > self.cache.seen:  # a newcomer longer than the batch: move the batch right
                shift_cache(self.cache, cache.seen - self.cache.seen)
            shift_cache(cache, self.cache.seen - cache.seen)
            append_rows(self.cache, cache)
        self.rows.append(ticket)
        self.last.append(token)
        self.peak_rows = max(self.peak_rows, len(self.rows))

    def _decode(self) -> None:
        cache = self.cache
        if cache.seen >= cache.max_len:  # no free slot: drop the padding every row has
            shift_cache(cache, -int(cache.pad_left.min()))
        tokens = torch.tensor(self.last, dtype=torch.long, device=self.device)
        logits = self.decoder(tokens)
        # plain greedy rows in one argmax (what `pick` does row by row); the others sample one by one
        greedy = logits.float().argmax(-1).tolist()
        done = []
        for row, ticket in enumerate(self.rows):
            if ticket.closed.is_set():
                done.append(row)
                continue
            s = ticket.sampling
            plain = s.temperature <= 0 and s.repetition_penalty == 1.0
            token = greedy[row] if plain else self._sample(ticket, logits[row : row + 1])
            self.last[row] = token
            if self._emit(ticket, token):
                done.append(row)
        self._retire(done)

    def _sample(self, ticket: Ticket, logits: torch.Tensor) -> int:
        s = ticket.sampling
        history = None
        if s.repetition_penalty != 1.0:  # the prompt and what the row produced, as generate_tokens keeps it
            history = torch.tensor([ticket.ids + ticket.produced], dtype=torch.long, device=self.device)
        return int(pick(next_token_scores(logits, history, s), s, ticket.generator)[0])

    def _emit(self, ticket: Ticket, token: int) -> bool:
        """Hand a token to its request; True when the request is finished (eos, budget or closed)."""
        ticket.produced.append(token)
        ticket.out.put(token)
        finished = (
            ticket.closed.is_set()
            or len(ticket.produced) >= ticket.budget
            or (ticket.sampling.stop_at_eos and self.eos_id is not None and token == self.eos_id)
        )
        if finished:
            ticket.end()
        return finished

    def _retire(self, rows: list[int]) -> None:
        if not rows:
            return
        gone = set(rows)
        for row in gone:
            self.rows[row].end()
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        self.last = [self.last[i] for i in keep]
        if not keep:
            self.cache, self.decoder = None, None
            return
        keep_rows(self.cache, keep)
        # the slots every remaining row holds as padding are free again: move the batch left over them
        # once they are many (attention of whole-context layers runs over every slot)
        free = int(self.cache.pad_left.min())
        if free >= 32 or free * 2 >= self.cache.seen:
            shift_cache(self.cache, -free)

    def _fail(self, exc: BaseException) -> None:
        with self._wake:
            tickets = [*self.rows, *self.waiting, *([self._joining] if self._joining else [])]
            self.waiting.clear()
            self._joining = None
        self.rows, self.last, self.cache, self.decoder = [], [], None, None
        for ticket in tickets:
            ticket.end(exc)
