"""``densenet bench memory`` end to end with tiny sizes: JSON records, Markdown table and plot written."""

import json

from densenet.cli import main


def test_bench_memory_smoke(tmp_path, capsys):
    results, markdown, plot = tmp_path / "m.json", tmp_path / "m.md", tmp_path / "m.png"
    argv = ["bench", "memory", "--depths", "10", "--growth-rate", "4", "--batch-size", "2", "--input-size",
            "8", "--threads", "1", "--repeats", "1", "--modes", "standard", "efficient",
            "--results", str(results), "--markdown", str(markdown), "--plot", str(plot)]
    assert main(argv) == 0
    records = json.loads(results.read_text())
    assert {(r["model"], r["mode"]) for r in records} == {
        (f"densenet_bc{d}_k4", m) for d in (10,) for m in ("standard", "efficient")}
    assert all(r["peak_mb"] >= 0 and r["live_mb"] >= 0 and r["seconds_per_step"] > 0 and r["batch"] == 2
               for r in records)
    table = markdown.read_text()
    assert "| densenet_bc10_k4 | cpu | 2 | ours, memory-efficient |" in table and "densenet bench memory" in table
    assert "fp32 matmul peak" in table and all(len(r["matmul_peak_gflops"]) == 2 for r in records)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # A second run merges: its rows replace the same rows, others stay.
    assert main(argv[:3] + ["16"] + argv[4:] + ["--repeats", "0"]) == 0
    records = json.loads(results.read_text())
    assert len(records) == 4 and [r["seconds_per_step"] for r in records if "bc16" in r["model"]] == [None, None]


def test_bench_memory_rejects_bad_depth(tmp_path, capsys):
    assert main(["bench", "memory", "--depths", "11", "--results", str(tmp_path / "x.json")]) == 2
    assert "error" in capsys.readouterr().err
