"""Check that a saved model folder is what its effir.json says it is.

    effir verify DIR [--reference MODEL] [--skip CHECK]

Checks, one PASS / FAIL / SKIP line each (exit code 1 when any fails; an unreadable effir.json is a FAIL too):
- integrity: the safetensors files, the Dense head's included, are the ones the stage wrote (their sha256 as
  recorded in effir.json);
- reload: `effir.load(DIR)` rebuilds the structure in effir.json and loads the safetensors strictly;
- weights: no tensor of a dropped sub-layer (module or norm) is stored in the safetensors;
- parameters: the reloaded model's parameter counts equal the ones recorded in effir.json;
- reference: the reference model (default: the source model named in the folder's history) loaded in memory and
  given the same structure has the same parameter counts and embeds a few built-in queries and documents the same
  (max |diff| <= --atol, computed in fp32 from weights rounded to the folder's stored dtype: like with like).
  Skipped when a later stage changed weights or widths that the reference cannot reproduce by dropping alone (the
  integrity check covers those); pass --reference with the right weights then;
- transformers: `AutoModel.from_pretrained(DIR, trust_remote_code=True)` gives the same embeddings as effir.load.
  It runs the folder's modeling_effir.py only when that file is byte for byte the one this effir ships;
- sentence-transformers: `SentenceTransformer(DIR)` in a fresh Python process where effir cannot be imported gives,
  through `encode_query` / `encode_document`, the same embeddings as effir.load (max |diff| <= --atol). A
  compressed folder's own modeling file runs there only when it is the one effir ships.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..checkpoint import EFFIR_JSON, load, read_effir_json
from ..encoder import Encoder
from ..model_files import REMOTE_FILE, load_with_transformers, remote_code_is_packaged, weight_keys, weights_digest
from ..refs import resolve
from ..surgery import count_parameters, drop_sublayers, dropped_prefixes, structure_of
from ..utils import EffirError, check_device, finite_float, floating_dtype

QUERIES = ["what is the capital of france", "how do vaccines train the immune system",
           "does aspirin reduce the risk of heart attack", "why is the sky blue"]
DOCUMENTS = [{"title": "Paris", "text": "Paris is the capital and largest city of France, on the river Seine."},
             {"title": "Vaccine", "text": "A vaccine trains the immune system to recognise a virus without disease."},
             "Low-dose aspirin lowers the risk of a first heart attack in some patients, with a bleeding risk.",
             "Sunlight is scattered by air molecules; blue light is scattered more than red light."]


SKIPPABLE = ("reference", "transformers", "sentence-transformers")
"""The checks ``--skip`` can leave out: each loads the model once more (the others read files or the loaded model)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="DIR", help="model folder written by an effir stage (e.g. DIR/model of effir drop)")
    p.add_argument("--reference", default=None,
                   help="model to rebuild and compare against (default: the source model in DIR's history)")
    p.add_argument("--atol", type=finite_float, default=1e-5, help="max |embedding difference| allowed (default: 1e-5)")
    p.add_argument("--device", default="cpu", help="device for the comparisons (default: cpu)")
    p.add_argument("--skip", action="append", default=[], choices=SKIPPABLE, metavar="CHECK",
                   help=f"skip a check that loads the model again ({', '.join(SKIPPABLE)}); repeatable. "
                        "sentence-transformers starts a Python process of its own")


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    folder = Path(args.model_dir)
    if not (folder / "config.json").is_file():
        resolve(folder)  # says what a query-side folder is and which route to verify
        raise EffirError(f"{folder} is not a model folder (no config.json)")
    if not (folder / EFFIR_JSON).exists():
        raise EffirError(f"{folder} has no effir.json; it was not written by effir, nothing to verify")
    try:
        meta = read_effir_json(folder)
    except EffirError as e:  # a damaged description is what verify exists to find: a failed check, not bad input
        return _report([("FAIL", "effir.json", str(e))])
    lines: list[tuple[str, str, str]] = [_check_integrity(folder, meta)]
    try:
        encoder = load(folder, device=args.device, dtype="fp32")
    except EffirError as e:
        lines.append(("FAIL", "reload", str(e)))
        return _report(lines)
    structure = structure_of(encoder.model, encoder.adapter)
    lines.append(_check_reload(meta, structure))
    lines.append(_check_weights(folder, encoder, structure))
    lines.append(_check_parameters(meta, encoder))
    want = _embeddings(encoder)
    checks = {"reference": lambda: _check_reference(args, meta, encoder, structure, want),
              "transformers": lambda: _check_transformers(folder, meta, encoder, want, args),
              "sentence-transformers": lambda: _check_sentence_transformers(folder, meta, want, args)}
    for name, check in checks.items():
        lines.append(("SKIP", name, "skipped (--skip)") if name in args.skip else check())
    return _report(lines)


