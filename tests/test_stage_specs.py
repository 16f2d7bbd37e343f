"""The stage table (effir.stage_specs) against the stages themselves, and the report reading the steps' fields."""

import json
from pathlib import Path

import pytest

from effir.report import _collect
from effir.run_plan import Step
from effir.stage_specs import SPECS
from effir.stages import verb_parser


@pytest.mark.parametrize("verb", SPECS)
def test_what_effir_run_wires_is_an_option_of_the_stage(verb):
    spec = SPECS[verb]
    flags = verb_parser(verb).flags()
    assert {"--" + key.replace("_", "-") for key in spec.wired} <= flags
    if spec.done_file:  # a stage that resumes by itself is restarted with --overwrite when its options change
        assert "--overwrite" in flags


def test_the_report_reads_the_steps_fields_not_their_names(tmp_path: Path):
    """Names the report cannot parse: the labels, data sets and quantisations come from the fields alone."""
    for folder, ndcg in (("a", 0.5), ("b", 0.25)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps({"metrics": {"nDCG@10": ndcg}}))
    steps = [Step("e1", "eval", [], tmp_path / "a", "v1", family="drop_mlp", count=3, dataset="scifact"),
             Step("e2", "eval", [], tmp_path / "b", "v1", family="drop_mlp", count=3, dataset="scifact",
                  quantized="onnx-int8"),
             Step("p", "prune", [], tmp_path / "c", "v2", family="sparsegpt_2_4", order="ft_prune")]
    variants = _collect(steps)
    assert variants["v1"]["label"] == "Drop-3M" and variants["v1"]["ndcg10"] == {"scifact": 0.5}
    assert variants["v1"]["quantized"]["onnx-int8"]["ndcg10"] == {"scifact": 0.25}
    assert variants["v2"]["label"] == "SparseGPT 2:4: the fine-tuned full model, pruned"
    assert variants["v2"]["sparsity"] == "2:4"
