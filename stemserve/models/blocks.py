"""Building blocks shared by the demucs v3/v4 models (demucs 4.0.1 ``demucs.py``,
``hdemucs.py``, ``utils.py``).

Attribute names and the order of children follow demucs 4.0.1 exactly: they are the
``state_dict`` keys of the official checkpoints.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F


def center_trim(tensor: torch.Tensor, reference: Union[torch.Tensor, int]) -> torch.Tensor:
    """Trim the last axis of ``tensor`` to the length of ``reference`` (a tensor or an int),
    centred; an odd surplus loses its extra sample on the right, as demucs does."""
    if isinstance(reference, torch.Tensor) and reference.dim():
        length = reference.shape[-1]
    else:  # a length; under tracing a 0-d tensor, kept as one so the trim stays dynamic
        length = reference
    delta = tensor.shape[-1] - length
    if delta < 0:
        raise ValueError(f"tensor must be at least {length} long, got {tensor.shape[-1]}")
    if delta:
        tensor = tensor[..., delta // 2:tensor.shape[-1] - (delta - delta // 2)]
    return tensor


def pad1d(x: torch.Tensor, paddings: Tuple[int, int], mode: str = "constant",
          value: float = 0.) -> torch.Tensor:
    """``F.pad`` on the last axis that also reflect-pads inputs shorter than the padding.

    Reflection cannot pad more than ``length - 1`` samples; like demucs, the surplus is first
    zero-padded (on the right first) and the rest is reflected.
    Shapes: [*, length] -> [*, left + length + right].
    """
    left, right = paddings
    length = x.shape[-1]
    if mode == "reflect" and torch.jit.is_tracing():
        # A traced graph cannot branch on the length: zero-pad by what reflection cannot
        # cover, which is nothing for long inputs.
        left, right = torch.as_tensor(left), torch.as_tensor(right)
        extra = torch.clamp(torch.maximum(left, right) - length + 1, min=0)
        extra_right = torch.minimum(right, extra)
        extra_left = extra - extra_right
        x = F.pad(x, (extra_left, extra_right))
        left, right = left - extra_left, right - extra_right
    elif mode == "reflect" and length <= max(left, right):
        extra = max(left, right) - length + 1
        extra_right = min(right, extra)
        extra_left = extra - extra_right
        x = F.pad(x, (extra_left, extra_right))
        left, right = left - extra_left, right - extra_right
    return F.pad(x, (left, right), mode, value)


def frames_of(x: torch.Tensor, width: int, stride: int) -> torch.Tensor:
    """Overlapping frames of the last axis, zero-padded at the end so that every sample is
    covered: [*, T] -> [*, ceil(T / stride), width] (demucs' ``utils.unfold``).

    Gathered by index rather than ``Tensor.unfold``, which ONNX cannot export when ``T``
    is a dynamic axis; the values are the same.
    """
    length = x.shape[-1]
    # Integer ops keep a traced length dynamic; no negative operands (ONNX's Div truncates).
    n_frames = (length + stride - 1) // stride
    x = F.pad(x, (0, (n_frames - 1) * stride + width - length))
    starts = torch.arange(n_frames, device=x.device)[:, None] * stride
    return x[..., starts + torch.arange(width, device=x.device)]


def rescale_module(module: nn.Module, reference: float) -> None:
    """Demucs' "rescaled init": scale every convolution's weight std towards ``reference``.

    Only matters for freshly initialised models; checkpoints overwrite it.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Conv1d, nn.ConvTranspose1d, nn.Conv2d, nn.ConvTranspose2d)):
            scale = (sub.weight.std().detach() / reference) ** 0.5
            sub.weight.data /= scale
            if sub.bias is not None:
                sub.bias.data /= scale


class LayerScale(nn.Module):
    """Learnt per-channel scale of a residual branch (Touvron et al. 2021), initialised small
    so that each branch starts close to the identity.

    Shapes: [batch, channels, time] -> same, or [*, channels] -> same with ``channel_last``.
    """

    def __init__(self, channels: int, init: float = 0, channel_last: bool = False):
        super().__init__()
        self.channel_last = channel_last
        self.scale = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x if self.channel_last else self.scale[:, None] * x


