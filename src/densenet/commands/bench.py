"""``densenet bench speed|inference|memory ...``: the benchmarks, each a module of ``densenet.bench``.

The command line (``densenet.cli.add_subcommands``) imports only the module of the benchmark being run.
"""

# name -> (module with add_arguments/run, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "speed": ("densenet.bench.speed", "training and inference speed, ours against torchvision, side by side"),
    "inference": ("densenet.bench.inference", "each inference engine's top-1 accuracy and speed on a test set"),
    "memory": ("densenet.bench.memory", "training memory of the standard and memory-efficient modes"),
}
DEST = "benchmark"
