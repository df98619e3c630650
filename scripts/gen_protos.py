"""Generate Python code (messages, gRPC stubs, type stubs) from protos/ into gen/.

`make protos` runs this; CI runs it with --check, which fails when the committed gen/ differs from
what the protos produce.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"


def generate(out: Path) -> None:
    protos = sorted(str(path.relative_to(PROTOS)) for path in PROTOS.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTOS}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Make every generated folder a regular package so imports work without namespace tricks.
    for folder in [out / "llmp", *(p for p in (out / "llmp").rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


def differences(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [*comparison.left_only, *comparison.right_only, *comparison.diff_files]
    for name in comparison.subdirs:
        found += [f"{name}/{item}" for item in differences(left / name, right / name)]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if gen/ is not what the protos produce")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        generate(out)
        if options.check:
            stale = differences(out / "llmp", GEN / "llmp") if (GEN / "llmp").exists() else ["gen/llmp"]
            if stale:
                print("gen/ is out of date with protos/ (run `make protos`):", *stale, sep="\n  ", file=sys.stderr)
                return 1
            print("gen/ matches protos/")
            return 0
        shutil.rmtree(GEN / "llmp", ignore_errors=True)
        shutil.copytree(out / "llmp", GEN / "llmp", ignore=shutil.ignore_patterns("__pycache__"))
    print(f"generated {GEN / 'llmp'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
