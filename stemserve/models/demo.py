"""Random-weight models of every family, to try stemserve with no download.

Pretrained weights are hundreds of megabytes from Meta's server; a host without it (or a
first look) still wants to export, serve and separate. :func:`demo_checkpoint` builds a
network of a release's configuration (or a small one, quick to export) with seeded random
weights and returns it as a checkpoint stemserve loads like any other: ``{'family',
'config', 'state'}``. Its stems are noise-shaped, not music: it shows the machinery, not the
quality.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from stemserve.files import atomic_write
from stemserve.defaults import SOURCES
from stemserve.model import Demucs
from stemserve.models import DemucsV3, HDemucs, HTDemucs
from stemserve.models.configs import DEMUCS_MDX, HDEMUCS_MMI, HTDEMUCS, HTDEMUCS_6S

CONFIGS: dict[str, tuple[str, type[torch.nn.Module], dict[str, Any], dict[str, Any]]] = {
    # name: (family, class, the release's configuration, what makes it small)
    "htdemucs": ("htdemucs", HTDemucs, HTDEMUCS,
                 dict(channels=8, bottom_channels=32, segment=Fraction(1))),
    "htdemucs_6s": ("htdemucs", HTDemucs, HTDEMUCS_6S,
                    dict(channels=8, bottom_channels=32, segment=Fraction(1))),
    "hdemucs_mmi": ("hdemucs", HDemucs, HDEMUCS_MMI, dict(channels=8, segment=4)),
    "demucs_mdx": ("demucs_v3", DemucsV3, DEMUCS_MDX, dict(channels=8, segment=4)),
    "demucs": ("demucs", Demucs, dict(sources=list(SOURCES)),
               dict(channels=4, segment_length=4 * 44100)),
}
"""What ``stemserve demo`` builds: HT Demucs (4 and 6 stems), Hybrid Demucs, the v3
waveform Demucs of the MDX bags and Demucs v2."""


def demo_checkpoint(name: str, *, small: bool = False, seed: int = 0) -> dict[str, Any]:
    """The checkpoint of a random-weight model of configuration ``name`` (:data:`CONFIGS`)."""
    family, klass, config, smaller = CONFIGS[name]
    config = dict(config, **smaller) if small else dict(config)
    torch.manual_seed(seed)
    model = klass(**config)
    return {"family": family, "config": config,
            "state": {key: value.detach().clone() for key, value in model.state_dict().items()}}


def save_demo(name: str, path: Path, *, small: bool = False, seed: int = 0) -> Path:
    """Write :func:`demo_checkpoint` to ``path`` (whole, or not at all)."""
    with atomic_write(Path(path)) as file:
        torch.save(demo_checkpoint(name, small=small, seed=seed), file)
    return Path(path)
