"""``stemserve web``'s flags come from :class:`~stemserve.web.settings.Settings`: every
setting is reachable from the command line, with the dataclass' defaults, the environment
fills in the Triton address and the token, and docs/web.md lists every flag."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
from pathlib import Path

import pytest

from stemserve import cli
from stemserve.connection import ConnectionOptions
from stemserve.web.settings import Settings, default_jobs_dir


@pytest.fixture
def served(monkeypatch) -> list[Settings]:
    """The settings ``stemserve web`` would serve with, instead of serving."""
    import stemserve.web.server

    calls: list[Settings] = []
    monkeypatch.setattr(stemserve.web.server, "serve", calls.append)
    monkeypatch.delenv("STEMSERVE_TRITON_URL", raising=False)
    monkeypatch.delenv("STEMSERVE_TRITON_URLS", raising=False)
    monkeypatch.delenv("STEMSERVE_WEB_TOKEN", raising=False)
    return calls


def web(*argv: str) -> int:
    """``stemserve web ARGV`` as the command line runs it, less its logging and signals."""
    args = cli.build_parser().parse_args(["web", *argv])
    return args.func(args)


def test_no_flags_give_the_dataclass_defaults(served):
    assert web() == 0
    assert served == [Settings()]
    assert served[0].jobs_dir == default_jobs_dir()


def test_every_setting_has_a_flag(served, tmp_path):
    values = dict(host="0.0.0.0", port=9000, triton_url="triton:8001", model="small",
                  config="demucs_unittest", max_upload_mb=2.5, max_duration=60.0, workers=2,
                  queue_size=3, job_ttl=10.0, jobs_dir=tmp_path / "jobs", max_disk_mb=50.0,
                  token="secret", allow_origins=("https://a.example", "https://b.example"),
                  header_timeout=1.0, body_timeout=2.0, precision="int8",
                  connection=ConnectionOptions(server_window=3, shared_memory=False,
                                               timeout=5.0, retries=1, backoff=0.25))
    assert set(values) == {field.name for field in dataclasses.fields(Settings)}
    argv = ["--allow-origin", values["allow_origins"][0],
            "--allow-origin", values["allow_origins"][1], "--server-window", "3",
            "--no-shared-memory", "--timeout", "5", "--retries", "1", "--backoff", "0.25"]
    for name, value in values.items():
        if name not in ("allow_origins", "connection"):
            argv += ["--url" if name == "triton_url" else "--" + name.replace("_", "-"),
                     str(value)]
    assert web(*argv) == 0
    assert served == [Settings(**values)]


def test_one_precision_by_name_or_alias(served, capsys):
    """``--precision NAME``, or its aliases ``--int8`` and ``--bf16``: one of them."""
    from stemserve.errors import StemserveError

    assert web("--bf16") == 0 and web("--int8") == 0 and web() == 0
    assert web("--precision", "fp16") == 0 and web("--int8", "--no-int8") == 0
    assert [settings.precision for settings in served] == ["bf16", "int8", None, "fp16", None]
    for argv in (("--int8", "--bf16"), ("--precision", "int8", "--bf16")):
        with pytest.raises(SystemExit):
            web(*argv)
        assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(StemserveError, match="precision must be one of fp32, fp16, int8, "
                                             "bf16, not 'fp8'"):
        Settings(precision="fp8")


def test_the_environment_names_triton_and_the_token(served, monkeypatch):
    monkeypatch.setenv("STEMSERVE_TRITON_URL", "triton:8001")
    monkeypatch.setenv("STEMSERVE_WEB_TOKEN", "from-env")
    assert web() == 0
    assert (served[0].triton_url, served[0].token) == ("triton:8001", "from-env")
    assert web("--backend", "onnx", "--token", "given") == 0
    assert (served[1].triton_url, served[1].token) == (None, "given")


def test_url_and_in_process_exclude_each_other(served, capsys):
    with pytest.raises(SystemExit):
        web("--url", "triton:8001", "--backend", "onnx")
    assert "not allowed with argument" in capsys.readouterr().err


def test_jobs_dir_defaults_to_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("STEMSERVE_CACHE", str(tmp_path))
    assert Settings().jobs_dir == Path(tmp_path).resolve() / "web-jobs"


def test_the_docs_list_every_flag():
    """docs/web.md's option table names exactly the flags ``stemserve web`` has."""
    lines = (Path(__file__).resolve().parents[1] / "docs" / "web.md").read_text().splitlines()
    start = lines.index("| option | default | |")
    rows = itertools.takewhile(str.strip, lines[start + 2:])
    documented = {flag for row in rows
                  for flag in re.findall(r"`(-{1,2}[\w-]+)", row.split("|")[1])}
    parser = next(action for action in cli.build_parser()._actions
                  if isinstance(action, argparse._SubParsersAction)).choices["web"]
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert documented == flags - {"-h", "--help", "-v", "--verbose"}


def test_the_web_port_is_none_of_the_ports_stemserve_serve_takes(served):
    """``stemserve web`` beside a default ``stemserve serve`` (a local tritonserver on
    8000-8002) used to fail on 8000: its default is out of their way, the old port a flag."""
    serve = next(action for action in cli.build_parser()._actions
                 if isinstance(action, argparse._SubParsersAction)).choices["serve"]
    taken = {action.default for action in serve._actions
             if action.dest in ("http_port", "grpc_port", "metrics_port")}
    assert taken == {8000, 8001, 8002}
    assert Settings().port == 8080 and Settings().port not in taken
    assert web("--port", "8000") == 0 and served[-1].port == 8000


def test_the_docs_give_the_defaults_and_where_exports_live():
    text = (Path(__file__).resolve().parents[1] / "docs" / "web.md").read_text()
    assert "| `--host`, `--port` | `127.0.0.1`, `8080` |" in text
    assert "build/export" not in text and "~/.cache/stemserve/export/" in text
