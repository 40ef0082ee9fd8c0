"""The stemserve client: separate music through Triton or in-process, without torch.

- :class:`Separator` (with :class:`SeparationOptions` and :class:`OutputOptions`) and the
  one-call :func:`separate_array`, :func:`separate_file`, :func:`separate_files`;
- :func:`open_backend` for a Triton server, a fleet of them, or in-process ONNX Runtime or
  PyTorch (:mod:`stemserve.client.backends`).

The ``stemserve`` command line over them (and over export, serving and the web page) is
:mod:`stemserve.cli`.
"""
from stemserve.audio import OutputFormat
from stemserve.client.backends import open_backend
from stemserve.client.backends.fleet import FleetBackend, parse_endpoints
from stemserve.client.separator import (OutputOptions, Separator, TrackResult, separate_array,
                                        separate_file, separate_files)
from stemserve.pipeline import SeparationOptions

__all__ = ["FleetBackend", "OutputFormat", "OutputOptions", "SeparationOptions", "Separator",
           "TrackResult", "open_backend", "parse_endpoints", "separate_array", "separate_file",
           "separate_files"]
