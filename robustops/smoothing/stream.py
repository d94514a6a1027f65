"""Sequential certification on the network: the batch-refill engine behind ``Smooth.certify_radius``,
``certify_radii``, ``certify_sequential`` and ``certify_stream``, fed to the statistics of
``robustops.smoothing.sequential``.

How it runs:

- Inputs are taken from an iterator as slots open. An input is in a *slot* (a row of the device vote
  table and of the test's state) from the start of its selection samples until its decision; then its
  slot takes the next waiting input. Every forward pass holds exactly ``batch_size`` noisy rows, cut
  from the pending samples of the slots in the order they were filled (the oldest first), so a pass
  can hold the tail of one input's chunk and the heads of others': it is full until the iterator runs
  dry.
- Full passes to the end: once the iterator is dry, a pass that the open chunks cannot fill is filled
  with samples *ahead* of the open inputs' looks: estimation samples past a slot's next look, up to the
  look after it (its next chunk, should it need one), counted in a separate row of the vote table. The
  look still sees exactly the samples up to it (drawing before looking is sound: a look's bound uses
  its count only, and the samples past it are the same noise rows the slot would draw next); when the
  slot goes on, the ahead votes join its count, and a chunk that ahead samples completed is read at
  once. Ahead samples of an input decided at the look are drawn for nothing (``unused``); the last
  passes are then full as long as the open inputs' next chunks hold a pass.
- A slot asks for the samples up to its next look (the n0 selection samples first, then the chunks of
  the look schedule). When a pass completes a slot's chunk, the slot is *parked* (it draws no more
  samples) and its vote row is copied to the host; the decision is taken on the host and the slot is
  either released or given its next chunk. On CUDA the copy is asynchronous and read one pass later,
  so the host prepares pass t + 1 while pass t runs: one synchronization per pass, never an idle GPU
  while the host decides. The votes stay on the device (``count_votes_``) in between.
- Noise is ``gaussian_noise`` with the keys and offsets of ``Smooth.certify``: the selection samples of
  the input with index i are rows i * n0 + j of the SELECTION key, its estimation samples rows
  i * n_max + j of the ESTIMATION key. An input's noise depends only on (seed, index, phase): not on
  batch_size, on its neighbours or on the refill order; its first n estimation samples are those of
  ``Smooth.certify(x, n0, n_max, ...)``.
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import stats

from .. import _checks, _rng
from .sequential import (CERTIFIED, DEFAULT_GROWTH, DEFAULT_N0, DEFAULT_N_MIN, DEFAULT_SCHEDULE, DEFAULT_TEST, TESTS,
                         SequentialTest)
from .votes import ESTIMATION, SELECTION, Piece, phase_seed

__all__ = ["SequentialRecord", "SequentialResult", "certify_stream", "check_radii"]

@dataclass
class SequentialRecord:
    """The result of one input of a sequential run (host values).

    position: its place in the input iterator; index: its global index (the noise's);
    prediction: the class cA when certified (at the smallest certified radius of the grid; full mode: at
    radius >= 0), else -1; radius: the largest certified radius of the grid (full mode: sigma *
    Phi^-1(pA_lower)), 0 when none; decisions int8 [R]: CERTIFIED / NOT_CERTIFIED / ABSTAINED per radius
    (empty in full mode); samples: noisy samples spent on the input (n0 + estimation samples);
    counts int64 [C]: votes of the estimation samples; selection_counts int64 [C]; pA_lower, pA_upper:
    the confidence sequence's bounds on pA when the input stopped; nan_votes: samples with NaN logits;
    finite: whether the input's values were all finite (a non-finite input abstains); unused: estimation
    samples drawn ahead of a look the input never needed (passes filled at the end of a run; not in
    samples)."""
    position: int
    index: int
    prediction: int
    radius: float
    decisions: np.ndarray
    samples: int
    counts: np.ndarray
    selection_counts: np.ndarray
    pA_lower: float
    pA_upper: float
    nan_votes: int
    finite: bool
    unused: int = 0


@dataclass
class SequentialResult:
    """Output of the sequential certification of B inputs (CPU tensors); see SequentialRecord for the
    fields. radii: float64 [R], the radii of the decisions' columns (empty in full mode); test: "betting" or
    "cp"; unused: int64 [B], samples drawn ahead and never counted (SequentialRecord). ``prediction, radius =
    result`` unpacks as CertifyResult does."""
    prediction: torch.Tensor
    radius: torch.Tensor
    decisions: torch.Tensor
    radii: torch.Tensor
    samples: torch.Tensor
    counts: torch.Tensor
    selection_counts: torch.Tensor
    pA_lower: torch.Tensor
    pA_upper: torch.Tensor
    nan_votes: torch.Tensor
    finite_input: torch.Tensor
    test: str
    unused: Optional[torch.Tensor] = None

    def __iter__(self):
        if self.prediction.numel() == 1 and self.radius.numel() == 1:
            return iter((int(self.prediction.reshape(-1)[0]), float(self.radius.reshape(-1)[0])))
        return iter((self.prediction, self.radius))

    @staticmethod
    def collect(records: Sequence[SequentialRecord], radii, C: int, test: str) -> "SequentialResult":
        recs = sorted(records, key=lambda r: r.position)
        R = len(radii)

        def col(name, dtype):
            return torch.tensor(np.array([getattr(r, name) for r in recs], dtype=dtype))

        def mat(name, width):
            a = np.array([getattr(r, name) for r in recs], dtype=np.int64).reshape(len(recs), width)
            return torch.from_numpy(a)
        return SequentialResult(
            prediction=col("prediction", np.int64), radius=col("radius", np.float64),
            decisions=mat("decisions", R), radii=torch.tensor(list(radii), dtype=torch.float64),
            samples=col("samples", np.int64), counts=mat("counts", C), selection_counts=mat("selection_counts", C),
            pA_lower=col("pA_lower", np.float64), pA_upper=col("pA_upper", np.float64),
            nan_votes=col("nan_votes", np.int64), finite_input=col("finite", bool), test=test,
            unused=col("unused", np.int64))


def check_radii(radii, name: str = "radii") -> List[float]:
    """A non-empty list of finite radii >= 0 (from a number or a sequence)."""
    if _checks.is_number(radii):
        radii = [radii]
    if isinstance(radii, torch.Tensor):
        radii = radii.reshape(-1).tolist()
    if not isinstance(radii, (list, tuple, np.ndarray)) or len(radii) == 0:
        raise ValueError(f"{name} must be a non-empty list of radii >= 0, got {radii!r}")
    return [_checks.check_number(r, f"{name}[{k}]" if name == "radii" else name, 0.0) for k, r in enumerate(radii)]


def certify_stream(smooth, inputs: Iterable[Tuple[int, torch.Tensor]], *, alpha: float, radii=None,
                   precision: Optional[float] = None, test: str = DEFAULT_TEST, beta: Optional[float] = None,
                   n0: int = DEFAULT_N0, n_min: int = DEFAULT_N_MIN, n_max: int = 100_000, batch_size: int = 1000,
                   seed: Optional[int] = None, max_active: Optional[int] = None, growth: float = DEFAULT_GROWTH,
                   schedule: str = DEFAULT_SCHEDULE) -> Iterator[SequentialRecord]:
    """Sequential certification of the inputs of an iterator of (index, x_i) pairs, x_i one input
    (a tensor without the batch dimension); yields a SequentialRecord per input as soon as it is
    decided (completion order, not input order). radii: decide these radii (grid mode; one radius:
    fixed-radius mode); precision: full-radius mode (radii None). See Smooth.certify_radii for the
    other arguments. max_active: inputs in flight at once (None: enough to fill the passes)."""
    alpha = _checks.check_probability(alpha, "alpha")
    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(map(repr, TESTS))}, got {test!r}")
    n0 = _checks.check_int(n0, "n0", 1)
    n_min = _checks.check_int(n_min, "n_min", 1)
    n_max = _checks.check_int(n_max, "n_max", 1)
    if n_min > n_max:
        raise ValueError(f"n_min must be <= n_max, got n_min {n_min}, n_max {n_max}")
    batch_size = _checks.check_int(batch_size, "batch_size", 1)
    if radii is None:
        if precision is None:
            raise ValueError("give radii (decide those radii) or precision (the largest certified radius to that "
                             "precision)")
        precision = _checks.check_number(precision, "precision", 0.0, strict=True)
        thresholds, radii = None, []
    else:
        if precision is not None:
            raise ValueError("radii and precision exclude each other: radii decides a grid of radii, precision asks "
                             "for the largest certified radius")
        radii = check_radii(radii)
        thresholds = stats.norm.cdf(np.asarray(radii) / smooth.sigma)
    if max_active is None:
        max_active = min(4096, 2 * -(-batch_size // min(n0, n_min)) + 16)
    max_active = _checks.check_int(max_active, "max_active", 1)
    seed = _rng.resolve_seed(seed)
    engine = _Engine(smooth, SequentialTest(max_active, test=test, alpha=alpha, beta=beta, n_min=n_min, n_max=n_max,
                                            thresholds=thresholds, growth=growth, schedule=schedule,
                                            precision_z=None if precision is None else precision / smooth.sigma),
                     radii, n0, n_max, batch_size, seed)
    yield from engine.run(iter(inputs))


class _Engine:
    """One sequential run: slots, the device vote table, the lagged host reads."""

    def __init__(self, smooth, test: SequentialTest, radii, n0, n_max, batch_size, seed):
        self.smooth, self.test, self.radii = smooth, test, list(radii)
        self.n0, self.n_max, self.batch_size = n0, n_max, batch_size
        self.keys = (phase_seed(seed, SELECTION), phase_seed(seed, ESTIMATION))
        S = len(test.n)
        self.S, self.C = S, smooth.num_classes
        self.xs = self.counts = self.finite = None
        self.free = list(range(S - 1, -1, -1))
        self.order: collections.OrderedDict = collections.OrderedDict()  # filled slots, oldest first
        self.index = [0] * S
        self.position = [0] * S
        self.phase = [0] * S
        self.drawn = [0] * S  # samples drawn in the slot's current phase
        self.target = [0] * S  # samples of the phase wanted before the next look
        self.parked = [False] * S
        self.c_a = [0] * S
        self.selection = [None] * S  # host votes of the selection samples
        self.sel_nan = [0] * S
        self.ahead = [0] * S  # estimation samples drawn past the slot's next look (vote row S + slot)
        self.ready: List[int] = []  # slots whose next chunk ahead samples completed: to read
        self.exhausted = False

    # ----------------------------------------------------------------------------------- set-up

    def _alloc(self, x: torch.Tensor) -> None:
        sm = self.smooth
        device = sm.device or x.device
        self.device = device
        self.shape = tuple(x.shape)
        if sm.input_shape is not None and self.shape != sm.input_shape:
            raise ValueError(f"each input must have shape input_shape {list(sm.input_shape)}, got {list(self.shape)}")
        if sm.channels_last and len(self.shape) not in (3, 4):
            raise ValueError(f"channels_last needs 3-D or 4-D inputs (one input of a 4-D / 5-D batch), got "
                             f"{list(self.shape)}")
        self.xs = torch.empty((self.S,) + self.shape, dtype=torch.float32, device=device)
        self.counts = torch.zeros(2 * self.S, self.C + 1, dtype=torch.int64, device=device)  # counted; ahead
        self.finite = torch.zeros(self.S, dtype=torch.bool, device=device)
        self.sampler = sm.vote_sampler(device)
        self.lag = 1 if device.type == "cuda" else 0

    def _admit(self, slot: int, position: int, index, x) -> None:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"each input must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__} (input {position})")
        if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.dtype.is_floating_point:
            index = int(index)
        if not _checks.is_int(index) or index < 0:
            raise ValueError(f"input indices must be ints >= 0, got {index!r} (input {position})")
        if self.xs is None:
            self._alloc(x)
        elif tuple(x.shape) != self.shape:
            raise ValueError(f"every input must have the shape of the first, {list(self.shape)}; input {position} has "
                             f"{list(x.shape)}")
        self.xs[slot].copy_(x, non_blocking=True)  # no stream synchronization (the pass in flight runs on)
        self.finite[slot] = torch.isfinite(self.xs[slot]).all()
        self.counts[slot].zero_()
        self.counts[self.S + slot].zero_()
        self.ahead[slot] = 0
        self.index[slot], self.position[slot] = int(index), position
        self.phase[slot], self.drawn[slot], self.target[slot] = SELECTION, 0, self.n0
        self.parked[slot] = False
        self.order[slot] = None

    # ------------------------------------------------------------------------------------ the loop

    def run(self, source) -> Iterator[SequentialRecord]:
        pending: collections.deque = collections.deque()
        position = 0
        with torch.inference_mode():
            while True:
                if self.ready:  # chunks completed by ahead samples: their votes are on the device already
                    with _on_device(self.device):
                        pending.append(self._snapshot(self.ready))
                    self.ready = []
                want = sum(self.target[s] - self.drawn[s] for s in self.order if not self.parked[s])
                while not self.exhausted and self.free and want < self.batch_size:
                    try:
                        index, x = next(source)
                    except StopIteration:
                        self.exhausted = True
                        break
                    slot = self.free.pop()
                    self._admit(slot, position, index, x)
                    position += 1
                    want += self.n0
                if want < self.batch_size and pending:  # decide first: it may free or feed slots
                    yield from self._read(pending.popleft())
                    continue
                if want == 0:
                    if pending:
                        yield from self._read(pending.popleft())
                        continue
                    return
                pending.append(self._pass())
                while len(pending) > self.lag:
                    yield from self._read(pending.popleft())

    def _pass(self):
        """One forward pass of up to batch_size noisy rows; returns the lagged read of the slots whose
        chunk it completed (or None)."""
        pieces, filled, completed = [], 0, []
        for s in self.order:
            if self.parked[s]:
                continue
            take = min(self.target[s] - self.drawn[s], self.batch_size - filled)
            if take <= 0:
                continue
            pieces.append((s, self.drawn[s], take, s))
            self.drawn[s] += take
            filled += take
            if self.drawn[s] == self.target[s]:
                self.parked[s] = True
                completed.append(s)
            if filled == self.batch_size:
                break
        if self.exhausted and filled < self.batch_size:
            filled += self._fill_ahead(pieces, self.batch_size - filled)
        with _on_device(self.device):
            return self._launch(pieces, completed)

    def _launch(self, pieces, completed):
        """The pass's noise, forward and votes, then the asynchronous copy of the completed slots' votes,
        all on the data device's current stream (the caller made that device current)."""
        self.sampler.run(self.xs, [Piece(s, self.keys[self.phase[s]], self.index[s] * self._stride(s) + j, take, row)
                                   for s, j, take, row in pieces], self.counts)
        if not completed:
            return None
        return self._snapshot(completed)

    def _snapshot(self, completed):
        """The lagged read of the completed slots' counted votes (and finite flags)."""
        rows = torch.tensor(completed, dtype=torch.int64)
        rows = (rows.pin_memory() if self.device.type == "cuda" else rows).to(self.device, non_blocking=True)
        snap = torch.cat([self.counts.index_select(0, rows).flatten(), self.finite.index_select(0, rows).long()])
        return (completed,) + _copy_to_host(snap, self.device)

    def _fill_ahead(self, pieces, room: int) -> int:
        """Adds pieces of samples past the estimation slots' next looks (up to the look after), oldest slot
        first, counted in the ahead rows; returns the samples added."""
        test, added = self.test, 0
        for s in self.order:
            if self.phase[s] != ESTIMATION or self.drawn[s] != self.target[s] or room == added:
                continue
            k = min(int(test.k[s]) + 1, int(test.K_row[s]) - 1)
            take = min(int(test.looks[s, k]) - self.target[s] - self.ahead[s], room - added)
            if take > 0:
                pieces.append((s, self.target[s] + self.ahead[s], take, self.S + s))
                self.ahead[s] += take
                added += take
        return added

    def _stride(self, s: int) -> int:
        """Noisy rows per input of the slot's phase: an input's samples of a phase are rows index * stride + j."""
        return self.n0 if self.phase[s] == SELECTION else self.n_max

    def _read(self, item) -> Iterator[SequentialRecord]:
        if item is None:
            return
        slots, host, event = item
        if event is not None:
            event.synchronize()
        data = host.numpy() if host.device.type == "cpu" else host.cpu().numpy()
        k, C = len(slots), self.C
        table = data[:k * (C + 1)].reshape(k, C + 1)
        finite = data[k * (C + 1):].astype(bool)
        sel = [(s, table[r], finite[r]) for r, s in enumerate(slots) if self.phase[s] == SELECTION]
        est = [(s, table[r]) for r, s in enumerate(slots) if self.phase[s] == ESTIMATION]
        test = self.test
        started = []
        for s, row, fin in sel:
            self.selection[s], self.sel_nan[s] = row[:C].copy(), int(row[C])
            if not fin or row[:C].sum() == 0:  # a non-finite input, or no class: abstain
                test.abstain([s])
                yield self._finish(s, np.zeros(C + 1, np.int64), fin)
                continue
            self.c_a[s] = int(np.argmax(row[:C]))  # ties -> lowest class, as Smooth.certify
            started.append(s)
        if started:
            test.start(started, [self.selection[s][self.c_a[s]] for s in started], self.n0)
            for s in started:
                self.phase[s], self.drawn[s] = ESTIMATION, 0
                self.counts[s].zero_()
                if test.done[s]:  # no radius of the grid can be certified within n_max
                    yield self._finish(s, np.zeros(C + 1, np.int64), True)
                else:
                    self.target[s] = int(test.chunk([s])[0])
                    self.parked[s] = False
        if est:
            ids = [s for s, _ in est]
            done = test.update(ids, [row[self.c_a[s]] for s, row in est])
            for (s, row), d in zip(est, done):
                if d:
                    yield self._finish(s, row, True)
                else:
                    self._go_on(s)

    def _go_on(self, s: int) -> None:
        """The slot's next chunk; the votes drawn ahead of the look join its count (device order: after
        the passes that drew them), and a chunk they complete is read at once."""
        self.target[s] = self.drawn[s] + int(self.test.chunk([s])[0])
        if self.ahead[s]:
            self.counts[s] += self.counts[self.S + s]
            self.counts[self.S + s].zero_()
            self.drawn[s] += self.ahead[s]
            self.ahead[s] = 0
        if self.drawn[s] == self.target[s]:
            self.ready.append(s)
        else:
            self.parked[s] = False

    def _finish(self, s: int, row: np.ndarray, finite: bool) -> SequentialRecord:
        test, C = self.test, self.C
        dec = test.decisions[s].copy()
        lower = float(test.lower[s])
        if test.R:
            cert = dec == CERTIFIED
            radius = max((r for r, c in zip(self.radii, cert) if c), default=0.0)
            prediction = self.c_a[s] if cert.any() else -1
        else:
            ok = lower >= 0.5
            radius = float(self.smooth.sigma * test.radius_z([s])[0]) if ok else 0.0
            prediction = self.c_a[s] if ok else -1
        rec = SequentialRecord(
            position=self.position[s], index=self.index[s], prediction=int(prediction), radius=float(radius),
            decisions=dec.astype(np.int8), samples=int(self.n0 + test.n[s]), counts=row[:C].astype(np.int64),
            selection_counts=self.selection[s].astype(np.int64), pA_lower=lower, pA_upper=float(test.upper[s]),
            nan_votes=int(row[C]) + self.sel_nan[s], finite=bool(finite), unused=self.ahead[s])
        self.ahead[s] = 0
        del self.order[s]
        self.free.append(s)
        return rec


def _on_device(device: torch.device):
    """The data's CUDA device made current (its stream is the current stream there), else nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _copy_to_host(snap: torch.Tensor, device: torch.device):
    """(host copy of snap, event or None). On CUDA the copy is asynchronous into pinned memory and the
    event is recorded on the current stream of the data's device, where the copy was queued: an event
    on another device's stream would complete before the copy lands, and the host would read stale
    votes. The reader waits on the event one pass later."""
    if device.type != "cuda":
        return snap, None
    host = snap.to("cpu", non_blocking=True)  # a non-blocking device-to-host copy lands in pinned memory
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return host, event
