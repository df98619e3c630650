"""The wheel every image installs carries every data file the code opens.

The images build llmp with `pip install --no-deps --no-build-isolation .` from the files their Dockerfile
COPYs; this test builds the wheel the same way from the same files (read from the Dockerfiles, in a
scratch directory, so nothing else in the checkout can leak in), then checks it against the data
folders the code itself names: every `Path(__file__)…parent / "folder"` in the packages' modules.
A template, SQL migration or console asset the package-data globs miss fails here, not in a pod.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import images
import pytest

ROOT = images.ROOT
PACKAGES = ("services", "gateway", "cli")
DOCKERFILES = images.LLMP_DOCKERFILES


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
    for module in images.tracked([f"{package}/**.py" for package in PACKAGES]):
        for node in ast.walk(ast.parse(module.read_text(), str(module))):
            # Only a path joined onto the module's folder names data (`parent` alone is a folder of code).
            target = _path_from_file(node, module) if isinstance(node, ast.BinOp) else None
            if target is None or not target.exists():
                continue
            files = [target] if target.is_file() else images.tracked([str(target.relative_to(ROOT))])
            opened.update({file: module for file in files if file.suffix != ".py"})
    return opened


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    return zipfile.ZipFile(images.build_wheel(tmp_path_factory.mktemp("wheel")))


def test_every_dockerfile_installs_llmp_from_the_copied_sources():
    # The fixture copies what the Dockerfiles COPY; make sure that is the same set for every image.
    assert DOCKERFILES, "no Dockerfile found"
    copied = {path.relative_to(ROOT): tuple(images.copied_sources(path)) for path in DOCKERFILES
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
