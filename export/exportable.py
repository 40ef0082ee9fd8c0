"""Hybrid Demucs (v3), HTDemucs (v4) and the band-split RoFormers with ONNX-exportable
STFTs, on the same weights (wrappers, no copies).

``torch.onnx`` cannot export ``torch.stft`` with complex outputs. Two ways around it:

- :class:`HybridGraphSTFT`: the STFT and iSTFT inside the graph, as real matrix
  products (:class:`~stemserve.models.stft.DftSTFT`/``DftISTFT``): one graph, mix in,
  stems out. This is what ``stemserve export`` writes
  (docs/decisions/0001-stft-in-the-graph.md).
- :class:`HTDemucsCore`: the STFT outside the graph. The graph takes the mix and its
  spectrogram (complex as channels) and returns both branches' outputs; the caller does
  the iSTFT of the spectral one and sums (:func:`htdemucs_from_core`). Kept so the
  comparison in that record can be made again, and tested against the whole model.

The RoFormers export as :class:`RoformerGraph`: their hop need not divide ``n_fft``, so
their transforms are strided convolutions on a fixed chunk.
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from stemserve.models.blocks import pad1d
from stemserve.models.hdemucs import HDemucs, _openunmix_atan2
from stemserve.models.htdemucs import HTDemucs
from stemserve.models.roformer import MelBandRoformer, _BandRoformer
from stemserve.models.stft import ConvISTFT, ConvSTFT, DftISTFT, DftSTFT


def _check(model: HTDemucs) -> None:
    if not model.cac:
        raise ValueError("exportable HTDemucs needs cac=True (complex as channels)")


class HybridGraphSTFT(nn.Module):
    """An HDemucs or HTDemucs computing its STFT and iSTFT with real matrix products (real
    tensors only): the same function as ``model.forward`` to float32 rounding of the DFTs.

    Spectrograms are real tensors [B, C, 2 (real, imag), nfft // 2, frames]. All length
    arithmetic is integer tensor arithmetic, so a traced graph keeps the time axis dynamic
    for Hybrid Demucs (any length); HTDemucs runs on its training segment.
    Shapes: mix [batch, audio_channels, length] -> stems [batch, sources, audio_channels,
    length].
    """

    def __init__(self, model: tp.Union[HDemucs, HTDemucs], segment_length: tp.Optional[int] = None):
        """``segment_length`` is not needed: Hybrid Demucs takes any length, HTDemucs pads
        to its training segment (the registration's ``graph`` passes it to every family)."""
        super().__init__()
        if not model._hybrid:
            raise ValueError("only hybrid models (time and spectral branches) export")
        if not model.cac and model.wiener_iters > 0:
            raise ValueError("Wiener filtering with iterations does not export")
        self.model = model
        bins = model.nfft // 2  # the hybrid models drop the Nyquist bin
        self.stft = DftSTFT(model.nfft, model.hop_length, n_bins=bins)
        self.istft = DftISTFT(model.nfft, model.hop_length, n_bins=bins)

    def spec(self, mix: torch.Tensor) -> torch.Tensor:
        """``model._spec``: [B, C, L] -> [B, C, 2, nfft // 2, ceil(L / hop)]."""
        length = mix.shape[-1]
        hop = self.model.hop_length
        frames = (length + hop - 1) // hop
        pad = hop // 2 * 3
        x = pad1d(mix, (pad, pad + frames * hop - length),
                  mode="constant" if self.model._hybrid_old else "reflect")
        return self.stft(x)[..., 2:2 + frames]

    def magnitude(self, z: torch.Tensor) -> torch.Tensor:
        """``model._magnitude``: the spectral branch's input, [B, C, 2, F, T] -> [B, 2 C, F,
        T] with CaC (channel ``2 c + {0: real, 1: imag}``), else the magnitude [B, C, F, T]."""
        batch, channels, _, freqs, frames = z.shape
        if self.model.cac:
            return z.reshape(batch, channels * 2, freqs, frames)
        return torch.sqrt(z[:, :, 0] ** 2 + z[:, :, 1] ** 2)

    def mask(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``model._mask``: each source's spectrogram [B, S, C, 2, F, T] from the spectral
        output ``m`` [B, S, C', F, T] (and the mixture's ``z`` when ``m`` is a magnitude)."""
        batch, sources, _, freqs, frames = m.shape
        if self.model.cac:
            return m.reshape(batch, sources, -1, 2, freqs, frames)
        real, imag = z[:, None, :, 0], z[:, None, :, 1]
        if self.model.wiener_iters < 0:
            scale = m / (1e-8 + torch.sqrt(real ** 2 + imag ** 2))
            return torch.stack([real * scale, imag * scale], dim=3)
        angle = _openunmix_atan2(imag, real)
        return torch.stack([m * torch.cos(angle), m * torch.sin(angle)], dim=3)

    def ispec(self, z: torch.Tensor, length) -> torch.Tensor:
        """``model._ispec``: [B, S, C, 2, F, T] -> [B, S, C, length]."""
        hop = self.model.hop_length
        frames = z.shape[-1]
        z = F.pad(z, (2, 2))
        if self.model._hybrid_old:
            return self.istft(z, hop * frames)[..., :length]
        pad = hop // 2 * 3
        return self.istft(z, hop * frames + 2 * pad)[..., pad:pad + length]

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        length = mix.shape[-1]
        if isinstance(self.model, HTDemucs):
            run_length = self.model.valid_length(length)
            mix = F.pad(mix, (0, run_length - length))
        z = self.spec(mix)
        x, xt = self.model.separate(mix, self.magnitude(z))
        return (xt + self.ispec(self.mask(z, x), mix.shape[-1]))[..., :length]


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


class RoformerGraph(nn.Module):
    """A BS-RoFormer or Mel-Band RoFormer on its fixed chunk of ``length`` samples, in
    operators that export: the STFT and iSTFT as strided convolutions
    (:class:`~stemserve.models.stft.ConvSTFT`, any hop), the complex masking as real
    products, the DC bin zeroed by a constant mask, and the rotary angles of the chunk's
    frames and bands as constants (:meth:`RotaryEmbedding.fix_lengths`). The band split and
    the mel bands' mask averaging stay the network's gathers and scatter-add.

    With the network's ``residual`` (set by the loader for a single-target model), the mix
    minus the stems' sum is one more stem, the ``instrumental``. Shapes: mix [batch,
    channels, length] -> stems [batch, num_stems (+ 1), channels, length].
    """

    def __init__(self, model: _BandRoformer, length: int):
        super().__init__()
        self.model, self.length, self.residual = model, length, model.residual
        stft = model.stft_kwargs
        n_fft, hop = stft["n_fft"], stft["hop_length"]
        frames = length // hop + 1
        out_length = model._istft_length(length)
        if out_length is None and length % hop:
            raise ValueError(f"a chunk of {length} samples is no multiple of the hop "
                             f"({hop}): the network would return {(frames - 1) * hop}")
        self.stft = ConvSTFT(n_fft, hop, stft["win_length"], stft["normalized"])
        self.istft = ConvISTFT(n_fft, hop, frames, stft["win_length"], stft["normalized"],
                               out_length)
        keep = torch.ones(model.num_freqs * model.audio_channels, 1)
        if model.zero_dc:
            keep[:model.audio_channels] = 0  # frequency 0 of every channel ('(f s)')
        self.register_buffer("keep", keep, persistent=False)
        bands = (model.freqs_per_band.shape[0] if isinstance(model, MelBandRoformer)
                 else len(model.freqs_per_bands))
        for layer in model.layers:  # [linear,] time, band transformer
            for transformer, length in ((layer[-2], frames), (layer[-1], bands)):
                for attention, _ in transformer.layers:
                    attention.rotary_embed.fix_lengths(length)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        model = self.model
        batch, channels, length = mix.shape
        z = self.stft(mix.reshape(batch * channels, length))  # [b s, 2, F, t]
        frames = z.shape[-1]
        # [b, s, 2, F, t] -> [b, F, s, t, 2] -> [b, (F s), t, 2]
        spec = z.view(batch, channels, 2, -1, frames).permute(0, 3, 1, 4, 2)
        spec = spec.reshape(batch, -1, frames, 2)
        masks = model.masks(spec)  # [b, n, (F s), t, 2]
        re = spec[:, None, ..., 0] * masks[..., 0] - spec[:, None, ..., 1] * masks[..., 1]
        im = spec[:, None, ..., 0] * masks[..., 1] + spec[:, None, ..., 1] * masks[..., 0]
        stems = torch.stack([re, im], dim=2) * self.keep  # [b, n, 2, (F s), t]
        # [b, n, 2, F, s, t] -> [b, n, s, 2, F, t]
        stems = stems.view(batch, -1, 2, model.num_freqs, channels, frames).permute(0, 1, 4, 2, 3, 5)
        audio = self.istft(stems.reshape(-1, 2, model.num_freqs, frames))
        audio = audio.view(batch, -1, channels, audio.shape[-1])
        if self.residual:
            audio = torch.cat([audio, (mix - audio.sum(dim=1))[:, None]], dim=1)
        return audio
