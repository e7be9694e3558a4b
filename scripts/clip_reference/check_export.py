#!/usr/bin/env python3
"""Check an ONNX file written by `mergeattack export` with the official ONNX checker
(`onnx.checker.check_model(full_check=True)`, which also runs shape inference) and, when
onnxruntime is installed, run it on the fixture's pixels and compare with its reference logits.

Maintainers only (CI never runs Python). Install: `pip install onnx` (+ `onnxruntime` optional).
Run from the repository root:

    cargo run --bin mergeattack -- export --model tests/fixtures/clip_tiny/model.safetensors \
        --head tests/fixtures/clip_tiny/heads.safetensors -o /tmp/tiny.onnx
    python3 scripts/clip_reference/check_export.py /tmp/tiny.onnx [--fixture tests/fixtures/clip_tiny]
"""
import argparse
import os
import sys

import onnx


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--fixture", default="tests/fixtures/clip_tiny")
    args = ap.parse_args()
    # A path (not a loaded proto) lets the checker follow external data and models > 2 GB.
    onnx.checker.check_model(args.model, full_check=True)
    m = onnx.load(args.model, load_external_data=False)
    print(f"onnx.checker full_check: OK (onnx {onnx.__version__}, ir {m.ir_version}, "
          f"opset {[o.version for o in m.opset_import]}, {len(m.graph.node)} nodes, "
          f"{len(m.graph.initializer)} initializers)")
    try:
        import numpy as np
        import onnxruntime as ort
        from safetensors.numpy import load_file
    except ImportError as e:
        print(f"skipping the onnxruntime run ({e})")
        return 0
    ref = load_file(os.path.join(args.fixture, "reference.safetensors"))
    sess = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    logits, _ = sess.run(["logits", "features"], {"pixels": ref["pixels"]})
    err = np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max()
    print(f"onnxruntime {ort.__version__}: logits relative error vs transformers {err:.2e}")
    return 0 if err < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
