"""The waveform-only Demucs of the v3 generation: demucs 4.0.1 ``demucs/demucs.py``
(``demucs.demucs.Demucs``).

Demucs v2's U-Net with GroupNorm in the inner layers, GELU, and DConv residual branches
(dilated convolutions, with a framed BiLSTM and local attention in the inner layers).
The time-domain members of the ``mdx`` and ``repro_mdx_a`` bags use it. Module tree,
``state_dict`` keys and constructor arguments are those of demucs 4.0.1.
"""
from __future__ import annotations

import math
import typing as tp
from fractions import Fraction

import julius
import torch
from torch import nn
from torch.nn import functional as F

from .blocks import BLSTM, DConv, center_trim, norm_factory, rescale_module
from .arguments import DEMUCS4_RULES
from .registry import FamilyRegistration, register


class DemucsV3(nn.Module):
    """Waveform Demucs, v3 generation (``demucs.demucs.Demucs`` of demucs 4.0.1).

    Shapes: mix [batch, audio_channels, length] ->
    stems [batch, len(sources), audio_channels, length] (any length: the input is
    zero-padded to :meth:`valid_length` and the output center-trimmed).

    Args (as demucs 4.0.1):
        sources: source names, in output order.
        audio_channels: input/output audio channels.
        channels: channels of the first layer, multiplied by ``growth`` at each layer.
        depth: encoder (and decoder) layers.
        rewrite: 1x1 rewrite convolutions (decoder: ``2 context + 1``) in each layer.
        lstm_layers: BiLSTM layers between encoder and decoder (0: none).
        kernel_size, stride: of the encoder/decoder convolutions.
        context: context of the decoder's rewrite convolution.
        gelu: GELU (else ReLU) after the convolutions.
        glu: GLU (else ReLU) after the rewrite convolutions.
        norm_starts, norm_groups: GroupNorm from this layer on, with this many groups.
        dconv_mode: DConv branches in the encoder (1), decoder (2) or both (3).
        dconv_depth, dconv_comp, dconv_attn, dconv_lstm, dconv_init: DConv depth,
            compression, first layer with attention, first with an LSTM, LayerScale init.
        normalize: standardise the input by its mono mean and std (and scale back).
        resample: upsample x2 before the network and downsample after.
        rescale: target std of the rescaled weight init.
        samplerate, segment: metadata (the training segment in seconds, for ``apply``).
    """

    def __init__(self,
                 sources: tp.Sequence[str],
                 # Channels
                 audio_channels: int = 2,
                 channels: int = 64,
                 growth: float = 2.,
                 # Main structure
                 depth: int = 6,
                 rewrite: bool = True,
                 lstm_layers: int = 0,
                 # Convolutions
                 kernel_size: int = 8,
                 stride: int = 4,
                 context: int = 1,
                 # Activations
                 gelu: bool = True,
                 glu: bool = True,
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
                 # Pre/post processing
                 normalize: bool = True,
                 resample: bool = True,
                 # Weight init
                 rescale: float = 0.1,
                 # Metadata
                 samplerate: int = 44100,
                 segment: float = 4 * 10):
        super().__init__()
        self.audio_channels = audio_channels
        self.sources = sources
        self.kernel_size = kernel_size
        self.context = context
        self.stride = stride
        self.depth = depth
        self.resample = resample
        self.channels = channels
        self.normalize = normalize
        self.samplerate = samplerate
        self.segment = segment
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.skip_scales = nn.ModuleList()  # empty, as in demucs

        if glu:
            activation: nn.Module = nn.GLU(dim=1)
            ch_scale = 2
        else:
            activation = nn.ReLU()
            ch_scale = 1
        act2: type = nn.GELU if gelu else nn.ReLU

        in_channels = audio_channels
        for index in range(depth):
            norm_fn = norm_factory(index >= norm_starts, norm_groups)
            dconv_kw = dict(depth=dconv_depth, init=dconv_init, compress=dconv_comp,
                            attn=index >= dconv_attn, lstm=index >= dconv_lstm)
            encode: list = [nn.Conv1d(in_channels, channels, kernel_size, stride),
                            norm_fn(channels), act2()]
            if dconv_mode & 1:
                encode.append(DConv(channels, **dconv_kw))
            if rewrite:
                encode += [nn.Conv1d(channels, ch_scale * channels, 1),
                           norm_fn(ch_scale * channels), activation]
            self.encoder.append(nn.Sequential(*encode))

            out_channels = in_channels if index > 0 else len(sources) * audio_channels
            decode: list = []
            if rewrite:
                decode += [nn.Conv1d(channels, ch_scale * channels, 2 * context + 1,
                                     padding=context),
                           norm_fn(ch_scale * channels), activation]
            if dconv_mode & 2:
                decode.append(DConv(channels, **dconv_kw))
            decode.append(nn.ConvTranspose1d(channels, out_channels, kernel_size, stride))
            if index > 0:
                decode += [norm_fn(out_channels), act2()]
            self.decoder.insert(0, nn.Sequential(*decode))
            in_channels = channels
            channels = int(growth * channels)

        self.lstm = BLSTM(in_channels, lstm_layers) if lstm_layers else None

        if rescale:
            rescale_module(self, reference=rescale)

    @property
    def valid_length_params(self) -> dict:
        """:func:`stemserve.spec.valid_length`'s parameters for this model: v2's formula
        without the context term."""
        return dict(resample=bool(self.resample), depth=self.depth,
                    kernel_size=self.kernel_size, stride=self.stride, context=1)

    def valid_length(self, length: int) -> int:
        """Smallest length >= ``length`` that leaves no sample over in any convolution;
        :meth:`forward` pads its input to it."""
        if self.resample:
            length = length * 2  # not *=: under tracing, length is the input's shape
        for _ in range(self.depth):
            length = max(1, math.ceil((length - self.kernel_size) / self.stride) + 1)
        for _ in range(self.depth):
            length = (length - 1) * self.stride + self.kernel_size
        if self.resample:
            length = math.ceil(length / 2)
        return int(length)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        x = mix
        length = x.shape[-1]
        if self.normalize:
            mono = mix.mean(dim=1, keepdim=True)
            mean = mono.mean(dim=-1, keepdim=True)
            std = mono.std(dim=-1, keepdim=True)
            x = (x - mean) / (1e-5 + std)
        else:
            mean, std = 0, 1

        if not torch.jit.is_tracing():  # an exported graph takes valid lengths only
            delta = self.valid_length(length) - length
            x = F.pad(x, (delta // 2, delta - delta // 2))
        if self.resample:
            x = julius.resample_frac(x, 1, 2)

        saved = []
        for encode in self.encoder:
            x = encode(x)
            saved.append(x)
        if self.lstm is not None:
            x = self.lstm(x)
        for decode in self.decoder:
            x = decode(x + center_trim(saved.pop(-1), x))

        if self.resample:
            x = julius.resample_frac(x, 2, 1)
        x = x * std + mean
        x = center_trim(x, length)
        return x.view(x.size(0), len(self.sources), self.audio_channels, x.size(-1))

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        """Load a state, renaming the keys of the earlier v3 checkpoints first (their
        encoder/decoder layers had no norm before the activation: index 2, now 3)."""
        state = dict(state)
        for idx in range(self.depth):
            for part in ("encoder", "decoder"):
                for name in ("bias", "weight"):
                    new, old = f"{part}.{idx}.3.{name}", f"{part}.{idx}.2.{name}"
                    if old in state and new not in state:
                        state[new] = state.pop(old)
        return super().load_state_dict(state, strict=strict, assign=assign)


REGISTRATION = register(FamilyRegistration(
    name="demucs_v3", model_class=DemucsV3, label="Demucs (v3)",
    pickled=("demucs.demucs.Demucs",), rules=DEMUCS4_RULES,
    segment=lambda model: int(Fraction(model.segment) * model.samplerate),
    input_needed=lambda model: model.valid_length(int(model.segment * model.samplerate))))
"""The waveform Demucs of demucs 4.0.1: its input is its segment's valid length, which
stride**depth can make far longer than the segment."""
