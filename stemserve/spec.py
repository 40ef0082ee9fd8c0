"""The sidecar that travels with every exported model, so client and server never guess.

It is written next to the ONNX file by ``stemserve export``, copied into the Triton model
repository, and read by the client to know the sample rate, the sources, how long a segment
is and how much real context to pad it with. It needs no torch.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

SPEC_VERSION = 1
SPEC_PARAMETER = "stemserve_spec"
"""The config.pbtxt parameter whose string value is the sidecar, for clients of a server."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a served Demucs model expects and returns.

    The ONNX graph maps ``mix`` [batch, audio_channels, time] to
    ``stems`` [batch, len(sources), audio_channels, time'] for any ``time`` that is a valid
    length of the network. The batched hot path uses ``time = padded_length``: a segment of
    ``segment_length`` samples with ``(padded_length - segment_length) // 2`` samples of real
    context on its left, the rest on its right. The network output is center-trimmed by the
    caller to the segment's length, exactly like demucs' ``apply_model``.
    """

    model_name: str
    checkpoint: str
    checkpoint_sha256: str
    sample_rate: int
    audio_channels: int
    sources: tuple[str, ...]
    segment_length: int
    padded_length: int
    output_length: int
    valid_length_params: dict
    precision: str = "fp32"
    onnx_file: str = "model.onnx"
    input_name: str = "mix"
    output_name: str = "stems"
    spec_version: int = SPEC_VERSION

    def valid_length(self, length: int) -> int:
        """The network's valid input length for ``length`` samples (demucs' formula)."""
        return valid_length(length, **self.valid_length_params)

    @property
    def segment_seconds(self) -> float:
        return self.segment_length / self.sample_rate

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["sources"] = list(self.sources)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> "ModelSpec":
        """Read a sidecar file; a missing field or a wrong version is a clear error."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ValueError(f"{path}: cannot read model sidecar: {err}") from err
        return cls.from_json(text, where=str(path))

    @classmethod
    def from_json(cls, text: str, where: str = "model sidecar") -> "ModelSpec":
        """Parse a sidecar's text (a file, or the ``stemserve_spec`` parameter of a config)."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{where}: not JSON: {err}") from err
        if not isinstance(data, dict) or data.get("spec_version") != SPEC_VERSION:
            version = data.get("spec_version") if isinstance(data, dict) else None
            raise ValueError(f"{where}: sidecar version {version!r}, expected {SPEC_VERSION}")
        fields = {field.name for field in dataclasses.fields(cls)}
        missing = fields - set(data) - {"precision", "onnx_file", "input_name", "output_name"}
        if missing:
            raise ValueError(f"{where}: sidecar lacks {sorted(missing)}")
        data = {key: value for key, value in data.items() if key in fields}
        data["sources"] = tuple(data["sources"])
        return cls(**data)


def valid_length(length: int, *, resample: bool, depth: int, kernel_size: int, stride: int,
                 context: int) -> int:
    """Demucs v2's valid length, without torch (the client needs it for the last segment)."""
    if resample:
        length *= 2
    for _ in range(depth):
        length = -(-(length - kernel_size) // stride) + 1
        length = max(1, length)
        length += context - 1
    for _ in range(depth):
        length = (length - 1) * stride + kernel_size
    if resample:
        length = -(-length // 2)
    return int(length)


def output_length(length: int, *, resample: bool, depth: int, kernel_size: int, stride: int,
                  context: int) -> int:
    """Length of the network's output for an input of ``length`` samples.

    Clients size shared-memory output regions with it before any inference has run.
    """
    if resample:
        length *= 2
    for _ in range(depth):
        length = (length - kernel_size) // stride + 1
    for _ in range(depth):
        length = (length - context) * stride + kernel_size
    if resample:
        length //= 2
    return int(length)
