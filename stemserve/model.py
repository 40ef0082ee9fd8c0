"""Demucs v2: the waveform U-Net with a bidirectional LSTM (arXiv 1909.01174).

Module structure, parameter names and defaults follow facebookresearch/demucs 2.0.x
(`demucs/model.py`) exactly, so that official checkpoints load with ``strict=True`` and a
checkpoint's stored constructor arguments rebuild the same network.
"""
from __future__ import annotations

from typing import Sequence

import julius
import torch
from torch import nn

from stemserve.models.registry import FamilyRegistration, register
from stemserve.spec import valid_length


def center_trim(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Trim ``tensor`` along its last axis to ``length``, centred.

    An odd surplus loses its extra sample on the right, as demucs does.
    """
    delta = tensor.size(-1) - length
    if delta < 0:
        raise ValueError(f"tensor must be longer than {length}, got {tensor.size(-1)}")
    if delta:
        tensor = tensor[..., delta // 2:tensor.size(-1) - (delta - delta // 2)]
    return tensor


class BLSTM(nn.Module):
    """Bidirectional LSTM over time followed by a linear projection back to ``dim``.

    Shapes: [batch, dim, time] -> [batch, dim, time].
    """

    def __init__(self, dim: int, layers: int = 1):
        super().__init__()
        self.lstm = nn.LSTM(bidirectional=True, num_layers=layers, hidden_size=dim, input_size=dim)
        self.linear = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)
        x = self.lstm(x)[0]
        x = self.linear(x)
        return x.permute(1, 2, 0)


def rescale_module(module: nn.Module, reference: float) -> None:
    """Scale every convolution so that its weight std moves towards ``reference``.

    This is demucs' "rescaled init"; it only matters for freshly initialised models.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Conv1d, nn.ConvTranspose1d)):
            scale = (sub.weight.std().detach() / reference) ** 0.5
            sub.weight.data /= scale
            if sub.bias is not None:
                sub.bias.data /= scale


class Demucs(nn.Module):
    """Demucs v2 source separation network.

    Shapes: mix [batch, audio_channels, valid_length(T)] ->
    stems [batch, len(sources), audio_channels, T'] with T' >= T; the caller center-trims
    T' to T (see :meth:`valid_length`), as demucs' ``apply_model`` does.

    Args:
        sources: source names, in output order.
        audio_channels: 2 for stereo, 1 for mono.
        channels: channels of the first encoder layer.
        depth: number of encoder (and decoder) layers.
        rewrite: add a 1x1 convolution to each encoder layer and a ``context`` convolution to
            each decoder layer.
        glu: gated linear units instead of ReLU after the rewrite convolutions.
        rescale: target weight std of the rescaled initialisation (0 disables it).
        resample: upsample the input x2 before the encoder and downsample /2 after the decoder.
        kernel_size: kernel size of the strided convolutions.
        stride: stride of the strided convolutions.
        growth: channel multiplier from one encoder layer to the next.
        lstm_layers: BiLSTM layers between encoder and decoder (0: no LSTM).
        context: kernel size of the decoder's rewrite convolution.
        normalize: standardise each input by its own mono mean and std inside the network.
        samplerate: sample rate the model was trained on (metadata).
        segment_length: training segment length in samples, what ``apply_model`` splits by.
    """

    def __init__(self,
                 sources: Sequence[str],
                 audio_channels: int = 2,
                 channels: int = 64,
                 depth: int = 6,
                 rewrite: bool = True,
                 glu: bool = True,
                 rescale: float = 0.1,
                 resample: bool = True,
                 kernel_size: int = 8,
                 stride: int = 4,
                 growth: float = 2.,
                 lstm_layers: int = 2,
                 context: int = 3,
                 normalize: bool = False,
                 samplerate: int = 44100,
                 segment_length: int = 4 * 10 * 44100):
        super().__init__()
        self.audio_channels = audio_channels
        self.sources = list(sources)
        self.kernel_size = kernel_size
        self.context = context
        self.stride = stride
        self.depth = depth
        self.resample = resample
        self.channels = channels
        self.normalize = normalize
        self.samplerate = samplerate
        self.segment_length = segment_length

        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()

        if glu:
            activation: nn.Module = nn.GLU(dim=1)
            ch_scale = 2
        else:
            activation = nn.ReLU()
            ch_scale = 1
        in_channels = audio_channels
        for index in range(depth):
            encode: list[nn.Module] = [nn.Conv1d(in_channels, channels, kernel_size, stride), nn.ReLU()]
            if rewrite:
                encode += [nn.Conv1d(channels, ch_scale * channels, 1), activation]
            self.encoder.append(nn.Sequential(*encode))

            out_channels = in_channels if index > 0 else len(self.sources) * audio_channels
            decode: list[nn.Module] = []
            if rewrite:
                decode += [nn.Conv1d(channels, ch_scale * channels, context), activation]
            decode += [nn.ConvTranspose1d(channels, out_channels, kernel_size, stride)]
            if index > 0:
                decode.append(nn.ReLU())
            self.decoder.insert(0, nn.Sequential(*decode))
            in_channels = channels
            channels = int(growth * channels)

        self.lstm = BLSTM(in_channels, lstm_layers) if lstm_layers else None

        if rescale:
            rescale_module(self, reference=rescale)

    @property
    def valid_length_params(self) -> dict:
        """The hyper-parameters that :func:`stemserve.spec.valid_length` needs."""
        return dict(resample=self.resample, depth=self.depth, kernel_size=self.kernel_size,
                    stride=self.stride, context=self.context)

    def valid_length(self, length: int) -> int:
        """Smallest input length >= ``length`` that leaves no sample over in any convolution.

        Feed the network ``valid_length(T)`` samples (real context on both sides) and
        center-trim its output to ``T``.
        """
        return valid_length(length, **self.valid_length_params)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """mix [batch, audio_channels, time] -> stems [batch, sources, audio_channels, time']."""
        if self.normalize:
            mono = mix.mean(dim=1, keepdim=True)
            mean = mono.mean(dim=-1, keepdim=True)
            std = mono.std(dim=-1, keepdim=True)
        else:
            mean, std = 0., 1.
        # Like the official model, divide by (1e-5 + 1) even without normalisation.
        x = (mix - mean) / (1e-5 + std)

        if self.resample:
            x = julius.resample_frac(x, 1, 2)

        saved = []
        for encode in self.encoder:
            x = encode(x)
            saved.append(x)
        if self.lstm is not None:
            x = self.lstm(x)
        for decode in self.decoder:
            x = x + center_trim(saved.pop(-1), x.size(-1))
            x = decode(x)

        if self.resample:
            x = julius.resample_frac(x, 2, 1)
        x = x * std + mean
        return x.view(x.size(0), len(self.sources), self.audio_channels, x.size(-1))


REGISTRATION = register(FamilyRegistration(
    name="demucs", model_class=Demucs, label="Demucs",
    pickled=("demucs.model.Demucs", "stemserve.model.Demucs"),
    rules=None,  # demucs 2.0.3's formats: checkpoints.bounds checks their arguments itself
    segment=lambda model: int(model.segment_length)))
"""Demucs v2 (demucs 2.0.3): trained on segments of ``segment_length`` samples."""