class BLSTM(nn.Module):
    """Bidirectional LSTM over time, projected back to ``dim`` channels.

    With ``max_steps``, long inputs are cut into frames of ``max_steps`` steps that overlap
    by half, each frame runs separately (bounded memory and context), and the centre of
    each frame is kept. ``skip`` adds the input back (a residual branch).

    Shapes: [batch, dim, time] -> [batch, dim, time].
    """

    def __init__(self, dim: int, layers: int = 1, max_steps: Optional[int] = None,
                 skip: bool = False):
        super().__init__()
        assert max_steps is None or max_steps % 4 == 0
        self.max_steps = max_steps
        self.lstm = nn.LSTM(bidirectional=True, num_layers=layers, hidden_size=dim, input_size=dim)
        self.linear = nn.Linear(2 * dim, dim)
        self.skip = skip

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, dim, time] -> [batch, dim, time], one pass of the LSTM."""
        y = self.lstm(x.permute(2, 0, 1))[0]
        return self.linear(y).permute(1, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        if self.max_steps is None:
            y = self._run(x)
        elif torch.jit.is_tracing():
            y = self._either(x)
        elif length <= self.max_steps:
            y = self._run(x)
        else:
            y = self._framed(x)
        return x + y if self.skip else y

    def _framed(self, x: torch.Tensor) -> torch.Tensor:
        """The LSTM run on frames of ``max_steps`` overlapping by half; the centre
        (``stride`` steps) of every frame is kept, plus the outer margins of the first and
        last frames, which nothing else covers."""
        batch, channels, length = x.shape
        width = self.max_steps
        stride = width // 2
        margin = stride // 2
        frames = frames_of(x, width, stride)  # [B, C, n, width]
        n_frames = frames.shape[2]
        y = self._run(frames.permute(0, 2, 1, 3).reshape(-1, channels, width))
        y = y.reshape(batch, n_frames, channels, width)
        centre = y[..., margin:width - margin].permute(0, 2, 1, 3)
        return torch.cat([y[:, 0, :, :margin], centre.reshape(batch, channels, -1),
                          y[:, -1, :, width - margin:]], dim=-1)[..., :length]

    def _either(self, x: torch.Tensor) -> torch.Tensor:
        """Both ways, chosen by the length inside the graph: a traced graph cannot branch
        in Python, and an exported graph takes many lengths. The unframed run only looks
        at the first ``max_steps`` steps (all of them when it is chosen), which bounds its
        cost."""
        length = x.shape[-1]
        whole = self._run(x[..., :self.max_steps])
        whole = F.pad(whole, (0, length - whole.shape[-1]))
        return torch.where(length <= self.max_steps, whole, self._framed(x))


class LocalState(nn.Module):
    """Multi-head self-attention over time without positional embedding; each head learns
    how fast its weights decay with the distance between steps (``ndecay`` decay rates),
    which keeps the attention local. Self-reference is excluded.

    ``nfreqs`` (a periodic attention bias) is a failed demucs experiment, kept so that its
    parameters load. Shapes: [batch, channels, time] -> [batch, channels, time].
    """

    def __init__(self, channels: int, heads: int = 4, nfreqs: int = 0, ndecay: int = 4):
        super().__init__()
        assert channels % heads == 0, (channels, heads)
        self.heads = heads
        self.nfreqs = nfreqs
        self.ndecay = ndecay
        self.content = nn.Conv1d(channels, channels, 1)
        self.query = nn.Conv1d(channels, channels, 1)
        self.key = nn.Conv1d(channels, channels, 1)
        if nfreqs:
            self.query_freqs = nn.Conv1d(channels, heads * nfreqs, 1)
        if ndecay:
            self.query_decay = nn.Conv1d(channels, heads * ndecay, 1)
            # Decays start near zero (behind a sigmoid): the widest window at first.
            self.query_decay.weight.data *= 0.01
            self.query_decay.bias.data[:] = -2
        self.proj = nn.Conv1d(channels + heads * nfreqs, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, length = x.shape
        heads = self.heads
        steps = torch.arange(length, device=x.device, dtype=x.dtype)
        delta = steps[:, None] - steps[None, :]  # [key t, query s]

        queries = self.query(x).view(batch, heads, -1, length)
        keys = self.key(x).view(batch, heads, -1, length)
        dots = torch.einsum("bhct,bhcs->bhts", keys, queries)
        dots /= keys.shape[2] ** 0.5
        if self.nfreqs:
            periods = torch.arange(1, self.nfreqs + 1, device=x.device, dtype=x.dtype)
            freq_kernel = torch.cos(2 * math.pi * delta / periods.view(-1, 1, 1))
            freq_q = self.query_freqs(x).view(batch, heads, -1, length) / self.nfreqs ** 0.5
            dots += torch.einsum("fts,bhfs->bhts", freq_kernel, freq_q)
        if self.ndecay:
            decays = torch.arange(1, self.ndecay + 1, device=x.device, dtype=x.dtype)
            decay_q = torch.sigmoid(self.query_decay(x).view(batch, heads, -1, length)) / 2
            decay_kernel = -decays.view(-1, 1, 1) * delta.abs() / self.ndecay ** 0.5
            dots += torch.einsum("fts,bhfs->bhts", decay_kernel, decay_q)
        dots.masked_fill_(delta == 0, -100)  # not torch.eye: ONNX Runtime lacks a bool EyeLike
        weights = torch.softmax(dots, dim=2)

        content = self.content(x).view(batch, heads, -1, length)
        result = torch.einsum("bhts,bhct->bhcs", weights, content)
        if self.nfreqs:
            time_sig = torch.einsum("bhts,fts->bhfs", weights, freq_kernel)
            result = torch.cat([result, time_sig], 2)
        return x + self.proj(result.reshape(batch, -1, length))


class DConv(nn.Module):
    """Residual branches of dilated convolutions inside each encoder/decoder layer.

    Each of the ``|depth|`` branches projects onto ``channels / compress`` channels with a
    dilated convolution (dilation ``2**d`` when ``depth > 0``), optionally runs a framed
    BiLSTM and a :class:`LocalState` attention there, projects back with a GLU and adds the
    result, scaled by a :class:`LayerScale`.

    ``dilate`` is accepted and ignored, as in demucs (the sign of ``depth`` decides).
    Shapes: [batch, channels, time] -> [batch, channels, time].
    """

    def __init__(self, channels: int, compress: float = 4, depth: int = 2, init: float = 1e-4,
                 norm: bool = True, attn: bool = False, heads: int = 4, ndecay: int = 4,
                 lstm: bool = False, gelu: bool = True, kernel: int = 3, dilate: bool = True):
        super().__init__()
        assert kernel % 2 == 1
        self.channels = channels
        self.compress = compress
        self.depth = abs(depth)
        dilate = depth > 0
        hidden = int(channels / compress)
        norm_fn = norm_factory(norm, 1)
        act: type = nn.GELU if gelu else nn.ReLU

        self.layers = nn.ModuleList()
        for d in range(self.depth):
            dilation = 2 ** d if dilate else 1
            mods: list = [
                nn.Conv1d(channels, hidden, kernel, dilation=dilation,
                          padding=dilation * (kernel // 2)),
                norm_fn(hidden), act()]
            # demucs inserts both at index 3: the LSTM ends up before the attention.
            if lstm:
                mods.append(BLSTM(hidden, layers=2, max_steps=200, skip=True))
            if attn:
                mods.append(LocalState(hidden, heads=heads, ndecay=ndecay))
            mods += [
                nn.Conv1d(hidden, 2 * channels, 1),
                norm_fn(2 * channels), nn.GLU(1),
                LayerScale(channels, init)]
            self.layers.append(nn.Sequential(*mods))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


class ScaledEmbedding(nn.Module):
    """Embedding whose weights are stored divided by ``scale`` (a larger effective learning
    rate); ``smooth`` initialises it as a normalised cumulative sum, i.e. smooth along the
    index (frequency) axis.

    Shapes: indices [*] -> [*, embedding_dim].
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float = 10.,
                 smooth: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        if smooth:
            weight = torch.cumsum(self.embedding.weight.data, dim=0)
            # A sum of n gaussians grows like sqrt(n).
            weight = weight / torch.arange(1, num_embeddings + 1).to(weight).sqrt()[:, None]
            self.embedding.weight.data[:] = weight
        self.embedding.weight.data /= scale
        self.scale = scale

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x) * self.scale


def norm_factory(norm: bool, groups: int) -> Callable[[int], nn.Module]:
    """``d -> GroupNorm(groups, d)`` when ``norm``, else ``d -> Identity()``."""
    if norm:
        return lambda d: nn.GroupNorm(groups, d)
    return lambda d: nn.Identity()

