"""The built wheel: kernels/ installed as fastpatch.kernels (nothing named `kernels` at top level), every module
packaged, no development tooling (fastpatch_dev/), and requirements that never replace the user's torch or
triton."""
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel of a clean copy of the sources: setuptools would reuse a stale ``build/`` of the checkout
    (modules since moved or deleted would be in the wheel)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("fastpatch", "kernels"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)]
    subprocess.run(cmd, check=True, capture_output=True)
    (path,) = out.glob("fastpatch-*.whl")
    return zipfile.ZipFile(path)


@pytest.fixture(scope="module")
def wheel_names(wheel):
    return wheel.namelist()


@pytest.fixture(scope="module")
def requirements(wheel):
    """The wheel's ``Requires-Dist`` lines (what pip installs with it)."""
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    lines = wheel.read(metadata).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]


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


def test_development_tooling_is_not_packaged(wheel, wheel_names):
    """The AOT compile helpers (cuobjdump, subprocess shards, compile_for_gpu, resource_usage, launch recording)
    and the triton-version compile shims live in fastpatch_dev/, which is not installed; the installed
    fastpatch.testing keeps the tolerances only, and nothing installed imports the tooling."""
    assert not [n for n in wheel_names if n.startswith("fastpatch_dev/")]
    assert "fastpatch/compat.py" not in wheel_names
    testing = wheel.read("fastpatch/testing.py").decode()
    for name in ("TOLERANCES", "Tolerance", "relative_error", "assert_close_to_reference"):
        assert f"{name}" in testing
    for tooling in ("cuobjdump", "subprocess", "compile_for_gpu", "resource_usage", "recorded_launches",
                    "SHARED_MEMORY_LIMIT", "compile_results_in_subprocesses"):
        assert tooling not in testing, tooling
    sources = {n: wheel.read(n).decode() for n in wheel_names if n.endswith(".py")}
    assert not [n for n, text in sources.items() if re.search(r"^\s*(from|import)\s+fastpatch_dev", text, flags=re.M)]


def test_tooling_is_importable_from_the_repository():
    """What moved out of the wheel is where the tests and benchmarks import it from."""
    from fastpatch_dev import aot, compat

    assert callable(aot.compile_for_gpu) and callable(aot.resource_usage) and callable(compat.launch_specialization)
    assert (ROOT / "fastpatch_dev" / "aot.py").exists() and not (ROOT / "fastpatch" / "compat.py").exists()


def test_requires_torch_2_5_and_no_triton(requirements):
    """torch >= 2.5 (its CUDA wheels pin a triton >= 3.1); triton only through the ``triton`` extra, so
    installing fastpatch never upgrades or downgrades the triton (and through it the torch) a user has."""
    plain = [r for r in requirements if "extra ==" not in r]
    assert plain == ["torch>=2.5"]
    assert [r for r in requirements if r.startswith("triton")] == ['triton>=3.1; extra == "triton"']


def test_oldest_environment_pins_the_lowest_supported_triton(requirements):
    """The CI's oldest-triton run (scripts/setup_oldest_env.sh) tests exactly the lower bound setup.py admits."""
    (lower,) = [r.split(";")[0].split(">=")[1] for r in requirements if r.startswith("triton>=")]
    script = (ROOT / "scripts" / "setup_oldest_env.sh").read_text()
    (pinned,) = re.findall(r"^OLDEST_TRITON=(\S+)$", script, flags=re.M)
    assert pinned.split(".")[:2] == lower.split(".")[:2]
