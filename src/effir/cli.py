"""The ``effir`` command: a table of verbs, each backed by one module under ``effir.stages``.

Each stage module provides ``add_arguments(parser)`` and ``run(args) -> int | None``. Bad input raises
:class:`~effir.utils.EffirError`, printed here as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .utils import EffirError

# verb -> (stage module, one-line help). Order is the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
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
    "verify": ("effir.stages.verify", "check a compressed model folder: reloads, weights, parameter counts, embeddings"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (plus exit code 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


class RaisingParser(OneLineParser):
    """argparse whose usage errors raise :class:`EffirError`: for checking option values that did not come from the
    command line (``effir run`` parses every stage's options from the config before the first stage runs)."""

    def error(self, message):
        raise EffirError(message)


def build_parser(parser_class: type[argparse.ArgumentParser] = OneLineParser) -> argparse.ArgumentParser:
    from . import __version__

    parser = parser_class(prog="effir", description="Make LLM-based dense retrievers small and fast (EffiR).",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"effir {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=parser_class)
    for verb, (module, help_text) in COMMANDS.items():
        stage = importlib.import_module(module)
        p = sub.add_parser(verb, help=help_text, description=(stage.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        stage.add_arguments(p)
        p.set_defaults(_run=stage.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except EffirError as e:
        print(f"effir {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"effir {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
