"""The verbs of the ``effir`` command: one module per verb, each with ``add_arguments(parser)`` and
``run(args) -> int | None``.

This package is the table of verbs and the way to parse and run one; :mod:`effir.cli` builds the command from it,
and ``effir run`` runs stages through it. Bad input raises :class:`~effir.utils.EffirError`, which
:func:`run_verb` prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from ..utils import EffirError

# verb -> (stage module, one-line help). Order is the pipeline's order.
VERBS: dict[str, tuple[str, str]] = {
    "analyze": ("effir.stages.analyze", "score every attention/MLP sub-layer and block: 1 - cos(in, out) -> scores.json + heatmap"),
    "drop": ("effir.stages.drop", "drop the least important attention/MLP sub-layers or blocks -> compressed model"),
    "slim": ("effir.stages.slim", "width reduction: learn MLP neuron gates, cut the weakest fraction globally, slice"),
    "finetune": ("effir.stages.finetune", "retrieval fine-tuning: InfoNCE + hard negatives (+ KL to a teacher), LoRA or full"),
    "distill": ("effir.stages.distill", "recover a compressed model from its parent on unlabelled text (embedding + "
                "similarity distillation, LoRA or full)"),
    "eval": ("effir.stages.evaluate", "evaluate a model on a BEIR folder: nDCG@10, R@100, RR@10 + a TREC run"),
    "bench": ("effir.stages.bench", "time query/document encoding against a baseline, beside the FLOPs-predicted speed-up"),
    "export": ("effir.stages.export", "export a model for serving: ONNX or OpenVINO graph (fp32, + int8 with --int8) "
               "beside its sentence-transformers files"),
    "run": ("effir.stages.run", "the whole pipeline from one YAML config, resumable, ending in a report"),
    "demo": ("effir.stages.run", "the whole pipeline on smollm2-135m and built-in Wikipedia data (= effir run demo)"),
    "prune": ("effir.stages.prune", "the paper's 2:4 baselines: Wanda or SparseGPT semi-structured pruning of every "
              "attention/MLP projection (no memory or speed gained without sparse kernels)"),
    "verify": ("effir.stages.verify", "check a compressed model folder: reloads, weights, parameter counts, embeddings"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (plus exit code 2) instead of the usage block; ``options`` lists the
    actions added to it or to its argument groups, in order."""

    def __init__(self, *args, **kwargs):
        self.options: list[argparse.Action] = []  # before argparse adds -h
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.options.append(action)
        return action

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument

        def add_and_record(*a, **kw) -> argparse.Action:
            action = add(*a, **kw)
            self.options.append(action)
            return action

        group.add_argument = add_and_record
        return group

    def flags(self) -> set[str]:
        """Every option string this parser accepts (``--output``, ``-h``, ...)."""
        return {s for action in self.options for s in action.option_strings}

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


class RaisingParser(OneLineParser):
    """argparse whose usage errors raise :class:`EffirError`: for checking option values that did not come from the
    command line (``effir run`` parses every stage's options from the config before the first stage runs)."""

    def error(self, message):
        raise EffirError(message)


def stage_module(verb: str) -> ModuleType:
    """The module behind ``verb``."""
    return importlib.import_module(VERBS[verb][0])


def describe(parser: argparse.ArgumentParser, verb: str) -> None:
    """Give ``parser`` the description and options of ``verb``, and ``verb`` as its ``verb`` default."""
    stage = stage_module(verb)
    parser.description = (stage.__doc__ or VERBS[verb][1]).strip()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    stage.add_arguments(parser)
    parser.set_defaults(verb=verb)


def verb_parser(verb: str, parser_class: type[OneLineParser] = OneLineParser) -> OneLineParser:
    """The parser of ``effir VERB`` on its own."""
    parser = parser_class(prog=f"effir {verb}")
    describe(parser, verb)
    return parser


def run_verb(verb: str, args: argparse.Namespace) -> int:
    """Run ``verb`` on parsed ``args``: its exit code; bad input is one line on stderr and exit code 2."""
    try:
        return int(stage_module(verb).run(args) or 0)
    except EffirError as e:
        print(f"effir {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"effir {verb}: interrupted", file=sys.stderr)
        return 130


def main_verb(verb: str, argv: list[str]) -> int:
    """``effir VERB ARGV...``: parse ``argv`` with the verb's parser and run it."""
    return run_verb(verb, verb_parser(verb).parse_args(argv))
