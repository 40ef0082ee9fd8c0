"""FLOPs of one Demucs v2 forward pass, counted by hand, and this CPU's matmul ceiling.

Library counters do not do: torch's ``FlopCounterMode`` and fvcore skip the LSTM, which is
30 % of the work. The tests cross-check the convolution and linear part of this count against
``FlopCounterMode``.
"""
from __future__ import annotations

from .timing import measure


def _resample_kernel(old_sr: int, new_sr: int) -> tuple[int, int]:
    """(phases, taps) of julius' ``ResampleFrac(old_sr, new_sr)`` FIR bank: 2 phases of 53
    taps for x2, 1 phase of 104 taps (stride 2) for /2."""
    import julius

    kernel = julius.ResampleFrac(old_sr, new_sr).kernel
    return int(kernel.shape[0]), int(kernel.shape[-1])


def demucs_flops(model, length: int, batch: int = 1) -> dict[str, float]:
    """Floating-point operations of ``model(mix)`` for mix ``[batch, channels, length]``.

    One multiply-accumulate counts as 2 FLOPs; biases, activations (ReLU, GLU, the LSTM's
    sigmoid/tanh gates), skip additions and normalisation are element-wise and left out
    (well under 1 % here). With ``C_in``/``C_out`` channels, kernel ``K``, stride ``S``::

        Conv1d            L_out = (L_in - K) // S + 1     FLOPs = 2 * C_out * C_in * K * L_out
        ConvTranspose1d   L_out = (L_in - 1) * S + K      FLOPs = 2 * C_in * C_out * K * L_in
        LSTM (per layer, per direction, T steps, hidden H, input I):
                          FLOPs = 2 * T * 4H * (I + H)    (the 4 gates: W_ih x + W_hh h)
        Linear            FLOPs = 2 * T * in * out
        resample x2 (julius, each of batch*channels signals of L samples):
                          FLOPs = 2 * (L + 1) * phases(2) * taps(53)
        resample /2       FLOPs = 2 * (L // 2 + 1) * phases(1) * taps(104)

    Everything is multiplied by ``batch``. The official configuration on an 8 s stereo
    segment (352800 samples, padded to the valid length 359082) gives about 192 GFLOP.
    Returns FLOPs per part (``resample``, ``encoder``, ``lstm``, ``linear`` (the BLSTM's
    projection), ``decoder``) and ``total``.
    """
    from torch import nn

    channels = model.audio_channels
    parts = {"resample": 0.0, "encoder": 0.0, "lstm": 0.0, "linear": 0.0, "decoder": 0.0}
    length = int(length)
    if model.resample:
        phases, taps = _resample_kernel(1, 2)
        parts["resample"] += 2 * channels * (length + 1) * phases * taps
        length *= 2

    def conv(layer: nn.Conv1d, length: int) -> tuple[float, int]:
        out = (length - layer.kernel_size[0]) // layer.stride[0] + 1
        return 2.0 * layer.out_channels * layer.in_channels * layer.kernel_size[0] * out, out

    def conv_transpose(layer: nn.ConvTranspose1d, length: int) -> tuple[float, int]:
        out = (length - 1) * layer.stride[0] + layer.kernel_size[0]
        return 2.0 * layer.in_channels * layer.out_channels * layer.kernel_size[0] * length, out

    for encode in model.encoder:
        for layer in encode:
            if isinstance(layer, nn.Conv1d):
                flops, length = conv(layer, length)
                parts["encoder"] += flops

    if model.lstm is not None:
        lstm: nn.LSTM = model.lstm.lstm
        hidden, steps = lstm.hidden_size, length
        directions = 2 if lstm.bidirectional else 1
        for index in range(lstm.num_layers):
            inputs = lstm.input_size if index == 0 else directions * hidden
            parts["lstm"] += directions * 2.0 * steps * 4 * hidden * (inputs + hidden)
        linear: nn.Linear = model.lstm.linear
        parts["linear"] += 2.0 * steps * linear.in_features * linear.out_features

    out_channels = channels
    for decode in model.decoder:
        for layer in decode:
            if isinstance(layer, nn.ConvTranspose1d):
                flops, length = conv_transpose(layer, length)
                out_channels = layer.out_channels
            elif isinstance(layer, nn.Conv1d):
                flops, length = conv(layer, length)
            else:
                continue
            parts["decoder"] += flops

    if model.resample:
        phases, taps = _resample_kernel(2, 1)
        parts["resample"] += 2 * out_channels * (length // 2 + 1) * phases * taps

    result = {key: value * batch for key, value in parts.items()}
    result["total"] = sum(result.values())
    return result


def matmul_ceiling(threads: int, *, size: int = 2048, repeats: int = 10) -> dict:
    """This CPU's practical fp32 peak: ``torch.mm`` of two ``size`` x ``size`` matrices.

    A large square sgemm is the most efficient kernel the BLAS has, so its rate is the
    ceiling a network made of convolutions and matmuls can approach. Runs at ``threads``
    threads (restored afterwards). Returns ``{"gflops": median, "gflops_min",
    "gflops_max", "size", "threads"}``.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
        wall = measure(lambda: torch.mm(a, b), repeats=repeats).wall
    finally:
        torch.set_num_threads(previous)
    flops = 2.0 * size ** 3 / 1e9
    return {"gflops": flops / wall.median, "gflops_min": flops / wall.max,
            "gflops_max": flops / wall.min, "size": size, "threads": threads}
