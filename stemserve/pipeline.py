"""The one separation pipeline: demucs' ``apply_model``, streamed, for every generation.

What it reproduces, step for step (demucs 2.0.3's ``separate.py`` and ``utils.py``, and
demucs 4.0.1's ``separate.py`` and ``apply.py``, which agree but where noted):

- the mix is normalised by the mean and (unbiased) standard deviation of its mono reference
  over the whole track, and the stems are de-normalised with them;
- segments of ``segment_length`` samples start every ``int((1 - overlap) * segment_length)``
  samples; each is sent at the network's valid length (its family's rule, see
  :data:`~stemserve.spec.FAMILIES`), padded with real neighbouring audio and with zeros
  only past the track's ends (``TensorChunk.padded``); the output is center-trimmed back;
- segment outputs are weighted by the triangular transition window raised to
  ``transition_power`` and divided by the summed weights;
- ``shifts``: demucs 2.0.3 sends each segment ``shifts`` times, each shifted by
  ``random.randint(0, max_shift)`` drawn segment by segment; demucs 4 shifts the whole
  track ``shifts`` times and splits each shifted copy (a "pass"); either way the draws come
  from one generator in demucs' order, so a seed reproduces demucs after
  ``random.seed(seed)``;
- a bag of models (demucs 4's ``BagOfModels``) runs every member over the track (its shifts
  drawn after the previous member's), and each source is the members' estimates weighted
  by the bag's matrix and divided by the weights' sum.

Unlike demucs it keeps up to ``in_flight`` requests in flight through a :class:`Backend`
(of every member and pass at once), adds results as they arrive in any order, and hands
out every finished stretch of output (one that no pending segment can still touch) as soon
as it is final (:func:`stream_stems` is a generator). Memory therefore grows with that
window, never with the track. No torch here.
"""
from __future__ import annotations

import collections
import dataclasses
import random
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from stemserve.defaults import DEFAULT_IN_FLIGHT
from stemserve.errors import StemserveError
from stemserve.spec import ModelSpec



@dataclasses.dataclass(frozen=True)
class SeparationOptions:
    """How a track is cut, sent and put back together: demucs' ``apply_model`` arguments,
    plus how many requests one track keeps in flight."""

    overlap: float = dataclasses.field(default=0.25, metadata={
        "help": "overlap between segments"})
    shifts: int = dataclasses.field(default=0, metadata={
        "help": "average this many random shifts of up to 0.5 s (demucs' shift trick)"})
    seed: int | None = dataclasses.field(default=None, metadata={
        "help": "seed of the random shifts, for reproducible output"})
    transition_power: float = dataclasses.field(default=1.0, metadata={
        "help": "sharpness of the transition between segments (demucs' transition_power)"})
    in_flight: int = dataclasses.field(default=DEFAULT_IN_FLIGHT, metadata={
        "help": "segment requests one track keeps in flight"})

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise StemserveError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.shifts < 0:
            raise StemserveError(f"shifts must be >= 0, got {self.shifts}")
        if self.transition_power < 1:
            raise StemserveError("transition_power < 1 gives weird transitions (demucs "
                                 "refuses it)")
        if self.in_flight < 1:
            raise StemserveError(f"in_flight must be >= 1, got {self.in_flight}")


BlockSource = Callable[[], Iterable[np.ndarray]]
"""Returns a fresh iterable of stereo [2, n] float32 blocks of the mix at the model's rate.

The pipeline calls it twice: once for the whole-track statistics, once to separate.
"""


class Backend(Protocol):
    """Runs the network on one padded segment; the pipeline does everything else.

    ``submit`` takes a [audio_channels, time] float32 mix whose time is a valid length and
    returns a future of the raw [sources, audio_channels, time'] network output. It must not
    block for long: the pipeline keeps several requests in flight.

    A bag of models is a backend with ``members`` (one backend per model, each with its own
    ``spec``) and ``weights`` (per member, one weight per source); its own ``submit`` is
    never called. Every other backend is a bag of itself.
    """

    spec: ModelSpec
    where: str
    """Where the network runs, for the user (``Triton at host:port``, ``in-process ONNX
    Runtime``, ...)."""

    def submit(self, mix: np.ndarray) -> Future: ...

    def close(self) -> None: ...


