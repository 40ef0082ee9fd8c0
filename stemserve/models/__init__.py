"""Reimplementations of the demucs 4.0.1 models behind its released checkpoints, with no
demucs import at run time.

- :class:`HTDemucs`: Hybrid Transformer Demucs (v4; ``htdemucs``, ``htdemucs_ft``,
  ``htdemucs_6s``).
- :class:`HDemucs`: Hybrid Demucs (v3; ``hdemucs_mmi`` and the hybrid members of ``mdx``,
  ``mdx_extra``).
- :class:`DemucsV3`: the waveform Demucs of the v3 generation (``demucs.demucs.Demucs``;
  the time-domain members of ``mdx`` and ``repro_mdx_a``). The v2 model is
  :class:`stemserve.model.Demucs`.

Module trees, ``state_dict`` keys and constructor signatures are demucs 4.0.1's, so that
official states load with ``strict=True``; eval-mode forwards compute the same function.
"""
from .demucs_v3 import DemucsV3
from .hdemucs import HDemucs
from .htdemucs import HTDemucs

__all__ = ["DemucsV3", "HDemucs", "HTDemucs"]
