"""Model repository templates and writer, and the docker-compose file, without a server."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from stemserve.errors import StemserveError
from stemserve.export.tensorrt import trtexec_command
from stemserve.model_repository.writer import (FILL_RECORD, TEMPLATES, VARIANTS,
                                               check_repository, fill_repository,
                                               load_config, render_config)
from stemserve.spec import ModelSpec, load_export, load_export_spec

ROOT = Path(__file__).resolve().parents[1]
# Keys the onnxruntime backend of Triton 24.10 accepts for the TensorRT accelerator; any
# other key makes the model fail to load.
TENSORRT_KEYS = {"precision_mode", "max_workspace_size_bytes", "trt_engine_cache_enable",
                 "trt_engine_cache_path", "trt_profile_min_shapes", "trt_profile_opt_shapes",
                 "trt_profile_max_shapes"}


@pytest.fixture(scope="module")
def spec(small_export) -> ModelSpec:
    return ModelSpec.load(small_export / "model.json")


@pytest.fixture(scope="module")
def export_with_plan(small_export, tmp_path_factory) -> Path:
    """The small export plus a stand-in ``model.plan`` (a real one needs a GPU)."""
    folder = tmp_path_factory.mktemp("export-plan")
    for name in ("model.onnx", "model.json"):
        shutil.copy2(small_export / name, folder / name)
    (folder / "model.plan").write_bytes(b"not a real engine")
    return folder


def _parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _accelerators(config: mc.ModelConfig) -> list:
    return list(config.optimization.execution_accelerators.gpu_execution_accelerator)


@pytest.mark.parametrize("variant", VARIANTS)
def test_committed_templates_parse(variant):
    config = _parse(TEMPLATES / variant / "demucs" / "config.pbtxt")
    assert config.name == "demucs" and config.max_batch_size >= 1
    assert len(config.model_warmup) == 1 and config.dynamic_batching.preferred_batch_size


FILLS = {
    "cpu": ("cpu", {}),
    "gpu-tensorrt": ("gpu", {}),
    "gpu-cuda": ("gpu", {"tensorrt": False}),
    "gpu-trt": ("gpu-trt", {}),
    "cpu-no-batching": ("cpu", {"dynamic_batching": False, "max_batch_size": 1}),
}


@pytest.mark.parametrize("case", FILLS)
def test_written_config_parses_and_matches_the_sidecar(case, small_export, export_with_plan,
                                                       spec, tmp_path):
    variant, options = FILLS[case]
    export = export_with_plan if variant == "gpu-trt" else small_export
    model_dir = fill_repository(export, tmp_path, variant, **options)
    config = _parse(model_dir / "config.pbtxt")

    assert config.name == spec.model_name == model_dir.name
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == \
        [(spec.input_name, mc.TYPE_FP32, [spec.audio_channels, -1])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == \
        [(spec.output_name, mc.TYPE_FP32, [len(spec.sources), spec.audio_channels, -1])]
    (warmup,) = config.model_warmup
    assert warmup.batch_size == 1
    assert dict(warmup.inputs)[spec.input_name].dims == [spec.audio_channels,
                                                          spec.padded_length]
    assert check_repository(tmp_path).members == ((model_dir, spec),)
    model_file = "model.plan" if variant == "gpu-trt" else spec.onnx_file
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == sorted(
        ["model.json", FILL_RECORD, model_file] + (["model.py"] if variant == "cpu" else []))

    if options.get("dynamic_batching") is False:
        assert not config.HasField("dynamic_batching")
    else:
        assert config.dynamic_batching.preferred_batch_size[-1] == config.max_batch_size
    accelerators = _accelerators(config)
    if case == "gpu-tensorrt":
        (tensorrt,) = accelerators
        assert tensorrt.name == "tensorrt" and set(tensorrt.parameters) <= TENSORRT_KEYS
        assert tensorrt.parameters["precision_mode"] == "FP16"
        batch, channels = config.max_batch_size, spec.audio_channels
        assert tensorrt.parameters["trt_profile_max_shapes"] == \
            f"mix:{batch}x{channels}x{spec.max_request_length}"
        assert tensorrt.parameters["trt_profile_opt_shapes"] == \
            f"mix:{batch}x{channels}x{spec.padded_length}"
        assert tensorrt.parameters["trt_profile_min_shapes"] == \
            f"mix:1x{channels}x{spec.valid_length(1)}"
    else:
        assert not accelerators
    expected = {"cpu": ("python", ""), "gpu": ("", "onnxruntime_onnx"),
                "gpu-trt": ("", "tensorrt_plan")}[variant]
    assert (config.backend, config.platform) == expected


@pytest.mark.parametrize("variant, batch, sizes", [("cpu", 6, [2, 6]), ("cpu", 1, [1]),
                                                   ("gpu", 6, [4, 6]), ("gpu", 16, [4, 8, 16])])
def test_max_batch_size_override_keeps_preferred_sizes_within_it(small_export, tmp_path,
                                                                 variant, batch, sizes):
    config = _parse(fill_repository(small_export, tmp_path, variant, max_batch_size=batch)
                    / "config.pbtxt")
    assert config.max_batch_size == batch
    assert list(config.dynamic_batching.preferred_batch_size) == sizes


def test_model_file_is_hard_linked(small_export, spec, tmp_path):
    model_dir = fill_repository(small_export, tmp_path, "cpu")
    assert (model_dir / "1" / spec.onnx_file).samefile(small_export / spec.onnx_file)


def test_refill_replaces_the_version_folder(small_export, tmp_path):
    model_dir = fill_repository(small_export, tmp_path, "cpu")
    (model_dir / "1" / "stale.txt").write_text("left from an older fill")
    fill_repository(small_export, tmp_path, "cpu")
    assert not (model_dir / "1" / "stale.txt").exists()


def test_unknown_variant_and_missing_plan_are_clear_errors(small_export, tmp_path):
    with pytest.raises(StemserveError, match="unknown repository variant 'tpu'"):
        fill_repository(small_export, tmp_path, "tpu")
    with pytest.raises(StemserveError, match=r"model\.plan is missing.*TensorRT script"):
        fill_repository(small_export, tmp_path, "gpu-trt")


@pytest.fixture
def filled(small_export, tmp_path) -> Path:
    """A freshly filled CPU repository whose files the refusal tests then tamper with."""
    fill_repository(small_export, tmp_path / "repository", "cpu")
    return tmp_path / "repository" / "demucs" / "1"


def _write_sidecar(version_dir: Path, spec: ModelSpec, *, record_it: bool) -> None:
    """Replace the sidecar; ``record_it`` also updates fill.json, as if filled like that."""
    spec.save(version_dir / "model.json")
    if record_it:
        record = json.loads((version_dir / FILL_RECORD).read_text())
        record["sidecar_sha256"] = hashlib.sha256(
            (version_dir / "model.json").read_bytes()).hexdigest()
        record["checkpoint_sha256"] = spec.checkpoint_sha256
        (version_dir / FILL_RECORD).write_text(json.dumps(record))


def test_refuses_a_sidecar_of_another_checkpoint(filled, spec):
    _write_sidecar(filled, dataclasses.replace(spec, checkpoint_sha256="0" * 64),
                   record_it=False)
    with pytest.raises(StemserveError, match=r"model\.json is not the sidecar .*model\.onnx "
                                             r"was filled with"):
        check_repository(filled.parents[1])


def test_refuses_a_model_file_changed_after_filling(filled, spec):
    model = filled / spec.onnx_file
    data = model.read_bytes()
    model.unlink()  # a hard link: do not write through to the export
    model.write_bytes(data + b"\0")
    with pytest.raises(StemserveError, match=r"model\.onnx changed since it was filled with "
                                             r".*model\.json"):
        check_repository(filled.parents[1])


@pytest.mark.parametrize("change, message", [
    ({"sources": ("drums", "bass", "vocals")}, "disagree on the output"),
    ({"audio_channels": 1}, "disagree on the input"),
    ({"input_name": "audio"}, "disagree on the input"),
])
def test_refuses_a_graph_that_disagrees_with_its_sidecar(filled, spec, change, message):
    """Even with consistent hashes, names and dims must be the graph's own."""
    changed = dataclasses.replace(spec, **change)
    _write_sidecar(filled, changed, record_it=True)
    config = filled.parent / "config.pbtxt"
    config.write_text(text_format.MessageToString(render_config(changed, "cpu")))
    with pytest.raises(StemserveError, match=rf"model\.onnx and .*model\.json {message}"):
        check_repository(filled.parents[1])