def bag_of(backend: Backend) -> tuple[list[Backend], list[list[float]]]:
    """The members of ``backend`` and their weights (a plain backend: itself, weight 1)."""
    members = list(getattr(backend, "members", None) or [backend])
    weights = getattr(backend, "weights", None) or [[1.0] * len(backend.spec.sources)]
    first = members[0].spec
    for member in members:
        spec = member.spec
        if (spec.sources, spec.sample_rate, spec.audio_channels, spec.segment_length) != \
                (first.sources, first.sample_rate, first.audio_channels, first.segment_length):
            raise StemserveError(f"the bag's models disagree: {spec.checkpoint} and "
                                 f"{first.checkpoint} differ in sources, rate, channels or "
                                 "segment")
        if spec.rules.shifts_around_split != first.rules.shifts_around_split:
            raise StemserveError("a bag cannot mix demucs 2 and demucs 4 models")
        if (spec.rules.split, spec.num_overlap, spec.normalize, spec.residual) != \
                (first.rules.split, first.num_overlap, first.normalize, first.residual):
            raise StemserveError(f"the bag's models split tracks differently: {spec.checkpoint} "
                                 f"({spec.rules.title}) and {first.checkpoint} "
                                 f"({first.rules.title})")
    if len(weights) != len(members) or any(len(row) != len(first.sources) for row in weights):
        raise StemserveError(f"the bag's weights must be one row of {len(first.sources)} per "
                             f"model ({len(members)} models)")
    if any(sum(column) <= 0 for column in zip(*weights)):
        raise StemserveError("every source needs a positive weight in the bag")
    return members, [list(map(float, row)) for row in weights]


# ---------------------------------------------------------------------------------------------
# Statistics

@dataclasses.dataclass(frozen=True)
class MixStats:
    """Mean and unbiased std of the mono reference, and the track length in samples."""

    mean: float
    std: float
    length: int


def mix_stats(blocks: Iterable[np.ndarray], ddof: int = 1) -> MixStats:
    """One streaming pass in float64 (Chan et al.'s pairwise update), as exact as torch's.
    ``ddof`` 1: demucs' unbiased std (torch's); 0: MSST's (numpy's)."""
    count, mean, m2 = 0, 0.0, 0.0
    for block in blocks:
        mono = block.mean(axis=0, dtype=np.float64)
        n = mono.size
        if not n:
            continue
        block_mean = float(mono.mean())
        block_m2 = float(np.square(mono - block_mean).sum())
        delta = block_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += block_m2 + delta * delta * count * n / total
        count = total
    if count < 2:
        raise StemserveError(f"the mix has {count} sample(s): too short to separate")
    if not np.isfinite(mean) or not np.isfinite(m2):
        raise StemserveError("the mix contains NaN or infinite samples")
    std = (m2 / (count - ddof)) ** 0.5
    # A silent track has std 0: demucs divides by zero and writes NaN; divide by 1 instead.
    return MixStats(mean, std if std > 0 else 1.0, count)


# ---------------------------------------------------------------------------------------------
# Geometry

@dataclasses.dataclass(frozen=True, eq=False)
class _Pass:
    """One run of demucs' split over the track, by one model of the bag.

    Local sample ``u`` of the pass is track sample ``u - shift`` (demucs 4 shifts the whole
    track: the pass is ``length = track + shift`` samples, of which the first ``shift`` are
    dropped). Its outputs are scaled by ``scale``, per source: the member's bag weight over
    the weights' sum, over the number of shifts.
    """

    member: int
    shift: int
    length: int
    scale: np.ndarray


@dataclasses.dataclass(eq=False)
class _Segment:
    """One of demucs' chunks of a pass: local samples [offset, offset + length)."""

    pass_: _Pass
    offset: int
    length: int
    pending: int = 0

    @property
    def cut(self) -> int:
        """Local samples before the track's start (a shifted pass' first segment)."""
        return max(0, self.pass_.shift - self.offset)

    @property
    def start(self) -> int:
        """The first track sample the segment writes."""
        return self.offset + self.cut - self.pass_.shift


