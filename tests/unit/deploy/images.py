"""Building llmp the way its images do, without Docker: the wheel from what the Dockerfiles COPY."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
# The images that install llmp itself (deploy/triton installs only what the model code imports).
LLMP_DOCKERFILES = sorted(path for path in ROOT.glob("**/Dockerfile")
                          if "pip install --no-deps --no-build-isolation ." in path.read_text())


def copied_sources(dockerfile: Path) -> list[str]:
    """What the build stage COPYs from the context before installing llmp (`COPY a b ./` or `COPY a ./a`)."""
    sources: list[str] = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(word.startswith("--from") for word in words):
            sources.extend(word for word in words[1:-1] if not word.startswith("--"))
    return sources


def tracked(paths: list[str]) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=ROOT, check=True, capture_output=True)
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]


def build_wheel(out: Path) -> Path:
    """llmp's wheel, built as `pip install --no-deps --no-build-isolation .` in the images builds it, from
    exactly the files their build stage COPYs (tracked by git: .dockerignore keeps caches and venvs out)."""
    sources = {source for dockerfile in LLMP_DOCKERFILES for source in copied_sources(dockerfile)}
    sources = {source for source in sources if not source.endswith(".lock")}  # dependencies, installed before llmp
    context = out / "context"
    for source in sorted(sources):
        for file in tracked([source]):
            target = context / file.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(context)], check=True, capture_output=True)
    (built,) = out.glob("llmp-*.whl")
    return built
