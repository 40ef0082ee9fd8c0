"""HTDemucs with ONNX-exportable STFTs, on the same weights (wrappers, no copies).

``torch.onnx`` cannot export ``torch.stft`` with complex outputs. Two ways around it:

- :class:`HTDemucsConvSTFT`: the STFT and iSTFT inside the graph, as convolutions with
  DFT kernels (:class:`~stemserve.models.stft.ConvSTFT`/``ConvISTFT``): one graph, mix in,
  stems out.
- :class:`HTDemucsCore`: the STFT outside the graph. The graph takes the mix and its
  spectrogram (complex as channels) and returns both branches' outputs; the caller does
  the iSTFT of the spectral one and sums (:func:`htdemucs_from_core`).

Both need ``cac=True`` (the released models' setting) and run on the training segment.
"""
from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import pad1d
from .htdemucs import HTDemucs
from .stft import ConvISTFT, ConvSTFT


def _check(model: HTDemucs) -> None:
    if not model.cac:
        raise ValueError("exportable HTDemucs needs cac=True (complex as channels)")


class HTDemucsConvSTFT(nn.Module):
    """HTDemucs computing its STFT and iSTFT with convolutions (real tensors only).

    Same function as ``model.forward`` (to float32 rounding of the DFT sums).
    Shapes: mix [batch, audio_channels, length] -> stems [batch, sources, audio_channels,
    length], ``length`` at most the training segment.
    """

    def __init__(self, model: HTDemucs):
        super().__init__()
        _check(model)
        self.model = model
        bins = model.nfft // 2  # the hybrid models drop the Nyquist bin
        self.stft = ConvSTFT(model.nfft, model.hop_length, n_bins=bins)
        self.istft = ConvISTFT(model.nfft, model.hop_length, n_bins=bins)

    def spec(self, mix: torch.Tensor) -> torch.Tensor:
        """The spectral branch's input, as ``model._magnitude(model._spec(mix))``.

        Shapes: [B, C, L] -> [B, 2 C, nfft // 2, ceil(L / hop)] (channel 2 c + real/imag).
        """
        batch, channels, length = mix.shape
        hop = self.model.hop_length
        frames = int(math.ceil(length / hop))
        pad = hop // 2 * 3
        x = pad1d(mix, (pad, pad + frames * hop - length), mode="reflect")
        z = self.stft(x)[..., 2:2 + frames]  # [B, C, 2, F, frames]
        return z.reshape(batch, channels * 2, z.shape[-2], frames)

    def ispec(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """The waveform of the spectral branch's output, as
        ``model._ispec(model._mask(z, x), length)``.

        Shapes: [B, S, 2 C, F, T] -> [B, S, C, length].
        """
        batch, sources, channels2, freqs, frames = x.shape
        hop = self.model.hop_length
        pad = hop // 2 * 3
        z = F.pad(x.reshape(batch, sources, channels2 // 2, 2, freqs, frames), (2, 2))
        y = self.istft(z, hop * int(math.ceil(length / hop)) + 2 * pad)
        return y[..., pad:pad + length]

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        length = mix.shape[-1]
        run_length = self.model.valid_length(length)
        if run_length > length:
            mix = F.pad(mix, (0, run_length - length))
        x, xt = self.model.separate(mix, self.spec(mix))
        return (xt + self.ispec(x, run_length))[..., :length]


class HTDemucsCore(nn.Module):
    """The network between the STFT and the iSTFT: :meth:`HTDemucs.separate`.

    Shapes: mix [B, C, L] (L = the training segment) and spec [B, 2 C, nfft // 2,
    ceil(L / hop)] (see :func:`htdemucs_spec`) -> spectral output [B, S, 2 C, nfft // 2,
    frames] and waveform output [B, S, C, L] (see :func:`htdemucs_from_core`).
    """

    def __init__(self, model: HTDemucs):
        super().__init__()
        _check(model)
        self.model = model

    def forward(self, mix: torch.Tensor, spec: torch.Tensor
                ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        return self.model.separate(mix, spec)


def htdemucs_spec(model: HTDemucs, mix: torch.Tensor) -> torch.Tensor:
    """The client side before :class:`HTDemucsCore`: [B, C, L] -> [B, 2 C, F, T]."""
    return model._magnitude(model._spec(mix))


def htdemucs_from_core(model: HTDemucs, freq_out: torch.Tensor,
                       time_out: torch.Tensor) -> torch.Tensor:
    """The client side after :class:`HTDemucsCore`: iSTFT of the spectral output plus the
    waveform output. Shapes: [B, S, 2 C, F, T], [B, S, C, L] -> [B, S, C, L]."""
    return time_out + model._ispec(model._mask(None, freq_out), time_out.shape[-1])
