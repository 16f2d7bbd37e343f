"""Query-side folders: one model folder whose queries are embedded by a compressed model and whose documents by the
parent retriever, so an index the parent built stays valid.

    DIR/effir.json        {"format": 1, "routes": {"query": "query", "document": "document"}, ...}
    DIR/query/            an effir model folder (the compressed query encoder)
    DIR/document/         an effir model folder (the parent, as it embeds documents)
    DIR/modules.json      sentence-transformers: one Router module (query route -> query/, document route -> document/)
    DIR/router_config.json, DIR/config_sentence_transformers.json

:func:`effir.load` returns such a folder as an :class:`~effir.encoder.AsymmetricEncoder`;
``SentenceTransformer(DIR, trust_remote_code=True)`` loads it without effir as a ``Router`` whose ``encode_query`` /
``encode_document`` route as effir does (plain ``encode`` takes the document route). A compressed route's
``modeling_effir.py`` is also copied to DIR itself: transformers looks for remote code at the top of the folder it
was given, not in the route's subfolder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .checkpoint import EFFIR_JSON, FORMAT_VERSION, read_effir_json
from .checkpoint import load as load_one
from .checkpoint import save as save_one
from .encoder import SIDES, AsymmetricEncoder, Encoder
from .files import atomic_path
from .model_files import REMOTE_FILE
from .refs import ROUTES_KEY, query_side_routes
from .utils import EffirError

ROUTER_TYPE = "sentence_transformers.base.modules.router.Router"


def load(ref, **options) -> Encoder | AsymmetricEncoder:
    """:func:`effir.checkpoint.load` for one model; for a query-side folder, both routes as an
    :class:`AsymmetricEncoder`. Query options (``query_prompt``, ``task``, ``prompt_name``, ``query_max_length``)
    reach the query route, document ones (``document_prompt``, ``document_max_length``) the document route."""
    routes = query_side_routes(Path(str(ref)).expanduser()) if ref is not None else None
    if not routes:
        return load_one(ref, **options)
    folder = Path(str(ref)).expanduser()
    query_only = {"query_prompt", "task", "prompt_name", "query_max_length"}
    document_only = {"document_prompt", "document_max_length"}
    encoders = {side: load_one(folder / routes[side], **{k: v for k, v in options.items()
                                                        if k not in (document_only if side == "query" else query_only)})
                for side in SIDES}
    meta = {**read_effir_json(folder), "reference": str(ref), "path": str(folder)}
    return AsymmetricEncoder(encoders["query"], encoders["document"], meta)


def save(query: Encoder, document: Encoder, out: str | os.PathLike, stage: dict | None = None,
         overwrite: bool = False) -> Path:
    """Write ``query`` and ``document`` as one query-side folder (module docstring), atomically.

    Raises:
        EffirError: the two embed in different spaces, or ``out`` holds something and ``overwrite`` is false.
    """
    AsymmetricEncoder(query, document)  # the same checks as at load time, before anything is written
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EffirError(f"{out} already exists and is not empty; pass --overwrite or choose another --output")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for side, encoder in (("query", query), ("document", document)):
            save_one(encoder, tmp / side, stage=stage if side == "query" else None)
        exported = _write_router_files(tmp)
        if not exported["exported"]:
            print(f"effir: WARNING: {out} gets no sentence-transformers files: {exported['reason']}", file=sys.stderr)
        meta = {"format": FORMAT_VERSION, ROUTES_KEY: {side: side for side in SIDES},
                "parameters": {side: read_effir_json(tmp / side)["parameters"] for side in SIDES},
                "history": read_effir_json(tmp / "query").get("history", []), "sentence_transformers": exported}
        (tmp / EFFIR_JSON).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the folder complete
    return out


def _write_router_files(folder: Path) -> dict:
    """The sentence-transformers Router over the two route folders, made of the modules each route lists."""
    types, structure, config = {}, {}, {}
    for side in SIDES:
        modules = folder / side / "modules.json"
        if not modules.is_file():
            reason = read_effir_json(folder / side).get("sentence_transformers", {}).get("reason", "no modules.json")
            return {"exported": False, "reason": f"the {side} route has no sentence-transformers files ({reason})"}
        structure[side] = []
        for module in json.loads(modules.read_text()):
            key = side if not module["path"] else f"{side}/{module['path']}"
            types[key] = module["type"]
            structure[side].append(key)
        config[side] = json.loads((folder / side / "config_sentence_transformers.json").read_text())
        if (folder / side / REMOTE_FILE).is_file():
            shutil.copyfile(folder / side / REMOTE_FILE, folder / REMOTE_FILE)
    router = {"types": types, "structure": structure,
              "parameters": {"default_route": "document", "allow_empty_key": True, "route_mappings": {}}}
    (folder / "router_config.json").write_text(json.dumps(router, indent=2) + "\n")
    (folder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": ROUTER_TYPE}],
                                                    indent=2) + "\n")
    # one set of prompts for the whole model: the query route's, with the document route's document prompt
    prompts = {**config["query"].get("prompts", {}),
               **{k: v for k, v in config["document"].get("prompts", {}).items() if k in ("document", "passage")}}
    top = {**config["document"], "prompts": prompts}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(top, indent=2) + "\n")
    return {"exported": True}