def test_refuses_a_config_that_disagrees_with_the_sidecar(filled):
    config = filled.parent / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "stems"', 'name: "output"'))
    with pytest.raises(StemserveError, match=r"config\.pbtxt and its sidecar disagree on the "
                                             r"output"):
        check_repository(filled.parents[1])


def test_refuses_a_repository_not_filled_by_the_writer(filled):
    (filled / FILL_RECORD).unlink()
    with pytest.raises(StemserveError, match=r"fill\.json is missing"):
        check_repository(filled.parents[1])


# docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _host_ports(service: dict) -> set[int]:
    return {int(str(port).split(":")[-2]) for port in service.get("ports", [])}


def test_compose_services_volumes_and_profiles(compose):
    services = compose["services"]
    assert set(services) >= {"export", "triton", "triton-cpu"}
    assert "profiles" not in services["export"]  # needed by every profile
    assert services["triton"]["profiles"] == ["gpu"]
    assert services["triton-cpu"]["profiles"] == ["cpu"]
    assert set(compose["volumes"]) >= {"model_repository", "checkpoints"}
    export_volumes = services["export"]["volumes"]
    assert "checkpoints:/root/.cache/torch/hub/checkpoints" in export_volumes
    assert any(volume.startswith("model_repository:") for volume in export_volumes)
    for path in ("docker/export.Dockerfile", "docker/triton-cpu.Dockerfile"):
        assert (ROOT / path).is_file()
    assert services["export"]["build"]["dockerfile"] == "docker/export.Dockerfile"
    assert services["triton-cpu"]["build"]["dockerfile"] == "docker/triton-cpu.Dockerfile"


