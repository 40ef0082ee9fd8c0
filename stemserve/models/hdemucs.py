"""Hybrid Demucs (v3, arXiv 2111.03600): demucs 4.0.1 ``demucs/hdemucs.py``.

Two U-Nets side by side: one over the spectrogram (convolutions along frequency until a
single frequency is left), one over the waveform; the time branch is injected into the
spectral branch where their strides meet, and they separate again in the decoder. The
output is the sum of the iSTFT of the spectral branch and of the time branch.

Module tree, ``state_dict`` keys and constructor arguments are those of demucs 4.0.1, so
that the official checkpoints (``hdemucs_mmi``, the hybrid members of ``mdx`` and
``mdx_extra``) load with ``strict=True``.
"""
from __future__ import annotations

import copy
import typing as tp
from fractions import Fraction

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import DConv, ScaledEmbedding, norm_factory, rescale_module
from .stft import hybrid_ispec, hybrid_spec
from .arguments import DEMUCS4_RULES
from .registry import FamilyRegistration, register


def _run_dconv(dconv: nn.Module, y: torch.Tensor, freq: bool) -> torch.Tensor:
    """Apply a DConv along time; for [B, C, Fr, T] inputs, every frequency separately."""
    if not freq:
        return dconv(y)
    batch, channels, freqs, frames = y.shape
    y = y.permute(0, 2, 1, 3).reshape(-1, channels, frames)
    y = dconv(y)
    return y.view(batch, freqs, channels, frames).permute(0, 2, 1, 3)


