"""stemserve: music source separation (Demucs v2, v3 and HT Demucs v4) served by Triton.

The packages, in layers (a module imports only its own layer or below; see
docs/architecture.md): :mod:`stemserve.defaults`; the torch-free core (:mod:`.spec`,
:mod:`.precision`, :mod:`.connection`, :mod:`.pipeline`, :mod:`.audio`, ...); the models
(:mod:`.models`, :mod:`.checkpoints`, :mod:`stemserve.export`, :mod:`.runtime`); the client's
backends (:mod:`stemserve.client.backends`); serving (:mod:`stemserve.model_repository`);
and the front ends: the client library (:mod:`stemserve.client`), the command line
(:mod:`.cli`) and the web page (:mod:`.web`).
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stemserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "(not installed)"
