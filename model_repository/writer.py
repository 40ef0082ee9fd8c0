"""Fill a Triton model repository from an export folder, and refuse inconsistent ones.

The committed ``config.pbtxt`` files next to this module are templates for the knobs that
do not depend on the model (backend, batching, instances, TensorRT options). Everything that
does, names, dims, the warm-up length and TensorRT profile shapes, comes from the export's
sidecar: the writer parses the template into a ``ModelConfig`` protobuf, sets those fields
and writes it back, so a written config always parses and always matches its model.

Each filled version folder also gets ``fill.json``: the hashes of the model file and the
sidecar it was filled with. :func:`check_repository` compares the graph's tensors with the
sidecar and the files with those hashes, so a model file swapped or re-exported behind the
sidecar's back is refused before any server starts.

A bag of models (``htdemucs_ft``, ``mdx``) is one Triton model per member, named as in the
export (``demucs_0``, ``demucs_1``, ...), each config also carrying the bag's sidecar as the
``stemserve_bag`` parameter: clients find the members and the weights on the server, send
each member its own segments, and every member batches on its own.

A CPU repository also gets ``separate`` (``separate/config.pbtxt`` beside the templates): a
decoupled python model that runs the whole pipeline on a track and streams the stems back,
calling the network model(s) through BLS. Its config carries the bag and the members'
sidecars, checked against theirs like everything else.

Usage: ``stemserve repository fill EXPORT_DIR REPO_DIR --variant gpu``, ``stemserve
repository check REPO_DIR``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from stemserve.errors import RepositoryError
from stemserve.export.tensorrt import PLAN_FILE
from stemserve.files import atomic_write, file_sha256
from stemserve.precision import check_precision
from stemserve.defaults import STREAM_MODEL
from stemserve.spec import (BAG_PARAMETER, SIDECAR_FILE, SPEC_PARAMETER, SPECS_PARAMETER, BagSpec,
                            ExportLayout, ModelSpec, load_export, sidecar_name)

TEMPLATES = Path(__file__).resolve().parent
VARIANTS = ("cpu", "gpu", "gpu-trt")
FILL_RECORD = "fill.json"
# Initializers up to this size may be shape constants that shape inference must read.
SHAPE_CONSTANT_BYTES = 1024
HEADER = ("# Written by stemserve.model_repository.writer from {template}\n"
          "# and {sidecar}: edit the template, then fill the repository again.\n")


def load_config(path: Path) -> mc.ModelConfig:
    """Parse a config.pbtxt; a misspelled field is a clear error naming the file."""
    try:
        return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
    except (OSError, text_format.ParseError) as err:
        raise RepositoryError(f"{path}: not a valid Triton model configuration: {err}") from err


def _template_dir(variant: str) -> Path:
    if variant not in VARIANTS:
        raise RepositoryError(f"unknown repository variant {variant!r}; "
                             f"choose one of {', '.join(VARIANTS)}")
    return TEMPLATES / variant / "demucs"


def render_config(spec: ModelSpec, variant: str = "cpu", *, tensorrt: bool = True,
                  max_batch_size: int | None = None, dynamic_batching: bool = True,
                  intra_op_threads: int | None = None,
                  bag: BagSpec | None = None) -> mc.ModelConfig:
    """The variant's template with every model-dependent field taken from ``spec`` (and
    ``bag``, the sidecar of the bag the model is a member of).

    ``tensorrt`` only matters for ``gpu`` (ONNX Runtime's TensorRT provider on or off);
    ``dynamic_batching=False`` serves each request alone (the benchmark's baseline);
    ``intra_op_threads`` sets the CPU model's ONNX Runtime threads (0: one per core);
    without ``max_batch_size`` the CPU batch is the family's (:attr:`Family.cpu_batch`).
    """
    config = load_config(_template_dir(variant) / "config.pbtxt")
    if intra_op_threads is not None:
        if variant != "cpu":
            raise RepositoryError("intra_op_threads applies to the cpu variant only")
        config.parameters["intra_op_threads"].string_value = str(intra_op_threads)
    config.name = spec.model_name
    # Clients read the sidecar from the server's model config: they need nothing local.
    config.parameters[SPEC_PARAMETER].string_value = spec.to_json()
    if bag is not None:
        config.parameters[BAG_PARAMETER].string_value = bag.to_json()
    if max_batch_size is not None:
        if max_batch_size < 1:
            raise RepositoryError(f"max_batch_size must be at least 1, got {max_batch_size}")
        config.max_batch_size = max_batch_size
    elif variant == "cpu":
        config.max_batch_size = spec.rules.cpu_batch
    batch = config.max_batch_size
    if variant == "gpu":
        config.default_model_filename = spec.onnx_file
    (tensor_in,), (tensor_out,) = config.input, config.output
    tensor_in.name, tensor_out.name = spec.input_name, spec.output_name
    tensor_in.dims[:], tensor_out.dims[:] = tensor_dims(spec)
    for warmup in config.model_warmup:
        (template_input,) = warmup.inputs.values()
        warmup.inputs.clear()
        warmup.inputs[spec.input_name].CopyFrom(template_input)
        warmup.inputs[spec.input_name].dims[:] = [spec.audio_channels, spec.padded_length]

    if not dynamic_batching:
        config.ClearField("dynamic_batching")
    elif config.HasField("dynamic_batching"):
        # Keep the template's sizes that fit, and always let a full batch leave at once.
        sizes = config.dynamic_batching.preferred_batch_size
        sizes[:] = [size for size in sizes if size < batch] + [batch]

    if variant == "gpu":
        if tensorrt:
            (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
            accelerator.parameters.update({
                f"trt_profile_{bound}_shapes": f"{spec.input_name}:{shape}"
                for bound, shape in spec.tensorrt_profile(batch).items()})
        else:
            config.optimization.ClearField("execution_accelerators")
            if not config.optimization.ListFields():
                config.ClearField("optimization")
    return config


def tensor_dims(spec: ModelSpec) -> tuple[list[int], list[int]]:
    """The config's dims of ``mix`` and ``stems`` (batch implicit): time is -1 for a network
    that takes many lengths, the fixed length for one that takes one."""
    time = spec.fixed_length or -1
    return ([spec.audio_channels, time],
            [len(spec.sources), spec.audio_channels, time if time < 0
             else spec.request_output_length(time)])


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` (no copy of a large model) or copy it across file systems.

    The export replaces its files by rename, so a later export never changes a linked copy.
    """
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_atomic(path: Path, text: str) -> None:
    with atomic_write(path, "w") as file:
        file.write(text)


def fill_repository(export_dir: Path, repo_dir: Path, variant: str = "cpu", *,
                    precision: str = "fp32", tensorrt: bool = True, version: int = 1,
                    max_batch_size: int | None = None, dynamic_batching: bool = True,
                    intra_op_threads: int | None = None) -> Path:
    """Fill ``repo_dir`` (a Triton model repository) from ``export_dir``; returns the (first)
    model dir.

    ``export_dir`` is a single model's export or a bag's (one model per member); each holds
    ``model.json`` and the graph it names (``model.plan``, built by the export's TensorRT
    script, for ``gpu-trt``). Models an earlier fill left in ``repo_dir`` are removed (a
    repository serves one model or one bag). ``precision`` picks the export's graph:
    ``int8`` (a CPU fast path; ``cpu`` only: its dynamically quantized operators are ONNX
    Runtime's CPU kernels), ``bf16`` (the other, ``cpu`` only: the fp32 graph on OpenVINO)
    or ``fp16`` (``gpu``). Each version folder is rebuilt from
    scratch, config.pbtxt is written last, and the result is checked with
    :func:`check_repository`.
    """
    export_dir, repo_dir = Path(export_dir), Path(repo_dir)
    _template_dir(variant)  # an unknown variant is refused before its precision is checked
    precision = check_precision(precision, variant=variant, error=RepositoryError).value
    layout = load_export(export_dir, precision)
    bag = layout.bag if len(layout.members) > 1 else None
    # One Triton model per model of the bag, however often the bag lists it.
    members = list({spec.model_name: (folder, spec) for folder, spec in layout.members}.values())
    options = dict(tensorrt=tensorrt, max_batch_size=max_batch_size,
                   dynamic_batching=dynamic_batching, intra_op_threads=intra_op_threads)
    configs = [render_config(spec, variant, bag=bag, **options) for _, spec in members]
    for folder, spec in members:
        model_file = folder / (PLAN_FILE if variant == "gpu-trt" else spec.onnx_file)
        if not model_file.is_file():
            hint = ("build it on the serving GPU with the export's TensorRT script"
                    if variant == "gpu-trt" else "run `stemserve export` first")
            raise RepositoryError(f"{model_file} is missing: {hint}")
    streams = variant == "cpu"  # the GPU image has no stemserve for a python model (yet)
    _remove_other_models(repo_dir, {spec.model_name for _, spec in members}
                         | ({STREAM_MODEL} if streams else set()))
    for (folder, spec), config in zip(members, configs):
        _fill_model(folder, spec, config, repo_dir, variant, version, precision)
    if streams:
        _fill_stream_model(layout, repo_dir, version)
    check_repository(repo_dir)
    return repo_dir / layout.spec.model_name


def render_stream_config(layout: ExportLayout) -> mc.ModelConfig:
    """The streaming model's template with the tensors, the bag and the members' sidecars
    of ``layout``."""
    spec = layout.spec
    config = load_config(TEMPLATES / STREAM_MODEL / "config.pbtxt")
    mix = config.input[0]
    mix.name, mix.dims[:] = spec.input_name, [spec.audio_channels, -1]
    (stems,) = [tensor for tensor in config.output if tensor.name == "stems"]
    stems.dims[:] = [len(spec.sources), spec.audio_channels, -1]
    config.parameters[BAG_PARAMETER].string_value = layout.bag.to_json()
    by_name = {member.model_name: member for _, member in layout.members}
    config.parameters[SPECS_PARAMETER].string_value = json.dumps(
        [by_name[name].to_json() for name in dict.fromkeys(layout.bag.members)])
    return config


def _fill_stream_model(layout: ExportLayout, repo_dir: Path, version: int) -> None:
    """``separate/``: its model.py and config.pbtxt, written last."""
    template = TEMPLATES / STREAM_MODEL
    model_dir = repo_dir / STREAM_MODEL
    version_dir = model_dir / str(version)
    shutil.rmtree(version_dir, ignore_errors=True)
    version_dir.mkdir(parents=True)
    shutil.copy2(template / "1" / "model.py", version_dir / "model.py")
    header = HEADER.format(template=template / "config.pbtxt", sidecar="the network's sidecars")
    _write_atomic(model_dir / "config.pbtxt",
                  header + text_format.MessageToString(render_stream_config(layout)))


def _remove_other_models(repo_dir: Path, keep: set[str]) -> None:
    """Remove the model folders an earlier fill wrote that are not in ``keep``; a folder
    stemserve did not write is left alone, and refused."""
    if not repo_dir.is_dir():
        return
    for config in repo_dir.glob("*/config.pbtxt"):
        if config.parent.name in keep:
            continue
        if not config.read_text().startswith(HEADER.split("{", 1)[0]):
            raise RepositoryError(f"{repo_dir} also holds {config.parent.name}/, which "
                                  "stemserve did not write: fill an empty folder")
        shutil.rmtree(config.parent)


def _fill_model(export_dir: Path, spec: ModelSpec, config: mc.ModelConfig, repo_dir: Path,
                variant: str, version: int, precision: str) -> None:
    """One model folder: the version folder with the model file, sidecar (the precision's,
    as ``model.json``) and fill record (and the python backend's model.py), then
    config.pbtxt."""
    template = _template_dir(variant)
    sidecar = export_dir / sidecar_name(precision)
    model_file = export_dir / (PLAN_FILE if variant == "gpu-trt" else spec.onnx_file)
    model_dir = repo_dir / spec.model_name
    version_dir = model_dir / str(version)
    shutil.rmtree(version_dir, ignore_errors=True)
    version_dir.mkdir(parents=True)
    template_version = template / "1"
    if template_version.is_dir():  # the python backend's model.py
        for item in template_version.glob("*.py"):
            shutil.copy2(item, version_dir / item.name)
    _link_or_copy(model_file, version_dir / model_file.name)
    shutil.copy2(sidecar, version_dir / SIDECAR_FILE)
    record = {"variant": variant, "model_file": model_file.name,
              "model_sha256": file_sha256(model_file), "sidecar_sha256": file_sha256(sidecar),
              "checkpoint_sha256": spec.checkpoint_sha256, "export_dir": str(export_dir)}
    _write_atomic(version_dir / FILL_RECORD, json.dumps(record, indent=2) + "\n")
    header = HEADER.format(template=template / "config.pbtxt", sidecar=sidecar)
    _write_atomic(model_dir / "config.pbtxt",
                  header + text_format.MessageToString(config))


def _config_spec(config: mc.ModelConfig, where: Path) -> ModelSpec | None:
    """The sidecar the config carries for clients, which read it from the server."""
    if SPEC_PARAMETER not in config.parameters:
        return None
    return ModelSpec.from_json(config.parameters[SPEC_PARAMETER].string_value,
                               where=f"{where}: parameter {SPEC_PARAMETER!r}")


def _check_config(config: mc.ModelConfig, spec: ModelSpec, where: Path) -> None:
    """The config's name, tensors and warm-up shape must be the sidecar's."""
    expected = {
        "name": spec.model_name,
        "input": [(spec.input_name, mc.TYPE_FP32, tensor_dims(spec)[0])],
        "output": [(spec.output_name, mc.TYPE_FP32, tensor_dims(spec)[1])],
        "warm-up dims": [[spec.audio_channels, spec.padded_length]]
        * len(config.model_warmup),
    }
    found = {
        "name": config.name,
        "input": [(t.name, t.data_type, list(t.dims)) for t in config.input],
        "output": [(t.name, t.data_type, list(t.dims)) for t in config.output],
        "warm-up dims": [list(i.dims) for w in config.model_warmup for i in w.inputs.values()],
    }
    for key, value in expected.items():
        if found[key] != value:
            raise RepositoryError(f"{where} and its sidecar disagree on the {key}: "
                                 f"{found[key]} in config.pbtxt, {value} expected")
    if config.max_batch_size < 1:
        raise RepositoryError(f"{where}: max_batch_size must be at least 1 (the batch "
                             "dimension is implicit in dims)")


def _check_onnx(path: Path, spec: ModelSpec, sidecar: Path) -> None:
    """Tensor names, element type, rank and static dims of the graph against the sidecar.

    The exporter may leave the output's dims symbolic; ONNX shape inference with data
    propagation recovers the static ones. It needs the weights' shapes, not their values,
    so large initializers are emptied first (the check then costs no second model copy).
    A dim that stays dynamic passes.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        if len(init.raw_data) > SHAPE_CONSTANT_BYTES:
            init.ClearField("raw_data")
    graph = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    initializers = {init.name for init in graph.initializer}
    channels, sources = spec.audio_channels, len(spec.sources)
    expected = {"input": [(spec.input_name, "FLOAT", [None, channels, None])],
                "output": [(spec.output_name, "FLOAT", [None, sources, channels, None])]}
    for key, values in (("input", graph.input), ("output", graph.output)):
        found = [(v.name, onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
                  [d.dim_value if d.HasField("dim_value") else None
                   for d in v.type.tensor_type.shape.dim])
                 for v in values if v.name not in initializers]
        if not _tensors_agree(found, expected[key]):
            raise RepositoryError(
                f"{path} and {sidecar} disagree on the {key} (name, type, dims; None is "
                f"dynamic): {found} in the graph, {expected[key]} in the sidecar")


def _tensors_agree(found: list[tuple], expected: list[tuple]) -> bool:
    """Same names, types and ranks; a dim agrees when equal or dynamic on either side."""
    return len(found) == len(expected) and all(
        name == want_name and dtype == want_dtype and len(dims) == len(want)
        and all(d is None or w is None or d == w for d, w in zip(dims, want))
        for (name, dtype, dims), (want_name, want_dtype, want) in zip(found, expected))


def _config_bag(config: mc.ModelConfig, where: Path) -> BagSpec | None:
    if BAG_PARAMETER not in config.parameters:
        return None
    return BagSpec.from_json(config.parameters[BAG_PARAMETER].string_value,
                             where=f"{where}: parameter {BAG_PARAMETER!r}")


def check_repository(repo_dir: Path) -> ExportLayout:
    """Refuse a repository whose configs, model files and sidecars do not belong together.

    ``repo_dir`` holds one model folder, or one per member of a bag (every config carrying
    the same bag, which names exactly those folders); every numeric version folder must
    have been filled by :func:`fill_repository` and left as it was. Returns the bag (of
    one for a single model) with each member's folder and spec.
    """
    repo_dir = Path(repo_dir)
    model_dirs = sorted(p.parent for p in repo_dir.glob("*/config.pbtxt")
                        if p.parent.name != STREAM_MODEL)
    if not model_dirs:
        raise RepositoryError(f"{repo_dir}: no model folder with a config.pbtxt; fill it "
                             "with stemserve.model_repository.writer")
    configs = {model_dir: load_config(model_dir / "config.pbtxt") for model_dir in model_dirs}
    bags = {model_dir: _config_bag(config, model_dir / "config.pbtxt")
            for model_dir, config in configs.items()}
    first = bags[model_dirs[0]]
    if len(model_dirs) > 1 and (first is None or any(bag != first for bag in bags.values())
                                or sorted(set(first.members)) != [p.name for p in model_dirs]):
        raise RepositoryError(f"{repo_dir}: expected one model folder, or the members of one "
                             f"bag, found {[p.name for p in model_dirs]}; fill it with "
                             "stemserve.model_repository.writer")
    members = tuple((model_dir, _check_model(model_dir, configs[model_dir]))
                    for model_dir in model_dirs)
    if first is None:
        layout = ExportLayout(BagSpec.single(members[0][1]), members)
    else:
        by_name = {model_dir.name: (model_dir, spec) for model_dir, spec in members}
        layout = ExportLayout(first, tuple(by_name[name] for name in first.members))
    if (repo_dir / STREAM_MODEL / "config.pbtxt").is_file():
        _check_stream_model(repo_dir / STREAM_MODEL, layout)
    return layout


def _check_stream_model(model_dir: Path, layout: ExportLayout) -> None:
    """The streaming model must be decoupled, have its model.py in every version, and carry
    exactly the bag and sidecars of the network models beside it."""
    where = model_dir / "config.pbtxt"
    config = load_config(where)
    if not config.model_transaction_policy.decoupled:
        raise RepositoryError(f"{where}: the streaming model must be decoupled "
                              "(model_transaction_policy { decoupled: true })")
    expected = render_stream_config(layout)
    for key in (BAG_PARAMETER, SPECS_PARAMETER):
        if config.parameters[key].string_value != expected.parameters[key].string_value:
            raise RepositoryError(f"{where}: its {key!r} parameter is not the sidecar of the "
                                  "network models beside it; fill the repository again")
    if [(t.name, list(t.dims)) for t in config.input][:1] != \
            [(t.name, list(t.dims)) for t in expected.input][:1]:
        raise RepositoryError(f"{where}: its input is not the network's mix; fill the "
                              "repository again")
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions or not all((version / "model.py").is_file() for version in versions):
        raise RepositoryError(f"{model_dir}: a version folder with model.py is missing")


def _check_model(model_dir: Path, config: mc.ModelConfig) -> ModelSpec:
    """One model folder against its config; returns its sidecar's spec."""
    versions = sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise RepositoryError(f"{model_dir}: no version folder (1/, 2/, ...)")
    for version_dir in versions:
        sidecar = version_dir / SIDECAR_FILE
        spec = ModelSpec.load(sidecar)
        if spec.model_name != model_dir.name:
            raise RepositoryError(f"{sidecar} describes model {spec.model_name!r}, but it "
                                 f"lies in {model_dir}")
        _check_config(config, spec, model_dir / "config.pbtxt")
        try:
            record = json.loads((version_dir / FILL_RECORD).read_text())
        except (OSError, ValueError) as err:
            raise RepositoryError(f"{version_dir / FILL_RECORD} is missing or unreadable "
                                 f"({err}): fill the repository with fill_repository") from err
        model_file = version_dir / record["model_file"]
        if not model_file.is_file():
            raise RepositoryError(f"{model_file} is missing (named by {FILL_RECORD})")
        if spec.checkpoint_sha256 != record["checkpoint_sha256"] or \
                file_sha256(sidecar) != record["sidecar_sha256"]:
            raise RepositoryError(
                f"{sidecar} is not the sidecar {model_file} was filled with (checkpoint "
                f"sha256 {spec.checkpoint_sha256[:12]}, {FILL_RECORD} recorded "
                f"{record['checkpoint_sha256'][:12]}); fill the repository again")
        if file_sha256(model_file) != record["model_sha256"]:
            raise RepositoryError(
                f"{model_file} changed since it was filled with {sidecar} (sha256 differs "
                f"from {FILL_RECORD}); fill the repository again from the export")
        served = _config_spec(config, model_dir / "config.pbtxt")
        if served is not None and served != spec:
            raise RepositoryError(
                f"the {SPEC_PARAMETER!r} parameter of {model_dir / 'config.pbtxt'} is not "
                f"{sidecar} (checkpoint {served.checkpoint} vs {spec.checkpoint}); clients "
                "would cut segments wrongly: fill the repository again")
        if model_file.suffix == ".onnx":
            _check_onnx(model_file, spec, sidecar)
        if config.backend == "python" and not (version_dir / "model.py").is_file():
            raise RepositoryError(f"{version_dir / 'model.py'} is missing (python backend)")
    return spec
