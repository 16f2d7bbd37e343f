"""Each verb of the ``effir`` command declared once: its module and help line, and what ``effir run`` must know to run
it as a stage. Every list that depends on a stage derives from :data:`SPECS`: the verb table
(:data:`effir.stages.VERBS`), the config keys a stage section may not set (:data:`effir.config.WIRED`), the stages run
under a launcher and the completion files (:class:`effir.run_plan.Step`). Whether a stage takes ``--overwrite`` is
read from its own parser (:func:`effir.stages.takes_overwrite`).

This table is a leaf that imports nothing, not an attribute of each stage module: :mod:`effir.config` and
:mod:`effir.run_plan` read it, and importing a stage module imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageSpec:
    """One verb: where it lives and how ``effir run`` runs it."""

    module: str
    """The module behind the verb: ``add_arguments(parser)`` and ``run(args)``."""
    help: str
    """Its line in ``effir -h``."""
    wired: dict[str, str | None] = field(default_factory=dict)
    """Options ``effir run`` sets itself besides the positional MODEL, each with the placeholder that stands for it when
    a config section is checked alone (None: not required, left out); a config section may not set them."""
    done_file: str | None = None
    """Completion file of a stage that resumes by itself: ``effir run`` lets an unfinished run continue from its
    checkpoints (no ``--overwrite``) as long as its options and upstream are unchanged."""
    launched: bool = False
    """Runs under the config's ``launcher`` (several processes) instead of as one process."""
    alone: bool = False
    """Runs in a process of its own even without a launcher: what earlier stages left in memory must not enter its
    timings."""

    def wired_keys(self) -> set[str]:
        """Config keys of this stage's section that ``effir run`` sets: the model, ``overwrite`` and :attr:`wired`."""
        return {"model", "overwrite", *self.wired}

    def placeholder_argv(self) -> list[str]:
        """The arguments the stage requires and ``effir run`` supplies, as placeholders: ``MODEL --output OUT ...``."""
        return ["MODEL", *(a for key, value in self.wired.items() if value is not None
                           for a in ("--" + key.replace("_", "-"), value))]


OUTPUT = {"output": "OUT"}
SPECS: dict[str, StageSpec] = {
    "analyze": StageSpec("effir.stages.analyze", "score every attention/MLP sub-layer and block: 1 - cos(in, out) -> "
                         "scores.json + heatmap", OUTPUT),
    "drop": StageSpec("effir.stages.drop", "drop the least important attention/MLP sub-layers or blocks -> compressed "
                      "model", {"scores": None, **OUTPUT}),
    "slim": StageSpec("effir.stages.slim", "width reduction: learn MLP neuron gates, cut the weakest fraction globally, "
                      "slice", {"train": None, **OUTPUT}, done_file="slim.json", launched=True),
    "finetune": StageSpec("effir.stages.finetune", "retrieval fine-tuning: InfoNCE + hard negatives (+ KL to a "
                          "teacher), LoRA or full", {"train": "DATA", **OUTPUT, "teacher": None},
                          done_file="finetune.json", launched=True),
    "distill": StageSpec("effir.stages.distill", "recover a compressed model from its parent on unlabelled text "
                         "(embedding + similarity distillation, LoRA or full)",
                         {"teacher": "PARENT", **OUTPUT, "query_side": None}, done_file="distill.json", launched=True),
    "eval": StageSpec("effir.stages.evaluate", "evaluate a model on a BEIR folder: nDCG@10, R@100, RR@10 + a TREC run",
                      {"data": "DATA", **OUTPUT}, launched=True),
    "bench": StageSpec("effir.stages.bench", "time query/document encoding against a baseline, beside the "
                       "FLOPs-predicted speed-up", {"baseline": None, **OUTPUT}, alone=True),
    "export": StageSpec("effir.stages.export", "export a model for serving: ONNX or OpenVINO graph (fp32, + int8 with "
                        "--int8) beside its sentence-transformers files", {"format": "onnx", "int8": None, **OUTPUT}),
    "compress": StageSpec("effir.stages.compress", "compress a retriever you own to a parameter budget in one command: "
                          "plan, cut, distil from itself, verify, bench"),
    "run": StageSpec("effir.stages.run", "the whole pipeline from one YAML config, resumable, ending in a report"),
    "demo": StageSpec("effir.stages.run", "the whole pipeline on smollm2-135m and built-in Wikipedia data (= effir run "
                      "demo)"),
    "prune": StageSpec("effir.stages.prune", "the paper's 2:4 baselines: Wanda or SparseGPT semi-structured pruning of "
                       "every attention/MLP projection (no memory or speed gained without sparse kernels)",
                       {"method": "wanda", "pattern": None, **OUTPUT}),
    "verify": StageSpec("effir.stages.verify", "check a compressed model folder: reloads, weights, parameter counts, "
                        "embeddings"),
}
"""verb -> its declaration, in the order of ``effir -h`` (the pipeline's order first)."""
