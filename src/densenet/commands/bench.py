"""``densenet bench speed|inference|memory ...``: the benchmarks, each a module of ``densenet.bench``.

The command line (``densenet.cli.add_subcommands``) imports only the module of the benchmark being run. ``memory``
writes files (--results, --markdown, --plot): it runs through ``run_memory`` here, which refuses outputs that would
overwrite one another or a training run's files before anything is measured.
"""

from __future__ import annotations

import argparse

# name -> (module with add_arguments/run, or this module's add_NAME_arguments/run_NAME; one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "speed": ("densenet.bench.speed", "training and inference speed, ours against torchvision, side by side"),
    "inference": ("densenet.bench.inference", "each inference engine's top-1 accuracy and speed on a test set"),
    "memory": ("densenet.commands.bench", "training memory of the standard and memory-efficient modes"),
}
DEST = "benchmark"


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    from densenet.bench import memory

    memory.add_arguments(parser)


def run_memory(args: argparse.Namespace) -> int:
    from densenet.bench import memory
    from densenet.files import check_outputs

    outputs = [("--results", args.results), ("--markdown", args.markdown)]
    if args.plot:
        outputs.append(("--plot", args.plot))
    # Each accumulates (results are merged, the Markdown's notes kept): its own earlier file may be rewritten.
    check_outputs(outputs, own=[args.results.name, args.markdown.name] + ([args.plot.name] if args.plot else []),
                  command="densenet bench memory")
    return memory.run(args)
