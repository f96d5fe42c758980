"""A regular (non-editable) wheel install registers the pass too: the .pth hook ships inside the wheel."""

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_hook_and_registers_the_pass(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("olive_int4_pass-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "olive_int4_pass.pth" in names and "olive_int4_pass/data/calibration.txt" in names

    # A fresh environment that sees the test environment's dependencies but installs our package from the wheel.
    # (--system-site-packages would expose the base interpreter's packages, not this virtual environment's.) A path
    # line in a .pth file adds the directory without running the .pth files inside it, so the editable install's
    # hook and finder stay out.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # this pip installs
    python = venv / "bin" / "python"
    venv_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(venv_site) / "outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    code = (
        "import olive_int4_pass, sys;"
        "from olive.package_config import OlivePackageConfig as C;"
        "print(olive_int4_pass.__file__);"
        "print(C.load_default_config().get_pass_module_config('OnnxInt4RtnQuantization').module_path)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the wheel may provide the package
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    location, module_path = result.stdout.split()
    assert location.startswith(str(venv))  # the wheel's copy, not the editable checkout
    assert module_path == "olive_int4_pass.olive.quantize_pass.OnnxInt4RtnQuantization"
