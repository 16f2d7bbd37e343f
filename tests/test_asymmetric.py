"""Query-side folders (effir.asymmetric): queries through a compressed model, documents through the parent, bitwise
as the parent embeds them; sentence-transformers loads the folder as a Router without effir; effir eval reuses the
parent's cached corpus embeddings; commands that take one model say which route to pass."""

import json
import textwrap

import pytest
import torch
from st_replicas import build_replica, run_without_effir

import effir
from effir import asymmetric
from effir.checkpoint import fingerprint
from effir.cli import main
from effir.encoder import AsymmetricEncoder

TEXTS = ["what is the capital of france", "fish", "the river in the city is blue water and a fish is in it"]


def _slimmed(src, out):
    assert main(["slim", str(src), "--method", "magnitude", "--ratio", "0.5", "--width-multiple", "8",
                 "--no-progress", "--output", str(out), "--device", "cpu", "--dtype", "fp32"]) == 0
    return out / "model"


def _query_side(parent, tmp_path, name="asym"):
    student = _slimmed(parent, tmp_path / f"{name}-slim")
    q = effir.load(student, device="cpu", dtype="source")
    p = effir.load(parent, device="cpu", dtype="source")
    return asymmetric.save(q, p, tmp_path / name, stage={"stage": "test"}), student


def test_documents_are_the_parents_bitwise_and_queries_the_students(tiny_llama_dir, tmp_path):
    folder, student = _query_side(tiny_llama_dir, tmp_path)
    enc = effir.load(folder, device="cpu", dtype="fp32")
    parent = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    query = effir.load(student, device="cpu", dtype="fp32")
    assert isinstance(enc, AsymmetricEncoder)
    assert torch.equal(enc.encode_documents(TEXTS), parent.encode_documents(TEXTS))
    assert torch.equal(enc.encode(TEXTS, "document"), parent.encode_documents(TEXTS))
    assert torch.equal(enc.encode_queries(TEXTS), query.encode_queries(TEXTS))
    assert not torch.allclose(enc.encode_queries(TEXTS), parent.encode_queries(TEXTS), atol=1e-3)  # really compressed
    # the corpus cache key is the parent's; the model's own identity is not
    assert fingerprint(enc, documents_only=True) == fingerprint(parent, documents_only=True)
    assert fingerprint(enc) not in (fingerprint(parent), fingerprint(query))
    meta = json.loads((folder / "effir.json").read_text())
    assert meta["routes"] == {"query": "query", "document": "document"}
    assert meta["parameters"]["query"]["without_embeddings"] < meta["parameters"]["document"]["without_embeddings"]


def test_route_options_reach_their_own_side(tiny_llama_dir, tmp_path):
    folder, _ = _query_side(tiny_llama_dir, tmp_path)
    enc = effir.load(folder, device="cpu", dtype="fp32", query_prompt="e5", document_max_length=64,
                     query_max_length=16)
    assert enc.route("query").settings.query_template.startswith("Instruct: ")
    assert enc.route("document").settings.query_template == effir.load(tiny_llama_dir).settings.query_template
    assert (enc.settings.query_max_length, enc.settings.document_max_length) == (16, 64)
    assert enc.route("query").settings.document_max_length != 64


