"""Step-level continuous batching: every in-flight image shares each UNet call it can.

Request-level batching (one pipeline call per group of equal plans, one group after another)
makes a 5-step request wait behind a 50-step one and never lets two plans share a network call.
LLM servers solved the same problem with iteration-level scheduling (Yu et al., "Orca", OSDI
2022; vLLM's continuous batching). ``StepBatcher`` does it for diffusion:

- Each image in flight is a ``Slot`` with its own sampler state (a fresh diffusers scheduler:
  DDIM, DPM-Solver++ or Euler, at its own step count), step index, guidance, skip state and
  model. Images of one request are separate slots, so they may advance apart.
- One *iteration* runs, per model, one UNet call on the rows of every selected slot at its own
  timestep (two rows per guided slot: unconditional and conditional; one unguided). A slot whose
  adaptive-skip estimator reuses its previous prediction this step takes no row and advances
  for free, so what skipping saves becomes room for others.
- New requests join at an iteration boundary (admission, first come first served, up to
  ``max_inflight`` images); finished images leave at once and their request is answered as soon
  as its last image is done. A cancelled or timed-out request leaves at the next boundary and
  frees its rows.
- Which slots take rows (``StepBatchConfig``): at most ``max_rows`` rows per call. Under
  ``policy="srpt"`` the slots with the fewest remaining steps go first (shortest remaining
  processing time, the order that minimises mean latency), under ``"fifo"`` the oldest. A slot
  passed over ``max_wait_iterations`` times in a row goes first (no starvation). With
  ``latency_slack`` set, while a short request (plan of at most ``short_steps`` steps) is in the
  call, longer ones are added only while the predicted iteration time stays within
  ``1 + latency_slack`` times that of the short rows alone. The prediction is a per-model cost
  model t(rows) = a + b·rows fitted online to the calls made (``CostModel``): on a GPU, where a
  dominates, the call fills up; on a CPU, where b dominates, short requests are not slowed down
  by long ones they share the machine with.

Images equal what each request gives alone through ``BudgetDiffusionPipeline.__call__`` with the
same seed, whatever they shared their calls with, up to floating-point reassociation in batched
kernels (tests/test_continuous.py checks 1e-3 on [0, 1] pixels for every scheduler, guided and
unguided, skipping, joining and leaving at every step). The library keeps no thread of its own
unless asked: ``Generator.__call__`` drives ``run_until_idle`` in the caller's thread, and a
server calls ``start()`` for a background loop and submits from any thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from budgetdiff.methods.adaptive import AdaptiveSkipConfig, AdaptiveSkipState, parametrization_of
from budgetdiff.generation.pipeline import coordinate_channels, make_scheduler

POLICIES = ("srpt", "fifo")


class QueueFullError(RuntimeError):
    """``submit`` refused a request: the waiting queue holds ``max_queue`` images already."""


@dataclass(frozen=True)
class StepBatchConfig:
    """How the step scheduler fills its UNet calls.

    Args:
        max_rows: the most UNet batch rows per call and model (a guided image takes 2).
        max_inflight: the most images denoising at once (admitted); more wait in the queue.
            Above ``max_rows`` (in images) so that rows freed by skipping slots are used.
        max_queue: the most images waiting for admission; ``submit`` raises ``QueueFullError``
            beyond it (None: unbounded).
        policy: "srpt" (fewest remaining steps first) or "fifo" (oldest first).
        latency_slack: None, or how much slower (as a fraction) an iteration that carries a short
            request may become because longer requests share it.
        short_steps: requests whose plan has at most this many steps count as short.
        max_wait_iterations: a slot passed over this many iterations in a row goes first.
    """

    max_rows: int = 16
    max_inflight: int = 16
    max_queue: int | None = None
    policy: str = "fifo"
    latency_slack: float | None = None
    short_steps: int = 16
    max_wait_iterations: int = 8

    def __post_init__(self):
        def check_int(name, value, low):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")

        check_int("max_rows", self.max_rows, 2)
        check_int("max_inflight", self.max_inflight, 1)
        if self.max_queue is not None:
            check_int("max_queue", self.max_queue, 0)
        check_int("short_steps", self.short_steps, 1)
        check_int("max_wait_iterations", self.max_wait_iterations, 1)
        if self.policy not in POLICIES:
            raise ValueError(f"policy: must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.latency_slack is not None and (isinstance(self.latency_slack, bool) or not isinstance(
                self.latency_slack, (int, float)) or not math.isfinite(self.latency_slack) or self.latency_slack < 0):
            raise ValueError(f"latency_slack: must be None or a finite number >= 0, got {self.latency_slack!r}")

    def to_record(self) -> dict:
        return {"max_rows": self.max_rows, "max_inflight": self.max_inflight, "max_queue": self.max_queue,
                "policy": self.policy, "latency_slack": self.latency_slack, "short_steps": self.short_steps,
                "max_wait_iterations": self.max_wait_iterations}


class CostModel:
    """Seconds of one UNet call of ``rows`` rows, t = a + b·rows, fitted by exponentially
    weighted least squares to the calls observed (``decay`` per call). Before two different row
    counts were seen it assumes a = b (a call of one row costs twice a row's share)."""

    def __init__(self, decay: float = 0.98):
        self.decay = decay
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.rows_seen: set[int] = set()

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.n, self.sx, self.sy = d * self.n + 1, d * self.sx + rows, d * self.sy + seconds
        self.sxx, self.sxy = d * self.sxx + rows * rows, d * self.sxy + rows * seconds
        self.rows_seen.add(int(rows))

    def coefficients(self) -> tuple[float, float] | None:
        if self.n == 0:
            return None
        if len(self.rows_seen) >= 2:
            var = self.sxx / self.n - (self.sx / self.n) ** 2
            if var > 1e-9:
                b = (self.sxy / self.n - self.sx / self.n * self.sy / self.n) / var
                a = self.sy / self.n - b * self.sx / self.n
                if a >= 0 and b > 0:
                    return a, b
        per = (self.sy / self.n) / (1 + self.sx / self.n)  # a = b prior through the mean call
        return per, per

    def predict(self, rows: int) -> float:
        """Predicted seconds (in units of a row when nothing was observed yet)."""
        if rows <= 0:
            return 0.0
        ab = self.coefficients()
        a, b = ab if ab is not None else (1.0, 1.0)
        return a + b * rows

    def describe(self) -> dict:
        ab = self.coefficients()
        return {"a_s": ab[0] if ab else None, "b_s_per_row": ab[1] if ab else None,
                "rows_seen": sorted(self.rows_seen)}


@dataclass(eq=False)  # compared and hashed by identity
class Ticket:
    """One submission: its requests' images, answered together when the last is done.

    ``future`` resolves to the list of ``GenerationResult`` in request order, or raises
    (``TimeoutError`` past the deadline, ``CancelledError`` after ``cancel``)."""

    requests: list
    plans: list
    generator: Any
    output_type: str
    deadline: float | None
    submitted: float = field(default_factory=time.perf_counter)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    results: list = field(default_factory=list)
    remaining: int = 0
    admitted: float | None = None
    on_image: Callable[[int, Any], None] | None = None

    def cancel(self) -> bool:
        """Cancel: the images still denoising leave at the next iteration boundary."""
        return self.future.cancel()

    def done(self) -> bool:
        return self.future.done()


class Slot:
    """One image in flight: its sampler state, conditioning, skip state and accounting."""

    def __init__(self, ticket: Ticket, index: int, seq: int, hidden: torch.Tensor, mask: torch.Tensor,
                 pooled: torch.Tensor, truncated: bool):
        plan = ticket.plans[index]
        request = ticket.requests[index]
        model = ticket.generator.models[plan.model]
        pipe = model.pipe
        self.ticket, self.index, self.seq = ticket, index, seq
        self.request, self.plan, self.model, self.pipe = request, plan, model, pipe
        self.unet = pipe.unet
        self.guidance = float(plan.guidance)
        self.copies = 2 if self.guidance != 1.0 else 1
        self.hidden, self.mask, self.pooled, self.truncated = hidden, mask, pooled, truncated
        device = pipe.device
        self.sched = make_scheduler(plan.scheduler, pipe.scheduler.config, timestep_spacing="trailing")
        self.sched.set_timesteps(plan.steps, device=device)
        self.timesteps = self.sched.timesteps
        gen = torch.Generator("cpu").manual_seed(int(request.seed))
        self.latents = pipe.prepare_latents(1, [gen], device, pipe.unet.dtype, self.sched)
        self.step = 0
        self.skip = plan.skip if isinstance(plan.skip, AdaptiveSkipConfig) else None
        self.skip_state = AdaptiveSkipState() if self.skip is not None else None
        self.space = self.skip.reuse if self.skip is not None else "output"
        self.par = parametrization_of(self.sched) if self.skip is not None and self.space != "output" else None
        self.pending_skip: bool | None = None  # this step's decision, made once
        self.waited = 0  # iterations in a row this slot needed rows and got none
        self.compute_seconds = 0.0  # its share of UNet calls and scheduler steps
        self.max_call_images = 0
        self.calls = 0
        self.call_images = 0
        self.admitted = time.perf_counter()

    @property
    def total_steps(self) -> int:
        return len(self.timesteps)

    @property
    def remaining(self) -> int:
        return self.total_steps - self.step

    def decide(self) -> bool:
        """Whether this step reuses the previous prediction (decided once per step)."""
        if self.pending_skip is None:
            if self.skip_state is None:
                self.pending_skip = False
            else:
                self.pending_skip = bool(self.skip_state.decide(1, self.skip, self.latents.device)[0])
        return self.pending_skip

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scaled UNet input rows (copies, C, H, W) and this step's timestep."""
        t = self.timesteps[self.step]
        x = torch.cat([self.latents] * self.copies) if self.copies == 2 else self.latents
        return self.sched.scale_model_input(x, t), t

    def advance(self, output: torch.Tensor | None, model_in: torch.Tensor, t) -> None:
        """One scheduler step on the network's rows ``output`` (None: reuse the cached prediction)."""
        if self.skip_state is not None:
            state = self.skip_state
            if output is None:
                output = state.cache if self.space == "output" else self.par.from_space(state.cache, model_in, t,
                                                                                        self.space)
            else:
                state.cache = output if self.space == "output" else self.par.to_space(output, model_in, t, self.space)
        if self.copies == 2:
            uncond, cond = output.chunk(2)
            output = uncond + self.guidance * (cond - uncond)
        self.latents = self.sched.step(output, t, self.latents).prev_sample
        if self.skip_state is not None:
            self.skip_state.observe(self.latents)
        self.step += 1
        self.pending_skip = None


class StepBatcher:
    """The denoising-step scheduler (module docstring).

    Use it synchronously (``submit`` then ``run_until_idle``; ``Generator.__call__`` does) or as
    a service (``start()`` runs the loop in a daemon thread; ``submit`` from any thread returns a
    ``Ticket`` whose ``future`` the caller awaits, e.g. with ``asyncio.wrap_future``).
    """

    def __init__(self, config: StepBatchConfig | None = None):
        self.config = config or StepBatchConfig()
        self._lock = threading.Condition()
        self._waiting: collections.deque[tuple[Ticket, int]] = collections.deque()  # (ticket, image index)
        self._slots: list[Slot] = []
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._stop = False
        self.costs: dict[int, CostModel] = {}
        # running statistics (read them with stats())
        self.iterations = 0
        self.unet_calls = 0
        self.rows_total = 0
        self.images_done = 0
        self.skipped_steps = 0
        self.computed_steps = 0
        self.cancelled_images = 0
        self.timed_out_images = 0
        self.observers: list[Callable[[str, dict], None]] = []  # fn(event, data): "call", "image", "queue_delay"

    # -- submission ------------------------------------------------------------------------------
    def submit(self, generator, requests: Sequence, output_type: str = "pil", timeout_s: float | None = None,
               on_image: Callable[[int, Any], None] | None = None) -> Ticket:
        """Plan ``requests`` (``generator.plan``: raises ``RequestError`` for what the generator
        cannot serve) and queue their images. ``timeout_s``: the request fails with
        ``TimeoutError`` and leaves if not done by then. ``on_image(i, result)`` is called as
        each image finishes (in the loop's thread)."""
        requests = list(requests)
        plans = generator.plan(requests)
        deadline = time.perf_counter() + timeout_s if timeout_s is not None else None
        ticket = Ticket(requests, plans, generator, output_type, deadline, on_image=on_image)
        ticket.results = [None] * len(requests)
        ticket.remaining = len(requests)
        if not requests:
            ticket.future.set_result([])
            return ticket
        with self._lock:
            limit = self.config.max_queue
            if limit is not None and len(self._waiting) + len(requests) > limit:
                raise QueueFullError(f"queue: {len(self._waiting)} images are waiting (limit {limit})")
            self._waiting.extend((ticket, i) for i in range(len(requests)))
            self._lock.notify_all()
        return ticket

    # -- the loop ----------------------------------------------------------------------------------
    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._slots

    def run_until_idle(self) -> None:
        """Run iterations until nothing waits or denoises (the synchronous use)."""
        while not self.idle():
            self.step()

    def start(self) -> "StepBatcher":
        """Run the loop in a daemon thread until ``stop()``."""
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="budgetdiff-step-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._slots:
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except BaseException as exc:  # fail what was in flight, keep serving
                self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            tickets = {id(s.ticket): s.ticket for s in self._slots}
            self._slots = []
        for t in tickets.values():
            if not t.future.done():
                t.future.set_exception(exc)

    # -- one iteration -----------------------------------------------------------------------------
    def step(self) -> None:
        """One iteration: drop cancelled/expired work, admit, select rows, call each model's
        UNet once, step every selected or skipping slot, hand back finished images."""
        now = time.perf_counter()
        self._drop_dead(now)
        self._admit(now)
        if not self._slots:
            return
        self.iterations += 1
        free, computing = [], []
        for s in self._slots:
            (free if s.decide() else computing).append(s)
        selected = self._select(computing)
        chosen = set(map(id, selected))
        for s in computing:
            s.waited = 0 if id(s) in chosen else s.waited + 1
        by_model: dict[int, list[Slot]] = {}
        for s in selected:
            by_model.setdefault(id(s.unet), []).append(s)
        for slots in by_model.values():
            self._call(slots)
        for s in free:
            start = time.perf_counter()
            model_in, t = s.model_input()
            s.advance(None, model_in, t)
            s.compute_seconds += time.perf_counter() - start
            self.skipped_steps += 1
        self._finish()

    def _drop_dead(self, now: float) -> None:
        """Drop the images of cancelled and expired requests (in flight or waiting); an expired
        request fails with ``TimeoutError``."""
        def dead(t: Ticket) -> bool:
            return t.future.done() or (t.deadline is not None and now > t.deadline)

        with self._lock:
            tickets = [s.ticket for s in self._slots] + [t for t, _ in self._waiting]
            verdict = {t: dead(t) for t in dict.fromkeys(tickets)}  # once per ticket
            gone = collections.Counter(t for t in tickets if verdict[t])  # ticket -> its images dropped
            if not gone:
                return
            self._waiting = collections.deque(w for w in self._waiting if w[0] not in gone)
        self._slots = [s for s in self._slots if s.ticket not in gone]
        for ticket, n in gone.items():
            if ticket.future.cancelled():
                self.cancelled_images += n
            elif not ticket.future.done():
                self.timed_out_images += n
                ticket.future.set_exception(TimeoutError(
                    f"timeout: the request was not done within its deadline ({ticket.remaining} of "
                    f"{len(ticket.requests)} images unfinished)"))

    def _admit(self, now: float) -> None:
        """First come first served, up to ``max_inflight`` images; one request's images are
        encoded together (one text-encoder call)."""
        room = self.config.max_inflight - len(self._slots)
        if room <= 0:
            return
        with self._lock:
            taken = []
            while self._waiting and len(taken) < room:
                taken.append(self._waiting.popleft())
        groups: dict[tuple[int, str], list[int]] = {}
        tickets: dict[int, Ticket] = {}
        for ticket, i in taken:
            tickets[id(ticket)] = ticket
            groups.setdefault((id(ticket), ticket.plans[i].model, ticket.plans[i].guidance != 1.0), []).append(i)
        for (tid, model_name, cfg), indices in groups.items():
            ticket = tickets[tid]
            if ticket.admitted is None:
                ticket.admitted = now
                for fn in self.observers:
                    fn("queue_delay", {"seconds": now - ticket.submitted, "mode": ticket.requests[0].mode})
            pipe = ticket.generator.models[model_name].pipe
            with ticket.generator._encoder_lock:
                hidden, mask, pooled, truncated = pipe.encode_prompt(
                    [ticket.requests[i].prompt for i in indices], cfg, pipe.device)
            n = len(indices)
            for j, i in enumerate(indices):
                rows = [j, n + j] if cfg else [j]
                slot = Slot(ticket, i, self._seq, hidden[rows], mask[rows], pooled[rows], truncated[j])
                self._seq += 1
                self._slots.append(slot)

    def _select(self, computing: list[Slot]) -> list[Slot]:
        """The slots that take rows this iteration (see the module docstring)."""
        if not computing:
            return []
        cfg = self.config

        def key(s: Slot) -> tuple:
            if s.waited >= cfg.max_wait_iterations:  # starved: the longest wait first
                return (0, -s.waited, s.seq)
            return (1, s.remaining if cfg.policy == "srpt" else 0, s.seq)

        order = sorted(computing, key=key)
        def short(s: Slot) -> bool:
            return s.plan.steps <= cfg.short_steps

        rows: dict[int, int] = {}
        selected: list[Slot] = []
        budget_time = None
        for s in order:
            unet = id(s.unet)
            new_rows = rows.get(unet, 0) + s.copies
            if new_rows > cfg.max_rows:
                continue
            if cfg.latency_slack is not None and selected:
                if budget_time is None and any(short(x) for x in selected) and not short(s):
                    # the short rows chosen so far set the iteration's time budget
                    budget_time = (1 + cfg.latency_slack) * self._predict(rows)
                if budget_time is not None and not short(s):
                    trial = dict(rows)
                    trial[unet] = new_rows
                    if self._predict(trial) > budget_time:
                        continue
            rows[unet] = new_rows
            selected.append(s)
        return selected

    def _predict(self, rows: dict[int, int]) -> float:
        return sum(self.costs.setdefault(k, CostModel()).predict(r) for k, r in rows.items())

    def _call(self, slots: list[Slot]) -> None:
        """One UNet call on the rows of ``slots`` (one model), then each slot's scheduler step."""
        start = time.perf_counter()
        inputs, ts = zip(*(s.model_input() for s in slots))
        x = torch.cat(inputs)
        t_rows = torch.cat([t.reshape(1).to(torch.float32).expand(s.copies) for s, t in zip(slots, ts)]).to(x.device)
        length = max(s.hidden.shape[1] for s in slots)
        hidden = torch.cat([_pad(s.hidden, length) for s in slots])
        mask = torch.cat([_pad(s.mask, length) for s in slots])
        pooled = torch.cat([s.pooled for s in slots])
        coords = coordinate_channels(x.shape[0], *x.shape[-2:], x.device, x.dtype)
        unet = slots[0].unet
        with torch.no_grad():
            out = unet(torch.cat([x, coords], 1), t_rows, encoder_hidden_states=hidden,
                       encoder_attention_mask=mask, class_labels=pooled).sample
        call_seconds = time.perf_counter() - start
        rows = x.shape[0]
        self.costs.setdefault(id(unet), CostModel()).observe(rows, call_seconds)
        self.unet_calls += 1
        self.rows_total += rows
        self.computed_steps += len(slots)
        for fn in self.observers:
            fn("call", {"rows": rows, "images": len(slots), "seconds": call_seconds, "model": slots[0].model.name})
        offset = 0
        with torch.no_grad():
            for s, model_in, t in zip(slots, inputs, ts):
                step_start = time.perf_counter()
                s.advance(out[offset:offset + s.copies], model_in, t)
                offset += s.copies
                s.compute_seconds += call_seconds * s.copies / rows + time.perf_counter() - step_start
                s.calls += 1
                s.call_images += len(slots)
                s.max_call_images = max(s.max_call_images, len(slots))

    def _finish(self) -> None:
        done = [s for s in self._slots if s.step >= s.total_steps]
        if not done:
            return
        self._slots = [s for s in self._slots if s.step < s.total_steps]
        now = time.perf_counter()
        for s in done:
            ticket = s.ticket
            if ticket.future.done():
                continue
            result = ticket.generator._result(s, now)
            ticket.results[s.index] = result
            ticket.remaining -= 1
            self.images_done += 1
            for fn in self.observers:
                fn("image", {"mode": s.request.mode, "latency_s": now - ticket.submitted, "nfe": result.record.nfe})
            if ticket.on_image is not None:
                ticket.on_image(s.index, result)
            if ticket.remaining == 0:
                ticket.future.set_result(ticket.results)

    # -- introspection -----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters since creation: iterations, UNet calls, rows per call, images, skips, queue."""
        with self._lock:
            waiting = len(self._waiting)
        return {"iterations": self.iterations, "unet_calls": self.unet_calls,
                "rows_per_call": self.rows_total / self.unet_calls if self.unet_calls else None,
                "images_done": self.images_done, "in_flight": len(self._slots), "waiting": waiting,
                "computed_steps": self.computed_steps, "skipped_steps": self.skipped_steps,
                "cancelled_images": self.cancelled_images, "timed_out_images": self.timed_out_images,
                "config": self.config.to_record()}


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad a (rows, L, ...) embedding or (rows, L) mask with zeros to ``length`` tokens: padded keys
    are masked in cross-attention, so the result does not depend on the padding."""
    if t.shape[1] == length:
        return t
    pad = torch.zeros((t.shape[0], length - t.shape[1]) + tuple(t.shape[2:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], 1)
