"""The stemserve client: separate music through Triton or in-process, without torch."""
from stemserve.audio import OutputFormat
from stemserve.client.api import open_backend, separate_array, separate_file

__all__ = ["OutputFormat", "open_backend", "separate_array", "separate_file"]
