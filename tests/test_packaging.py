"""The built wheel installs kernels/ as fastpatch.kernels and nothing named `kernels` at top level."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)]
    subprocess.run(cmd, check=True, capture_output=True)
    (wheel,) = out.glob("fastpatch-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_kernels_installed_under_fastpatch(wheel_names):
    assert "fastpatch/kernels/__init__.py" in wheel_names
    top_level = {name.split("/")[0] for name in wheel_names}
    assert "kernels" not in top_level
    assert {n for n in top_level if not n.endswith(".dist-info")} == {"fastpatch"}


def test_every_source_module_is_packaged(wheel_names):
    sources = [p.relative_to(ROOT) for p in (ROOT / "fastpatch").rglob("*.py")]
    sources += [Path("fastpatch/kernels") / p.relative_to(ROOT / "kernels") for p in (ROOT / "kernels").rglob("*.py")]
    missing = [str(p) for p in sources if str(p) not in wheel_names]
    assert not missing, f"modules missing from the wheel (add their package to setup.py): {missing}"
