"""The wheel every image installs carries every data file the code opens.

The images build llmp with `pip install --no-deps --no-build-isolation .` from the files their Dockerfile
COPYs; this test builds the wheel the same way from the same files (read from the Dockerfiles, in a
scratch directory, so nothing else in the checkout can leak in), then checks it against the data
folders the code itself names: every `Path(__file__)…parent / "folder"` in the packages' modules.
A template, SQL migration or console asset the package-data globs miss fails here, not in a pod.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("services", "gateway", "cli")
DOCKERFILES = sorted(ROOT.glob("**/Dockerfile"))


def _copied_sources(dockerfile: Path) -> list[str]:
    """What the build stage COPYs from the context before installing llmp (`COPY a b ./` or `COPY a ./a`)."""
    sources: list[str] = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(word.startswith("--from") for word in words):
            sources.extend(word for word in words[1:-1] if not word.startswith("--"))
    return sources


def _tracked(paths: list[str]) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=ROOT, check=True, capture_output=True)
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]


def _path_from_file(node: ast.AST, module: Path) -> Path | None:
    """The path `Path(__file__)[.resolve()].parent… / "a" / "b"` denotes, or None for other expressions."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        base = _path_from_file(node.left, module)
        if base is not None and isinstance(node.right, ast.Constant) and isinstance(node.right.value, str):
            return base / node.right.value
        return None
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        base = _path_from_file(node.value, module)
        return base.parent if base is not None else None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "resolve":
        return _path_from_file(node.func.value, module)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Path"
            and len(node.args) == 1 and isinstance(node.args[0], ast.Name) and node.args[0].id == "__file__"):
        return module
    return None


def data_files_the_code_opens() -> dict[Path, Path]:
    """Every tracked non-Python file under a folder (or at a path) a module builds from `__file__`.

    Maps each file to the module that names it, for the failure message."""
    opened: dict[Path, Path] = {}
    for module in _tracked([f"{package}/**.py" for package in PACKAGES]):
        for node in ast.walk(ast.parse(module.read_text(), str(module))):
            # Only a path joined onto the module's folder names data (`parent` alone is a folder of code).
            target = _path_from_file(node, module) if isinstance(node, ast.BinOp) else None
            if target is None or not target.exists():
                continue
            files = [target] if target.is_file() else _tracked([str(target.relative_to(ROOT))])
            opened.update({file: module for file in files if file.suffix != ".py"})
    return opened


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    sources = {source for dockerfile in DOCKERFILES for source in _copied_sources(dockerfile)}
    sources = {source for source in sources if not source.endswith(".lock")}  # dependencies, installed before llmp
    context = tmp_path_factory.mktemp("context")
    for source in sorted(sources):
        for file in _tracked([source]):  # what git tracks: .dockerignore keeps caches and venvs out too
            target = context / file.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(context)], check=True, capture_output=True)
    (built,) = out.glob("llmp-*.whl")
    return zipfile.ZipFile(built)


def test_every_dockerfile_installs_llmp_from_the_copied_sources():
    # The fixture copies what the Dockerfiles COPY; make sure that is the same set for every image.
    assert DOCKERFILES, "no Dockerfile found"
    copied = {path.relative_to(ROOT): tuple(_copied_sources(path)) for path in DOCKERFILES
              if "pip install --no-deps --no-build-isolation ." in path.read_text()}
    assert copied, "no Dockerfile installs llmp with `pip install --no-deps --no-build-isolation .`"
    assert len(set(copied.values())) == 1, copied


def test_the_code_names_data_folders():
    # Guards the scan itself: these are the folders the services read at run time.
    folders = {file.parent.name for file in data_files_the_code_opens()}
    assert {"migrations", "console", "triton_model"} <= folders, folders


def test_the_wheel_holds_every_data_file_the_code_opens(wheel):
    names = set(wheel.namelist())
    missing = {str(file.relative_to(ROOT)): str(module.relative_to(ROOT))
               for file, module in data_files_the_code_opens().items()
               if str(file.relative_to(ROOT)) not in names}
    assert not missing, f"opened by the code but not in the wheel (file: module): {missing}"


def test_an_installed_wheel_writes_a_triton_model(wheel, tmp_path):
    # What a deployment does first in the inference image: write_model from the installed package,
    # with no source tree on the path (the checkout is neither the working directory nor on PYTHONPATH).
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site),
                    wheel.filename], check=True, capture_output=True)
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"onnx")
    (export / "decoder.json").write_text("{}")
    script = (
        "import sys; from pathlib import Path; from services.inference import model_repository as m\n"
        "assert Path(m.__file__).is_relative_to(sys.argv[1]), m.__file__\n"
        "m.write_model(Path(sys.argv[2]), 'm-t-x-1', Path(sys.argv[3]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(site), str(tmp_path / "repo"), str(export)],
                          cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "name: \"m-t-x-1\"" in (tmp_path / "repo" / "m-t-x-1" / "config.pbtxt").read_text()
