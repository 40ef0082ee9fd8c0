"""Band-split RoFormers: BS-RoFormer (arXiv 2309.02612) and Mel-Band RoFormer (arXiv
2310.01809), as ZFTurbo's Music-Source-Separation-Training (MSST)
``models/bs_roformer/bs_roformer.py`` and ``mel_band_roformer.py`` define them.

The public checkpoints (viperx's BS-RoFormer 1296/1297, Kim's Mel-Band RoFormer, the
BS-RoFormer-SW multi-stem model ...) were trained with that code; audio-separator vendors it
as ``audio_separator/separator/uvr_lib_v5/roformer/``. Module trees, ``state_dict`` keys and
constructor arguments are MSST's, so that their states load with ``strict=True``; the
eval-mode forward computes the same function. No einops, beartype, rotary_embedding_torch
or librosa: the rearranges are reshapes and permutes, the rotary embedding and the mel
filterbank are written out here.

Both networks take a mix ``[batch, channels, length]`` to its STFT, split the frequencies
into bands (contiguous for BS-RoFormer, overlapping mel bands for Mel-Band RoFormer), embed
each band, run axial transformers (along time, then along bands) and estimate one complex
mask per stem. The forward is split in three steps for exports that move or replace the
STFT: :meth:`BSRoformer.spectrogram`, :meth:`BSRoformer.masks` (real tensors only) and
:meth:`BSRoformer.waveform`.

Inference only: the training-only arguments (dropouts, multi-resolution STFT loss,
gradient checkpointing, attention kernels) are accepted and change nothing at inference.

Where audio-separator 0.47.1's copy departs from MSST, this module is MSST's: it honours
``zero_dc`` (default True: the DC bin of the masked spectrogram is zeroed) and
``skip_connection``, which audio-separator accepts and ignores; its Mel-Band RoFormer takes
``mlp_expansion_factor`` and ``linear_transformer_depth`` (audio-separator's ignores the
first and refuses the second); BS-RoFormer's output has the input's length (audio-separator
stops at the last whole hop). With ``zero_dc=False`` and neither of the other options, both
compute the same function (tests/test_roformer.py). Stems are always
``[batch, stems, channels, length]``, also for one stem.

Both are registered as families (``bs_roformer``, ``mel_band_roformer``) served on their
config's chunk, as :func:`stemserve.checkpoints.load_msst` builds them (it sets the rate,
stems, chunk, overlap and ``residual``: a single-target model's instrumental); the exporter
traces :class:`stemserve.export.exportable.RoformerGraph` instead of the network.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .registry import FamilyRegistration, register

__all__ = ["BSRoformer", "MelBandRoformer", "mel_filterbank", "DEFAULT_FREQS_PER_BANDS"]

DEFAULT_FREQS_PER_BANDS = (
    (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)
)
"""The 62 bands of the BS-RoFormer paper for ``n_fft=2048`` (1025 frequencies)."""


# --- norms and attention ---------------------------------------------------------------

class RMSNorm(nn.Module):
    """``x / |x| * sqrt(dim) * gamma`` over the last axis (the reference's RMSNorm: an L2
    normalisation rescaled, with ``F.normalize``'s 1e-12 floor instead of an epsilon)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class FeedForward(nn.Module):
    """Pre-norm MLP ``dim -> dim * mult -> dim`` with GELU. Shapes: [..., dim] -> same."""

    def __init__(self, dim: int, mult: float = 4, dropout: float = 0.0):
        super().__init__()
        dim_inner = int(dim * mult)
        self.net = nn.Sequential(
            RMSNorm(dim), nn.Linear(dim, dim_inner), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(dim_inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: rotary pairs are adjacent
    features, as in rotary_embedding_torch."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of rotary_embedding_torch's ``RotaryEmbedding(dim)``
    ('lang' frequencies ``theta ** (-2i / dim)``, all features rotated, adjacent pairs).

    ``freqs`` [dim // 2] is a parameter that does not train, as in rotary_embedding_torch,
    because the checkpoints hold it under every attention layer that shares the module.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def angles(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Rotation angle of each position and feature. Shape: [seq_len, dim]."""
        positions = torch.arange(seq_len, device=device, dtype=dtype).to(self.freqs.dtype)
        angles = positions[:, None] * self.freqs[None, :]
        return angles.repeat_interleave(2, dim=-1)

    def fix_lengths(self, *seq_lens: int) -> None:
        """Keep the cosines and sines of sequences of ``seq_lens`` positions as constants
        (non-persistent buffers): an export on a fixed chunk then holds no ``Range`` or
        ``Tile`` (the slow path of lucidrains/BS-RoFormer issue 37), and eager calls skip
        the trigonometry. Other lengths still compute theirs."""
        for seq_len in seq_lens:
            angles = self.angles(seq_len, self.freqs.device, torch.float32)
            self.register_buffer(f"cos_{seq_len}", angles.cos(), persistent=False)
            self.register_buffer(f"sin_{seq_len}", angles.sin(), persistent=False)

    def tables(self, seq_len, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The cosines and sines of ``seq_len`` positions: the fixed ones
        (:meth:`fix_lengths`) or computed. Shapes: [seq_len, dim] each."""
        fixed = int(seq_len)
        cos, sin = getattr(self, f"cos_{fixed}", None), getattr(self, f"sin_{fixed}", None)
        if cos is None or sin is None:
            angles = self.angles(seq_len, device, dtype)
            cos, sin = angles.cos(), angles.sin()
        return cos, sin

    def rotate_queries_or_keys(self, t: torch.Tensor) -> torch.Tensor:
        """Rotate each position of ``t`` by its angles. Shapes: [..., seq, dim] -> same."""
        cos, sin = self.tables(t.shape[-2], t.device, t.dtype)
        return (t * cos + rotate_half(t) * sin).type(t.dtype)


class Attend(nn.Module):
    """``softmax(q k^T * scale) v`` (``scale`` defaults to ``dim_head ** -0.5``).

    ``flash`` only picked the reference's CUDA kernel: accepted, and the same function.
    Shapes: q, k, v [batch, heads, seq, dim_head] -> [batch, heads, seq, dim_head].
    """

    def __init__(self, dropout: float = 0.0, flash: bool = False,
                 scale: Optional[float] = None):
        super().__init__()
        self.scale = scale
        self.dropout = dropout
        self.attn_dropout = nn.Dropout(dropout)
        self.flash = flash

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, scale=self.scale)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with rotary positions and a sigmoid gate per head
    and position. Shapes: [batch, seq, dim] -> [batch, seq, dim]."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0,
                 rotary_embed: Optional[RotaryEmbedding] = None, flash: bool = True):
        super().__init__()
        self.heads = heads
        self.scale = dim_head ** -0.5
        dim_inner = heads * dim_head
        self.rotary_embed = rotary_embed
        self.attend = Attend(flash=flash, dropout=dropout)
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, dim_inner * 3, bias=False)
        self.to_gates = nn.Linear(dim, heads)
        self.to_out = nn.Sequential(nn.Linear(dim_inner, dim, bias=False), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        batch, seq, _ = x.shape
        # 'b n (qkv h d) -> qkv b h n d'
        q, k, v = self.to_qkv(x).view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.rotary_embed is not None:
            q = self.rotary_embed.rotate_queries_or_keys(q)
            k = self.rotary_embed.rotate_queries_or_keys(k)
        out = self.attend(q, k, v)
        gates = self.to_gates(x)  # [b, n, h]
        out = out * gates.transpose(1, 2).unsqueeze(-1).sigmoid()
        out = out.transpose(1, 2).reshape(batch, seq, -1)  # 'b h n d -> b n (h d)'
        return self.to_out(out)


class SplitHeadsTransposed(nn.Module):
    """``'b n (qkv h d) -> qkv b h d n'`` (einops ``Rearrange`` of the reference's linear
    attention; no parameters). Shapes: [b, n, 3 * h * d] -> [3, b, h, d, n]."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 4, 1)


class MergeHeadsTransposed(nn.Module):
    """``'b h d n -> b n (h d)'``. Shapes: [b, h, d, n] -> [b, n, h * d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, heads, dim_head, seq = x.shape
        return x.permute(0, 3, 1, 2).reshape(batch, seq, heads * dim_head)


class LinearAttention(nn.Module):
    """Cross-covariance attention (El-Nouby et al., arXiv 2106.09681): attention between
    feature channels rather than positions, with L2-normalised queries and keys and a
    learned temperature per head; linear in the sequence length, so it can run over all
    time x band cells at once. Shapes: [batch, seq, dim] -> [batch, seq, dim]."""

    def __init__(self, *, dim: int, dim_head: int = 32, heads: int = 8, scale: float = 8,
                 flash: bool = False, dropout: float = 0.0):
        super().__init__()
        dim_inner = dim_head * heads
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Sequential(nn.Linear(dim, dim_inner * 3, bias=False),
                                    SplitHeadsTransposed(heads))
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.attend = Attend(scale=scale, dropout=dropout, flash=flash)
        self.to_out = nn.Sequential(MergeHeadsTransposed(), nn.Linear(dim_inner, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        q, k, v = self.to_qkv(x)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        q = q * self.temperature.exp()
        return self.to_out(self.attend(q, k, v))


class Transformer(nn.Module):
    """``depth`` residual (attention, feed-forward) pairs, then an RMSNorm if
    ``norm_output``. Shapes: [batch, seq, dim] -> [batch, seq, dim]."""

    def __init__(self, *, dim: int, depth: int, dim_head: int = 64, heads: int = 8,
                 attn_dropout: float = 0.0, ff_dropout: float = 0.0, ff_mult: float = 4,
                 norm_output: bool = True, rotary_embed: Optional[RotaryEmbedding] = None,
                 flash_attn: bool = True, linear_attn: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([])
        for _ in range(depth):
            if linear_attn:
                attn: nn.Module = LinearAttention(dim=dim, dim_head=dim_head, heads=heads,
                                                  dropout=attn_dropout, flash=flash_attn)
            else:
                attn = Attention(dim=dim, dim_head=dim_head, heads=heads, dropout=attn_dropout,
                                 rotary_embed=rotary_embed, flash=flash_attn)
            self.layers.append(nn.ModuleList(
                [attn, FeedForward(dim=dim, mult=ff_mult, dropout=ff_dropout)]))
        self.norm = RMSNorm(dim) if norm_output else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


# --- band split and mask estimation ----------------------------------------------------

class BandSplit(nn.Module):
    """One RMSNorm + Linear per band, from its ``dim_inputs[i]`` features (frequencies x
    channels x real/imaginary) to ``dim``.
    Shapes: [b, t, sum(dim_inputs)] -> [b, t, len(dim_inputs), dim]."""

    def __init__(self, dim: int, dim_inputs: Sequence[int]):
        super().__init__()
        self.dim_inputs = tuple(dim_inputs)
        self.to_features = nn.ModuleList(
            [nn.Sequential(RMSNorm(dim_in), nn.Linear(dim_in, dim)) for dim_in in dim_inputs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bands = x.split(self.dim_inputs, dim=-1)
        return torch.stack([net(band) for band, net in zip(bands, self.to_features)], dim=-2)


def MLP(dim_in: int, dim_out: int, dim_hidden: Optional[int] = None, depth: int = 1,
        activation: Callable[[], nn.Module] = nn.Tanh) -> nn.Sequential:
    """``depth`` Linear layers ``dim_in -> dim_hidden ... -> dim_out`` with ``activation``
    between them (the reference's function, whose Sequential indices are state keys)."""
    dim_hidden = dim_in if dim_hidden is None else dim_hidden
    dims = (dim_in, *((dim_hidden,) * (depth - 1)), dim_out)
    net: list[nn.Module] = []
    for index, (layer_in, layer_out) in enumerate(zip(dims[:-1], dims[1:])):
        net.append(nn.Linear(layer_in, layer_out))
        if index < len(dims) - 2:
            net.append(activation())
    return nn.Sequential(*net)


class MaskEstimator(nn.Module):
    """One MLP + GLU per band, from ``dim`` back to the band's ``dim_inputs[i]`` mask
    values. Shapes: [b, t, len(dim_inputs), dim] -> [b, t, sum(dim_inputs)].

    Each MLP has ``depth`` Linear layers, or ``depth + 1`` with ``extra_layer``: MSST's
    Mel-Band RoFormer builds its MLPs with ``depth`` hidden layers where BS-RoFormer's have
    ``depth - 1``, and the checkpoints hold the layers each one built.
    """

    def __init__(self, dim: int, dim_inputs: Sequence[int], depth: int,
                 mlp_expansion_factor: int = 4, extra_layer: bool = False):
        super().__init__()
        self.dim_inputs = tuple(dim_inputs)
        dim_hidden = dim * mlp_expansion_factor
        layers = depth + 1 if extra_layer else depth
        self.to_freqs = nn.ModuleList([
            nn.Sequential(MLP(dim, dim_in * 2, dim_hidden=dim_hidden, depth=layers),
                          nn.GLU(dim=-1))
            for dim_in in dim_inputs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bands = x.unbind(dim=-2)
        return torch.cat([mlp(band) for band, mlp in zip(bands, self.to_freqs)], dim=-1)


# --- the networks ----------------------------------------------------------------------

class _BandRoformer(nn.Module):
    """What both networks share: the STFT, the axial transformers and the mask estimators.

    Subclasses build ``self.band_split``, ``self.mask_estimators`` and ``self.layers`` (via
    :meth:`_build_layers`) and define :meth:`_band_input` and :meth:`_full_masks`.
    """

    stereo: bool
    audio_channels: int
    num_stems: int
    residual: bool = False
    """Also return the mix minus the stems' sum as a last stem (not an MSST argument: the
    loader sets it for a single-target config, whose ``instrumental`` it is)."""
    skip_connection: bool
    zero_dc: bool
    layers: nn.ModuleList
    band_split: BandSplit
    mask_estimators: nn.ModuleList

    def _init_common(self, *, stereo: bool, num_stems: int, stft_n_fft: int,
                     stft_hop_length: int, stft_win_length: int, stft_normalized: bool,
                     stft_window_fn: Optional[Callable], zero_dc: bool,
                     skip_connection: bool, use_pope: bool) -> None:
        if use_pope:
            # PoPE (MSST's alternative to rotary positions) needs the PoPE_pytorch package
            # and adds parameters of its own; no public checkpoint uses it.
            raise NotImplementedError("use_pope=True (PoPE positions) is not supported")
        if stft_win_length > stft_n_fft:
            raise ValueError(f"stft_win_length {stft_win_length} > stft_n_fft {stft_n_fft}")
        self.stereo = stereo
        self.audio_channels = 2 if stereo else 1
        self.num_stems = num_stems
        self.skip_connection = skip_connection
        self.zero_dc = zero_dc
        self.stft_kwargs = dict(n_fft=stft_n_fft, hop_length=stft_hop_length,
                                win_length=stft_win_length, normalized=stft_normalized)
        self.stft_window_fn = partial(stft_window_fn or torch.hann_window, stft_win_length)
        self.num_freqs = stft_n_fft // 2 + 1

    def _build_layers(self, *, depth: int, linear_transformer_depth: int,
                      time_transformer_depth: int, freq_transformer_depth: int,
                      dim_head: int, transformer_kwargs: dict) -> None:
        """``layers[i]``: ([linear transformer,] time transformer, band transformer); one
        rotary embedding for time and one for bands, shared by all layers."""
        time_rotary_embed = RotaryEmbedding(dim=dim_head)
        freq_rotary_embed = RotaryEmbedding(dim=dim_head)
        self.layers = nn.ModuleList([])
        for _ in range(depth):
            blocks = []
            if linear_transformer_depth > 0:
                blocks.append(Transformer(depth=linear_transformer_depth, linear_attn=True,
                                          **transformer_kwargs))
            blocks.append(Transformer(depth=time_transformer_depth,
                                      rotary_embed=time_rotary_embed, **transformer_kwargs))
            blocks.append(Transformer(depth=freq_transformer_depth,
                                      rotary_embed=freq_rotary_embed, **transformer_kwargs))
            self.layers.append(nn.ModuleList(blocks))

    def _check_channels(self, mix: torch.Tensor) -> torch.Tensor:
        if mix.ndim == 2:
            mix = mix[:, None]
        if mix.ndim != 3 or mix.shape[1] != self.audio_channels:
            raise ValueError(f"expected a mix [batch, {self.audio_channels}, length] "
                             f"(stereo={self.stereo}), got {tuple(mix.shape)}")
        return mix

    def spectrogram(self, mix: torch.Tensor) -> torch.Tensor:
        """Centred STFT, channels interleaved into frequencies (``f0c0, f0c1, f1c0 ...``).

        Shapes: mix [b, s, length] (or [b, length] when mono) -> [b, F * s, frames, 2].
        """
        mix = self._check_channels(mix)
        batch, channels, length = mix.shape
        window = self.stft_window_fn(device=mix.device)
        spec = torch.stft(mix.reshape(batch * channels, length), **self.stft_kwargs,
                          window=window, return_complex=True)
        spec = torch.view_as_real(spec)
        spec = spec.view(batch, channels, *spec.shape[1:])  # [b, s, F, t, 2]
        return spec.transpose(1, 2).reshape(batch, -1, spec.shape[3], 2)  # 'b s f t c -> b (f s) t c'

    def _band_input(self, spec: torch.Tensor) -> torch.Tensor:
        """The spectrogram's frequencies each band reads, in band order.
        Shapes: [b, F * s, t, 2] -> [b, t, sum of band widths * 2]."""
        raise NotImplementedError

    def _full_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """The bands' masks on the spectrogram's frequencies.
        Shapes: [b, n, sum of band widths, t, 2] -> [b, n, F * s, t, 2]."""
        raise NotImplementedError

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def masks(self, spec: torch.Tensor) -> torch.Tensor:
        """The network proper: complex masks (real, imaginary) of each stem.

        Shapes: spec [b, F * s, t, 2] -> masks [b, num_stems, F * s, t, 2].
        """
        x = self.band_split(self._band_input(spec))  # [b, t, bands, d]
        batch, frames, bands, dim = x.shape
        store: list[torch.Tensor] = []
        for block in self.layers:
            if len(block) == 3:
                linear_transformer, time_transformer, freq_transformer = block
                x = linear_transformer(x.reshape(batch, frames * bands, dim))
                x = x.view(batch, frames, bands, dim)
            else:
                time_transformer, freq_transformer = block
            if self.skip_connection:
                for previous in store:  # the outputs of all previous layers
                    x = x + previous
            x = x.transpose(1, 2).reshape(batch * bands, frames, dim)
            x = time_transformer(x)
            x = x.view(batch, bands, frames, dim).transpose(1, 2).reshape(batch * frames, bands, dim)
            x = freq_transformer(x)
            x = x.view(batch, frames, bands, dim)
            if self.skip_connection:
                store.append(x)
        x = self._final_norm(x)
        masks = torch.stack([estimator(x) for estimator in self.mask_estimators], dim=1)
        masks = masks.unflatten(-1, (-1, 2)).transpose(2, 3)  # 'b n t (f c) -> b n f t c'
        return self._full_masks(masks)

    def _istft_length(self, length: int) -> Optional[int]:
        return length

    def waveform(self, spec: torch.Tensor, masks: torch.Tensor, length: int) -> torch.Tensor:
        """Masked spectrogram back to audio (the DC bin zeroed if ``zero_dc``).

        Shapes: spec [b, F * s, t, 2], masks [b, n, F * s, t, 2] ->
        stems [b, n, s, length] (``(t - 1) * hop_length`` samples when the reference does
        not trim, see :class:`MelBandRoformer`'s ``match_input_audio_length``).
        """
        batch, num_stems, _, frames, _ = masks.shape
        channels = self.audio_channels
        spec = torch.view_as_complex(spec.contiguous())[:, None]
        stems = spec * torch.view_as_complex(masks.contiguous())  # [b, n, F * s, t]
        # 'b n (f s) t -> (b n s) f t'
        stems = stems.view(batch, num_stems, -1, channels, frames).transpose(2, 3)
        stems = stems.reshape(batch * num_stems * channels, -1, frames)
        if self.zero_dc:
            stems = stems.index_fill(1, torch.tensor(0, device=stems.device), 0.0)
        window = self.stft_window_fn(device=stems.device)
        audio = torch.istft(stems, **self.stft_kwargs, window=window, return_complex=False,
                            length=self._istft_length(length))
        return audio.view(batch, num_stems, channels, -1)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """Separate. Shapes: mix [b, s, length] (or [b, length] when mono) ->
        stems [b, num_stems, s, length].

        With :attr:`residual`, one more stem: the mix minus the others. Always 4-D, also
        for one stem: MSST's BSRoformer returns that shape while its
        MelBandRoformer (and audio-separator's copies) drop the stem axis of one-stem
        models; stemserve keeps one shape for every checkpoint.
        """
        mix = self._check_channels(mix)
        spec = self.spectrogram(mix)
        stems = self.waveform(spec, self.masks(spec), mix.shape[-1])
        if self.residual:
            stems = torch.cat([stems, (mix - stems.sum(dim=1))[:, None]], dim=1)
        return stems


class BSRoformer(_BandRoformer):
    """Band-Split RoFormer: the STFT's frequencies cut into contiguous bands of
    ``freqs_per_bands`` bins.

    Shapes: mix [batch, 2 if stereo else 1, length] -> stems [batch, num_stems, channels,
    length].

    Args (MSST's):
        dim: feature size of each (frame, band) cell.
        depth: number of (time, band) transformer pairs.
        stereo: two audio channels (else one).
        num_stems: number of stems (one mask estimator each).
        time_transformer_depth, freq_transformer_depth: layers of each transformer.
        linear_transformer_depth: if > 0, a linear-attention transformer over all cells
            before each pair.
        freqs_per_bands: bins per band; they add up to ``stft_n_fft // 2 + 1``.
        dim_head, heads: attention heads.
        stft_n_fft, stft_hop_length, stft_win_length, stft_normalized, stft_window_fn:
            the STFT (hann window of ``stft_win_length`` unless ``stft_window_fn``).
        zero_dc: zero the DC bin of the masked spectrograms (MSST since Sept 2025).
        mask_estimator_depth: Linear layers of each band's mask MLP.
        mlp_expansion_factor: hidden size of the mask MLPs, times ``dim``.
        skip_connection: add the outputs of all previous layers to each layer's input.
        use_pope: PoPE instead of rotary positions: refused (no checkpoint uses it).

    Accepted and without effect at inference (training options of the reference):
    ``attn_dropout``, ``ff_dropout``, ``flash_attn``, ``sage_attention`` (attention
    kernels), ``use_torch_checkpoint``, ``dim_freqs_in`` (unused by the reference too) and
    the ``multi_stft_*`` arguments of the training loss.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        stereo: bool = False,
        num_stems: int = 1,
        time_transformer_depth: int = 2,
        freq_transformer_depth: int = 2,
        linear_transformer_depth: int = 0,
        freqs_per_bands: Sequence[int] = DEFAULT_FREQS_PER_BANDS,
        dim_head: int = 64,
        heads: int = 8,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        flash_attn: bool = True,
        dim_freqs_in: int = 1025,
        stft_n_fft: int = 2048,
        stft_hop_length: int = 512,
        stft_win_length: int = 2048,
        stft_normalized: bool = False,
        stft_window_fn: Optional[Callable] = None,
        zero_dc: bool = True,
        mask_estimator_depth: int = 2,
        multi_stft_resolution_loss_weight: float = 1.0,
        multi_stft_resolutions_window_sizes: Sequence[int] = (4096, 2048, 1024, 512, 256),
        multi_stft_hop_size: int = 147,
        multi_stft_normalized: bool = False,
        multi_stft_window_fn: Callable = torch.hann_window,
        mlp_expansion_factor: int = 4,
        use_torch_checkpoint: bool = False,
        skip_connection: bool = False,
        use_pope: bool = False,
        sage_attention: bool = False,
    ):
        super().__init__()
        self._init_common(stereo=stereo, num_stems=num_stems, stft_n_fft=stft_n_fft,
                          stft_hop_length=stft_hop_length, stft_win_length=stft_win_length,
                          stft_normalized=stft_normalized, stft_window_fn=stft_window_fn,
                          zero_dc=zero_dc, skip_connection=skip_connection, use_pope=use_pope)
        transformer_kwargs = dict(dim=dim, heads=heads, dim_head=dim_head,
                                  attn_dropout=attn_dropout, ff_dropout=ff_dropout,
                                  flash_attn=flash_attn, norm_output=False)
        self._build_layers(depth=depth, linear_transformer_depth=linear_transformer_depth,
                           time_transformer_depth=time_transformer_depth,
                           freq_transformer_depth=freq_transformer_depth, dim_head=dim_head,
                           transformer_kwargs=transformer_kwargs)
        self.final_norm = RMSNorm(dim)

        freqs_per_bands = tuple(freqs_per_bands)
        if len(freqs_per_bands) < 2:
            raise ValueError(f"freqs_per_bands needs at least 2 bands, got {freqs_per_bands}")
        if sum(freqs_per_bands) != self.num_freqs:
            raise ValueError(f"freqs_per_bands adds up to {sum(freqs_per_bands)}, but "
                             f"stft_n_fft={stft_n_fft} gives {self.num_freqs} frequencies")
        self.freqs_per_bands = freqs_per_bands
        dim_inputs = tuple(2 * f * self.audio_channels for f in freqs_per_bands)
        self.band_split = BandSplit(dim=dim, dim_inputs=dim_inputs)
        self.mask_estimators = nn.ModuleList([
            MaskEstimator(dim=dim, dim_inputs=dim_inputs, depth=mask_estimator_depth,
                          mlp_expansion_factor=mlp_expansion_factor)
            for _ in range(num_stems)])

    def _band_input(self, spec: torch.Tensor) -> torch.Tensor:
        return spec.transpose(1, 2).flatten(2)  # 'b f t c -> b t (f c)'

    def _full_masks(self, masks: torch.Tensor) -> torch.Tensor:
        return masks

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(x)


# --- the mel filterbank ----------------------------------------------------------------

_F_SP = 200.0 / 3  # Slaney: linear below 1 kHz, 3 mels per 200 Hz
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa ``hz_to_mel(htk=False)``)."""
    hz = np.asarray(hz, dtype=np.float64)
    above = np.maximum(hz, _MIN_LOG_HZ)  # no log of 0 where the linear part applies
    return np.where(hz >= _MIN_LOG_HZ, _MIN_LOG_MEL + np.log(above / _MIN_LOG_HZ) / _LOGSTEP,
                    hz / _F_SP)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_hz_to_mel` (librosa ``mel_to_hz(htk=False)``)."""
    mels = np.asarray(mels, dtype=np.float64)
    return np.where(mels >= _MIN_LOG_MEL,
                    _MIN_LOG_HZ * np.exp(_LOGSTEP * (mels - _MIN_LOG_MEL)), _F_SP * mels)


def mel_filterbank(sample_rate: float, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular Slaney mel filters with Slaney (area) normalisation from 0 Hz to Nyquist:
    ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)`` with its defaults,
    in the same operations and float32 result, so that stemserve needs no librosa.

    Shape: [n_mels, n_fft // 2 + 1], float32.
    """
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    mel_freqs = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(float(sample_rate) / 2),
                                       n_mels + 2))
    fdiff = np.diff(mel_freqs)
    ramps = np.subtract.outer(mel_freqs, fft_freqs)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2: n_mels + 2] - mel_freqs[:n_mels]))[:, np.newaxis]
    return weights


def mel_bands(sample_rate: float, n_fft: int, num_bands: int) -> torch.Tensor:
    """Which frequencies each mel band covers: the filterbank's nonzero weights, with the
    first band forced to cover DC and the last Nyquist (the reference's fix-ups: librosa's
    first filter is 0 at DC, and its last may be 0 or ~1e-18 at Nyquist by platform).

    Shape: bool [num_bands, n_fft // 2 + 1].
    """
    filters = torch.from_numpy(mel_filterbank(sample_rate, n_fft, num_bands))
    filters[0][0] = 1.0
    filters[-1, -1] = 1.0
    return filters > 0


class MelBandRoformer(_BandRoformer):
    """Mel-Band RoFormer: bands are the supports of ``num_bands`` mel filters, which
    overlap; a frequency's mask is the mean of the masks of the bands that cover it.

    Shapes: mix [batch, 2 if stereo else 1, length] -> stems [batch, num_stems, channels,
    length'] with ``length' = length`` if ``match_input_audio_length`` else
    ``(frames - 1) * stft_hop_length`` as in the reference (equal when the length is a
    multiple of the hop).

    Args (MSST's): as :class:`BSRoformer`, but ``num_bands`` mel bands (from 0 Hz to
    ``sample_rate / 2``) instead of ``freqs_per_bands``, no final norm (each transformer
    ends in its own), mask MLPs of ``mask_estimator_depth + 1`` Linear layers
    (``mask_estimator_depth`` 1 by default), and ``match_input_audio_length``: trim or pad
    the output to the input's length.

    Accepted and without effect at inference (training options of the reference):
    ``attn_dropout``, ``ff_dropout``, ``flash_attn``, ``sage_attention`` (attention
    kernels), ``use_torch_checkpoint``, ``dim_freqs_in`` (unused by the reference too) and
    the ``multi_stft_*`` arguments of the training loss.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        stereo: bool = False,
        num_stems: int = 1,
        time_transformer_depth: int = 2,
        freq_transformer_depth: int = 2,
        linear_transformer_depth: int = 0,
        num_bands: int = 60,
        dim_head: int = 64,
        heads: int = 8,
        attn_dropout: float = 0.1,
        ff_dropout: float = 0.1,
        flash_attn: bool = True,
        dim_freqs_in: int = 1025,
        sample_rate: int = 44100,
        stft_n_fft: int = 2048,
        stft_hop_length: int = 512,
        stft_win_length: int = 2048,
        stft_normalized: bool = False,
        stft_window_fn: Optional[Callable] = None,
        zero_dc: bool = True,
        mask_estimator_depth: int = 1,
        multi_stft_resolution_loss_weight: float = 1.0,
        multi_stft_resolutions_window_sizes: Sequence[int] = (4096, 2048, 1024, 512, 256),
        multi_stft_hop_size: int = 147,
        multi_stft_normalized: bool = False,
        multi_stft_window_fn: Callable = torch.hann_window,
        match_input_audio_length: bool = False,
        mlp_expansion_factor: int = 4,
        use_torch_checkpoint: bool = False,
        skip_connection: bool = False,
        use_pope: bool = False,
        sage_attention: bool = False,
    ):
        super().__init__()
        self._init_common(stereo=stereo, num_stems=num_stems, stft_n_fft=stft_n_fft,
                          stft_hop_length=stft_hop_length, stft_win_length=stft_win_length,
                          stft_normalized=stft_normalized, stft_window_fn=stft_window_fn,
                          zero_dc=zero_dc, skip_connection=skip_connection, use_pope=use_pope)
        transformer_kwargs = dict(dim=dim, heads=heads, dim_head=dim_head,
                                  attn_dropout=attn_dropout, ff_dropout=ff_dropout,
                                  flash_attn=flash_attn)
        self._build_layers(depth=depth, linear_transformer_depth=linear_transformer_depth,
                           time_transformer_depth=time_transformer_depth,
                           freq_transformer_depth=freq_transformer_depth, dim_head=dim_head,
                           transformer_kwargs=transformer_kwargs)

        freqs_per_band = mel_bands(sample_rate, stft_n_fft, num_bands)
        if not freqs_per_band.any(dim=0).all():
            raise ValueError(f"num_bands={num_bands} mel bands leave frequencies of "
                             f"stft_n_fft={stft_n_fft} uncovered")
        # Each band's frequency indices, band after band (overlaps repeat frequencies).
        freq_indices = torch.arange(self.num_freqs).expand(num_bands, -1)[freqs_per_band]
        if stereo:  # index the interleaved (f s) axis
            freq_indices = (freq_indices[:, None] * 2 + torch.arange(2)).flatten()
        self.register_buffer("freq_indices", freq_indices, persistent=False)
        self.register_buffer("freqs_per_band", freqs_per_band, persistent=False)
        num_freqs_per_band = freqs_per_band.sum(dim=1)
        num_bands_per_freq = freqs_per_band.sum(dim=0)
        self.register_buffer("num_freqs_per_band", num_freqs_per_band, persistent=False)
        self.register_buffer("num_bands_per_freq", num_bands_per_freq, persistent=False)
        self.match_input_audio_length = match_input_audio_length

        dim_inputs = tuple(2 * f * self.audio_channels for f in num_freqs_per_band.tolist())
        self.band_split = BandSplit(dim=dim, dim_inputs=dim_inputs)
        self.mask_estimators = nn.ModuleList([
            MaskEstimator(dim=dim, dim_inputs=dim_inputs, depth=mask_estimator_depth,
                          mlp_expansion_factor=mlp_expansion_factor, extra_layer=True)
            for _ in range(num_stems)])

    def _band_input(self, spec: torch.Tensor) -> torch.Tensor:
        x = spec.index_select(1, self.freq_indices)  # [b, sum of band widths, t, 2]
        return x.transpose(1, 2).flatten(2)  # 'b f t c -> b t (f c)'

    def _full_masks(self, masks: torch.Tensor) -> torch.Tensor:
        index = self.freq_indices.view(1, 1, -1, 1, 1).expand_as(masks)  # batch stays dynamic
        # zeros computed from ``masks`` (a traced ``zeros_like`` is a constant of the traced
        # batch): an export keeps the batch dynamic
        zeros = (masks[:, :, :1] * 0).expand(
            -1, -1, self.num_freqs * self.audio_channels, -1, -1)
        summed = zeros.contiguous().scatter_add(2, index, masks)
        denom = self.num_bands_per_freq.repeat_interleave(self.audio_channels)
        return summed / denom.clamp(min=1e-8).view(-1, 1, 1).to(summed.dtype)

    def _istft_length(self, length: int) -> Optional[int]:
        return length if self.match_input_audio_length else None


# --- the families ----------------------------------------------------------------------

SERVED_ATTRIBUTES = ("samplerate", "sources", "chunk_size", "num_overlap", "normalize")
"""What the loader (:func:`stemserve.checkpoints.load_msst`) sets on a network from its
config, besides :attr:`~BSRoformer.residual`: the rate, the stems, and how MSST's
``demix`` splits a track (``audio.chunk_size``, ``inference.num_overlap`` and
``inference.normalize``)."""


def _served_as_loaded(model: nn.Module) -> None:
    missing = [name for name in SERVED_ATTRIBUTES if not hasattr(model, name)]
    if missing:
        raise ValueError(f"a {type(model).__name__} is served as load_msst builds it from its "
                         f"config: this one lacks {', '.join(missing)}")


def _registration(name: str, model_class: type[nn.Module]) -> FamilyRegistration:
    """A RoFormer family: bounded by its config reader (``msst_config``), split by chunks."""
    return register(FamilyRegistration(
        name=name, model_class=model_class, label=model_class.__name__, pickled=(),
        rules=None, segment=_chunk_size, graph="stemserve.export.exportable:RoformerGraph",
        unsupported={"fp16": "not exported in fp16 yet (the PyTorch backend's autocast runs "
                             "it in half precision on a GPU)"},
        check=_served_as_loaded))


def _chunk_size(model: nn.Module) -> int:
    return int(model.chunk_size)


REGISTRATIONS = (_registration("bs_roformer", BSRoformer),
                 _registration("mel_band_roformer", MelBandRoformer))
