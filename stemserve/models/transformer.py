"""The cross-domain Transformer of Hybrid Transformer Demucs (demucs 4.0.1
``demucs/transformer.py``).

Self-attention layers alternate with cross-attention layers between the spectral branch
(tokens are frequency x time cells) and the waveform branch (tokens are time steps).
Module and parameter names follow demucs 4.0.1 (and ``nn.TransformerEncoderLayer``, which
its self-attention layer subclasses) so that checkpoints load unchanged.

Inference only: the training-time CAPE augmentation is not reimplemented.
"""
from __future__ import annotations

import math
import random
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import LayerScale


def create_sin_embedding(length: int, dim: int, shift: int = 0, device="cpu",
                         max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal positions ``shift .. shift + length - 1``: cosines then sines.

    Shape: [length, 1, dim].
    """
    assert dim % 2 == 0
    pos = shift + torch.arange(length, device=device).view(-1, 1, 1)
    half_dim = dim // 2
    adim = torch.arange(half_dim, device=device).view(1, 1, -1)
    phase = pos / (max_period ** (adim / (half_dim - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


def create_2d_sin_embedding(d_model: int, height: int, width: int, device="cpu",
                            max_period: float = 10000) -> torch.Tensor:
    """2D sinusoidal positions: the first half of the channels encodes the column (time),
    the second half the row (frequency), sines and cosines interleaved.

    Shape: [1, d_model, height, width].
    """
    if d_model % 4 != 0:
        raise ValueError(f"Cannot use sin/cos positional encoding with odd dimension "
                         f"(got dim={d_model})")
    pe = torch.zeros(d_model, height, width)
    half = d_model // 2
    div_term = torch.exp(torch.arange(0.0, half, 2) * -(math.log(max_period) / half))
    pos_w = torch.arange(0.0, width).unsqueeze(1)
    pos_h = torch.arange(0.0, height).unsqueeze(1)
    along_w = (pos_w * div_term).transpose(0, 1).unsqueeze(1)  # [half / 2, 1, width]
    along_h = (pos_h * div_term).transpose(0, 1).unsqueeze(2)  # [half / 2, height, 1]
    pe[0:half:2] = torch.sin(along_w).repeat(1, height, 1)
    pe[1:half:2] = torch.cos(along_w).repeat(1, height, 1)
    pe[half::2] = torch.sin(along_h).repeat(1, 1, width)
    pe[half + 1::2] = torch.cos(along_h).repeat(1, 1, width)
    return pe[None].to(device)


def create_sin_embedding_cape(length: int, dim: int, batch_size: int, mean_normalize: bool,
                              device="cpu", max_period: float = 10000.0) -> torch.Tensor:
    """CAPE positions (arXiv 2106.03143) as used at inference: sinusoidal embedding of
    positions centred on their mean when ``mean_normalize``; no augmentation.

    Shape: [length, batch_size, dim].
    """
    assert dim % 2 == 0
    pos = 1.0 * torch.arange(length).view(-1, 1, 1)
    pos = pos.repeat(1, batch_size, 1)
    if mean_normalize:
        pos -= pos.mean(dim=0, keepdim=True)  # demucs' nanmean: no NaN here, and it exports
    pos = pos.to(device)
    half_dim = dim // 2
    adim = torch.arange(half_dim, device=device).view(1, 1, -1)
    phase = pos / (max_period ** (adim / (half_dim - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1).float()


class ScaledEmbedding(nn.Module):
    """Learnt positional embedding stored divided by ``boost`` (a larger learning rate).

    Shapes: positions [*] -> [*, embedding_dim].
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float = 1.0,
                 boost: float = 3.0):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data *= scale / boost
        self.boost = boost

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight * self.boost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x) * self.boost


