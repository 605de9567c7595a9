#!/usr/bin/env python3
"""The build script: an HF checkpoint -> ONNX (checked against PyTorch) -> a TensorRT plan sized by
`max_num_tokens` (checked against the ONNX graph), with the manifest that says what was built, from
what and for which GPU, in one engine folder (build/README.md).

`make build-engine` runs this file. It is the `nerserve build-engine` command by another door: the
builder is the package's (packages/nerserve/export/build.py), so this script, `nerserve build-engine`
and the container's start (model/start.sh) run the same code; the package ships to the image (Truss's
packages/ folder) where the start needs it, and this folder is the toolchain's entry for people."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "packages"))

from nerserve.cli import main  # noqa: E402 - needs the path above

if __name__ == "__main__":
    sys.exit(main(["build-engine", *sys.argv[1:]]))
