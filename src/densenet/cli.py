"""The ``densenet`` command line: ``densenet list``, ``densenet summary NAME``, ``densenet train``, ...

Each subcommand lives beside the code it drives; this file only routes. A command module provides
``add_arguments(parser)`` and ``run(args) -> int``. Errors a user can act on (DenseNetError, ValueError,
a missing file) print one line on stderr and exit with code 2; nothing else is swallowed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("densenet.analysis.commands", "every named model with its parameters and MACs"),
    "summary": ("densenet.analysis.commands", "a model as the paper's Table 1, with parameters and MACs"),
    "train": ("densenet.training.train", "train a DenseNet with the paper's protocol (default: digits, built in)"),
    "evaluate": ("densenet.training.evaluate", "top-1/top-5 error of a run folder or weights file on a data set"),
    "check-data": ("densenet.data.check", "find every broken image file under data folders, before a run meets one"),
    "predict": ("densenet.deploy.predict", "top-k classes of image files from a weights file or run folder"),
    "export": ("densenet.deploy.export", "a trained model as ONNX, TorchScript or torch.export, checked"),
    "analyze": ("densenet.analysis.reuse", "analyses of a trained model: reuse (the paper's Figure 5)"),
    "report": ("densenet.analysis.report", "runs as the paper's Tables 2/3 and Figures 3/4, in Markdown"),
    "bench": ("densenet.bench.commands", "benchmarks: speed against torchvision, training memory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densenet", description="Densely Connected Convolutional Networks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, f"add_{name}_arguments", getattr(module, "add_arguments", None))(command)
        command.set_defaults(_run=getattr(module, f"run_{name}", getattr(module, "run", None)))
    return parser


def main(argv: list[str] | None = None) -> int:
    from densenet.errors import DenseNetError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (DenseNetError, ValueError, OSError) as exc:  # OSError: a missing, read-only or full folder
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"densenet {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"densenet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
