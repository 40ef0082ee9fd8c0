"""Bounds on the constructor arguments of the model families, for what a checkpoint asks.

A checkpoint names its network's arguments, and a small file may ask for one that would
allocate or compute without measure. Each family's registration
(:class:`~stemserve.models.registry.FamilyRegistration`) carries a :class:`Rule` for every
argument of its class; the checkpoint loader checks them before anything is built.
Torch-free.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from stemserve.releases import SEGMENTS as _SEGMENTS
from stemserve.releases import is_number as _is_number
from stemserve.releases import is_segment as _is_segment


class Rule(NamedTuple):
    """A bound on one argument: what passes, and the words for the error and the README."""

    accepts: Callable[[Any], bool]
    accepted: str
    releases: str


def integers(low: int, high: int, releases: str) -> Rule:
    return Rule(lambda v: _is_number(v, integer=True) and low <= v <= high,
                f"integers from {low} to {high}", releases)


def numbers(low: float, high: float, releases: str) -> Rule:
    return Rule(lambda v: _is_number(v) and low <= v <= high,
                f"numbers from {low:g} to {high:g}", releases)


def flag(releases: str) -> Rule:
    return Rule(lambda v: isinstance(v, bool), "True or False", releases)


def flag_or_integer(high: int, releases: str) -> Rule:
    """demucs' ``Union[bool, int]`` norms: off, on, or a number of groups."""
    return Rule(lambda v: isinstance(v, bool) or (_is_number(v, integer=True) and 0 <= v <= high),
                f"True, False or an integer from 0 to {high}", releases)


def or_none(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.accepts(v), f"None or {rule.accepted}",
                rule.releases)


def choice(values: Sequence[str], releases: str) -> Rule:
    return Rule(lambda v: isinstance(v, str) and v in values, f"one of {', '.join(values)}",
                releases)


def number_list(low_count: int, high_count: int, low: float, high: float,
                 releases: str) -> Rule:
    def accepts(value: Any) -> bool:
        return (isinstance(value, (list, tuple)) and low_count <= len(value) <= high_count
                and all(_is_number(v) and low <= v <= high for v in value))
    return Rule(accepts, f"lists of {low_count} to {high_count} numbers from {low:g} to "
                          f"{high:g}", releases)


def text(pattern: str, accepted: str, releases: str) -> Rule:
    compiled = re.compile(pattern)
    return Rule(lambda v: isinstance(v, str) and compiled.fullmatch(v) is not None, accepted,
                releases)


# Bounds on the arguments of demucs 4.0.1's HTDemucs, HDemucs and (v3) Demucs, by name (the
# classes share most; `sources` is checked on its own). The releases' values are in the last
# column; the bounds leave room for custom trainings and refuse what would allocate or compute
# without measure. Cross-argument constraints (heads dividing channels, nfft against depth)
# are the classes' own: building the network on the meta device checks them for free.
DEMUCS4_RULES: dict[str, Rule] = {
    # All three
    "audio_channels": integers(1, 2, "2"),
    "channels": integers(1, 128, "48; 64 (the time-domain models of mdx)"),
    "growth": numbers(1, 4, "2"),
    "depth": integers(1, 8, "4 (htdemucs), 6"),
    "rewrite": flag("True"),
    "kernel_size": integers(1, 16, "8"),
    "stride": integers(1, 8, "4"),
    "context": integers(0, 9, "1"),
    "norm_starts": integers(0, 16, "4"),
    "norm_groups": integers(1, 16, "4"),
    "dconv_mode": integers(0, 3, "1; 3 (htdemucs)"),
    "dconv_depth": integers(0, 8, "2"),
    "dconv_comp": numbers(1, 64, "4; 8 (htdemucs)"),
    "dconv_attn": integers(0, 16, "4"),
    "dconv_lstm": integers(0, 16, "4"),
    "dconv_init": numbers(0, 1, "1e-4; 1e-3 (hybrid)"),
    "rescale": numbers(0, 10, "0.1"),  # only shapes the random init
    "samplerate": integers(8000, 192000, "44100"),
    "segment": Rule(_is_segment, _SEGMENTS, "7.8 (htdemucs), 40 or 44"),
    # The hybrid models: HTDemucs, HDemucs
    "channels_time": or_none(integers(1, 128, "None")),
    "nfft": Rule(lambda v: _is_number(v, integer=True) and 256 <= v <= 16384
                 and v & (v - 1) == 0, "powers of two from 256 to 16384", "4096"),
    "wiener_iters": integers(-16, 16, "0"),
    "end_iters": integers(-16, 16, "0"),
    "wiener_residual": flag("False"),
    "cac": flag("True; False in some MDX models"),
    "hybrid": flag("True"),
    "hybrid_old": flag("False; True in some MDX models"),
    "multi_freqs": or_none(number_list(0, 4, 0, 1, "[] or None")),
    "multi_freqs_depth": integers(0, 8, "2 or 3"),
    "freq_emb": numbers(0, 1, "0.2"),
    "emb_scale": numbers(0, 100, "10"),
    "emb_smooth": flag("True"),
    "time_stride": integers(1, 8, "2"),
    "context_enc": integers(0, 9, "0"),
    # HTDemucs: the cross-domain transformer
    "bottom_channels": integers(0, 2048, "512"),
    "t_layers": integers(0, 16, "5"),
    "t_emb": choice(("sin", "cape", "scaled"), "sin"),
    "t_hidden_scale": numbers(0, 16, "4"),
    "t_heads": integers(1, 32, "8"),
    "t_dropout": numbers(0, 1, "0.02"),
    "t_max_positions": integers(1, 100_000, "10000"),
    "t_norm_in": flag("True"),
    "t_norm_in_group": flag_or_integer(64, "False"),
    "t_group_norm": flag_or_integer(64, "False"),
    "t_norm_first": flag("True"),
    "t_norm_out": flag_or_integer(64, "True"),
    "t_max_period": numbers(1, 1e6, "10000"),
    "t_weight_decay": numbers(0, 1, "0"),
    "t_lr": or_none(numbers(0, 1, "None")),
    "t_layer_scale": flag("True"),
    "t_gelu": flag("True"),
    "t_weight_pos_embed": numbers(0, 100, "1"),
    "t_sin_random_shift": integers(0, 10_000, "0"),
    "t_cape_mean_normalize": flag("True"),
    "t_cape_augment": flag("True"),
    "t_cape_glob_loc_scale": number_list(3, 3, 0, 1e6, "[5000, 1, 1.4]"),
    "t_sparse_self_attn": flag("False"),
    "t_sparse_cross_attn": flag("False"),
    "t_mask_type": text(r"(diag|jmask|random|global)(_(diag|jmask|random|global)){0,3}",
                         "diag, jmask, random, global or several joined by _", "diag"),
    "t_mask_random_seed": integers(0, 2**32 - 1, "42"),
    "t_sparse_attn_window": integers(1, 100_000, "400"),
    "t_global_window": integers(1, 100_000, "100"),
    "t_sparsity": numbers(0, 1, "0.95"),
    "t_auto_sparsity": flag("False"),
    "t_cross_first": flag("False"),
    "use_train_segment": flag("True"),
    # The v3 Demucs (time domain)
    "lstm_layers": integers(0, 4, "0"),
    "gelu": flag("True"),
    "glu": flag("True"),
    "normalize": flag("False; True (repro_mdx_a)"),
    "resample": flag("True"),
}