class ChannelLastGroupNorm(nn.GroupNorm):
    """GroupNorm over [batch, time, channels] tensors: with one group, it normalises each
    item over all its time steps and channels together (demucs' ``MyGroupNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class SparseAttention(nn.Module):
    """The parameters of demucs' sparse ``MultiheadAttention`` (``q``, ``k``, ``v``,
    ``proj``), so that checkpoints of sparse-attention models load.

    No released model uses it and its kernels need xformers: running it raises.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, auto_sparsity: float = 0):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(embed_dim, embed_dim, bias)
        self.proj_drop = nn.Dropout(dropout)
        self.batch_first = batch_first
        self.auto_sparsity = auto_sparsity

    def forward(self, *args, **kwargs):
        raise NotImplementedError("sparse attention (xformers kernels) is not supported")


def _activation(activation: tp.Union[str, tp.Callable]) -> tp.Callable:
    if not isinstance(activation, str):
        return activation
    if activation in ("relu", "gelu"):
        return getattr(F, activation)
    raise RuntimeError(f"activation should be relu/gelu, not {activation}")


class _FeedForwardMixin:
    """The feed-forward block shared by both layer kinds: linear, activation, linear."""

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout2(x)


class MyTransformerEncoderLayer(_FeedForwardMixin, nn.Module):
    """Self-attention layer: ``nn.TransformerEncoderLayer`` plus LayerScale on both residual
    branches and an optional GroupNorm after the layer (``norm_out``).

    Sparse attention masks are not supported (no released model uses them).
    Shapes: [batch, time, d_model] -> same (``batch_first=True``; demucs always uses it).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: tp.Union[str, tp.Callable] = F.relu,
                 group_norm: int = 0, norm_first: bool = False, norm_out: bool = False,
                 layer_norm_eps: float = 1e-5, layer_scale: bool = False,
                 init_values: float = 1e-4, device=None, dtype=None, sparse: bool = False,
                 mask_type: str = "diag", mask_random_seed: int = 42,
                 sparse_attn_window: int = 500, global_window: int = 50,
                 auto_sparsity: bool = False, sparsity: float = 0.95,
                 batch_first: bool = False):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.sparse = sparse
        self.batch_first = batch_first
        if sparse:
            self.self_attn: nn.Module = SparseAttention(
                d_model, nhead, dropout=dropout, batch_first=batch_first,
                auto_sparsity=sparsity if auto_sparsity else 0)
        else:
            self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout,
                                                   batch_first=batch_first, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, **factory)
        self.norm_first = norm_first
        if group_norm:
            self.norm1: nn.Module = ChannelLastGroupNorm(int(group_norm), d_model,
                                                         eps=layer_norm_eps, **factory)
            self.norm2: nn.Module = ChannelLastGroupNorm(int(group_norm), d_model,
                                                         eps=layer_norm_eps, **factory)
        else:
            self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
            self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.norm_out = (ChannelLastGroupNorm(num_groups=int(norm_out), num_channels=d_model)
                         if norm_first and norm_out else None)
        self.gamma_1 = LayerScale(d_model, init_values, True) if layer_scale else nn.Identity()
        self.gamma_2 = LayerScale(d_model, init_values, True) if layer_scale else nn.Identity()

    def _sa_block(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(x, x, x, need_weights=False)[0]
        return self.dropout1(x)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self.gamma_1(self._sa_block(self.norm1(x)))
            x = x + self.gamma_2(self._ff_block(self.norm2(x)))
            if self.norm_out is not None:
                x = self.norm_out(x)
        else:
            x = self.norm1(x + self.gamma_1(self._sa_block(x)))
            x = self.norm2(x + self.gamma_2(self._ff_block(x)))
        return x


class CrossTransformerEncoderLayer(_FeedForwardMixin, nn.Module):
    """Cross-attention layer: queries from one branch attend to the other branch's tokens,
    then a feed-forward block; LayerScale on both residual branches.

    Shapes: q [batch, T, d_model], k [batch, S, d_model] -> [batch, T, d_model].
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: tp.Union[str, tp.Callable] = F.relu,
                 layer_norm_eps: float = 1e-5, layer_scale: bool = False,
                 init_values: float = 1e-4, norm_first: bool = False, group_norm: bool = False,
                 norm_out: bool = False, sparse: bool = False, mask_type: str = "diag",
                 mask_random_seed: int = 42, sparse_attn_window: int = 500,
                 global_window: int = 50, sparsity: float = 0.95, auto_sparsity=None,
                 device=None, dtype=None, batch_first: bool = False):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.sparse = sparse
        if sparse:
            self.cross_attn: nn.Module = SparseAttention(
                d_model, nhead, dropout=dropout, batch_first=batch_first,
                auto_sparsity=sparsity if auto_sparsity else 0)
        else:
            self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout,
                                                    batch_first=batch_first)
        self.linear1 = nn.Linear(d_model, dim_feedforward, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, **factory)
        self.norm_first = norm_first
        norm: tp.Callable[[], nn.Module]
        if group_norm:
            norm = lambda: ChannelLastGroupNorm(int(group_norm), d_model,  # noqa: E731
                                                eps=layer_norm_eps, **factory)
        else:
            norm = lambda: nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)  # noqa: E731
        self.norm1 = norm()
        self.norm2 = norm()
        self.norm3 = norm()
        self.norm_out = (ChannelLastGroupNorm(num_groups=int(norm_out), num_channels=d_model)
                         if norm_first and norm_out else None)
        self.gamma_1 = LayerScale(d_model, init_values, True) if layer_scale else nn.Identity()
        self.gamma_2 = LayerScale(d_model, init_values, True) if layer_scale else nn.Identity()
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)

    def _ca_block(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        x = self.cross_attn(q, k, k, need_weights=False)[0]
        return self.dropout1(x)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = q + self.gamma_1(self._ca_block(self.norm1(q), self.norm2(k)))
            x = x + self.gamma_2(self._ff_block(self.norm3(x)))
            if self.norm_out is not None:
                x = self.norm_out(x)
        else:
            x = self.norm1(q + self.gamma_1(self._ca_block(q, k)))
            x = self.norm2(x + self.gamma_2(self._ff_block(x)))
        return x


class CrossTransformerEncoder(nn.Module):
    """``num_layers`` pairs of layers, one for each branch: self-attention within each
    branch alternates with cross-attention between the branches (cross first with
    ``cross_first``). Both token sequences get sinusoidal positions first (2D for the
    spectral branch; ``emb`` chooses the waveform branch's: "sin", "cape" or "scaled").

    Shapes: x [batch, dim, freqs, frames], xt [batch, dim, time] -> same shapes.
    """

    def __init__(self, dim: int, emb: str = "sin", hidden_scale: float = 4.0,
                 num_heads: int = 8, num_layers: int = 6, cross_first: bool = False,
                 dropout: float = 0.0, max_positions: int = 1000, norm_in: bool = True,
                 norm_in_group: bool = False, group_norm: int = False,
                 norm_first: bool = False, norm_out: bool = False, max_period: float = 10000.0,
                 weight_decay: float = 0.0, lr: tp.Optional[float] = None,
                 layer_scale: bool = False, gelu: bool = True, sin_random_shift: int = 0,
                 weight_pos_embed: float = 1.0, cape_mean_normalize: bool = True,
                 cape_augment: bool = True,
                 cape_glob_loc_scale: tp.Sequence[float] = (5000.0, 1.0, 1.4),
                 sparse_self_attn: bool = False, sparse_cross_attn: bool = False,
                 mask_type: str = "diag", mask_random_seed: int = 42,
                 sparse_attn_window: int = 500, global_window: int = 50,
                 auto_sparsity: bool = False, sparsity: float = 0.95):
        super().__init__()
        assert dim % num_heads == 0
        self.num_layers = num_layers
        # Layers whose index has this parity are self-attention, the others cross-attention.
        self.classic_parity = 1 if cross_first else 0
        self.emb = emb
        self.max_period = max_period
        self.weight_decay = weight_decay
        self.weight_pos_embed = weight_pos_embed
        self.sin_random_shift = sin_random_shift
        if emb == "cape":
            self.cape_mean_normalize = cape_mean_normalize
            self.cape_augment = cape_augment
            self.cape_glob_loc_scale = list(cape_glob_loc_scale)
        if emb == "scaled":
            self.position_embeddings = ScaledEmbedding(max_positions, dim, scale=0.2)
        self.lr = lr

        if norm_in:
            self.norm_in: nn.Module = nn.LayerNorm(dim)
            self.norm_in_t: nn.Module = nn.LayerNorm(dim)
        elif norm_in_group:
            self.norm_in = ChannelLastGroupNorm(int(norm_in_group), dim)
            self.norm_in_t = ChannelLastGroupNorm(int(norm_in_group), dim)
        else:
            self.norm_in = nn.Identity()
            self.norm_in_t = nn.Identity()

        common = dict(d_model=dim, nhead=num_heads, dim_feedforward=int(dim * hidden_scale),
                      dropout=dropout, activation=F.gelu if gelu else F.relu,
                      group_norm=group_norm, norm_first=norm_first, norm_out=norm_out,
                      layer_scale=layer_scale, mask_type=mask_type,
                      mask_random_seed=mask_random_seed, sparse_attn_window=sparse_attn_window,
                      global_window=global_window, sparsity=sparsity,
                      auto_sparsity=auto_sparsity, batch_first=True)
        self.layers = nn.ModuleList()  # spectral branch
        self.layers_t = nn.ModuleList()  # waveform branch
        for idx in range(num_layers):
            for layers in (self.layers, self.layers_t):
                if idx % 2 == self.classic_parity:
                    layers.append(MyTransformerEncoderLayer(sparse=sparse_self_attn, **common))
                else:
                    layers.append(CrossTransformerEncoderLayer(sparse=sparse_cross_attn,
                                                               **common))

    def forward(self, x: torch.Tensor, xt: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        batch, channels, freqs, frames = x.shape
        pos_emb_2d = create_2d_sin_embedding(channels, freqs, frames, x.device, self.max_period)
        # Spectral tokens are time-major: [batch, frames * freqs, channels].
        pos_emb_2d = pos_emb_2d.permute(0, 3, 2, 1).reshape(1, frames * freqs, channels)
        x = x.permute(0, 3, 2, 1).reshape(batch, frames * freqs, channels)
        x = self.norm_in(x)
        x = x + self.weight_pos_embed * pos_emb_2d

        _, _, time = xt.shape
        xt = xt.permute(0, 2, 1)
        pos_emb = self._get_pos_embedding(time, batch, channels, x.device).permute(1, 0, 2)
        xt = self.norm_in_t(xt)
        xt = xt + self.weight_pos_embed * pos_emb

        for idx in range(self.num_layers):
            if idx % 2 == self.classic_parity:
                x = self.layers[idx](x)
                xt = self.layers_t[idx](xt)
            else:
                old_x = x
                x = self.layers[idx](x, xt)
                xt = self.layers_t[idx](xt, old_x)

        x = x.reshape(batch, frames, freqs, channels).permute(0, 3, 2, 1)
        xt = xt.permute(0, 2, 1)
        return x, xt

    def _get_pos_embedding(self, length: int, batch: int, channels: int,
                           device) -> torch.Tensor:
        """Positions of the waveform branch's tokens. Shape: [length, 1 or batch, channels]."""
        if self.emb == "sin":
            # Like demucs, the random shift is drawn in eval mode too (0 for released models).
            shift = random.randrange(self.sin_random_shift + 1)
            return create_sin_embedding(length, channels, shift=shift, device=device,
                                        max_period=self.max_period)
        if self.emb == "cape":
            if self.training and self.cape_augment:
                raise NotImplementedError("CAPE augmentation (training only) is not supported")
            return create_sin_embedding_cape(length, channels, batch, device=device,
                                             max_period=self.max_period,
                                             mean_normalize=self.cape_mean_normalize)
        if self.emb == "scaled":
            pos = torch.arange(length, device=device)
            return self.position_embeddings(pos)[:, None]
        raise ValueError(f"unknown positional embedding {self.emb!r}")

    def make_optim_group(self) -> dict:
        """The transformer's own optimiser group (weight decay, learning rate)."""
        group = {"params": list(self.parameters()), "weight_decay": self.weight_decay}
        if self.lr is not None:
            group["lr"] = self.lr
        return group
