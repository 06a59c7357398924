"""The ``densenet`` command line: ``densenet list``, ``densenet summary NAME``, ``densenet train``, ...

Each command is a module of ``densenet.commands`` (the benchmarks: of ``densenet.bench``, whose modules exist only
to be run as commands), one layer above the library code it calls; this file only routes. A command module provides
``add_arguments(parser)`` and ``run(args) -> int`` (a module serving two commands names them
``add_NAME_arguments`` and ``run_NAME``). Only the module of the command being run is imported, so
``densenet --help`` and ``densenet list`` answer without loading torch.

Errors a user can act on (``DenseNetError`` and its ``ConfigError``; ``OSError``: a missing, read-only or
full folder) print one line on stderr and exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("densenet.commands.models", "every named model with its parameters and MACs"),
    "summary": ("densenet.commands.models", "a model as the paper's Table 1, with parameters and MACs"),
    "train": ("densenet.commands.train", "train a DenseNet with the paper's protocol (default: digits, built in)"),
    "evaluate": ("densenet.commands.evaluate", "test error, or AUROC, ACC, mAP..., of a run folder or weights file"),
    "check-data": ("densenet.commands.check_data",
                   "find every broken image file under data folders before a run meets one"),
    "predict": ("densenet.commands.predict", "top-k classes of image files from a weights file or run folder"),
    "export": ("densenet.commands.export", "a trained model as ONNX, TorchScript or torch.export, checked"),
    "explain": ("densenet.commands.explain", "heat maps (CAM, Grad-CAM) of where the network looked in images"),
    "analyze": ("densenet.commands.analyze", "analyses: reuse (the paper's Figure 5), figure4 (error vs parameters)"),
    "report": ("densenet.commands.report", "runs as the paper's Tables 2/3 and Figures 3/4, in Markdown"),
    "bench": ("densenet.commands.bench", "benchmarks: speed against torchvision, training memory"),
}


def add_subcommands(parser: argparse.ArgumentParser, commands: dict[str, tuple[str, str]], argv: Sequence[str],
                    dest: str = "command", required: bool = False) -> None:
    """One subparser per command, with its help alone; only the command ``argv`` names (its first word that is
    not an option) has its module imported and its arguments added, so the others cost nothing.

    A module that groups commands (``densenet bench speed|inference|memory``) offers ``SUBCOMMANDS``, a table
    like ``COMMANDS``, and ``DEST``, the name its choice is stored under; its commands load the same way.
    """
    sub = parser.add_subparsers(dest=dest, metavar=dest.upper(), required=required)
    index, chosen = next(((i, word) for i, word in enumerate(argv) if not word.startswith("-")), (0, None))
    for name, (module_name, help_text) in commands.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        module = importlib.import_module(module_name)
        if getattr(module, "SUBCOMMANDS", commands) is not commands:  # a group (its own commands may live in it)
            add_subcommands(command, module.SUBCOMMANDS, argv[index + 1:], dest=module.DEST)
            command.set_defaults(_group=(name, list(module.SUBCOMMANDS)))
            continue
        add = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
        add(command)
        command.set_defaults(_run=getattr(module, f"run_{name}", None) or module.run)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for ``argv``: every command listed, the arguments of the one ``argv`` names."""
    from densenet import __version__

    parser = argparse.ArgumentParser(prog="densenet", description="Densely Connected Convolutional Networks.")
    parser.add_argument("--version", action="version", version=f"densenet {__version__}")
    add_subcommands(parser, COMMANDS, argv)
    return parser


def main(argv: list[str] | None = None) -> int:
    from densenet.errors import DenseNetError

    argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8, or a terminal that is not: escaped
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass  # replaced by something else (a test's capture, a notebook): it prints as it does
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        group = getattr(args, "_group", None)
        if group is None:
            parser.print_help()
        else:
            print(f"densenet {group[0]}: error: say which: densenet {group[0]} {'|'.join(group[1])} ...",
                  file=sys.stderr)
        return 2
    try:
        return int(run(args) or 0)
    except (DenseNetError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"densenet {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"densenet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
