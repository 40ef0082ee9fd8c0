"""The STFT of demucs 4.0.1 (``demucs/spec.py`` and the hybrid models' ``_spec``/``_ispec``),
and the same transforms as real-valued convolutions with DFT kernels.

``torch.stft`` returns complex tensors, which ``torch.onnx`` cannot export: :class:`ConvSTFT`
and :class:`ConvISTFT` compute the same STFT (hann window, ``normalized=True``,
``center=True`` with reflect padding) with ``Conv1d``/``ConvTranspose1d`` so that a whole
hybrid model exports to one ONNX graph. Their kernels are non-persistent buffers: they never
appear in a ``state_dict``.
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


def _dft_angles(n_fft: int, n_bins: int) -> torch.Tensor:
    """2 pi k n / n_fft for bins k < n_bins and samples n < n_fft, exact in float64
    (k n is reduced modulo n_fft in integers first). Shape: [n_bins, n_fft]."""
    k = torch.arange(n_bins, dtype=torch.int64)[:, None]
    n = torch.arange(n_fft, dtype=torch.int64)[None, :]
    return (2 * math.pi / n_fft) * ((k * n) % n_fft).to(torch.float64)


class ConvSTFT(nn.Module):
    """:func:`spectro` (hann window, normalised, centred with reflect padding) as a strided
    ``Conv1d`` whose kernels are the windowed DFT basis, real parts then imaginary parts.

    Only the first ``n_bins`` bins are computed (default: all ``n_fft // 2 + 1``).
    Shapes: [*, length] -> [*, 2 (real, imag), n_bins, 1 + length // hop_length].
    """

    def __init__(self, n_fft: int = 4096, hop_length: int = 1024, n_bins: Optional[int] = None):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_bins = n_bins or n_fft // 2 + 1
        angles = _dft_angles(n_fft, self.n_bins)
        window = torch.hann_window(n_fft, dtype=torch.float64) / math.sqrt(n_fft)
        kernel = torch.cat([angles.cos() * window, -angles.sin() * window])
        self.register_buffer("kernel", kernel[:, None].float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *other, length = x.shape
        x = x.reshape(-1, 1, length)
        x = F.pad(x, (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        z = F.conv1d(x, self.kernel, stride=self.hop_length)
        return z.view(*other, 2, self.n_bins, z.shape[-1])


class ConvISTFT(nn.Module):
    """:func:`ispectro` as a ``ConvTranspose1d`` (inverse real DFT, window and overlap-add in
    one kernel) followed by the division by the summed squared window.

    Bins past ``n_bins`` are taken as zero, and the imaginary parts of the DC and Nyquist
    bins are ignored, as ``irfft`` does.
    Shapes: [*, 2 (real, imag), n_bins, frames] -> [*, length].
    """

    def __init__(self, n_fft: int = 4096, hop_length: int = 1024, n_bins: Optional[int] = None):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_bins = n_bins or n_fft // 2 + 1
        angles = _dft_angles(n_fft, self.n_bins)
        window = torch.hann_window(n_fft, dtype=torch.float64)
        # irfft counts every bin but DC and Nyquist twice (the negative frequencies).
        twice = torch.full((self.n_bins, 1), 2., dtype=torch.float64)
        twice[0] = 1
        if self.n_bins == n_fft // 2 + 1:
            twice[-1] = 1
        scale = twice * window / math.sqrt(n_fft)
        kernel = torch.cat([angles.cos() * scale, -angles.sin() * scale])
        self.register_buffer("kernel", kernel[:, None].float(), persistent=False)
        self.register_buffer("window_sq", (window ** 2).float()[None, None], persistent=False)

    def forward(self, z: torch.Tensor, length: int) -> torch.Tensor:
        *other, two, n_bins, frames = z.shape
        assert two == 2 and n_bins == self.n_bins, z.shape
        z = z.reshape(-1, 2 * n_bins, frames)
        y = F.conv_transpose1d(z, self.kernel, stride=self.hop_length)
        ones = torch.ones(1, 1, frames, dtype=y.dtype, device=y.device)
        envelope = F.conv_transpose1d(ones, self.window_sq, stride=self.hop_length)
        start = self.n_fft // 2
        assert start + length <= y.shape[-1], (length, y.shape)
        y = y[..., start:start + length] / envelope[..., start:start + length]
        return y.view(*other, length)
