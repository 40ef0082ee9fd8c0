"""The stemserve client: separate music through Triton or in-process, without torch."""
from stemserve.audio import OutputFormat
from stemserve.client.api import open_backend, separate_array, separate_file, separate_files
from stemserve.client.fleet import FleetBackend, parse_endpoints

__all__ = ["FleetBackend", "OutputFormat", "open_backend", "parse_endpoints", "separate_array",
           "separate_file", "separate_files"]
