"""The STFT of demucs 4.0.1 (``demucs/spec.py`` and the hybrid models' ``_spec``/``_ispec``),
and the same transforms in real-valued matrix products.

``torch.stft`` returns complex tensors, which ``torch.onnx`` cannot export: :class:`DftSTFT`
and :class:`DftISTFT` compute the same STFT (hann window, ``normalized=True``,
``center=True`` with reflect padding) with reshapes, slices and ``MatMul``s so that a whole
hybrid model exports to one ONNX graph of standard operators. Each frame's DFT is one
Cooley-Tukey step (``n_fft = n1 * n2``: DFTs of size ``n1``, twiddles, DFTs of size ``n2``),
about 16 times fewer multiplications than one DFT kernel of ``n_fft`` taps for 4096 points
(docs/decisions/0001-stft-in-the-graph.md weighs the ways). Their matrices are non-persistent buffers: they never appear in a
``state_dict``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import pad1d


def spectro(x: torch.Tensor, n_fft: int = 512, hop_length: Optional[int] = None,
            pad: int = 0) -> torch.Tensor:
    """Normalised, centred (reflect) STFT with a hann window of ``n_fft``, the FFT being
    ``n_fft * (1 + pad)`` long.

    Shapes: [*, length] -> complex [*, n_fft * (1 + pad) // 2 + 1, frames].
    """
    *other, length = x.shape
    z = torch.stft(x.reshape(-1, length), n_fft * (1 + pad), hop_length or n_fft // 4,
                   window=torch.hann_window(n_fft).to(x), win_length=n_fft, normalized=True,
                   center=True, return_complex=True, pad_mode="reflect")
    return z.view(*other, z.shape[-2], z.shape[-1])


def ispectro(z: torch.Tensor, hop_length: Optional[int] = None, length: Optional[int] = None,
             pad: int = 0) -> torch.Tensor:
    """Inverse of :func:`spectro`. Shapes: complex [*, freqs, frames] -> [*, length]."""
    *other, freqs, frames = z.shape
    n_fft = 2 * freqs - 2
    win_length = n_fft // (1 + pad)
    x = torch.istft(z.reshape(-1, freqs, frames), n_fft, hop_length,
                    window=torch.hann_window(win_length).to(z.real), win_length=win_length,
                    normalized=True, length=length, center=True)
    return x.view(*other, x.shape[-1])


def hybrid_spec(x: torch.Tensor, nfft: int, hybrid: bool = True,
                hybrid_old: bool = False) -> torch.Tensor:
    """The hybrid models' spectrogram: ``nfft // 2`` bins (the Nyquist bin is dropped) and,
    for hybrid models, exactly ``ceil(length / hop)`` frames aligned with the time branch's
    strides (the signal is first padded by ``3/8 nfft``, reflected; zeros for the MDX models'
    ``hybrid_old`` padding bug).

    Shapes: [batch, channels, length] -> complex [batch, channels, nfft // 2, frames].
    """
    hop = nfft // 4
    if hybrid:
        frames = int(math.ceil(x.shape[-1] / hop))
        pad = hop // 2 * 3
        x = pad1d(x, (pad, pad + frames * hop - x.shape[-1]),
                  mode="constant" if hybrid_old else "reflect")
    z = spectro(x, nfft, hop)[..., :-1, :]
    if hybrid:
        assert z.shape[-1] == frames + 4, (z.shape, x.shape, frames)
        z = z[..., 2:2 + frames]
    return z


def hybrid_ispec(z: torch.Tensor, length: int, hop: int, hybrid: bool = True,
                 hybrid_old: bool = False) -> torch.Tensor:
    """Inverse of :func:`hybrid_spec`. Shapes: complex [*, nfft // 2, frames] -> [*, length]."""
    z = F.pad(z, (0, 0, 0, 1))
    if not hybrid:
        return ispectro(z, hop, length)
    z = F.pad(z, (2, 2))
    pad = hop // 2 * 3
    if hybrid_old:
        return ispectro(z, hop, length=hop * int(math.ceil(length / hop)))[..., :length]
    x = ispectro(z, hop, length=hop * int(math.ceil(length / hop)) + 2 * pad)
    return x[..., pad:pad + length]


def _angles(rows: int, cols: int, n: int) -> torch.Tensor:
    """2 pi r c / n for r < rows and c < cols, exact in float64 (r c is reduced modulo ``n``
    in integers first). Shape: [rows, cols]."""
    r = torch.arange(rows, dtype=torch.int64)[:, None]
    c = torch.arange(cols, dtype=torch.int64)[None, :]
    return (2 * math.pi / n) * ((r * c) % n).to(torch.float64)


def _split(n_fft: int, hop: int) -> tuple[int, int]:
    """``n_fft = n1 * n2`` with ``n1`` the largest divisor of ``hop`` (and so of ``n_fft``)
    not above the square root of ``n_fft``: 64 * 64 for 4096 points and a hop of 1024."""
    n1 = max(d for d in range(1, math.isqrt(n_fft) + 1) if hop % d == 0)
    return n1, n_fft // n1


def _frames(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """The ``1 + (length - n_fft) // hop`` frames of ``x``, as a strided convolution would
    see them, stacked from ``n_fft // hop`` shifted views of its hop-long blocks (no gather,
    no loop), time last as the spectrogram has it.
    Shapes: [B, length] -> [B, n_fft, frames]."""
    overlap = n_fft // hop
    length = x.shape[-1]
    blocks = ((length - n_fft) // hop + overlap) * hop
    x = x[:, :blocks].reshape(x.shape[0], -1, hop).transpose(1, 2)  # [B, hop, blocks]
    views = [x[..., q:x.shape[-1] - overlap + 1 + q] for q in range(overlap)]
    return torch.cat(views, dim=1)


class _CooleyTukey(nn.Module):
    """What :class:`DftSTFT` and :class:`DftISTFT` share: the sizes, the split ``n_fft = n1
    n2``, the twiddles ``w^(b c)`` as [c, b, 1] and constant matrices as non-persistent
    float32 buffers."""

    def __init__(self, n_fft: int, hop_length: int, n_bins: Optional[int]):
        super().__init__()
        if n_fft % hop_length:
            raise ValueError(f"hop_length {hop_length} must divide n_fft {n_fft}")
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_bins = n_bins or n_fft // 2 + 1
        self.n1, self.n2 = _split(n_fft, hop_length)
        twiddle = _angles(self.n1, self.n2, n_fft)[..., None]
        self._constants({"twiddle_cos": twiddle.cos(), "twiddle_sin": twiddle.sin()})

    def _constants(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            self.register_buffer(name, value.float(), persistent=False)


class DftSTFT(_CooleyTukey):
    """:func:`spectro` (hann window, normalised, centred with reflect padding) in real
    matrix products: frames by reshaping, then a Cooley-Tukey DFT of each frame.

    With ``n = n2 a + b`` and ``k = c + n1 d`` (``a, c < n1``, ``b, d < n2``), the DFT is
    ``X[c + n1 d] = sum_b w^(b c) e(b d / n2) sum_a x[n2 a + b] e(a c / n1)``: a product with
    an ``n1``-point DFT matrix, an elementwise twiddle ``w^(b c)`` and a product with an
    ``n2``-point one, of which only the ``d`` that reach the first ``n_bins`` bins are kept.
    The matrices multiply from the left, so frames stay the last, contiguous axis and no
    large tensor is transposed. Only the first ``n_bins`` bins are returned (default: all
    ``n_fft // 2 + 1``).
    Shapes: [*, length] -> [*, 2 (real, imag), n_bins, 1 + length // hop_length].
    """

    def __init__(self, n_fft: int = 4096, hop_length: int = 1024, n_bins: Optional[int] = None):
        super().__init__(n_fft, hop_length, n_bins)
        n1, n2 = self.n1, self.n2
        self.kept = -(-self.n_bins // n1)  # values of d reaching the first n_bins bins
        window = torch.hann_window(n_fft, dtype=torch.float64) / math.sqrt(n_fft)
        inner = _angles(n1, n1, n1)  # [c, a]
        outer = _angles(self.kept, n2, n2)  # [d, b]
        self._constants({
            "window": window[:, None],
            # [cos; -sin] @ x: the n1-point DFT of a real input
            "inner": torch.cat([inner.cos(), -inner.sin()]),
            # [[cos, sin], [-sin, cos]] @ [re; im]: the n2-point DFT of a complex input
            "outer": torch.cat([torch.cat([outer.cos(), outer.sin()], dim=1),
                                torch.cat([-outer.sin(), outer.cos()], dim=1)]),
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *other, length = x.shape
        x = F.pad(x.reshape(-1, 1, length), (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        frames = _frames(x[:, 0], self.n_fft, self.hop_length) * self.window  # [B, n, T]
        batch, _, count = frames.shape
        n1, n2 = self.n1, self.n2
        # [(re|im) c, a] @ [B, a, b T] -> [B, (re|im) c, b, T]
        a = (self.inner @ frames.reshape(batch, n1, n2 * count)).reshape(batch, 2 * n1, n2, count)
        re, im = a[:, :n1], a[:, n1:]
        re, im = (re * self.twiddle_cos + im * self.twiddle_sin,
                  im * self.twiddle_cos - re * self.twiddle_sin)
        # [(re|im) d, (re|im) b] @ [B, c, (re|im) b, T] -> [B, c, (re|im) d, T]
        z = self.outer @ torch.cat([re, im], dim=2)
        # k = c + n1 d: [B, c, 2, d, T] -> [B, 2, d, c, T] -> [B, 2, kept n1, T]
        z = z.reshape(batch, n1, 2, self.kept, count).permute(0, 2, 3, 1, 4)
        z = z.reshape(batch, 2, self.kept * n1, count)[:, :, :self.n_bins]
        return z.reshape(*other, 2, self.n_bins, count)


class DftISTFT(_CooleyTukey):
    """:func:`ispectro` in real matrix products: a Cooley-Tukey inverse DFT of each frame
    (as :class:`DftSTFT`, with the conjugate roots), keeping the real part, the window,
    overlap-add, and the division by the summed squared window.

    A real signal's spectrum is Hermitian, so ``irfft`` is ``Re sum_k w_k Z[k] e(k n / N)``
    over the half spectrum only, with ``w_k`` 1 for the DC and Nyquist bins and 2 between:
    with ``k = n2 a + b`` that is ``a <= n1 / 2``, half of the first product. Bins past
    ``n_bins`` are taken as zero, and the imaginary parts of the DC and Nyquist bins drop
    out, as in ``irfft``. Frames stay the last axis until the overlap-add, which works on
    hop-long blocks.
    Shapes: [*, 2 (real, imag), n_bins, frames] -> [*, length].
    """

    def __init__(self, n_fft: int = 4096, hop_length: int = 1024, n_bins: Optional[int] = None):
        super().__init__(n_fft, hop_length, n_bins)
        n1, n2 = self.n1, self.n2
        self.rows = n1 // 2 + 1  # values of a reaching bins up to n_fft / 2
        weight = torch.full((self.rows * n2, 1), 2., dtype=torch.float64)
        weight[0] = weight[n_fft // 2] = 1
        weight[n_fft // 2 + 1:] = 0
        window = torch.hann_window(n_fft, dtype=torch.float64)
        inner = _angles(n1, self.rows, n1)  # [c, a]
        outer = _angles(n2, n2, n2)  # [d, b]
        self._constants({
            "weight": weight,
            # [[cos, -sin], [sin, cos]] @ [re; im]: the n1-point inverse DFT
            "inner": torch.cat([torch.cat([inner.cos(), -inner.sin()], dim=1),
                                torch.cat([inner.sin(), inner.cos()], dim=1)]),
            # [cos, -sin] @ [re; im]: the real part of the n2-point inverse DFT
            "outer": torch.cat([outer.cos(), -outer.sin()], dim=1),
            # sample n = c + n1 d of a frame: [c, d, 1]
            "window": (window / math.sqrt(n_fft)).reshape(n2, n1).T[..., None],
            "window_sq": window[None, None] ** 2,
        })

    def forward(self, z: torch.Tensor, length: int) -> torch.Tensor:
        *other, two, n_bins, count = z.shape
        assert two == 2 and n_bins == self.n_bins, z.shape
        n1, n2, n_fft, hop = self.n1, self.n2, self.n_fft, self.hop_length
        z = z.reshape(-1, 2, n_bins, count)
        batch = z.shape[0]
        z = F.pad(z, (0, 0, 0, self.rows * n2 - n_bins)) * self.weight
        # k = n2 a + b: [(re|im) c, (re|im) a] @ [B, (re|im) a, b T] -> [B, (re|im) c, b, T]
        a = self.inner @ z.reshape(batch, 2 * self.rows, n2 * count)
        a = a.reshape(batch, 2 * n1, n2, count)
        re, im = a[:, :n1], a[:, n1:]
        re, im = (re * self.twiddle_cos - im * self.twiddle_sin,
                  re * self.twiddle_sin + im * self.twiddle_cos)
        # [d, (re|im) b] @ [B, c, (re|im) b, T] -> [B, c, d, T]: sample n = c + n1 d
        frames = (self.outer @ torch.cat([re, im], dim=2)) * self.window
        # Overlap-add: sample n of frame t lands in block t + n // hop, at n % hop, that is
        # at c + n1 d' for d = q hop / n1 + d'.
        overlap = n_fft // hop
        parts = frames.reshape(batch, n1, overlap, hop // n1, count)
        y = F.pad(parts[:, :, 0], (0, overlap - 1))
        for q in range(1, overlap):
            y = y + F.pad(parts[:, :, q], (q, overlap - 1 - q))
        y = y.permute(0, 3, 2, 1).reshape(batch, -1)  # [B, blocks, d', c] -> [B, samples]
        ones = torch.ones(1, 1, count, dtype=y.dtype, device=y.device)
        envelope = F.conv_transpose1d(ones, self.window_sq, stride=hop)[:, 0]
        start = n_fft // 2
        assert start + length <= y.shape[-1], (length, y.shape)
        y = y[..., start:start + length] / envelope[..., start:start + length]
        return y.reshape(*other, length)


def _centred_window(win_length: int, n_fft: int) -> torch.Tensor:
    """``torch.stft``'s window: a periodic hann of ``win_length`` zero-padded to ``n_fft``
    in the middle. Shape: [n_fft], float64."""
    window = torch.hann_window(win_length, dtype=torch.float64)
    left = (n_fft - win_length) // 2
    return F.pad(window, (left, n_fft - win_length - left))


class ConvSTFT(nn.Module):
    """``torch.stft(x, n_fft, hop, win_length, hann window, center=True, reflect)`` as one
    strided ``Conv`` whose kernels are the windowed DFT's rows: any hop (the RoFormers use
    441 samples for 2048 points, which :class:`DftSTFT`'s blocks cannot), real tensors only.

    A dense DFT costs ``n_fft`` multiplications per bin and frame, which is negligible
    beside a RoFormer's transformers; the Hybrid Demucs graphs use :class:`DftSTFT`.
    Shapes: [B, length] -> [B, 2 (real, imag), n_fft // 2 + 1, 1 + length // hop].
    """

    def __init__(self, n_fft: int, hop_length: int, win_length: Optional[int] = None,
                 normalized: bool = False):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        bins = n_fft // 2 + 1
        window = _centred_window(win_length or n_fft, n_fft)
        if normalized:
            window = window / math.sqrt(n_fft)
        angles = _angles(bins, n_fft, n_fft)  # [k, n]
        kernel = torch.cat([angles.cos(), -angles.sin()]) * window  # [2 bins, n]
        self.register_buffer("kernel", kernel[:, None].float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.n_fft // 2
        x = F.pad(x[:, None], (pad, pad), mode="reflect")
        z = F.conv1d(x, self.kernel, stride=self.hop_length)  # [B, 2 bins, frames]
        return z.unflatten(1, (2, -1))


class ConvISTFT(nn.Module):
    """``torch.istft`` of :class:`ConvSTFT`'s transform for a fixed number of ``frames``: the
    windowed inverse DFT of each frame and their overlap-add in one strided
    ``ConvTranspose``, then the division by the summed squared window (a constant, since
    the frames are), trimmed as ``center=True`` with ``length`` (default ``(frames - 1) *
    hop``) does. The imaginary parts of the DC and Nyquist bins drop out, as in ``irfft``.
    Shapes: [B, 2 (real, imag), n_fft // 2 + 1, frames] -> [B, length].
    """

    def __init__(self, n_fft: int, hop_length: int, frames: int,
                 win_length: Optional[int] = None, normalized: bool = False,
                 length: Optional[int] = None):
        super().__init__()
        self.n_fft, self.hop_length, self.frames = n_fft, hop_length, frames
        self.length = (frames - 1) * hop_length if length is None else length
        total = n_fft + hop_length * (frames - 1)
        if n_fft // 2 + self.length > total:
            raise ValueError(f"{frames} frames of {hop_length} hold fewer than {self.length} "
                             "samples")
        bins = n_fft // 2 + 1
        window = _centred_window(win_length or n_fft, n_fft)
        weight = torch.full((bins, 1), 2.0, dtype=torch.float64)
        weight[0] = 1
        if n_fft % 2 == 0:
            weight[-1] = 1
        angles = _angles(bins, n_fft, n_fft)  # [k, n]
        scale = (1 / math.sqrt(n_fft)) if normalized else 1 / n_fft
        kernel = torch.cat([angles.cos(), -angles.sin()]) * torch.cat([weight, weight])
        kernel = kernel * window * scale  # [2 bins, n]
        envelope = F.conv_transpose1d(torch.ones(1, 1, frames, dtype=torch.float64),
                                      (window ** 2)[None, None], stride=hop_length)[0, 0]
        start = n_fft // 2
        self.register_buffer("kernel", kernel[:, None].float(), persistent=False)
        self.register_buffer("envelope",
                             envelope[start:start + self.length].float(), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[0]
        y = F.conv_transpose1d(z.reshape(batch, -1, self.frames), self.kernel,
                               stride=self.hop_length)[:, 0]
        start = self.n_fft // 2
        return y[:, start:start + self.length] / self.envelope
