"""Whole tracks: stemserve's paths against each family's reference (CPU and GPU), the client's
memory over track length, and a short track's segments in turn or at once."""

SCENARIOS: tuple[str, ...] = ("tracks.reference", "tracks.client_memory", "tracks.short")