@dataclasses.dataclass(frozen=True)
class _Request:
    """One network call for a segment: what to send and how to cut the answer.

    The input is track samples [start, start + size) of the mix, real only within [lo, hi)
    and zero elsewhere (or the samples ``indices`` names). The output is center-trimmed to
    ``keep`` samples, then ``drop`` samples are cut from its left, and the segment's
    samples are the first that remain; each is scaled by ``scale`` (demucs 2.0.3's average
    over shifts).
    """

    segment: _Segment
    start: int
    size: int
    lo: int
    hi: int
    keep: int
    drop: int
    scale: float = 1.0
    indices: np.ndarray | None = None
    """Instead of [start, start + size): the track sample each input sample is, -1 for a
    zero (a chunk over a reflected border)."""


def transition_window(segment_length: int, transition_power: float) -> np.ndarray:
    """demucs' triangle, maximal in the middle, normalised and raised to ``transition_power``
    (checked by :class:`SeparationOptions`)."""
    half = segment_length // 2
    weight = np.concatenate([np.arange(1, half + 1),
                             np.arange(segment_length - half, 0, -1)]).astype(np.float32)
    return (weight / weight.max()) ** np.float32(transition_power)


class _Planner:
    """Lays out passes, segments and requests in demucs' order, drawing shifts as it does.

    Every member's passes are laid out at once and their segments sorted by the first track
    sample they write, so that the track is worked through front to back whatever the bag
    and the shifts.
    """

    def __init__(self, specs: list[ModelSpec], weights: list[list[float]], length: int,
                 options: SeparationOptions):
        first = specs[0]
        self.specs = specs
        self.length = length
        self.segment_length = first.segment_length
        self.stride = int((1 - options.overlap) * first.segment_length)
        if self.stride < 1:
            raise StemserveError(f"overlap {options.overlap} leaves no stride between "
                                 "segments")
        self.shifts = options.shifts
        self.max_shift = first.max_shift
        self.around_split = first.rules.shifts_around_split
        self.rng = random.Random(options.seed)
        self.window = transition_window(first.segment_length, options.transition_power)
        totals = np.sum(weights, axis=0, dtype=np.float64)
        self.passes: list[_Pass] = []
        for member, row in enumerate(weights):
            scale = (np.asarray(row, np.float64) / totals).astype(np.float32)
            if self.around_split and self.shifts:
                for _ in range(self.shifts):  # demucs 4: this member's shifts, in order
                    shift = self.max_shift - self.rng.randint(0, self.max_shift)
                    self.passes.append(_Pass(member, shift, length + shift,
                                             scale / np.float32(self.shifts)))
                    self._draw_as_forwards(specs[member], length + shift)
            else:
                self.passes.append(_Pass(member, 0, length, scale))

    def _draw_as_forwards(self, spec: ModelSpec, length: int) -> None:
        """What the network's calls on a pass of ``length`` samples draw from Python's random
        state (one ``randrange`` each, see :attr:`ModelSpec.forward_randrange`), between
        demucs 4's random shifts."""
        if spec.forward_randrange:
            for _ in range(0, length, self.stride):
                self.rng.randrange(spec.forward_randrange)

    def segments(self) -> list[_Segment]:
        """Every pass' segments, by the first track sample they write (stable: a bag's
        members and a segment's passes keep demucs' order)."""
        segments = [_Segment(pass_, offset, min(self.segment_length, pass_.length - offset))
                    for pass_ in self.passes
                    for offset in range(0, pass_.length, self.stride)]
        return sorted(segments, key=lambda segment: segment.start)

    def requests_per_segment(self) -> int:
        """demucs 2.0.3 sends each segment once per shift; demucs 4 once per pass."""
        return 1 if self.around_split else max(self.shifts, 1)

    def first_needed(self, segment: _Segment) -> int:
        """The earliest real input sample any request of ``segment`` reads."""
        if self.shifts and not self.around_split:
            return max(0, segment.offset - self.max_shift)
        size = self.specs[segment.pass_.member].valid_length(segment.length)
        return max(0, segment.offset - (size - segment.length) // 2 - segment.pass_.shift)

    def keep_from(self, segments: list[_Segment]) -> list[int]:
        return _keep_from(self, segments)

    def weights(self, segment: _Segment) -> np.ndarray:
        """The transition window of ``segment`` over the summed windows of its pass, for
        the samples it writes: demucs' ``out / sum_weight``, divided in advance."""
        offset, length = segment.offset, segment.length
        total = np.zeros(length, np.float32)
        first = max(0, offset - self.segment_length + 1)
        for other in range(-(-first // self.stride) * self.stride, offset + length,
                           self.stride):
            other_length = min(self.segment_length, segment.pass_.length - other)
            lo, hi = max(offset, other), min(offset + length, other + other_length)
            if hi > lo:
                total[lo - offset:hi - offset] += self.window[lo - other:hi - other]
        return (self.window[:length] / total)[segment.cut:]

    def requests(self, segment: _Segment) -> list[_Request]:
        """``apply_model(chunk, ...)`` for one chunk, as a list of network calls."""
        offset, length = segment.offset, segment.length
        spec = self.specs[segment.pass_.member]
        if self.around_split or not self.shifts:
            size = spec.valid_length(length)
            start = offset - (size - length) // 2 - segment.pass_.shift
            return [_Request(segment, start, size, 0, self.length, keep=length, drop=0)]
        # demucs 2.0.3 pads the chunk to length + 2 * max_shift (real audio where the track
        # has some), then feeds windows of that padded chunk: nothing outside it is real.
        lo = max(0, offset - self.max_shift)
        hi = min(self.length, offset + length + self.max_shift)
        requests = []
        for _ in range(self.shifts):
            shift = self.rng.randint(0, self.max_shift)
            shifted = length + self.max_shift - shift
            size = spec.valid_length(shifted)
            start = offset - self.max_shift + shift - (size - shifted) // 2
            requests.append(_Request(segment, start, size, lo, hi, keep=shifted,
                                     drop=self.max_shift - shift, scale=1 / self.shifts))
        return requests


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32, value for value: a float32 step,
    the first half counted from ``start`` and the second from ``end``."""
    step = np.float64(np.float32(end - start) / np.float32(max(steps - 1, 1)))
    index = np.arange(steps)
    return np.where(index < steps // 2, start + step * index,
                    end - step * (steps - 1 - index)).astype(np.float32)


def fade_window(chunk: int) -> np.ndarray:
    """MSST's ``_getWindowingArray(chunk, chunk // 10)``: linear fades in and out over a
    tenth of the chunk (``torch.linspace``'s values), ones between."""
    fade = chunk // 10
    window = np.ones(chunk, np.float32)
    if fade:
        window[chunk - fade:] = _torch_linspace(1, 0, fade)
        window[:fade] = _torch_linspace(0, 1, fade)
    return window


class _ChunkPlanner:
    """Music-Source-Separation-Training's ``demix`` (``utils/model_utils.py``, generic mode)
    laid out as requests: chunks of ``segment_length`` samples every ``segment_length //
    num_overlap``, over the track with ``border = chunk - step`` samples reflected at each
    end (when the track is longer than two borders); a short last chunk is reflected to the
    chunk's length (zeros when it is half a chunk or less); each output weighted by the fade
    window, without fade-in on the first chunk and without fade-out on the last, and
    divided by the summed windows (0 where they sum to 0, as its ``nan_to_num``).

    MSST decides "first" and "last" per batch of its ``inference.batch_size``; this is its
    result with a batch of 1. The pass is the padded track: its local sample ``u`` is track
    sample ``u - border``, so the pass' ``shift`` is the border.
    """

    shifts = 0
    around_split = True

    def __init__(self, spec: ModelSpec, length: int, options: SeparationOptions):
        if options.shifts:
            raise StemserveError(f"{spec.rules.title} models take no random shifts: their "
                                 "chunks overlap as their config's num_overlap says")
        if options.overlap != SeparationOptions.overlap or options.transition_power != 1:
            raise StemserveError(f"{spec.rules.title} models overlap their chunks as their "
                                 f"config's inference.num_overlap says ({spec.num_overlap}) "
                                 "with its fade window: --overlap and --transition-power apply "
                                 "to Demucs models")
        self.length = length
        self.segment_length = chunk = spec.segment_length
        self.stride = step = chunk // spec.num_overlap
        border = chunk - step
        self.border = border if length > 2 * border and border > 0 else 0
        self.padded = length + 2 * self.border
        self.window = fade_window(chunk)
        self.passes = [_Pass(0, self.border, length + self.border, np.ones(
            len(spec.sources), np.float32))]

    def _chunk_window(self, offset: int) -> np.ndarray:
        window = self.window.copy()
        fade = self.segment_length // 10
        if offset == 0:
            window[:fade] = 1
        elif offset + self.stride >= self.padded:
            window[self.segment_length - fade:] = 1
        return window

    def segments(self) -> list[_Segment]:
        (pass_,) = self.passes
        return [_Segment(pass_, offset, min(self.segment_length, pass_.length - offset))
                for offset in range(0, pass_.length, self.stride)]

    def requests_per_segment(self) -> int:
        return 1

    def _indices(self, offset: int) -> np.ndarray:
        """The track sample of each of the chunk's input samples (-1: zero)."""
        chunk = self.segment_length
        real = min(chunk, self.padded - offset)
        part = np.arange(offset, offset + real) - self.border
        part = np.where(part < 0, -part, part)
        part = np.where(part >= self.length, 2 * (self.length - 1) - part, part)
        if real == chunk:
            return part
        if real > chunk // 2:  # reflected within the chunk
            return np.concatenate([part, part[real - 2 - np.arange(chunk - real)]])
        return np.concatenate([part, np.full(chunk - real, -1)])

    def first_needed(self, segment: _Segment) -> int:
        indices = self._indices(segment.offset)
        return int(indices[indices >= 0].min())

    def keep_from(self, segments: list[_Segment]) -> list[int]:
        return _keep_from(self, segments)

    def weights(self, segment: _Segment) -> np.ndarray:
        """The chunk's window over the windows of every chunk that covers its samples (those
        past the track's end too), summed in chunk order as MSST's counter is."""
        offset, length = segment.offset, segment.length
        counter = np.zeros(length, np.float32)
        first = max(0, offset - self.segment_length + 1)
        for other in range(-(-first // self.stride) * self.stride,
                           min(offset + length, self.padded), self.stride):
            lo = max(offset, other)
            hi = min(offset + length, other + self.segment_length, self.padded)
            if hi > lo:
                counter[lo - offset:hi - offset] += self._chunk_window(other)[lo - other:hi - other]
        window = self._chunk_window(offset)[:length]
        factors = np.divide(window, counter, out=np.zeros(length, np.float32),
                            where=counter != 0)
        return factors[segment.cut:]

    def requests(self, segment: _Segment) -> list[_Request]:
        chunk = self.segment_length
        indices = self._indices(segment.offset)
        start = int(indices[0])
        if np.array_equal(indices, np.arange(start, start + chunk)):
            return [_Request(segment, start, chunk, 0, self.length, keep=chunk, drop=0)]
        return [_Request(segment, 0, chunk, 0, self.length, keep=chunk, drop=0,
                         indices=indices)]


def _keep_from(planner: "_Planner | _ChunkPlanner", segments: list[_Segment]) -> list[int]:
    """For each segment, the earliest input sample it or any later segment reads.

    Short segments at the track's end get more padding than full ones (and a chunk over a
    reflected border reads back), so the need is not monotonic in the offset; input before
    ``keep_from[i]`` is never read again once segment ``i`` is planned.
    """
    floor = planner.length
    result = [0] * len(segments)
    for index in range(len(segments) - 1, -1, -1):
        floor = min(floor, planner.first_needed(segments[index]))
        result[index] = floor
    return result


def center_trim(array: np.ndarray, length: int) -> np.ndarray:
    """demucs' ``center_trim`` on the last axis: an odd surplus loses its extra right sample."""
    delta = array.shape[-1] - length
    if delta < 0:
        raise StemserveError(f"the backend returned {array.shape[-1]} samples, "
                             f"fewer than the {length} needed")
    return array[..., delta // 2:delta // 2 + length]


# ---------------------------------------------------------------------------------------------
# Buffers

class _InputWindow:
    """The stretch of the normalised mix that pending segments still need."""

    def __init__(self, blocks: Iterator[np.ndarray], channels: int):
        self._blocks = blocks
        self._begin = 0
        self._data = np.zeros((channels, 0), np.float32)

    @property
    def _end(self) -> int:
        return self._begin + self._data.shape[-1]

    def _read_until(self, end: int) -> None:
        """Read blocks until sample ``end`` is held."""
        pieces, held = [], self._end
        while held < end:
            block = next(self._blocks, None)
            if block is None:
                raise StemserveError(f"the mix ended at sample {held}, before the {end} "
                                     "samples its first reading counted")
            pieces.append(block)
            held += block.shape[-1]
        if pieces:
            self._data = np.concatenate([self._data, *pieces], axis=-1)

    def take(self, start: int, size: int, lo: int, hi: int) -> np.ndarray:
        """Samples [start, start + size), real within [lo, hi), zero elsewhere."""
        real_start, real_end = max(start, lo), min(start + size, hi)
        assert real_start >= self._begin or real_end <= real_start, "input released too early"
        self._read_until(real_end)
        out = np.zeros((self._data.shape[0], size), np.float32)
        if real_end > real_start:
            out[:, real_start - start:real_end - start] = \
                self._data[:, real_start - self._begin:real_end - self._begin]
        return out

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """The samples ``indices`` names (-1: zero): a chunk over a reflected border."""
        real = indices[indices >= 0]
        assert real.min() >= self._begin, "input released too early"
        self._read_until(int(real.max()) + 1)
        out = np.zeros((self._data.shape[0], indices.size), np.float32)
        out[:, indices >= 0] = self._data[:, real - self._begin]
        return out

    def release(self, before: int) -> None:
        """Forget samples before ``before``: no later request reads them."""
        cut = min(max(0, before - self._begin), self._data.shape[-1])
        if cut:
            self._data = self._data[:, cut:].copy()
            self._begin += cut


class _OverlapAdd:
    """Weighted sums of the output samples not yet handed on (each contribution comes
    already divided by its pass' summed weights).

    Array index ``i`` holds output sample ``base + i``; samples before ``base + start`` are
    gone. Live samples move to the front only when room runs out, so popping is cheap.
    """

    def __init__(self, sources: int, channels: int, capacity: int):
        self.base = 0
        self._start = 0
        self._sum = np.zeros((sources, channels, capacity), np.float32)
        self._scratch = np.zeros(0, np.float32)

    def reserve(self, end: int) -> None:
        """Make room up to output sample ``end``, growing only if the window needs it."""
        size = self._sum.shape[-1]
        if end - self.base <= size:
            return
        live, gap = size - self._start, self._start
        # Move the live samples to the front a gap at a time: the pieces never overlap, so
        # numpy copies them in place instead of through a temporary as large as all of them.
        for at in range(0, live if gap else 0, gap or 1):
            self._sum[..., at:min(at + gap, live)] = \
                self._sum[..., gap + at:gap + min(at + gap, live)]
        self._sum[..., live:] = 0
        self.base += self._start
        self._start = 0
        grow = end - self.base - size
        if grow > 0:
            self._sum = np.pad(self._sum, ((0, 0), (0, 0), (0, grow)))

    def add(self, offset: int, values: np.ndarray, factors: np.ndarray,
            scale: np.ndarray) -> None:
        """Add ``values * factors * scale`` (in that order: the same float32 rounding as
        demucs) at output sample ``offset``, through one reused scratch buffer: a segment's
        product is as large as its output, and a fresh one per answer would hold that much
        more memory for each answer collected at once."""
        if self._scratch.size < values.size:
            self._scratch = np.empty(values.size, np.float32)
        product = self._scratch[:values.size].reshape(values.shape)
        np.multiply(values, factors, out=product)
        product *= scale
        self._sum[..., offset - self.base:offset - self.base + values.shape[-1]] += product

    def pop(self, until: int) -> np.ndarray:
        """The finished samples up to output sample ``until``."""
        stop = until - self.base
        out = self._sum[..., self._start:stop].copy()
        self._start = stop
        return out


# ---------------------------------------------------------------------------------------------
# The pipeline

def stream_stems(source: BlockSource, backend: Backend,
                 options: SeparationOptions = SeparationOptions(), *,
                 on_progress: Callable[[float], None] | None = None) -> Iterator[np.ndarray]:
    """Separate the mix that ``source`` yields into de-normalised [sources, channels, n]
    stem blocks, in order, each yielded as soon as no pending request can still touch it.

    ``backend`` may be a bag (see :class:`Backend`). ``on_progress`` receives, each time a
    request is answered, its share of the track in samples (a segment's length over its
    number of requests, scaled so that the shares add up to the track's length): progress
    moves with every answer, not only once a stretch of output is finished.

    A generator, pulled by its consumer: the first ``next`` reads the whole mix once for the
    statistics, then requests go out only as blocks are taken, so a slow consumer holds the
    pipeline back instead of piling up output. Closing it early (or an error) cancels every
    request still in flight.
    """
    members, weights = bag_of(backend)
    spec, window = members[0].spec, options.in_flight
    chunked = spec.rules.split == "chunks"
    stats = mix_stats(source(), ddof=0 if chunked else 1)
    mean, std = (np.float32(stats.mean), np.float32(stats.std)) if spec.normalize else \
        (np.float32(0), np.float32(1))
    planner: _Planner | _ChunkPlanner = (
        _ChunkPlanner(spec, stats.length, options) if chunked else
        _Planner([member.spec for member in members], weights, stats.length, options))
    # A residual stem (the mix minus the others) carries no mean of its own.
    means = np.full((len(spec.sources), 1, 1), mean, np.float32)
    if spec.residual:
        means[-1] = 0
    inputs = _InputWindow(((block - mean) / std for block in source()) if spec.normalize
                          else source(), spec.audio_channels)
    # A segment's room is reserved once fewer than ``window`` requests are pending, so the
    # live output spans ``window - 1`` strides and a segment (and a shift) at most.
    output = _OverlapAdd(len(spec.sources), spec.audio_channels,
                         (window - 1) * planner.stride + spec.segment_length + spec.max_shift)
    segments: collections.deque[_Segment] = collections.deque()
    factors: dict[_Segment, np.ndarray] = {}
    pending: dict[Future, _Request] = {}
    emitted = 0

    def emit(frontier: int) -> Iterator[np.ndarray]:
        """The output up to ``frontier``, de-normalised, if any of it is new."""
        nonlocal emitted
        if frontier > emitted:
            yield output.pop(frontier) * std + means
            emitted = frontier

    def collect(done: Iterable[Future]) -> None:
        for future in done:
            request = pending.pop(future)
            segment = request.segment
            result = center_trim(future.result(), request.keep)[
                ..., request.drop:request.drop + segment.length]
            scale = segment.pass_.scale[:, None, None] * np.float32(request.scale)
            output.add(segment.start, result[..., segment.cut:], factors[segment], scale)
            segment.pending -= 1
            if not segment.pending:
                del factors[segment]
            if on_progress is not None:
                on_progress(segment.length * share)
        while segments and not segments[0].pending:
            segments.popleft()

    try:
        plan = planner.segments()
        # Segments overlap: scale every request's share so that they add up to the track.
        share = stats.length / (sum(segment.length for segment in plan)
                                * planner.requests_per_segment())
        keep_from = planner.keep_from(plan)
        for index, segment in enumerate(plan):
            inputs.release(keep_from[index])
            factors[segment] = planner.weights(segment)
            requests = planner.requests(segment)
            segment.pending = len(requests)
            segments.append(segment)
            for request in requests:
                while len(pending) >= window:
                    collect(wait(pending, return_when=FIRST_COMPLETED).done)
                    yield from emit(segments[0].start if segments else segment.start)
                output.reserve(segment.start + segment.length)
                mix = (inputs.take(request.start, request.size, request.lo, request.hi)
                       if request.indices is None else inputs.gather(request.indices))
                pending[members[segment.pass_.member].submit(mix)] = request
        while pending:
            collect(wait(pending, return_when=FIRST_COMPLETED).done)
            yield from emit(segments[0].start if segments else stats.length)
        yield from emit(stats.length)
    finally:  # done, failed, or closed by the consumer (GeneratorExit)
        for future in pending:
            future.cancel()
