"""The wheel ships ``deco_ops`` (with ``deco_ops.kernels``, the integrations and ``py.typed``) and
nothing else at top level, and works installed (non-editable) in a fresh environment, imported
from outside the checkout.

The wheel is built from a copy of the files git knows (tracked, plus untracked ones that are not
ignored), never from the working directory itself: a checkout may hold ignored helpers (such as a
``deco_ops/kernels`` symlink for imports) that a clean clone does not.
"""

import os
import re
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT_VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def _git_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files a clean clone holds")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = _git_files()
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)
    (path,) = (tmp / "dist").glob("deco_ops-*.whl")
    return path, files


def test_wheel_ships_deco_ops_only(wheel):
    path, files = wheel
    names = set(zipfile.ZipFile(path).namelist())
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"deco_ops"}, sorted(top)
    expected = {f for f in files if f.startswith("deco_ops/") and f.endswith(".py")}
    expected |= {"deco_ops/kernels/" + f.removeprefix("kernels/") for f in files if f.startswith("kernels/") and f.endswith(".py")}
    assert expected - names == set(), f"missing from the wheel: {sorted(expected - names)}"
    assert "deco_ops/py.typed" in names
    assert not [n for n in names if n.startswith(("benchmarks/", "tests/", "examples/", "kernels/"))]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh virtual environment with the wheel installed; returns ``run(code_or_args)``, which
    runs its python from a temporary directory outside the checkout, with no PYTHONPATH."""
    path, _ = wheel
    tmp = tmp_path_factory.mktemp("installed")
    env_dir = tmp / "venv"
    # torch, triton (and the rest) come from this interpreter's site-packages, never from an index:
    # a .pth file lists them (system_site_packages would miss them where this interpreter is itself
    # a virtual environment; and unlike a site dir, a .pth line does not run the checkout's
    # editable-install hook, so deco_ops can only come from the wheel)
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "parent_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(path)],
                   check=True, capture_output=True, text=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("DECO_OPS_BACKEND", "TRITON_INTERPRET", "PYTHONPATH")}
    cwd = tmp / "elsewhere"
    cwd.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return run


def test_installed_wheel_imports_outside_the_checkout(installed):
    code = (
        "import sys, deco_ops, deco_ops.kernels, deco_ops.kernels.pool_gemm\n"
        "assert deco_ops.__file__.startswith(sys.prefix), deco_ops.__file__\n"
        "assert deco_ops.kernels.__file__.startswith(sys.prefix), deco_ops.kernels.__file__\n"
        "assert 'transformers' not in sys.modules, 'import deco_ops imported transformers'\n"
        "print(deco_ops.DeCoProjector(8, 8, grid=(2, 2), out_grid=(1, 1))(__import__('torch').randn(1, 4, 8)).shape)\n"
    )
    assert "torch.Size([1, 1, 8])" in installed("-c", code).stdout


def test_installed_version_is_the_package_metadata(installed):
    code = ("import importlib.metadata, deco_ops\n"
            "print(deco_ops.__version__, importlib.metadata.version('deco-ops'))\n")
    ours, metadata = installed("-c", code).stdout.split()
    assert ours == metadata == PYPROJECT_VERSION


def test_installed_wheel_tunes_outside_the_checkout(installed):
    """``python -m deco_ops.tune --dry-run`` from the wheel alone (no benchmarks/, no checkout on
    sys.path): a shipped pool_mlp and cross_attention shape, and a --shape of one's own."""
    out = installed("-m", "deco_ops.tune", "--dry-run", "--shapes", "infer_b1", "blip2_qformer",
                    "--shape", "cross_attention:name=mine,batch=2,M=8,N=300,heads=2,head_dim=16").stdout
    assert "infer_b1  pool_mlp  bf16" in out and "pool_gemm_kernel  [M=256 N=4096 K=1024" in out
    assert "blip2_qformer  cross_attention  bf16" in out and "cross_attention_fwd_kernel  [M=32 N=512 BLOCK_D=64" in out
    assert "mine  cross_attention  bf16" in out and "cross_attention_fwd_kernel  [M=8 N=512 BLOCK_D=16" in out


def test_checkout_version_without_metadata_is_pyprojects(monkeypatch):
    """A source checkout imported without being installed reports pyproject.toml's version."""
    from deco_ops import _version

    def not_installed(name):
        raise _version.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_version.metadata, "version", not_installed)
    assert _version.version() == PYPROJECT_VERSION


def test_checkout_version_is_pyprojects_whatever_is_installed(monkeypatch):
    """A source checkout reports its pyproject.toml's version also where deco-ops is installed at
    another one (an editable install of another checkout, or metadata left from before a version
    bump): the strategy's keys carry it, so two versions must never share a decision. Reported
    the installed metadata's until 2026-12-07."""
    from deco_ops import _version

    monkeypatch.setattr(_version.metadata, "version", lambda name: "0.0.1")
    assert _version.version() == PYPROJECT_VERSION


def test_checkout_root_leaves_the_name_kernels_to_its_owner(tmp_path):
    """From the checkout's root (``python -m pytest``, a script run there) our ``kernels/`` folder
    stands first on sys.path under the name that Hugging Face's ``kernels`` package owns, and
    ``import transformers`` imports that package: the folder hands the name over to the next
    ``kernels`` on sys.path, and without one fails as a missing package does."""
    other = tmp_path / "elsewhere" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("OWNER = 'the other kernels'\nfrom . import sub\n")
    (other / "sub.py").write_text("")
    another_checkout = tmp_path / "another_checkout"  # as on a PYTHONPATH: its kernels/ hands the name on too
    shutil.copytree(ROOT / "kernels", another_checkout / "kernels")
    probe = ("import sys; sys.path[1:1] = sys.argv[1:]; import kernels, kernels.sub; "
             "print(kernels.OWNER, kernels.__file__ == sys.modules['kernels'].__file__)")
    out = subprocess.run([sys.executable, "-c", probe, str(another_checkout), str(other.parent)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["the", "other", "kernels", "True"], out.stderr
    missing = ("import sys\ntry:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
               "    print(e.name, 'kernels' in sys.modules)")
    out = subprocess.run([sys.executable, "-S", "-c", missing], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == ["kernels", "False"], (out.stdout, out.stderr)


def test_readme_states_the_dependency_floors_pyproject_installs():
    """The README's requirements row and its CPU-build note name the torch and triton floors that
    ``pip install`` resolves (they said torch >= 2.6 and triton >= 3.4 while deco_ops did not import
    under triton 3.4 and called APIs torch 2.6 and 2.7 lack)."""
    dependencies = re.search(r"^dependencies = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    floors = dict(re.findall(r'"(torch|triton)>=([\d.]+)"', dependencies))
    readme = (ROOT / "README.md").read_text()
    assert f"torch ≥ {floors['torch']}, triton ≥ {floors['triton']}." in readme
    assert f"`torch>={floors['torch']}`" in readme
