"""``densenet bench speed|memory ...``: routes to the benchmark modules beside this file."""

from __future__ import annotations

import argparse
import importlib

# name -> (module with add_arguments/run, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "speed": ("densenet.bench.speed", "training and inference speed, ours against torchvision, side by side"),
    "inference": ("densenet.inference.accuracy", "each inference engine's top-1 accuracy and speed on a test set"),
    "memory": ("densenet.bench.memory", "training memory of the standard and memory-efficient modes"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a benchmark still being written
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    return args._bench_run(args)
