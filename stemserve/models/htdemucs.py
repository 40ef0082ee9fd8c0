"""Hybrid Transformer Demucs (v4, arXiv 2211.08553): demucs 4.0.1 ``demucs/htdemucs.py``.

Hybrid Demucs whose innermost layers are replaced by a cross-domain Transformer between
the spectral and the waveform branches. Module tree, ``state_dict`` keys and constructor
arguments are those of demucs 4.0.1, so that the official checkpoints (``htdemucs``,
``htdemucs_ft``, ``htdemucs_6s``) load with ``strict=True``.

The network is split in three steps so that exports can move the STFT out of the graph
or replace it (see :mod:`stemserve.export.exportable`): :meth:`HTDemucs._spec` and
:meth:`HTDemucs._magnitude` (STFT, complex as channels), :meth:`HTDemucs.separate` (the
network proper, real tensors only), :meth:`HTDemucs._mask` and :meth:`HTDemucs._ispec`.
"""
from __future__ import annotations

import typing as tp
from fractions import Fraction

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import ScaledEmbedding, rescale_module
from .hdemucs import HDecLayer, HEncLayer, MultiWrap, _HybridSpectrogram
from .transformer import CrossTransformerEncoder
from .arguments import DEMUCS4_RULES
from .registry import FamilyRegistration, register