def _report(lines) -> int:
    for status, name, detail in lines:
        print(f"{status:<5}{name}: {detail}")
    failed = sum(status == "FAIL" for status, _, _ in lines)
    print(f"verify: {'FAIL' if failed else 'PASS'} ({failed} of {len(lines)} checks failed)" if failed
          else f"verify: PASS ({sum(s == 'PASS' for s, _, _ in lines)} passed, "
               f"{sum(s == 'SKIP' for s, _, _ in lines)} skipped)")
    return 1 if failed else 0


def _describe(structure: dict) -> str:
    widths = [w for w in structure["mlp_widths"] if w is not None]
    return (f"{structure['num_layers']} layers, attention dropped {structure['dropped_attention']}, "
            f"MLP dropped {structure['dropped_mlp']}, MLP widths {min(widths, default=0)}..{max(widths, default=0)}")


def _check_integrity(folder: Path, meta: dict):
    recorded = meta.get("weights_sha256")
    if not recorded:
        return "SKIP", "integrity", "effir.json records no weights hash (saved by an older effir)"
    try:
        found = weights_digest(folder, (meta.get("embedding") or {}).get("head", []))
    except EffirError as e:
        return "FAIL", "integrity", str(e)
    unhashed = sorted(set(found) - set(recorded))
    if unhashed and all("/" in k for k in unhashed):  # a Dense head saved before effir hashed heads
        found = {k: v for k, v in found.items() if k not in unhashed}
        if found == recorded:
            return "PASS", "integrity", (f"{len(found)} weight file(s) match the sha256 recorded at save time; "
                                         f"{', '.join(unhashed)} not covered (saved by an older effir without their "
                                         "hash: re-save the folder with effir to cover them)")
    if found != recorded:
        changed = sorted(set(found) ^ set(recorded) | {k for k in found if recorded.get(k) != found[k]})
        return "FAIL", "integrity", (f"{', '.join(changed)} differ(s) from what the stage wrote (sha256 in "
                                     "effir.json): the weights were replaced or damaged")
    return "PASS", "integrity", f"{len(found)} weight file(s) match the sha256 recorded at save time"


def _check_reload(meta: dict, structure: dict):
    recorded = meta.get("structure")
    if recorded is not None and recorded != structure:
        return "FAIL", "reload", f"effir.json says {_describe(recorded)} but the reloaded model has {_describe(structure)}"
    return "PASS", "reload", f"effir.load rebuilt {_describe(structure)}"


def _check_weights(folder: Path, encoder: Encoder, structure: dict):
    prefixes = tuple(dropped_prefixes(encoder.adapter, structure))
    keys = weight_keys(folder)
    leaked = [k for k in keys if k.startswith(prefixes)]
    if leaked:
        return "FAIL", "weights", f"{len(leaked)} tensors of dropped sub-layers are stored, e.g. {leaked[0]}"
    return "PASS", "weights", f"{len(keys)} tensors stored, none of the {len(prefixes)} dropped modules/norms"


def _check_parameters(meta: dict, encoder: Encoder):
    counted = count_parameters(encoder.model, encoder.adapter)
    recorded = meta.get("parameters")
    if recorded != counted:
        return "FAIL", "parameters", f"effir.json records {recorded}, the reloaded model has {counted}"
    return "PASS", "parameters", (f"{counted['total']:,} total, {counted['without_embeddings']:,} without "
                                  "embeddings, as recorded in effir.json")


def _embeddings(encoder: Encoder) -> torch.Tensor:
    return torch.cat([encoder.encode(QUERIES, "query"), encoder.encode(DOCUMENTS, "document")])  # (8, H)


def _check_reference(args, meta: dict, encoder: Encoder, structure: dict, want: torch.Tensor):
    history = meta.get("history") or []
    ref = args.reference
    if ref is None:
        if not history or not history[0].get("model"):
            return "SKIP", "reference", "effir.json names no source model; pass --reference MODEL"
        changed = sorted({h.get("stage", "?") for h in history if h.get("stage") != "drop"})
        if changed:
            return "SKIP", "reference", (f"stage(s) {', '.join(changed)} changed the weights after "
                                         f"{history[0]['model']}; pass --reference MODEL with the same weights")
        ref = history[0]["model"]
    reference = load(ref, device=args.device, dtype="fp32")
    _round_weights(reference.model, floating_dtype(encoder.meta["stored_dtype"]))
    have = structure_of(reference.model, reference.adapter)
    extra = [(g, i) for g in ("attention", "mlp") for i in have[f"dropped_{g}"] if i not in structure[f"dropped_{g}"]]
    if have["num_layers"] != structure["num_layers"] or extra:
        return "FAIL", "reference", f"{ref} does not have the same base structure ({_describe(have)})"
    if structure.get("mlp_maps"):
        return "SKIP", "reference", ("its dropped MLPs are replaced by maps fitted on calibration text, which cannot "
                                     f"be replayed from {ref}; pass --reference with a model of the same weights")
    drop_sublayers(reference.model, reference.adapter, structure["dropped_attention"], structure["dropped_mlp"])
    rebuilt = structure_of(reference.model, reference.adapter)
    if rebuilt["mlp_widths"] != structure["mlp_widths"]:
        return "SKIP", "reference", (f"MLP widths differ from {ref}'s (width pruning cannot be replayed from the "
                                     "reference); pass --reference with the pruned model")
    if count_parameters(reference.model, reference.adapter) != count_parameters(encoder.model, encoder.adapter):
        return "FAIL", "reference", f"{ref} with this structure has a different parameter count"
    reference.settings = encoder.settings  # embed exactly as the folder does
    diff = (_embeddings(reference) - want).abs().max().item()
    status = "PASS" if diff <= args.atol else "FAIL"
    return status, "reference", (f"{ref} with the same structure: max |embedding diff| {diff:.2e} "
                                 f"({'<=' if status == 'PASS' else '>'} {args.atol:g}) over {len(want)} texts")