def test_routes_that_embed_in_different_spaces_are_refused(tiny_llama_dir, tmp_path):
    query, document = (effir.load(tiny_llama_dir, device="cpu") for _ in range(2))
    document.model.config.hidden_size += 8  # as a parent of another width would report
    with pytest.raises(effir.EffirError, match="dimensions"):
        asymmetric.save(query, document, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", ["drop", "slim", "analyze", "distill"])
def test_commands_that_take_one_model_name_the_routes(tiny_llama_dir, tmp_path, capsys, verb):
    folder, _ = _query_side(tiny_llama_dir, tmp_path)
    args = {"drop": ["--strategy", "last", "--mlp", "1"], "slim": ["--method", "magnitude"],
            "analyze": ["--calibration", "wiki"], "distill": ["--teacher", str(tiny_llama_dir), "--texts", "wiki"]}
    capsys.readouterr()
    assert main([verb, str(folder), *args[verb], "--output", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "query-side folder" in err and str(folder / "query") in err, err


def test_effir_eval_reuses_the_parents_corpus_embeddings(tiny_llama_dir, tiny_beir, tmp_path, encoded):
    folder, _ = _query_side(tiny_llama_dir, tmp_path)
    common = ["--data", str(tiny_beir), "--device", "cpu", "--dtype", "fp32"]
    assert main(["eval", str(tiny_llama_dir), *common, "--output", str(tmp_path / "parent")]) == 0
    documents = encoded["document"]
    assert main(["eval", str(folder), *common, "--output", str(tmp_path / "asym")]) == 0
    assert encoded["document"] == documents  # not one document encoded again
    cached = json.loads((tmp_path / "asym" / "results.json").read_text())
    assert cached["corpus_cached"]
    assert main(["eval", str(folder), *common, "--no-cache", "--output", str(tmp_path / "fresh")]) == 0
    fresh = json.loads((tmp_path / "fresh" / "results.json").read_text())
    assert fresh["metrics"] == cached["metrics"] and not fresh["corpus_cached"]
    assert (tmp_path / "asym" / "run.trec").read_text() == (tmp_path / "fresh" / "run.trec").read_text()


ROUTER_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["effir"] = None  # effir is pip-installed (editable) in this venv: make any import of it fail
    from sentence_transformers import SentenceTransformer

    job = json.load(open(sys.argv[1]))
    model = SentenceTransformer(job["dir"], device="cpu", trust_remote_code=True)
    out = {"query": model.encode_query(job["texts"], convert_to_tensor=True).tolist(),
           "document": model.encode_document(job["texts"], convert_to_tensor=True).tolist(),
           "plain": model.encode(job["texts"], convert_to_tensor=True).tolist(),
           "router": type(model[0]).__name__}
    try:
        SentenceTransformer(job["dir"], device="cpu")
        out["refusal"] = None
    except Exception as e:
        out["refusal"] = str(e).strip().splitlines()[0]
    json.dump(out, open(sys.argv[2], "w"))
""")


@pytest.mark.parametrize("name", ["qwen3-embedding", "bge"])
def test_sentence_transformers_loads_the_folder_as_a_router_without_effir(tmp_path, name):
    parent = build_replica(name, tmp_path / name)
    folder, _ = _query_side(parent, tmp_path)
    enc = effir.load(folder, device="cpu", dtype="fp32")
    got = run_without_effir(ROUTER_SCRIPT, tmp_path, {"dir": str(folder), "texts": TEXTS})
    assert got["router"] == "Router"
    assert (torch.tensor(got["query"]) - enc.encode_queries(TEXTS)).abs().max() <= 1e-5
    assert (torch.tensor(got["document"]) - enc.encode_documents(TEXTS)).abs().max() <= 1e-5
    assert (torch.tensor(got["plain"]) - enc.encode_documents(TEXTS)).abs().max() <= 1e-5  # plain encode: documents
    assert (torch.tensor(got["query"]) - torch.tensor(got["document"])).abs().max() > 1e-3  # two different models
    assert got["refusal"] and "custom code" in got["refusal"]  # the compressed route needs trust_remote_code


@pytest.mark.parametrize("verb", ["eval", "bench"])
def test_a_query_side_folder_is_not_served_as_one_graph(tiny_llama_dir, tiny_beir, tmp_path, capsys, verb):
    pytest.importorskip("onnxruntime")
    folder, _ = _query_side(tiny_llama_dir, tmp_path)
    data = ["--data", str(tiny_beir)] if verb == "eval" else []
    capsys.readouterr()
    assert main([verb, str(folder), *data, "--backend", "onnx", "--output", str(tmp_path / "out"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "query-side folder" in err and "serve one model" in err, err
    assert not (tmp_path / "out" / ("results.json" if verb == "eval" else "bench.json")).exists()