@pytest.mark.parametrize("name, repository", [("triton", "/models/gpu"),
                                              ("triton-cpu", "/models/cpu")])
def test_compose_triton_services(compose, name, repository):
    service = compose["services"][name]
    assert f"--model-repository={repository}" in service["command"]
    assert service["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert service["healthcheck"]["test"] == \
        ["CMD", "curl", "-f", "localhost:8000/v2/health/ready"]
    assert any(volume.startswith("model_repository:/models") for volume in service["volumes"])
    assert _host_ports(service) == {8010, 8001, 8002}  # 8000 is the web page's


def test_compose_gpu_reservation(compose):
    devices = compose["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in compose["services"]["triton-cpu"]


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_profile_has_no_port_collision(compose, profile):
    enabled = [s for s in compose["services"].values()
               if "profiles" not in s or profile in s["profiles"]]
    ports = {name: _host_ports(service) for name, service in compose["services"].items()
             if service in enabled}
    every = [port for published in ports.values() for port in published]
    assert len(every) == len(set(every))
    # Port 8000 belongs to the web page, as in the original demucs image; Triton moves.
    assert [name for name, published in ports.items() if 8000 in published] == \
        ["web" if profile == "gpu" else "web-cpu"]


def test_config_carries_the_sidecar_for_clients(filled, spec):
    from stemserve.spec import SPEC_PARAMETER

    config_path = filled.parent / "config.pbtxt"
    config = load_config(config_path)
    assert ModelSpec.from_json(config.parameters[SPEC_PARAMETER].string_value) == spec
    config.parameters[SPEC_PARAMETER].string_value = dataclasses.replace(
        spec, segment_length=spec.segment_length // 2).to_json()
    config_path.write_text(text_format.MessageToString(config))
    with pytest.raises(StemserveError, match="stemserve_spec"):
        check_repository(filled.parents[1])


def _time_range(shapes: str, name: str = "mix") -> tuple[int, int]:
    """(batch, time) of a ``mix:BxCxT`` shape string."""
    batch, _, time = shapes.removeprefix(f"{name}:").split("x")
    return int(batch), int(time)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_admits_a_one_sample_tail_and_a_shifted_segment(small_export, variant):
    """The shape contract: the shortest request a track can end with (its last segment of one
    sample) and the longest one (a full segment with a shift's context) fit every variant."""
    spec = load_export_spec(small_export)
    shortest, longest = spec.valid_length(1), spec.valid_length(spec.segment_length
                                                                 + spec.max_shift)
    assert (spec.min_request_length, spec.max_request_length) == (shortest, longest)
    config = render_config(spec, variant)
    assert list(config.input[0].dims) == [spec.audio_channels, -1]  # any length in between
    if variant == "cpu":  # v2's BiLSTM: batches of 2 (Family.cpu_batch)
        assert config.max_batch_size == 2
    if variant == "gpu":
        (tensorrt,) = _accelerators(config)
        low = _time_range(tensorrt.parameters["trt_profile_min_shapes"])
        high = _time_range(tensorrt.parameters["trt_profile_max_shapes"])
        assert low[1] <= shortest and high[1] >= longest and low[0] == 1
    if variant == "gpu-trt":  # the engine's profile, which its config must not exceed
        command = trtexec_command(small_export, max_batch=config.max_batch_size)
        shapes = dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--m"))
        assert _time_range(shapes["minShapes"])[1] <= shortest
        assert _time_range(shapes["maxShapes"]) == (config.max_batch_size, longest)


# -- HT Demucs (a fixed length) and bags of models -------------------------------------------


@pytest.fixture(scope="module")
def tiny_bag_export(tmp_path_factory) -> Path:
    """A bag of two tiny HTDemucs (htdemucs_ft's layout: identity-like weights), exported."""
    import torch

    from stemserve.checkpoints import Bag, CheckpointInfo
    from stemserve.export.to_onnx import export_bag
    from stemserve.models import HTDemucs
    from stemserve.models.configs import HTDEMUCS
    from test_models_v4 import SMALL_HT

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(HTDemucs(**dict(HTDEMUCS, **SMALL_HT)).eval())
    infos = [CheckpointInfo(f"member{i}", None, f"{i}" * 64, {}, "htdemucs") for i in (0, 1)]
    folder = tmp_path_factory.mktemp("bag") / "tiny_ft"
    export_bag(Bag("tiny_ft", models, infos, [[1., 1., 0., 0.], [0., 0., 1., 1.]], None),
               folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_a_bag_is_one_served_model_per_member_carrying_the_bag(tiny_bag_export, variant,
                                                               tmp_path):
    from stemserve.spec import BAG_PARAMETER, BagSpec

    fill_repository(tiny_bag_export, tmp_path, variant)
    layout = check_repository(tmp_path)
    assert layout.bag.name == "tiny_ft" and layout.bag.members == ("demucs_0", "demucs_1")
    assert layout.bag.weights == ((1., 1., 0., 0.), (0., 0., 1., 1.))
    for model_dir, member in layout.members:
        config = _parse(model_dir / "config.pbtxt")
        assert BagSpec.from_json(config.parameters[BAG_PARAMETER].string_value) == layout.bag
        # HT Demucs takes its training segment only: the time axis is that number.
        assert list(config.input[0].dims) == [2, member.segment_length] == [2, 44100]
        assert list(config.output[0].dims) == [4, 2, 44100]
        if variant == "cpu":  # no BiLSTM to amortise: each segment alone (Family.cpu_batch)
            assert config.max_batch_size == 1
            assert list(config.dynamic_batching.preferred_batch_size) == [1]
        if variant == "gpu":
            (accelerator,) = _accelerators(config)
            shapes = {key: value for key, value in accelerator.parameters.items()
                      if key.startswith("trt_profile")}
            assert shapes == {"trt_profile_min_shapes": "mix:1x2x44100",
                              "trt_profile_opt_shapes": "mix:8x2x44100",
                              "trt_profile_max_shapes": "mix:8x2x44100"}
    # one engine per member, each for its own graph
    commands = [trtexec_command(folder) for folder, _ in load_export(tiny_bag_export).members]
    assert [c[1] for c in commands] == [f"--onnx={tiny_bag_export / m / 'model.onnx'}"
                                        for m in ("demucs_0", "demucs_1")]


@pytest.mark.slow
def test_filling_another_model_replaces_the_bag_and_a_foreign_model_is_refused(
        tiny_bag_export, small_export, tmp_path):
    fill_repository(tiny_bag_export, tmp_path, "cpu")
    fill_repository(small_export, tmp_path, "cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demucs", "separate"]
    assert check_repository(tmp_path).bag.members == ("demucs",)

    shutil.copytree(tmp_path / "demucs", tmp_path / "demucs_7")  # not a bag member
    with pytest.raises(StemserveError, match="one model folder, or the members of one bag"):
        check_repository(tmp_path)
    (tmp_path / "demucs_7" / "config.pbtxt").write_text('name: "mine"\n')
    with pytest.raises(StemserveError, match="stemserve did not write"):
        fill_repository(tiny_bag_export, tmp_path, "cpu")


@pytest.mark.slow
@pytest.mark.server
def test_a_model_a_bag_lists_twice_is_exported_and_served_once(tmp_path):
    """repro_mdx_a_hybrid_only lists each of its models twice: one graph and one Triton model
    each, while separation still runs every listing (as demucs' BagOfModels does)."""
    import numpy as np
    import torch

    from stemserve.checkpoints import Bag, CheckpointInfo
    from stemserve.client import separate_array
    from stemserve.client.backends import open_backend
    from stemserve.export.to_onnx import export_bag
    from stemserve.model_repository.local import local_server
    from stemserve.models import HTDemucs
    from stemserve.models.configs import HTDEMUCS
    from test_models_v4 import SMALL_HT

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(HTDemucs(**dict(HTDEMUCS, **SMALL_HT)).eval())
    infos = [CheckpointInfo(f"member{i}", None, f"{i}" * 64, {}, "htdemucs") for i in (0, 1)]
    weights = [[1., 1., 0., 0.], [0., 1., 1., 1.], [1., 0., 1., 0.], [0., 0., 0., 1.]]
    export = tmp_path / "dup"
    export_bag(Bag("dup", models * 2, infos * 2, weights, None), export)
    assert sorted(path.name for path in export.iterdir()) == ["bag.json", "demucs_0", "demucs_1"]
    layout = load_export(export)
    assert layout.bag.members == ("demucs_0", "demucs_1", "demucs_0", "demucs_1")

    repository = tmp_path / "repository"
    fill_repository(export, repository, "cpu")
    assert sorted(path.name for path in repository.iterdir()) == ["demucs_0", "demucs_1",
                                                                  "separate"]
    assert check_repository(repository).bag == layout.bag

    mix = np.random.default_rng(3).standard_normal((2, 3 * 44100)).astype(np.float32)
    with open_backend("onnx", model=export) as backend:
        assert len(backend.members) == 4 and len({id(m) for m in backend.members}) == 2
        local = separate_array(mix, 44100, backend=backend)
    with local_server(export, root=tmp_path / "served") as server:
        with open_backend("triton", connection=server.grpc_url) as backend:
            served = separate_array(mix, 44100, backend=backend)
        # The server's own pipeline runs the bag too: every listing, through BLS.
        with open_backend("triton-stream", connection=server.grpc_url) as backend:
            streamed = separate_array(mix, 44100, backend=backend)
    # The same bag in PyTorch, every listing its own network run.
    from stemserve.client.backends.bag import BagBackend
    from stemserve.client.backends.pytorch import TorchBackend

    with BagBackend([TorchBackend(model, info) for model, info in zip(models * 2, infos * 2)],
                    weights, "dup") as reference_backend:
        reference = separate_array(mix, 44100, backend=reference_backend)
    for name, stem in reference.items():
        assert np.abs(local[name] - stem).max() < 1e-4, name
        assert np.abs(served[name] - stem).max() < 1e-4, name
        assert np.abs(streamed[name] - stem).max() < 1e-4, name