def _round_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round the weights (not buffers such as rotary frequencies, which loading recomputes) to the dtype the folder
    stores, keeping fp32: the reference then holds what the folder holds and both compute alike."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())


def _check_transformers(folder: Path, meta: dict, encoder: Encoder, want: torch.Tensor, args):
    if not meta.get("structure"):
        return "SKIP", "transformers", "not structurally compressed; a plain AutoModel.from_pretrained folder"
    if not remote_code_is_packaged(folder):
        return "FAIL", "transformers", (f"{folder / REMOTE_FILE} is not the file this effir ships (changed, or saved "
                                        "by another version); not run. Review it, or re-save the folder with "
                                        "this effir (effir.load, then effir.checkpoint.save)")
    try:
        model = load_with_transformers(folder, torch.float32).to(args.device)
    except Exception as e:  # any failure of the remote-code path is a failed check, reported in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return "FAIL", "transformers", f"AutoModel.from_pretrained(trust_remote_code=True) failed: {first}"
    plain = Encoder(model, encoder.tokenizer, encoder.settings, encoder.adapter, head=encoder.head)
    diff = (_embeddings(plain) - want).abs().max().item()
    status = "PASS" if diff <= args.atol else "FAIL"
    return status, "transformers", (f"AutoModel.from_pretrained(DIR, trust_remote_code=True) -> "
                                    f"{type(model).__name__}: max |embedding diff| {diff:.2e} vs effir.load")


ST_SCRIPT = """
import json, sys
sys.modules["effir"] = None  # the folder must embed without effir: any import of it fails
from sentence_transformers import SentenceTransformer
folder, remote, device, texts, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
# fp32 as effir.load(DIR) is compared here, whatever dtype the weights are stored in: like with like
model = SentenceTransformer(folder, device=device, trust_remote_code=remote, model_kwargs={"dtype": "float32"})
query = model.encode_query(texts["query"], convert_to_tensor=True).float().cpu().tolist()
document = model.encode_document(texts["document"], convert_to_tensor=True).float().cpu().tolist()
json.dump(query + document, open(out, "w"))
"""


def _check_sentence_transformers(folder: Path, meta: dict, want: torch.Tensor, args):
    """``SentenceTransformer(DIR)`` in a process without effir embeds :data:`QUERIES` / :data:`DOCUMENTS` as effir."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from ..encoder import document_text

    export = meta.get("sentence_transformers") or {}
    if not export.get("exported", (folder / "modules.json").is_file()):
        return "SKIP", "sentence-transformers", f"no sentence-transformers files: {export.get('reason', '?')}"
    remote = bool(meta.get("structure"))
    if remote and not remote_code_is_packaged(folder):
        return "FAIL", "sentence-transformers", f"{REMOTE_FILE} is not the file this effir ships; not run"
    texts = {"query": QUERIES, "document": [document_text(d) for d in DOCUMENTS]}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "embeddings.json"
        env = {**os.environ, "PYTHONPATH": "", "HF_MODULES_CACHE": str(Path(tmp) / "modules")}
        proc = subprocess.run([sys.executable, "-I", "-c", ST_SCRIPT, str(folder.resolve()), str(int(remote)),
                               args.device, json.dumps(texts), str(out)], cwd=tmp, env=env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=600)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return "FAIL", "sentence-transformers", f"SentenceTransformer(DIR) failed: {last}"
        got = torch.tensor(json.loads(out.read_text()))
    diff = (got - want).abs().max().item()
    status = "PASS" if diff <= args.atol else "FAIL"
    return status, "sentence-transformers", (f"SentenceTransformer(DIR{', trust_remote_code=True' if remote else ''})"
                                             f" encode_query / encode_document: max |embedding diff| {diff:.2e} vs "
                                             "effir.load")
