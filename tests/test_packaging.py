"""The package as pip builds it: no warnings at install, every data file shipped."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_without_warnings_and_ships_its_data(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in (done.stdout + done.stderr).splitlines()
                if "warning" in line.lower() and "Location 'file:" not in line]
    assert not warnings, "\n".join(warnings)
    (wheel,) = tmp_path.glob("stemserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("stemserve/model_repository/cpu/demucs/config.pbtxt",
                 "stemserve/model_repository/cpu/demucs/1/model.py",
                 "stemserve/model_repository/gpu/demucs/config.pbtxt",
                 "stemserve/model_repository/gpu-trt/demucs/config.pbtxt",
                 "stemserve/web/static/index.html"):
        assert data in names, data
    assert not any(name.startswith(("client/", "export/", "tests/")) for name in names)
