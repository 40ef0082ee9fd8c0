"""Random-weight Demucs models for the benchmarks: built from a seed, exported, cached.

Timing does not depend on the weights, and pretrained ones cannot be downloaded everywhere,
so every benchmark builds its model from a seed: the same seed gives the same weights in
any process, and the checkpoint digest recorded in the export's sidecar says which.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

#: Demucs constructor arguments per configuration name. "default" is the official v2 model.
CONFIGS: dict[str, dict] = {"small": {"channels": 4}, "medium": {"channels": 16}, "default": {}}


def random_model(config: str | dict, seed: int):
    """``(model, info)``: a Demucs of ``config`` (a name or constructor arguments) in eval mode."""
    import torch

    from stemserve.checkpoints import CheckpointInfo
    from stemserve.defaults import SOURCES
    from stemserve.model import Demucs

    name, args = (config, CONFIGS[config]) if isinstance(config, str) else ("custom", config)
    torch.manual_seed(seed)
    model = Demucs(SOURCES, **args).eval()
    digest = hashlib.sha256(repr(sorted((key, value.sum().item()) for key, value
                                        in model.state_dict().items())).encode()).hexdigest()
    info = CheckpointInfo(name=f"random-{name}-seed{seed}", path=Path(f"random-{name}.th"),
                          sha256=digest, config=dict(args))
    return model, info


def export_random(config: str | dict, seed: int, out: Path, *, segment_length: int | None = None,
                  save_weights: bool = False) -> Path:
    """Export a random model to ``out`` (and its state dict to ``out/weights.th`` if asked).

    Reuses ``out`` when it already holds this configuration, seed and segment: exporting
    the full model takes a minute and a gigabyte.
    """
    out = Path(out)
    stamp = {"config": config, "seed": seed, "segment_length": segment_length,
             "weights": save_weights}
    stamp_file = out / "benchmark-stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    import torch

    from stemserve.export.to_onnx import export_onnx

    model, info = random_model(config, seed)
    out.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)
    export_onnx(model, info, out, segment_length=segment_length)
    if save_weights:
        torch.save({"config": info.config, "state": model.state_dict()}, out / "weights.th")
    stamp_file.write_text(json.dumps(stamp))
    return out
