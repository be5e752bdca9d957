"""Generate the Python gRPC stubs of ``protos/`` into ``stitchgraph/v1/``.

Stubs are generated at install time (``make`` does it before anything runs) rather
than committed: the protos are the single source, and there is no generated code
that could drift from them. See docs/development.md.
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "stitchgraph" / "v1"


def main() -> int:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "stitchgraph" / "v1").glob("*.proto"))
    if not protos:
        print("no protos found under protos/stitchgraph/v1", file=sys.stderr)
        return 1
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return int(code)
    (OUT / "__init__.py").write_text(
        '"""Generated from protos/stitchgraph/v1 by scripts/gen_stubs.py; do not edit."""\n')
    (OUT / "py.typed").write_text("")
    print(f"generated stubs for {len(protos)} proto files into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
