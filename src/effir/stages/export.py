"""Export a model for serving: an effir folder plus an ONNX or OpenVINO graph (fp32, and int8 with --int8).

    effir export MODEL --format onnx [--int8 [--int8-method auto|dynamic|mixed|blockwise]] --output DIR
    effir export MODEL --format openvino [--int8] [--calibration wiki] --output DIR

DIR is a complete effir model folder (weights, tokenizer, ``effir.json``, sentence-transformers files with the
``query`` / ``document`` prompts, pooling and Normalize) plus, in sentence-transformers' backend layout:

- ``onnx/model.onnx`` and, with --int8, ``onnx/model_qint8.onnx`` by one of ONNX Runtime's quantisers
  (:mod:`effir.onnx_int8`): with ``--int8-method auto`` (the default) the first of ``dynamic``, ``mixed``,
  ``blockwise`` (fastest first) whose distortion of the probe and calibration embeddings (:func:`_parity`) stays
  within ``--int8-max-distortion`` (default ``INT8_PICK_DISTORTION``); the method, every candidate's score and the
  int8 graph's speed against the fp32 one on this machine go to stdout and ``export.json`` (``int8_method``);
- ``openvino/openvino_model.xml`` and, with --int8, ``openvino/openvino_model_qint8_quantized.xml`` (NNCF static
  quantisation, calibrated on --calibration text encoded as queries and documents).

Every graph maps ``input_ids`` / ``attention_mask`` to ``last_hidden_state``; pooling, a sentence-transformers
Dense head (``2_Dense/``, ...: not in the graph, effir applies it), normalisation, prompts and EOS stay in the
folder's modules, so ``effir eval DIR --backend onnx [--quantize int8]`` and ``effir bench DIR
--backend onnx --baseline MODEL`` embed exactly as the torch model does. The export checks itself: probe queries and
documents are embedded by the torch model and by every written graph, and ``DIR/export.json`` (written last)
records the largest absolute difference and the cosine between them. Compressed models (``model_type: "effir"``)
export like any other: the graph is traced from the loaded torch modules, so no remote code is involved.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from .. import onnx_int8, serving
from ..calibration import load_texts
from ..checkpoint import load, save
from ..encoder import Encoder
from ..files import write_json
from ..refs import resolve
from ..utils import EffirError, check_output_dir, finite_float

FORMATS = ("onnx", "openvino")
PROBE_QUERIES = ["what causes scurvy?", "Vitamin C deficiency in sailors", "q"]
PROBE_DOCUMENTS = [
    {"title": "Scurvy", "text": "Scurvy is a disease resulting from a lack of vitamin C. Early symptoms include "
                                "weakness, feeling tired and sore arms and legs."},
    "The river is blue.",
    "Paris is the capital and most populous city of France, with an estimated population of two million residents.",
]
FP32_TOLERANCE = 1e-3  # largest |difference| of normalised embeddings the fp32 graphs may show (float32 reordering)
INT8_MIN_COSINE = 0.95
"""An int8 graph whose probe embeddings fall below this cosine to the torch model's is exported with a warning:
int8 costs a little everywhere, but a graph this far off is one whose quantiser the model defeats."""
INT8_PICK_DISTORTION = 0.002
"""``--int8-method auto`` takes the first ONNX int8 method whose distortion (:func:`_parity`: the embeddings' mean
angular error to the torch model's, as a fraction of how far apart the model puts unrelated documents) is at most
this (``--int8-max-distortion``). A bare cosine cannot serve: an embedder that packs every text into a narrow cone (a
decoder LLM's) loses rankings at an error an isotropic encoder shrugs off. What picks at several levels cost in
nDCG@10, and what they buy in speed, is measured in docs/results/serving-cpu.md."""
SCORING_TEXTS = 16  # calibration queries and documents, each, that int8 candidates are scored on (with the probes)
ONNX_CALIBRATION_BATCHES = 8  # --calibration batches that probe the ONNX MatMul inputs for massive activations
INT8_ADVICE = {
    "onnx": "no ONNX Runtime int8 method held this model (see int8_method in export.json): measure it (effir eval "
            "DIR --data BEIR --backend onnx --quantize int8, against --quantize none) before serving it, or serve "
            "the fp32 graph onnx/model.onnx",
    "openvino": "measure it (effir eval DIR --backend openvino --quantize int8) before serving it; more "
                "--calibration-samples, or text like the served one in --calibration, may help",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name (minilm-l6, smollm2-135m), model folder (compressed or not), .gguf "
                                 "or hub id")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx (ONNX Runtime) or openvino")
    p.add_argument("--int8", action="store_true",
                   help="also write the int8 graph (onnx: see --int8-method; openvino: NNCF static, calibrated)")
    p.add_argument("--int8-method", default="auto",
                   help=f"ONNX int8 quantiser: auto (default: the first of {', '.join(onnx_int8.METHODS)}, fastest "
                        "first, whose embedding distortion stays within --int8-max-distortion) or one of them; "
                        "OpenVINO int8 is always NNCF's")
    p.add_argument("--int8-max-distortion", type=finite_float, default=INT8_PICK_DISTORTION,
                   help="what --int8-method auto accepts: the int8 embeddings' mean 1 - cosine to torch as a fraction "
                        "of 1 - the mean cosine between different documents (default: %(default)s; larger trades "
                        "nDCG@10 for speed, see docs/results/serving-cpu.md)")
    p.add_argument("--output", required=True, help="folder for the exported model")
    p.add_argument("--calibration", default="wiki",
                   help="text for --int8 (OpenVINO's ranges; ONNX's massive-activation probes and method scores), "
                        "as for effir analyze: wiki, a .txt/.jsonl file or beir:DIR (default: wiki)")
    p.add_argument("--calibration-samples", type=int, default=32,
                   help="calibration batches of 4 texts for OpenVINO int8, half queries, half documents; ONNX int8 "
                        f"probes the first {ONNX_CALIBRATION_BATCHES} (default: 32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder in --output")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    out = Path(args.output)
    t0 = time.perf_counter()
    encoder = load(args.model, device="cpu", dtype="fp32", padding_side="right")
    (out / "export.json").unlink(missing_ok=True)  # a failed run must not leave an older record looking current
    save(encoder, out, {"stage": "export", "format": args.format, "int8": args.int8}, overwrite=args.overwrite)
    encoder.model.eval()  # the int8 pick and the checks compare graphs with this model's embeddings
    written, int8_method = _export(encoder, out, args)
    probes = _torch_reference(encoder, [("query", PROBE_QUERIES), ("document", PROBE_DOCUMENTS)])
    checks = {rel: _parity(encoder, out / rel, probes) for rel in written}
    report = {"model": args.model, "format": args.format, "int8": args.int8, "files": written, "checks": checks,
              "seconds": time.perf_counter() - t0, "torch": torch.__version__, "versions": _versions(args.format)}
    if int8_method:
        report["int8_method"] = int8_method
    write_json(out / "export.json", report)  # last: its presence means the export is complete
    for rel, c in checks.items():
        print(f"effir export: {rel}: {c['megabytes']:.1f} MB, embeddings vs torch: max |diff| "
              f"{c['max_abs_diff']:.2e}, min cosine {c['min_cosine']:.5f}")
    for rel, c in checks.items():
        if c["int8"] and c["min_cosine"] < INT8_MIN_COSINE:
            print(f"effir export: warning: {rel} embeds the probes at cosine {c['min_cosine']:.3f} to the torch "
                  f"model; {INT8_ADVICE[c['backend']]}", file=sys.stderr)
    bad = [rel for rel, c in checks.items() if not c["int8"] and c["max_abs_diff"] > FP32_TOLERANCE]
    if bad:
        raise EffirError(f"{', '.join(bad)} embed(s) differently from the torch model (max |diff| > "
                         f"{FP32_TOLERANCE}); see {out / 'export.json'}")
    print(f"effir export: wrote {out}")
    return 0


def _check_args(args) -> None:
    serving.require(args.format, f"--format {args.format}")
    if args.int8_method not in ("auto", *onnx_int8.METHODS):
        raise EffirError(f"--int8-method must be auto or one of {', '.join(onnx_int8.METHODS)}, got {args.int8_method!r}")
    if args.int8_method != "auto" and not args.int8:  # --format openvino --int8 takes it (a run's shared export:)
        raise EffirError(f"--int8-method {args.int8_method} chooses the ONNX int8 quantiser: add --int8")
    if not args.int8_max_distortion > 0:
        raise EffirError(f"--int8-max-distortion must be > 0, got {args.int8_max_distortion}")
    if args.calibration_samples < 1:
        raise EffirError(f"--calibration-samples must be >= 1, got {args.calibration_samples}")
    try:
        resolve(args.model)
    except EffirError as e:
        raise EffirError(f"MODEL: {e}") from None
    out = check_output_dir(args.output, siblings=True)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise EffirError(f"{out} already exists and is not empty; pass --overwrite or choose another --output")


def _export(encoder, out: Path, args) -> tuple[list[str], dict | None]:
    """Write the graphs; return their paths relative to ``out`` and the ONNX int8 choice (or ``None``)."""
    sample = encoder.tokenize(PROBE_DOCUMENTS + PROBE_QUERIES, "document")  # rows of different lengths
    files = []
    if args.format == "onnx":
        onnx_path = serving.export_onnx(encoder.model, sample, out / serving.SERVED_FILES[("onnx", False)])
        files.append(serving.SERVED_FILES[("onnx", False)])
        if not args.int8:
            return files, None
        choice = _onnx_int8(encoder, onnx_path, out / serving.SERVED_FILES[("onnx", True)], args)
        files.append(serving.SERVED_FILES[("onnx", True)])
        choice["speed_vs_fp32"] = _speed_vs_fp32(encoder, onnx_path, out / serving.SERVED_FILES[("onnx", True)], args)
        return files, choice
    with serving.scratch_dir() as tmp:
        onnx_path = serving.export_onnx(encoder.model, sample, Path(tmp) / "model.onnx")
        xml = serving.onnx_to_openvino(onnx_path, out / serving.SERVED_FILES[("openvino", False)])
    files.append(serving.SERVED_FILES[("openvino", False)])
    if args.int8:
        batches = _calibration_batches(encoder, args.calibration, args.calibration_samples)
        serving.quantize_openvino_int8(xml, out / serving.SERVED_FILES[("openvino", True)], batches)
        files.append(serving.SERVED_FILES[("openvino", True)])
    return files, None


def _calibration_sides(source: str) -> tuple[list[str], list[str]]:
    """The calibration queries and documents; a source with only one kind of text serves as both."""
    texts = load_texts(source)
    return texts.queries or texts.documents, texts.documents or texts.queries


def _calibration_batches(encoder, source: str, n: int, per_batch: int = 4) -> list[dict[str, torch.Tensor]]:
    sides = list(zip(("query", "document"), _calibration_sides(source), strict=True))
    batches = []
    for i in range(n):
        side, pool = sides[i % 2]
        start = (i // 2) * per_batch % max(1, len(pool))
        chunk = (pool[start:] + pool)[:per_batch]
        batches.append(encoder.tokenize(chunk, side))
    return batches


def _onnx_int8(encoder, src: Path, dst: Path, args) -> dict:
    """Write ``dst`` by the first candidate (:func:`_int8_candidates`) whose distortion (:func:`_parity`) on the
    probes plus calibration texts is within ``--int8-max-distortion``, else by the least distorted; return the
    record."""
    reference = _torch_reference(encoder, _scoring_texts(args.calibration))  # once for every candidate
    level = args.int8_max_distortion
    record = {"requested": args.int8_method, "pick_max_distortion": level,
              "document_spread": _document_spread(reference), "candidates": []}
    best = float("inf")
    with serving.scratch_dir() as tmp:
        for i, (method, ratio, nodes) in enumerate(_int8_candidates(encoder, src, args)):
            t0 = time.perf_counter()
            path = Path(tmp) / str(i) / dst.name
            path.parent.mkdir()
            serving.quantize_onnx_int8(src, path, method, nodes)
            parity = _parity(encoder, path, reference)
            c = {"method": method, **{k: parity[k] for k in ("distortion", "mean_cosine", "min_cosine")}}
            if method == "mixed":
                c.update(outlier_ratio=ratio, blockwise_matmuls=nodes)
            record["candidates"].append(dict(c, seconds=time.perf_counter() - t0))
            if c["distortion"] < best:
                best = c["distortion"]
                record.update(c)
                for p in path.parent.iterdir():  # the graph and, for large models, its external data
                    shutil.move(str(p), str(dst.parent / p.name))
            if best <= level:
                break
    tried = ", ".join(f"{c['method']}{_mixed_label(c)} {c['distortion']:.4f}" for c in record["candidates"])
    verdict = "forced" if args.int8_method != "auto" else (
        f"first <= {level:g}" if best <= level else f"none within {level:g}: the least")
    print(f"effir export: onnx int8 method: {record['method']}{_mixed_label(record)} ({verdict}; distortion: {tried})")
    return record


def _int8_candidates(encoder, src: Path, args):
    """Yield ``(method, outlier ratio, blockwise MatMuls)`` in preference order: ``dynamic``; ``mixed`` with the
    MatMuls over each of ``onnx_int8.OUTLIER_RATIOS`` in turn (fewest first, each set once); ``blockwise``."""
    for method in onnx_int8.METHODS if args.int8_method == "auto" else (args.int8_method,):
        if method != "mixed":
            yield method, None, []
            continue
        ratios, seen = _input_ratios(encoder, src, args), []
        for ratio in onnx_int8.OUTLIER_RATIOS:
            nodes = onnx_int8.outliers(ratios, ratio)
            if (nodes or args.int8_method == "mixed") and nodes not in seen:
                seen.append(nodes)
                yield method, ratio, nodes


def _speed_vs_fp32(encoder, fp32: Path, int8: Path, args, repeats: int = 3) -> dict[str, float]:
    """How many times faster the int8 graph embeds than the fp32 one on this machine: a batch of 16 calibration
    queries and one of 4 documents, median of ``repeats`` after a warm-up. On CPUs whose ``MatMulNBits`` kernels are
    slow, a graph that had to go blockwise can be slower than fp32: the export says so."""
    queries, documents = _calibration_sides(args.calibration)
    batches = {"query": encoder.tokenize(queries[:16], "query"), "document": encoder.tokenize(documents[:4], "document")}
    runners = {path: serving.OnnxRunner(path) for path in (fp32, int8)}
    speed = {}
    for side, batch in batches.items():
        feeds = {k: v.numpy().astype("int64") for k, v in batch.items()}
        median = {}
        for path, runner in runners.items():
            runner(feeds)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                runner(feeds)
                times.append(time.perf_counter() - t0)
            median[path] = sorted(times)[len(times) // 2]
        speed[side] = median[fp32] / median[int8]
    print(f"effir export: onnx int8 graph speed on this machine: {speed['query']:.2f}x the fp32 graph on queries, "
          f"{speed['document']:.2f}x on documents")
    slower = [{"query": "queries", "document": "documents"}[side] for side, ratio in speed.items() if ratio < 1]
    if slower:
        print(f"effir export: warning: the int8 graph is slower than the fp32 graph here on {' and '.join(slower)}; "
              "serve onnx/model.onnx, or allow more error (--int8-max-distortion) for a faster method", file=sys.stderr)
    return speed


def _mixed_label(c: dict) -> str:
    return f" (>{c['outlier_ratio']:g}x: {len(c['blockwise_matmuls'])} blockwise)" if c["method"] == "mixed" else ""


def _input_ratios(encoder, src: Path, args) -> dict[str, float]:
    """Each MatMul of ``src``: how massive its inputs' activations are on the first calibration batches."""
    batches = _calibration_batches(encoder, args.calibration, min(args.calibration_samples, ONNX_CALIBRATION_BATCHES))
    feeds = [{k: v.numpy().astype("int64") for k, v in b.items()} for b in batches]
    return onnx_int8.input_ratios(src, feeds)


def _scoring_texts(source: str, n: int = SCORING_TEXTS) -> list[tuple[str, list]]:
    """The probes plus ``n`` calibration queries and documents: what an int8 method is scored on."""
    queries, documents = _calibration_sides(source)
    return [("query", PROBE_QUERIES), ("document", PROBE_DOCUMENTS), ("query", queries[:n]), ("document", documents[:n])]


def _torch_reference(encoder, texts: list[tuple[str, list]]) -> list[tuple[str, dict, torch.Tensor]]:
    """Each ``(side, texts)`` tokenized, with the torch model's embeddings of it: what a graph is compared with."""
    reference = []
    for side, batch_texts in texts:
        batch = encoder.tokenize(batch_texts, side)
        with torch.inference_mode():
            reference.append((side, batch, encoder.embed(**batch)))
    return reference


def _parity(encoder, path: Path, reference: list[tuple[str, dict, torch.Tensor]]) -> dict:
    """Embed the batches of ``reference`` (:func:`_torch_reference`) with the graph at ``path`` and compare them with
    the torch model's embeddings of the same tokens.

    ``distortion``: the mean of ``1 - cosine`` between the graph's and the torch model's embeddings, over one minus the
    mean cosine between the torch model's embeddings of different documents. Rankings turn on how far apart texts
    lie, so an error counts against the distances the model itself keeps between unrelated texts."""
    backend = "onnx" if path.suffix == ".onnx" else "openvino"
    runner = serving.OnnxRunner(path) if backend == "onnx" else serving.OpenVinoRunner(path)
    served = Encoder(serving.ServedModel(runner, encoder.model.config), encoder.tokenizer, encoder.settings,
                     encoder.adapter, padding_side="right", head=encoder.head)
    diffs, cosines = [], []
    for _, batch, ref in reference:
        with torch.inference_mode():
            got = served.embed(**batch)
        diffs.append((got - ref).abs().max().item())
        cosines.append(torch.nn.functional.cosine_similarity(got, ref, dim=-1))
    cosines = torch.cat(cosines)
    error = 1 - cosines.mean().item()
    return {"backend": backend, "int8": "qint8" in path.name, "megabytes": serving.files_bytes(path) / 1e6,
            "max_abs_diff": max(diffs), "min_cosine": cosines.min().item(), "mean_cosine": 1 - error,
            "distortion": error / max(1 - _document_spread(reference), 1e-6)}


def _document_spread(reference: list[tuple[str, dict, torch.Tensor]]) -> float:
    """Mean cosine between the torch model's embeddings of different documents (1 when they all coincide)."""
    docs = torch.nn.functional.normalize(torch.cat([ref for side, _, ref in reference if side == "document"]), dim=-1)
    pairs = docs @ docs.T
    off_diagonal = ~torch.eye(len(docs), dtype=torch.bool)
    return pairs[off_diagonal].mean().item() if len(docs) > 1 else 0.0


def _versions(fmt: str) -> dict:
    import importlib.metadata as md

    names = ["onnx", "onnxruntime", "onnxscript"] if fmt == "onnx" else ["onnx", "onnxscript", "openvino", "nncf"]
    return {n: md.version(n) for n in names}