class HEncLayer(nn.Module):
    """Encoder layer of either branch: a strided convolution (along frequency for the
    spectral branch, along time for the waveform one), GroupNorm + GELU, a DConv residual
    branch and a 1x1 (``1 + 2 context``) rewrite convolution with a GLU.

    ``empty`` keeps only the first convolution: the time layer that feeds (``inject``) the
    spectral branch where both have the same stride. With ``pad``, the output length is the
    input length divided by the stride.

    Shapes: freq [B, chin, F, T] -> [B, chout, F / stride, T];
    time [B, chin, T] -> [B, chout, ceil(T / stride)].
    """

    def __init__(self, chin: int, chout: int, kernel_size: int = 8, stride: int = 4,
                 norm_groups: int = 1, empty: bool = False, freq: bool = True,
                 dconv: bool = True, norm: bool = True, context: int = 0,
                 dconv_kw: tp.Optional[dict] = None, pad: bool = True, rewrite: bool = True):
        super().__init__()
        norm_fn = norm_factory(norm, norm_groups)
        pad_size = kernel_size // 4 if pad else 0
        self.freq = freq
        self.kernel_size = kernel_size
        self.stride = stride
        self.empty = empty
        self.norm = norm
        self.pad = pad_size
        if freq:
            self.conv: nn.Module = nn.Conv2d(chin, chout, [kernel_size, 1], [stride, 1],
                                             [pad_size, 0])
        else:
            self.conv = nn.Conv1d(chin, chout, kernel_size, stride, pad_size)
        if empty:
            return
        self.norm1 = norm_fn(chout)
        self.rewrite: tp.Optional[nn.Module] = None
        if rewrite:
            klass = nn.Conv2d if freq else nn.Conv1d
            self.rewrite = klass(chout, 2 * chout, 1 + 2 * context, 1, context)
            self.norm2 = norm_fn(2 * chout)
        self.dconv: tp.Optional[nn.Module] = None
        if dconv:
            self.dconv = DConv(chout, **(dconv_kw or {}))

    def forward(self, x: torch.Tensor, inject: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.freq:
            if x.dim() == 4:
                x = x.reshape(x.shape[0], -1, x.shape[-1])
            remainder = x.shape[-1] % self.stride
            if remainder or torch.jit.is_tracing():  # traced: no branch on the length
                x = F.pad(x, (0, (self.stride - remainder) % self.stride))
        y = self.conv(x)
        if self.empty:
            return y
        if inject is not None:
            assert inject.shape[-1] == y.shape[-1], (inject.shape, y.shape)
            if inject.dim() == 3 and y.dim() == 4:
                inject = inject[:, :, None]
            y = y + inject
        y = F.gelu(self.norm1(y))
        if self.dconv is not None:
            y = _run_dconv(self.dconv, y, self.freq)
        if self.rewrite is None:
            return y
        return F.glu(self.norm2(self.rewrite(y)), dim=1)


class HDecLayer(nn.Module):
    """Decoder layer, mirror of :class:`HEncLayer`: adds the skip connection, rewrite
    convolution + GLU, DConv, then a transposed convolution (+ GroupNorm, + GELU unless
    ``last``). ``forward`` also returns the input of the transposed convolution, which the
    time branch takes over where the branches separate (``empty`` time layers).

    ``context_freq=False`` makes the rewrite convolution's context act along time only.
    Shapes: freq [B, chin, F, T] -> [B, chout, F * stride, T];
    time [B, chin, T] -> [B, chout, length].
    """

    def __init__(self, chin: int, chout: int, last: bool = False, kernel_size: int = 8,
                 stride: int = 4, norm_groups: int = 1, empty: bool = False, freq: bool = True,
                 dconv: bool = True, norm: bool = True, context: int = 1,
                 dconv_kw: tp.Optional[dict] = None, pad: bool = True,
                 context_freq: bool = True, rewrite: bool = True):
        super().__init__()
        norm_fn = norm_factory(norm, norm_groups)
        self.pad = kernel_size // 4 if pad else 0
        self.last = last
        self.freq = freq
        self.chin = chin
        self.empty = empty
        self.stride = stride
        self.kernel_size = kernel_size
        self.norm = norm
        self.context_freq = context_freq
        if freq:
            klass: type = nn.Conv2d
            self.conv_tr: nn.Module = nn.ConvTranspose2d(chin, chout, [kernel_size, 1],
                                                         [stride, 1])
        else:
            klass = nn.Conv1d
            self.conv_tr = nn.ConvTranspose1d(chin, chout, kernel_size, stride)
        self.norm2 = norm_fn(chout)
        if empty:
            return
        self.rewrite: tp.Optional[nn.Module] = None
        if rewrite:
            if context_freq:
                self.rewrite = klass(chin, 2 * chin, 1 + 2 * context, 1, context)
            else:
                self.rewrite = klass(chin, 2 * chin, [1, 1 + 2 * context], 1, [0, context])
            self.norm1 = norm_fn(2 * chin)
        self.dconv: tp.Optional[nn.Module] = None
        if dconv:
            self.dconv = DConv(chin, **(dconv_kw or {}))

    def forward(self, x: torch.Tensor, skip: tp.Optional[torch.Tensor],
                length: int) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        if self.freq and x.dim() == 3:
            x = x.view(x.shape[0], self.chin, -1, x.shape[-1])
        if self.empty:
            assert skip is None
            y = x
        else:
            x = x + skip
            y = x if self.rewrite is None else F.glu(self.norm1(self.rewrite(x)), dim=1)
            if self.dconv is not None:
                y = _run_dconv(self.dconv, y, self.freq)
        z = self.norm2(self.conv_tr(y))
        if self.freq:
            if self.pad:
                z = z[..., self.pad:-self.pad, :]
        else:
            z = z[..., self.pad:self.pad + length]
            assert z.shape[-1] == length, (z.shape[-1], length)
        if not self.last:
            z = F.gelu(z)
        return z, y


class MultiWrap(nn.Module):
    """One copy of a frequency layer per frequency band (``split_ratios`` give the band
    limits as fractions of the frequency axis), so that each band has its own weights.

    Bands overlap by what the kernels need, so that with equal weights this is exactly the
    wrapped layer. The wrapped layer must be a frequency layer, padded, without norm.
    Shapes: as the wrapped :class:`HEncLayer` / :class:`HDecLayer`.
    """

    def __init__(self, layer: nn.Module, split_ratios: tp.Sequence[float]):
        super().__init__()
        self.split_ratios = split_ratios
        self.layers = nn.ModuleList()
        self.conv = isinstance(layer, HEncLayer)
        assert not layer.norm
        assert layer.freq
        assert layer.pad
        if not self.conv:
            assert not layer.context_freq
        for _ in range(len(split_ratios) + 1):
            band = copy.deepcopy(layer)
            if self.conv:
                band.conv.padding = (0, 0)
            else:
                band.pad = False
            for module in band.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            self.layers.append(band)

    def forward(self, x: torch.Tensor, skip: tp.Optional[torch.Tensor] = None,
                length: tp.Optional[int] = None):
        freqs = int(x.shape[2])  # a fixed size, also in a traced graph
        ratios = list(self.split_ratios) + [1]
        start = 0
        outs = []
        for ratio, layer in zip(ratios, self.layers):
            if self.conv:
                pad = layer.kernel_size // 4
                if ratio == 1:
                    limit = freqs
                else:
                    # Round the band to whole output frequencies.
                    limit = int(round(freqs * ratio))
                    size = limit - start + (pad if start == 0 else 0)
                    n_out = round((size - layer.kernel_size) / layer.stride + 1)
                    limit = start + (n_out - 1) * layer.stride + layer.kernel_size
                    if start == 0:
                        limit -= pad
                assert limit - start > 0, (limit, start)
                assert limit <= freqs, (limit, freqs)
                y = x[:, :, start:limit, :]
                if start == 0:
                    y = F.pad(y, (0, 0, pad, 0))
                if ratio == 1:
                    y = F.pad(y, (0, 0, 0, pad))
                outs.append(layer(y))
                start = limit - layer.kernel_size + layer.stride
            else:
                limit = freqs if ratio == 1 else int(round(freqs * ratio))
                last = layer.last
                layer.last = True
                out, _ = layer(x[:, :, start:limit], skip[:, :, start:limit], None)
                if outs:
                    # Overlap-add the transposed convolutions of neighbouring bands (their
                    # bias only once).
                    outs[-1][:, :, -layer.stride:] += (
                        out[:, :, :layer.stride] - layer.conv_tr.bias.view(1, -1, 1, 1))
                    out = out[:, :, layer.stride:]
                if ratio == 1:
                    out = out[:, :, :-layer.stride // 2, :]
                if start == 0:
                    out = out[:, :, layer.stride // 2:, :]
                outs.append(out)
                layer.last = last
                start = limit
        out = torch.cat(outs, dim=2)
        if self.conv:
            return out
        if not last:
            out = F.gelu(out)
        return out, None


class _HybridSpectrogram:
    """The spectrogram pre- and post-processing shared by :class:`HDemucs` and HTDemucs:
    STFT, complex-as-channels or magnitude input, masking or CaC output, iSTFT."""

    def _spec(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, length] -> complex [B, C, nfft // 2, frames]."""
        assert self.hop_length == self.nfft // 4
        return hybrid_spec(x, self.nfft, self._hybrid, self._hybrid_old)

    def _ispec(self, z: torch.Tensor, length: int, scale: int = 0) -> torch.Tensor:
        """complex [B, S, C, nfft // 2, frames] -> [B, S, C, length]."""
        hop = self.hop_length // (4 ** scale)
        return hybrid_ispec(z, length, hop, self._hybrid, self._hybrid_old)

    def _magnitude(self, z: torch.Tensor) -> torch.Tensor:
        """The spectral branch's input: with CaC, real and imaginary parts as channels
        ([B, C, F, T] complex -> [B, 2 C, F, T], channel ``2 c + {0: real, 1: imag}``),
        else the magnitude."""
        if self.cac:
            batch, channels, freqs, frames = z.shape
            m = torch.view_as_real(z).permute(0, 1, 4, 2, 3)
            return m.reshape(batch, channels * 2, freqs, frames)
        return z.abs()

    def _mask(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Complex spectrogram of each source [B, S, C, F, T] from the spectral branch's
        output ``m``: with CaC, ``m`` holds it as channels; otherwise ``m`` is a magnitude
        that takes the mixture's phase (``wiener_iters`` 0, as openunmix' ``wiener`` does
        without iterations), or a mask of the mixture (``wiener_iters`` < 0)."""
        if self.cac:
            batch, sources, _, freqs, frames = m.shape
            out = m.view(batch, sources, -1, 2, freqs, frames).permute(0, 1, 2, 4, 5, 3)
            return torch.view_as_complex(out.contiguous())
        niters = self.end_iters if self.training else self.wiener_iters
        if niters < 0:
            z = z[:, None]
            return z / (1e-8 + z.abs()) * m
        if niters > 0:
            raise NotImplementedError("Wiener filtering with iterations is not supported")
        angle = _openunmix_atan2(z.imag, z.real)[:, None]
        return torch.complex(m * torch.cos(angle), m * torch.sin(angle))


def _openunmix_atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """openunmix' ``atan2`` (what demucs' Wiener filtering uses): ``atan(y / x)`` moved to
    the right quadrant, 0 where ``x == y == 0``."""
    pi = 2 * torch.asin(torch.tensor(1.0))
    x = x + ((x == 0) & (y == 0)) * 1.0
    out = torch.atan(y / x)
    out += ((y >= 0) & (x < 0)) * pi
    out -= ((y < 0) & (x < 0)) * pi
    out *= 1 - ((y > 0) & (x == 0)) * 1.0
    out += ((y > 0) & (x == 0)) * (pi / 2)
    out *= 1 - ((y < 0) & (x == 0)) * 1.0
    out += ((y < 0) & (x == 0)) * (-pi / 2)
    return out


class HDemucs(_HybridSpectrogram, nn.Module):
    """Hybrid Demucs v3.

    Shapes: mix [batch, audio_channels, length] ->
    stems [batch, len(sources), audio_channels, length] (any length; no padding needed).

    Args (as demucs 4.0.1; its training configuration sets most of them):
        sources: source names, in output order.
        audio_channels: input/output audio channels.
        channels: hidden channels of the first layer; ``channels_time`` for the time branch.
        growth: channel multiplier from one layer to the next.
        nfft: STFT size (hop ``nfft // 4``).
        wiener_iters, end_iters: Wiener filtering iterations at test / train time (only 0
            is supported, i.e. magnitude with the mixture's phase, or < 0 for masking);
            ignored with ``cac``.
        wiener_residual: add a residual source before Wiener filtering.
        cac: complex as channels in input and output (else magnitude spectrograms).
        depth: encoder (and decoder) layers.
        rewrite: 1x1 rewrite convolutions in each layer.
        hybrid: add the time branch (else frequency only).
        hybrid_old: the zero (not reflect) padding of the STFT of some MDX models.
        multi_freqs, multi_freqs_depth: frequency bands with their own weights
            (:class:`MultiWrap`) in the outermost ``multi_freqs_depth`` layers.
        freq_emb, emb_scale, emb_smooth: weight, learning-rate scale and smooth init of the
            frequency embedding added after the first spectral layer (0: none).
        kernel_size, stride: of the encoder/decoder convolutions.
        time_stride: stride of the layers after the branches merged.
        context, context_enc: context of the decoder's / encoder's rewrite convolution.
        norm_starts, norm_groups: GroupNorm from this layer on, with this many groups.
        dconv_mode: DConv branches in the encoder (1), decoder (2) or both (3).
        dconv_depth, dconv_comp, dconv_attn, dconv_lstm, dconv_init: DConv depth,
            compression, first layer with attention, first with an LSTM, LayerScale init.
        rescale: target std of the rescaled weight init.
        samplerate, segment: metadata (the training segment in seconds, for ``apply``).
    """

    def __init__(self,
                 sources: tp.Sequence[str],
                 # Channels
                 audio_channels: int = 2,
                 channels: int = 48,
                 channels_time: tp.Optional[int] = None,
                 growth: float = 2,
                 # STFT
                 nfft: int = 4096,
                 wiener_iters: int = 0,
                 end_iters: int = 0,
                 wiener_residual: bool = False,
                 cac: bool = True,
                 # Main structure
                 depth: int = 6,
                 rewrite: bool = True,
                 hybrid: bool = True,
                 hybrid_old: bool = False,
                 # Frequency branch
                 multi_freqs: tp.Optional[tp.Sequence[float]] = None,
                 multi_freqs_depth: int = 2,
                 freq_emb: float = 0.2,
                 emb_scale: float = 10,
                 emb_smooth: bool = True,
                 # Convolutions
                 kernel_size: int = 8,
                 time_stride: int = 2,
                 stride: int = 4,
                 context: int = 1,
                 context_enc: int = 0,
                 # Normalization
                 norm_starts: int = 4,
                 norm_groups: int = 4,
                 # DConv residual branch
                 dconv_mode: int = 1,
                 dconv_depth: int = 2,
                 dconv_comp: float = 4,
                 dconv_attn: int = 4,
                 dconv_lstm: int = 4,
                 dconv_init: float = 1e-4,
                 # Weight init
                 rescale: float = 0.1,
                 # Metadata
                 samplerate: int = 44100,
                 segment: float = 4 * 10):
        super().__init__()
        self.cac = cac
        self.wiener_residual = wiener_residual
        self.audio_channels = audio_channels
        self.sources = sources
        self.kernel_size = kernel_size
        self.context = context
        self.stride = stride
        self.depth = depth
        self.channels = channels
        self.samplerate = samplerate
        self.segment = segment
        self.nfft = nfft
        self.hop_length = nfft // 4
        self.wiener_iters = wiener_iters
        self.end_iters = end_iters
        self.freq_emb: tp.Optional[ScaledEmbedding] = None
        self.hybrid = hybrid
        self.hybrid_old = hybrid_old
        if hybrid_old:
            assert hybrid, "hybrid_old must come with hybrid=True"
        if hybrid:
            assert wiener_iters == end_iters

        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        if hybrid:
            self.tencoder = nn.ModuleList()
            self.tdecoder = nn.ModuleList()

        chin = audio_channels  # time branch
        chin_z = chin * 2 if cac else chin  # spectral branch
        chout = channels_time or channels
        chout_z = channels
        freqs = nfft // 2
        for index in range(depth):
            freq = freqs > 1
            stri, ker = stride, kernel_size
            if not freq:
                assert freqs == 1
                ker, stri = time_stride * 2, time_stride
            pad = True
            last_freq = False
            if freq and freqs <= kernel_size:
                # The layer that reduces the remaining frequencies to one.
                ker, pad, last_freq = freqs, False, True
            kw = dict(kernel_size=ker, stride=stri, freq=freq, pad=pad,
                      norm=index >= norm_starts, rewrite=rewrite, norm_groups=norm_groups,
                      dconv_kw=dict(lstm=index >= dconv_lstm, attn=index >= dconv_attn,
                                    depth=dconv_depth, compress=dconv_comp, init=dconv_init,
                                    gelu=True))
            kwt = dict(kw, freq=0, kernel_size=kernel_size, stride=stride, pad=True)
            kw_dec = dict(kw)
            multi = bool(multi_freqs) and index < multi_freqs_depth
            if multi:
                kw_dec["context_freq"] = False
            if last_freq:
                chout_z = max(chout, chout_z)
                chout = chout_z

            enc: nn.Module = HEncLayer(chin_z, chout_z, dconv=dconv_mode & 1,
                                       context=context_enc, **kw)
            if hybrid and freq:
                self.tencoder.append(HEncLayer(chin, chout, dconv=dconv_mode & 1,
                                               context=context_enc, empty=last_freq, **kwt))
            if multi:
                enc = MultiWrap(enc, multi_freqs)
            self.encoder.append(enc)

            if index == 0:
                chin = audio_channels * len(sources)
                chin_z = chin * 2 if cac else chin
            dec: nn.Module = HDecLayer(chout_z, chin_z, dconv=dconv_mode & 2,
                                       last=index == 0, context=context, **kw_dec)
            if multi:
                dec = MultiWrap(dec, multi_freqs)
            if hybrid and freq:
                self.tdecoder.insert(0, HDecLayer(chout, chin, dconv=dconv_mode & 2,
                                                  empty=last_freq, last=index == 0,
                                                  context=context, **kwt))
            self.decoder.insert(0, dec)

            chin, chin_z = chout, chout_z
            chout, chout_z = int(growth * chout), int(growth * chout_z)
            if freq:
                freqs = 1 if freqs <= kernel_size else freqs // stride
            if index == 0 and freq_emb:
                self.freq_emb = ScaledEmbedding(freqs, chin_z, smooth=emb_smooth,
                                                scale=emb_scale)
                self.freq_emb_scale = freq_emb

        if rescale:
            rescale_module(self, reference=rescale)

    @property
    def _hybrid(self) -> bool:
        return self.hybrid

    @property
    def _hybrid_old(self) -> bool:
        return self.hybrid_old

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        z = self._spec(mix)
        x, xt = self.separate(mix, self._magnitude(z).to(mix.device))
        x = self._ispec(self._mask(z, x), mix.shape[-1])
        return xt + x if self.hybrid else x

    def separate(self, mix: torch.Tensor, mag: torch.Tensor
                 ) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        """The network proper, on real tensors only (as :meth:`HTDemucs.separate`).

        Shapes: mix [B, C, L] and its spectral input ``mag`` [B, C', F, T] (C' = 2 C with
        CaC, else C; see :meth:`_magnitude`) -> spectral output [B, S, C', F, T] (before
        :meth:`_mask`) and, for hybrid models, waveform output [B, S, C, L] (else None),
        both scaled back to the inputs' levels.
        """
        length = mix.shape[-1]
        batch, _, freqs, frames = mag.shape
        # Both branches see standardised inputs; outputs are scaled back.
        mean = mag.mean(dim=(1, 2, 3), keepdim=True)
        std = mag.std(dim=(1, 2, 3), keepdim=True)
        x = (mag - mean) / (1e-5 + std)
        xt = None
        if self.hybrid:
            meant = mix.mean(dim=(1, 2), keepdim=True)
            stdt = mix.std(dim=(1, 2), keepdim=True)
            xt = (mix - meant) / (1e-5 + stdt)

        saved, saved_t = [], []  # skip connections
        lengths, lengths_t = [], []  # lengths before each layer, to trim the padding
        for idx, encode in enumerate(self.encoder):
            lengths.append(x.shape[-1])
            inject = None
            if self.hybrid and idx < len(self.tencoder):
                lengths_t.append(xt.shape[-1])
                tenc = self.tencoder[idx]
                xt = tenc(xt)
                if tenc.empty:
                    inject = xt  # same shape as the spectral branch from here on: merge
                else:
                    saved_t.append(xt)
            x = encode(x, inject)
            if idx == 0 and self.freq_emb is not None:
                # Frequency embedding: convolutions along frequency are not equivariant.
                frs = torch.arange(x.shape[-2], device=x.device)
                emb = self.freq_emb(frs).t()[None, :, :, None].expand_as(x)
                x = x + self.freq_emb_scale * emb
            saved.append(x)

        # The decoders start from zeros: the signal comes through the skip connections.
        x = torch.zeros_like(x)
        if self.hybrid:
            xt = torch.zeros_like(x)
            offset = self.depth - len(self.tdecoder)
        for idx, decode in enumerate(self.decoder):
            x, pre = decode(x, saved.pop(-1), lengths.pop(-1))
            if self.hybrid and idx >= offset:
                tdec = self.tdecoder[idx - offset]
                length_t = lengths_t.pop(-1)
                if tdec.empty:
                    # The branches separate: the time branch starts from the input of the
                    # spectral layer's transposed convolution.
                    assert pre.shape[2] == 1, pre.shape
                    xt, _ = tdec(pre[:, :, 0], None, length_t)
                else:
                    xt, _ = tdec(xt, saved_t.pop(-1), length_t)
        assert not saved and not saved_t and not lengths_t

        sources = len(self.sources)
        x = x.view(batch, sources, -1, freqs, frames)
        x = x * std[:, None] + mean[:, None]
        if self.hybrid:
            xt = xt.view(batch, sources, -1, length)
            xt = xt * stdt[:, None] + meant[:, None]
        return x, xt


REGISTRATION = register(FamilyRegistration(
    name="hdemucs", model_class=HDemucs, label="HDemucs",
    pickled=("demucs.hdemucs.HDemucs",), rules=DEMUCS4_RULES, graph="stemserve.export.exportable:HybridGraphSTFT",
    segment=lambda model: int(Fraction(model.segment) * model.samplerate)))
"""Hybrid Demucs (v3): takes any length, its STFTs exported as matrix products."""
