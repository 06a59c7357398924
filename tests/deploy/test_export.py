"""densenet export on a tiny trained model: ONNX (checked in onnxruntime), TorchScript, torch.export; bad input."""

import json
import warnings

import onnx
import onnxruntime
import pytest
import torch

from densenet.cli import main
from densenet.deploy import export
from densenet.errors import DenseNetError
from tests.deploy.trained import train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    model, metadata = train_tiny(folder)
    return folder, model, metadata


def inputs():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(n, 1, 8, 8, generator=generator) for n in (2, 5)]  # two batch sizes


def load_runner(fmt, path):
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; libtorch users still load it
            return torch.jit.load(str(path))
    return torch.export.load(str(path)).module()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported"])
def test_every_format_gives_pytorch_logits_at_two_batch_sizes(run, tmp_path, capsys, fmt):
    folder, model, metadata = run
    out = tmp_path / f"model{export.FORMATS[fmt]}"
    assert main(["export", str(folder), "--format", fmt, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    runner = load_runner(fmt, out)
    with torch.no_grad():
        for x in inputs():
            got, want = runner(x), model(x)
            assert got.shape == want.shape == (x.shape[0], 10)
            assert float((got - want).abs().max()) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left beside it


def test_onnx_has_a_dynamic_batch_and_the_metadata(run, tmp_path):
    folder, _, metadata = run
    out = tmp_path / "digits.onnx"
    assert main(["export", str(folder), "--out", str(out)]) == 0  # the format from the extension
    proto = onnx.load(str(out))
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props["classes"] == metadata["classes"] and props["mean"] == metadata["mean"]
    assert props["input_size"] == 8


@pytest.mark.parametrize("block_impl", ["efficient", "concat_free"])
def test_a_buffer_block_model_exports_as_the_standard_graph_and_is_left_as_it_was(run, tmp_path, block_impl):
    from densenet.models import set_block_impl
    from densenet.models.densenet import block_impl_of

    _, model, metadata = run
    set_block_impl(model, block_impl)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        worst = export.export_model(model, metadata, "onnx", tmp_path / "m.onnx")
        # export works on a copy: the caller's model keeps its blocks, its mode and its weights
        assert block_impl_of(model) == block_impl and model.training
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        set_block_impl(model, "plain")
        model.eval()
    assert worst <= 1e-4
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "Concat" in ops and not any(op.startswith("PythonOp") for op in ops)


def test_a_file_that_does_not_match_pytorch_is_not_kept(run, tmp_path, monkeypatch):
    _, model, metadata = run
    honest = export._WRITERS["onnx"]

    def wrong(m, example, meta):  # the graph of a slightly different network
        other = type(m)(**m.config).eval()
        other.load_state_dict(m.state_dict())
        with torch.no_grad():
            other.classifier.bias += 1e-3
        return honest(other, example, meta)

    monkeypatch.setitem(export._WRITERS, "onnx", wrong)
    out = tmp_path / "wrong.onnx"
    with pytest.raises(DenseNetError, match="differ from PyTorch"):
        export.export_model(model, metadata, "onnx", out)
    assert list(tmp_path.iterdir()) == []


def test_bad_format_and_unwritable_outputs_are_one_line_and_leave_nothing(run, tmp_path, capsys):
    folder, _, _ = run
    cases = [
        (["--format", "tflite", "--out", str(tmp_path / "m.tflite")], "unsupported export format 'tflite'"),
        (["--out", str(tmp_path / "m.bin")], "say --format"),
        (["--format", "onnx", "--out", str(tmp_path / "missing" / "m.onnx")], "does not exist"),
        (["--format", "onnx", "--out", str(tmp_path)], "is a folder"),
    ]
    for extra, message in cases:
        assert main(["export", str(folder), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_weights_of_another_architecture_are_refused(run, tmp_path, capsys):
    folder, model, metadata = run
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state["classifier.weight"] = torch.zeros(7, state["classifier.weight"].shape[1])  # 7 classes, config says 10
    bad = tmp_path / "bad.safetensors"
    header = {"densenet": json.dumps({**metadata, "config": model.config})}
    save_file(state, str(bad), metadata=header)
    assert main(["export", str(bad), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_signals_and_volumes_export_as_onnx_checked_against_pytorch(tmp_path, spatial_dims):
    from densenet.models import create_model

    model = create_model("densenet_bc10_k4", num_classes=2, in_chans=1, spatial_dims=spatial_dims)
    worst = export.export_model(model, {"input_size": 8, "classes": ["a", "b"]}, "onnx", tmp_path / "m.onnx")
    assert worst <= 1e-4
    shape = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in shape[1:]] == [1] + [8] * spatial_dims
