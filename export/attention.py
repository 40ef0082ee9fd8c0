"""The RoFormers' attention as ONNX Runtime's fused operators, for the graphs stemserve runs.

Exported as plain operators, one attention over the 801 frames of an 8 s chunk writes its
801 x 801 maps out three times (``MatMul``, ``Softmax``, ``MatMul``), and the rotary
embedding of the queries and keys costs five more passes (``Split``, ``Neg``, ``Concat``,
``Mul``, ``Add``). ONNX Runtime's ``com.microsoft`` operators do each in one kernel:
``MultiHeadAttention`` (a flash attention on the CPU, a fused kernel on CUDA) and
``RotaryEmbedding`` (the rotation with a cosine and sine table). What it saves on a CPU, for
ONNX Runtime and for OpenVINO, which reads both operators too:
docs/decisions/0010-fused-attention.md; the stems stay within float rounding of the plain
graph's.

TensorRT's ONNX parser knows neither operator: ``stemserve export --portable`` (and
``--tensorrt``) trace the plain graph. :func:`fuse_attention` makes the swap on a copy of
the graph's module tree that shares its weights, so the caller's model is left as it was.
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn import functional as F

from stemserve.models.roformer import Attention

DOMAIN = "com.microsoft"
"""The operator domain of ONNX Runtime's contrib operators."""


class _MultiHeadAttention(torch.autograd.Function):
    """``softmax(q k^T / sqrt(d)) v`` per head, exported as ``com.microsoft``'s
    ``MultiHeadAttention``. Shapes: q, k, v [batch, seq, heads * d] -> [batch, seq, heads * d]."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                heads: int) -> torch.Tensor:
        batch, seq, inner = q.shape
        q, k, v = (t.view(batch, seq, heads, -1).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, seq, inner)

    @staticmethod
    def symbolic(g, q, k, v, heads: int):
        out = g.op(f"{DOMAIN}::MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())  # the exporter's shape inference has no rule for it
        return out


class _RotaryEmbedding(torch.autograd.Function):
    """Rotate adjacent feature pairs of each head by the angles of their position (what
    :meth:`~stemserve.models.roformer.RotaryEmbedding.rotate_queries_or_keys` does),
    exported as ``com.microsoft``'s ``RotaryEmbedding`` (``interleaved``, positions from
    ``offset``). Shapes: x [batch, seq, heads * d], offset [1], cos and sin [seq, d / 2]
    -> x's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, offset: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, heads: int) -> torch.Tensor:
        batch, seq, inner = x.shape
        pairs = x.view(batch, seq, heads, -1, 2)
        first, second = pairs[..., 0], pairs[..., 1]
        cos, sin = cos[:, None], sin[:, None]
        rotated = torch.stack((first * cos - second * sin, second * cos + first * sin), dim=-1)
        return rotated.view(batch, seq, inner)

    @staticmethod
    def symbolic(g, x, offset, cos, sin, heads: int):
        out = g.op(f"{DOMAIN}::RotaryEmbedding", x, offset, cos, sin, interleaved_i=1,
                   num_heads_i=heads)
        out.setType(x.type())
        return out


class FusedAttention(nn.Module):
    """:class:`~stemserve.models.roformer.Attention` on the same weights, its queries, keys
    and values as three products (no split of a joint one), rotated and attended by the
    fused operators. Shapes: [batch, seq, dim] -> [batch, seq, dim]."""

    def __init__(self, attention: Attention):
        super().__init__()
        self.heads = attention.heads
        self.norm, self.to_gates, self.to_out = attention.norm, attention.to_gates, attention.to_out
        self.rotary_embed = attention.rotary_embed
        self.projections = nn.ModuleList()
        for weight in attention.to_qkv.weight.detach().chunk(3):  # 'b n (qkv h d)'
            projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            projection.weight = nn.Parameter(weight, requires_grad=False)
            self.projections.append(projection)
        self.register_buffer("offset", torch.zeros(1, dtype=torch.int64), persistent=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        # the chunk's length: the fixed tables become constants
        cos, sin = self.rotary_embed.tables(int(x.shape[1]), x.device, x.dtype)
        cos, sin = cos[:, ::2], sin[:, ::2]  # each angle is repeated for its pair
        return _RotaryEmbedding.apply(x, self.offset, cos.contiguous(), sin.contiguous(),
                                      self.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        q, k, v = (projection(x) for projection in self.projections)
        if self.rotary_embed is not None:
            q, k = self._rotate(q), self._rotate(k)
        out = _MultiHeadAttention.apply(q, k, v, self.heads)  # [b, n, (h d)]
        gates = self.to_gates(x).sigmoid()  # [b, n, h]
        out = (out.unflatten(-1, (self.heads, -1)) * gates.unsqueeze(-1)).flatten(-2)
        return self.to_out(out)


def fuse_attention(module: nn.Module) -> nn.Module:
    """``module`` with every RoFormer :class:`Attention` in it replaced by a
    :class:`FusedAttention`: a copy of the module tree sharing its weights and buffers
    (``module`` itself when it holds none)."""
    if not any(isinstance(child, Attention) for child in module.modules()):
        return module
    shared = {id(tensor): tensor for tensor in itertools.chain(module.parameters(),
                                                               module.buffers())}
    fused = copy.deepcopy(module, shared)
    for parent in list(fused.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Attention):
                setattr(parent, name, FusedAttention(child))
    return fused.eval()