class HTDemucs(_HybridSpectrogram, nn.Module):
    """Hybrid Transformer Demucs.

    Shapes: mix [batch, audio_channels, length] ->
    stems [batch, len(sources), audio_channels, length]. With ``use_train_segment`` (the
    default) the network always runs on the training segment (``segment * samplerate``
    samples): shorter inputs are zero-padded and the output trimmed back; longer ones are
    refused.

    Args (as demucs 4.0.1; see :class:`stemserve.models.HDemucs` for the shared ones):
        sources: source names, in output order.
        audio_channels, channels, channels_time, growth, nfft, wiener_iters, end_iters,
        wiener_residual, cac, depth, rewrite, multi_freqs, multi_freqs_depth, freq_emb,
        emb_scale, emb_smooth, kernel_size, time_stride, stride, context, context_enc,
        norm_starts, norm_groups, dconv_mode, dconv_depth, dconv_comp, dconv_init:
            as in Hybrid Demucs (the DConv branches have neither LSTM nor attention).
        bottom_channels: if > 0, 1x1 convolutions to and from this many channels around
            the Transformer.
        t_layers, t_emb, t_hidden_scale, t_heads, t_dropout, t_max_positions, t_norm_in,
        t_norm_in_group, t_group_norm, t_norm_first, t_norm_out, t_max_period,
        t_weight_decay, t_lr, t_layer_scale, t_gelu, t_weight_pos_embed,
        t_sin_random_shift, t_cape_mean_normalize, t_cape_augment, t_cape_glob_loc_scale,
        t_sparse_self_attn, t_sparse_cross_attn, t_mask_type, t_mask_random_seed,
        t_sparse_attn_window, t_global_window, t_sparsity, t_auto_sparsity, t_cross_first:
            the :class:`~stemserve.models.transformer.CrossTransformerEncoder`'s arguments
            (sparse attention is not supported at run time).
        rescale: target std of the rescaled weight init.
        samplerate, segment: sample rate and training segment in seconds (a ``Fraction``
            in the official checkpoints).
        use_train_segment: always run on the training segment length.
    """

    def __init__(
        self,
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
        depth: int = 4,
        rewrite: bool = True,
        # Frequency branch
        multi_freqs: tp.Optional[tp.Sequence[float]] = None,
        multi_freqs_depth: int = 3,
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
        dconv_comp: float = 8,
        dconv_init: float = 1e-3,
        # Before the Transformer
        bottom_channels: int = 0,
        # Transformer
        t_layers: int = 5,
        t_emb: str = "sin",
        t_hidden_scale: float = 4.0,
        t_heads: int = 8,
        t_dropout: float = 0.0,
        t_max_positions: int = 10000,
        t_norm_in: bool = True,
        t_norm_in_group: tp.Union[bool, int] = False,
        t_group_norm: tp.Union[bool, int] = False,
        t_norm_first: bool = True,
        t_norm_out: tp.Union[bool, int] = True,
        t_max_period: float = 10000.0,
        t_weight_decay: float = 0.0,
        t_lr: tp.Optional[float] = None,
        t_layer_scale: bool = True,
        t_gelu: bool = True,
        t_weight_pos_embed: float = 1.0,
        t_sin_random_shift: int = 0,
        t_cape_mean_normalize: bool = True,
        t_cape_augment: bool = True,
        # demucs' default (a list, never mutated):
        t_cape_glob_loc_scale: tp.List[float] = [5000.0, 1.0, 1.4],  # noqa: B006
        t_sparse_self_attn: bool = False,
        t_sparse_cross_attn: bool = False,
        t_mask_type: str = "diag",
        t_mask_random_seed: int = 42,
        t_sparse_attn_window: int = 500,
        t_global_window: int = 100,
        t_sparsity: float = 0.95,
        t_auto_sparsity: bool = False,
        # ------ Particuliar parameters
        t_cross_first: bool = False,
        # Weight init
        rescale: float = 0.1,
        # Metadata
        samplerate: int = 44100,
        segment: float = 10,
        use_train_segment: bool = True,
    ):
        super().__init__()
        self.cac = cac
        self.wiener_residual = wiener_residual
        self.audio_channels = audio_channels
        self.sources = sources
        self.kernel_size = kernel_size
        self.context = context
        self.stride = stride
        self.depth = depth
        self.bottom_channels = bottom_channels
        self.channels = channels
        self.samplerate = samplerate
        self.segment = segment
        self.use_train_segment = use_train_segment
        self.nfft = nfft
        self.hop_length = nfft // 4
        self.wiener_iters = wiener_iters
        self.end_iters = end_iters
        self.freq_emb: tp.Optional[ScaledEmbedding] = None
        assert wiener_iters == end_iters

        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
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
                ker, pad, last_freq = freqs, False, True
            kw = dict(kernel_size=ker, stride=stri, freq=freq, pad=pad,
                      norm=index >= norm_starts, rewrite=rewrite, norm_groups=norm_groups,
                      dconv_kw=dict(depth=dconv_depth, compress=dconv_comp, init=dconv_init,
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
            if freq:
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
            if freq:
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

        transformer_channels = channels * growth ** (depth - 1)
        if bottom_channels:
            self.channel_upsampler = nn.Conv1d(transformer_channels, bottom_channels, 1)
            self.channel_downsampler = nn.Conv1d(bottom_channels, transformer_channels, 1)
            self.channel_upsampler_t = nn.Conv1d(transformer_channels, bottom_channels, 1)
            self.channel_downsampler_t = nn.Conv1d(bottom_channels, transformer_channels, 1)
            transformer_channels = bottom_channels

        self.crosstransformer: tp.Optional[CrossTransformerEncoder] = None
        if t_layers > 0:
            self.crosstransformer = CrossTransformerEncoder(
                dim=transformer_channels, emb=t_emb, hidden_scale=t_hidden_scale,
                num_heads=t_heads, num_layers=t_layers, cross_first=t_cross_first,
                dropout=t_dropout, max_positions=t_max_positions, norm_in=t_norm_in,
                norm_in_group=t_norm_in_group, group_norm=t_group_norm,
                norm_first=t_norm_first, norm_out=t_norm_out, max_period=t_max_period,
                weight_decay=t_weight_decay, lr=t_lr, layer_scale=t_layer_scale,
                gelu=t_gelu, sin_random_shift=t_sin_random_shift,
                weight_pos_embed=t_weight_pos_embed, cape_mean_normalize=t_cape_mean_normalize,
                cape_augment=t_cape_augment, cape_glob_loc_scale=t_cape_glob_loc_scale,
                sparse_self_attn=t_sparse_self_attn, sparse_cross_attn=t_sparse_cross_attn,
                mask_type=t_mask_type, mask_random_seed=t_mask_random_seed,
                sparse_attn_window=t_sparse_attn_window, global_window=t_global_window,
                sparsity=t_sparsity, auto_sparsity=t_auto_sparsity)

    _hybrid = True
    _hybrid_old = False

    @property
    def training_length(self) -> int:
        """The training segment in samples (343,980 for the released 7.8 s models)."""
        return int(self.segment * self.samplerate)

    def valid_length(self, length: int) -> int:
        """The length the model runs on: the training segment (which ``length`` must not
        exceed) with ``use_train_segment``, else ``length`` itself."""
        if not self.use_train_segment:
            return length
        if self.training_length < length:
            raise ValueError(f"Given length {length} is longer than "
                             f"training length {self.training_length}")
        return self.training_length

    def separate(self, mix: torch.Tensor, mag: torch.Tensor
                 ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """The network proper, on real tensors only.

        Shapes: mix [B, C, L] and its spectral input ``mag`` [B, C', F, T] (C' = 2 C with
        CaC, see :meth:`_magnitude`) -> spectral output [B, S, C', F, T] (before
        :meth:`_mask`) and waveform output [B, S, C, L], both scaled back to the inputs'
        levels.
        """
        length = mix.shape[-1]
        batch, _, freqs, frames = mag.shape
        # Both branches see standardised inputs; outputs are scaled back.
        mean = mag.mean(dim=(1, 2, 3), keepdim=True)
        std = mag.std(dim=(1, 2, 3), keepdim=True)
        x = (mag - mean) / (1e-5 + std)
        meant = mix.mean(dim=(1, 2), keepdim=True)
        stdt = mix.std(dim=(1, 2), keepdim=True)
        xt = (mix - meant) / (1e-5 + stdt)

        saved, saved_t = [], []  # skip connections
        lengths, lengths_t = [], []  # lengths before each layer, to trim the padding
        for idx, encode in enumerate(self.encoder):
            lengths.append(x.shape[-1])
            inject = None
            if idx < len(self.tencoder):
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

        if self.crosstransformer is not None:
            if self.bottom_channels:
                b, c, f, t = x.shape
                x = self.channel_upsampler(x.reshape(b, c, f * t)).reshape(b, -1, f, t)
                xt = self.channel_upsampler_t(xt)
            x, xt = self.crosstransformer(x, xt)
            if self.bottom_channels:
                x = self.channel_downsampler(x.reshape(b, -1, f * t)).reshape(b, c, f, t)
                xt = self.channel_downsampler_t(xt)

        offset = self.depth - len(self.tdecoder)
        for idx, decode in enumerate(self.decoder):
            x, pre = decode(x, saved.pop(-1), lengths.pop(-1))
            if idx >= offset:
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
        xt = xt.view(batch, sources, -1, length)
        xt = xt * stdt[:, None] + meant[:, None]
        return x, xt

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        length = mix.shape[-1]
        if self.use_train_segment and self.training:
            # As demucs: the segment follows what the model is trained on.
            self.segment = Fraction(length, self.samplerate)
        run_length = self.valid_length(length)
        if run_length > length:
            mix = F.pad(mix, (0, run_length - length))
        z = self._spec(mix)
        x, xt = self.separate(mix, self._magnitude(z).to(mix.device))
        x = self._ispec(self._mask(z, x), run_length)
        return (xt + x)[..., :length]


def _served_on_its_segment(model: HTDemucs) -> None:
    if not model.use_train_segment:
        raise ValueError("HTDemucs(use_train_segment=False) takes any length; stemserve "
                         "serves it on its training segment only")


REGISTRATION = register(FamilyRegistration(
    name="htdemucs", model_class=HTDemucs, label="HTDemucs",
    pickled=("demucs.htdemucs.HTDemucs",), rules=DEMUCS4_RULES, graph="stemserve.export.exportable:HybridGraphSTFT",
    segment=lambda model: int(Fraction(model.segment) * model.samplerate),
    unsupported={"fp16": "its transformer adds float32 positional embeddings to "
                         "half-precision tokens, which does not trace; export it in fp32 "
                         "(fp16 on a GPU: the PyTorch backend's autocast, "
                         "TorchBackend(autocast='fp16'))"},
    check=_served_on_its_segment))
"""HT Demucs (v4): runs on its training segment only (``use_train_segment``)."""
