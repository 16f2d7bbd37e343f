"""Score every ONNX int8 candidate of an exported folder, as `effir export --int8` scores them, without stopping early.

    python benchmarks/int8_candidates.py EXPORTED_DIR SCRATCH_DIR [--calibration wiki]

EXPORTED_DIR is a folder written by `effir export MODEL --format onnx` (its onnx/model.onnx is quantised again). The
export's own code (`stages.export._onnx_int8`) runs with the pick level out of reach, so each candidate of the
ladder gets its distortion, mean and min cosine on record; the least distorted graph lands in SCRATCH_DIR with
`int8_scores.json`. The exported folder is not changed.
"""

import argparse
import json
from pathlib import Path

from effir.checkpoint import load
from effir.stages import export

ap = argparse.ArgumentParser()
ap.add_argument("exported")
ap.add_argument("scratch")
ap.add_argument("--calibration", default="wiki")
ap.add_argument("--calibration-samples", type=int, default=32)
a = ap.parse_args()
src, scratch = Path(a.exported), Path(a.scratch)
scratch.mkdir(parents=True, exist_ok=True)
encoder = load(str(src), device="cpu", dtype="fp32", padding_side="right")
encoder.model.eval()
args = argparse.Namespace(int8_method="auto", int8_max_distortion=-1.0, calibration=a.calibration,
                          calibration_samples=a.calibration_samples)
record = export._onnx_int8(encoder, src / "onnx" / "model.onnx", scratch / "model_qint8.onnx", args)
(scratch / "int8_scores.json").write_text(json.dumps(record, indent=1))
print(f"mean cosine between different documents: {record['document_spread']:.4f}")
for c in record["candidates"]:
    print(f"{c['method']}{export._mixed_label(c)}: distortion {c['distortion']:.4f}, mean cosine {c['mean_cosine']:.5f}, "
          f"min cosine {c['min_cosine']:.5f}, {c['seconds']:.0f} s")
