"""Demucs checkpoints: resolve a release, download it once, verify it, load it safely.

Two generations of releases are known by name. demucs 2.0.3's (``demucs/pretrained.py``) are
one file each, ``<name>-<sha256 prefix>.th``; demucs 4.0.1's (``demucs/remote/files.txt``
and ``remote/<name>.yaml``) are bags of one to four models whose outputs are averaged, each
model a file ``<signature>-<sha256 prefix>.th``. Every file is checked against the sha256
prefix in its name before use, exactly like ``torch.hub`` does, and lands in torch hub's
checkpoint folder under the name demucs itself gives it, so an existing cache is reused. A
local file is checked against the CRCs of its zip records instead, which torch does not read.

Checkpoints are pickles. They are read with torch's ``weights_only`` unpickler and a short
allowlist: no pickled code runs. The model class a training package names unpickles to an
inert marker (each registered family's, :mod:`stemserve.models.registry`), and the few
other objects demucs packages hold (a ``Fraction`` segment, numpy numbers in their
metrics, omegaconf configurations) to placeholders that only keep data. A family with a
checkpoint format of its own reads it through its registration's ``read``.
Nothing is built until the package's configuration has been checked against bounds
(:mod:`.bounds`: ``_LIMITS`` for v2, the family registration's ``rules`` for the others,
``_MAX_PARAMETERS``), so a small file cannot make the loader allocate gigabytes: the network
is laid out on torch's ``meta`` device first, and a state dict's tensors are assigned to it
rather than copied into a freshly initialised model.

The modules, each importing only those before it: ``messages``, ``unpickle``, ``fetch``
(download, cache, mirrors), ``releases`` (names to files and URLs), ``bounds``, ``diffq``,
``build`` (formats to models) and ``bags`` (loading); band-split RoFormer checkpoints of
Music-Source-Separation-Training (a weights file and its ``config.yaml``) are read by
``msst_config``, ``msst_state`` and ``msst`` (loading), and demucs 4.1.0's safetensors files
by ``hf``. The public names are here.
"""
from stemserve.checkpoints.bags import Bag, CheckpointInfo, load_bag, load_model
from stemserve.checkpoints.build import DEFAULT_CONFIG
from stemserve.checkpoints.fetch import URL_ENV, checkpoint_cache_dir
from stemserve.checkpoints.msst import config_beside, load_msst
from stemserve.checkpoints.releases import checkpoint_files, checkpoint_url, download_checkpoint
from stemserve.errors import CheckpointError
# The release tables are part of this package's API too (``from stemserve.checkpoints import
# KNOWN_MODELS``): re-exported from the torch-free module that keys exports by them.
from stemserve.releases import (BAGS, DEMUCS4_FILES, DEMUCS4_ROOT_URL, KNOWN_MODELS, RELEASES,
                                ROFORMER_RELEASES, ROOT_URL, UNSUPPORTED, BagRelease, Release,
                                RemoteFile, RoformerRelease, is_bag_yaml, is_release_name,
                                release_files, v2_file, v4_file)

__all__ = [
    "BAGS", "DEFAULT_CONFIG", "DEMUCS4_FILES", "DEMUCS4_ROOT_URL", "KNOWN_MODELS",
    "RELEASES", "ROFORMER_RELEASES", "ROOT_URL", "UNSUPPORTED", "URL_ENV", "Bag", "BagRelease",
    "CheckpointError", "CheckpointInfo", "Release", "RemoteFile", "RoformerRelease", "checkpoint_cache_dir", "checkpoint_files",
    "checkpoint_url", "config_beside", "download_checkpoint", "is_bag_yaml", "is_release_name",
    "load_bag", "load_model", "load_msst", "release_files", "v2_file", "v4_file",
]
