"""The fast training path (training/fast.py) and the short-run recipe options (schedule, label smoothing,
weight decay on weights only, flip test-time augmentation)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

from densenet.cli import main
from densenet.errors import ConfigError
from densenet.models import create_model
from densenet.models.densenet import DenseNet
from densenet.training import fast
from densenet.training.engine import Stats, evaluate
from densenet.training.options import TrainOptions, resolve_options
from densenet.training.schedule import build_optimizer, build_scheduler, per_step

TINY = ["--model", "densenet_bc10_k4", "--batch-size", "128", "--quiet", "--threads", "1"]


def test_auto_compiles_only_runs_long_enough_to_pay_for_it():
    cpu = torch.device("cpu")
    short = fast.plan(TrainOptions(), cpu, total_steps=fast.COMPILE_MIN_STEPS - 1)
    assert not short.compile and not short.channels_last and "too short" in short.reason
    long = fast.plan(TrainOptions(dataset="cifar10"), cpu, total_steps=300 * 782)
    assert long.compile and long.channels_last
    forced = fast.plan(TrainOptions(compile="on"), cpu, total_steps=10)
    assert forced.compile
    eager = fast.plan(TrainOptions(dataset="cifar10", compile="off", channels_last=False), cpu, total_steps=10**6)
    assert not eager.compile and not eager.channels_last
    efficient = fast.plan(TrainOptions(dataset="cifar10", memory_efficient=True), cpu, total_steps=10**6)
    assert not efficient.compile and "memory-efficient" in efficient.reason
    nhwc_eager = fast.plan(TrainOptions(channels_last=True, compile="off"), cpu, total_steps=10)
    assert nhwc_eager.channels_last and not nhwc_eager.compile


def test_the_path_chooses_the_dense_block_implementation():
    # concat_free where it keeps the least memory (eager fp32 NCHW), plain where the buffer is slower or
    # compiled around (compile, channels_last, autocast), efficient when asked for.
    cpu = torch.device("cpu")
    assert fast.plan(TrainOptions(), cpu, total_steps=10).block_impl == "concat_free"
    assert fast.plan(TrainOptions(compile="on"), cpu, total_steps=10).block_impl == "plain"
    assert fast.plan(TrainOptions(channels_last=True, compile="off"), cpu, total_steps=10).block_impl == "plain"
    assert fast.plan(TrainOptions(amp="bf16"), cpu, total_steps=10).block_impl == "plain"
    assert fast.plan(TrainOptions(memory_efficient=True, amp="bf16"), cpu, total_steps=10).block_impl == "efficient"
    assert fast.plan(TrainOptions(), cpu, total_steps=10).to_dict()["block_impl"] == "concat_free"
    for name, compile_, channels_last in fast.PATHS:
        expected = "plain" if compile_ or channels_last else "concat_free"
        assert fast.block_impl_for(compile_, channels_last, "none", False) == expected, name


def test_inductor_cache_is_ours_unless_the_user_chose_one(monkeypatch, tmp_path):
    import torchvision  # noqa: F401 - importing it sets the variable to inductor's /tmp default
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert fast.inductor_cache_dir() == tmp_path / "densenet" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir()  # asking changes nothing
    with fast.inductor_cache() as path:  # a run sets it while it runs ...
        assert path == tmp_path / "densenet" / "inductor" and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir()  # ... and puts it back after
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert fast.inductor_cache_dir() == tmp_path / "densenet" / "inductor"
    with fast.inductor_cache():
        pass
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert fast.inductor_cache_dir() == tmp_path / "mine"


def test_no_constructor_writes_the_environment(monkeypatch):
    before = dict(os.environ)
    fast.StaticBatchModule(DenseNet(growth_rate=4, block_config=(1,), stem="cifar", num_classes=2), {2})
    assert dict(os.environ) == before


@pytest.mark.slow
def test_compiled_training_step_equals_eager(monkeypatch, tmp_path):
    """Two SGD steps through torch.compile give the eager loss, gradients and weights within fp32 tolerance."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    eager = DenseNet(growth_rate=4, block_config=(2, 2), stem="cifar", num_classes=5)
    compiled = DenseNet(growth_rate=4, block_config=(2, 2), stem="cifar", num_classes=5)
    compiled.load_state_dict(eager.state_dict())
    compiled = compiled.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 5, (8,))
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    forward = fast.StaticBatchModule(compiled, {8}, say=pytest.fail)
    for _ in range(2):
        losses = []
        for model, call, opt, inp in ((eager, eager, opt_e, x),
                                      (compiled, forward, opt_c, x.contiguous(memory_format=torch.channels_last))):
            opt.zero_grad()
            loss = F.cross_entropy(call(inp), y, label_smoothing=0.1)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert forward.compiled is not None  # it really ran compiled, no fallback
    # A batch of another size runs the plain module (no second graph), with the same result.
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(x[:3]), eager(x[:3]), rtol=1e-4, atol=1e-5)


def test_a_failing_compiler_falls_back_to_eager_with_one_line(monkeypatch):
    said = []
    model = create_model("densenet_bc10_k4", num_classes=3, in_chans=1)
    forward = fast.StaticBatchModule(model, {2}, say=said.append)

    def broken(x):
        raise RuntimeError("no C++ compiler\nlong details")
    forward.compiled = broken
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    torch.testing.assert_close(forward(x), model(x))
    assert forward.compiled is None and len(said) == 1 and "no C++ compiler" in said[0] and "eagerly" in said[0]


def test_sgd_step_calls_the_forward_it_is_given_even_one_without_a_truth_value():
    # torch.compile's module raises on len(), so bool() of it fails: sgd_step must test for None, not truth.
    model = create_model("densenet_bc10_k4", num_classes=3, in_chans=1)
    calls = []

    class NoTruthValue(torch.nn.Module):
        def __len__(self):
            raise TypeError("no len()")

        def forward(self, x):
            calls.append(x.shape[0])
            return model(x)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    before = [p.detach().clone() for p in model.parameters()]
    fast.sgd_step(model, x, y, torch.device("cpu"), "none", forward=NoTruthValue())()
    assert calls == [2]
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_short_run_schedules_step_per_batch_warm_up_and_end_near_zero(schedule):
    options = TrainOptions(dataset="cifar10", epochs=4, lr=0.2, schedule=schedule, warmup=0.25)
    assert per_step(options)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, options)
    scheduler = build_scheduler(optimizer, options, steps_per_epoch=10)
    seen = []
    for _ in range(40):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = seen.index(max(seen))
    assert max(seen) == pytest.approx(0.2, rel=0.03) and 8 <= peak <= 10  # warm-up: a quarter of the 40 steps
    assert all(a <= b for a, b in zip(seen[:peak], seen[1:peak + 1], strict=True))
    assert all(a >= b for a, b in zip(seen[peak:], seen[peak + 1:], strict=False))
    assert seen[0] < 0.05 and seen[-1] < 0.02


def test_weight_decay_on_weights_only_spares_bn_and_biases():
    model = create_model("densenet_bc10_k4", num_classes=3)
    groups = build_optimizer(model, TrainOptions(weight_decay=5e-4, weight_decay_on="weights")).param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0
    assert id(model.classifier.weight) in decayed and id(model.features.conv0.weight) in decayed
    assert id(model.classifier.bias) not in decayed and id(model.features.norm5.weight) not in decayed
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    paper = build_optimizer(model, TrainOptions()).param_groups
    assert len(paper) == 1 and paper[0]["weight_decay"] == 1e-4


@pytest.mark.parametrize("field, value, words", [
    ("schedule", "linear", "--schedule"), ("warmup", 1.0, "--warmup"), ("label_smoothing", 1.0, "--label-smoothing"),
    ("tta", "ten", "--tta"), ("compile", "yes", "--compile"), ("weight_decay_on", "bn", "--weight-decay-on"),
    ("weight_decay", "lots", "--weight-decay must be a number"), ("eval_every", 0, "--eval-every"),
    ("crop_padding", -1, "--crop-padding"), ("crop_padding", 1.5, "--crop-padding"),
    ("small_crop", 0, "--small-crop"), ("small_crop_epochs", 2, "--small-crop-epochs needs --small-crop"),
    ("small_crop_epochs", -1, "--small-crop-epochs"),
])
def test_bad_recipe_options_are_config_errors(field, value, words):
    with pytest.raises(ConfigError, match=words):
        TrainOptions(**{field: value})


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: cifar10\nweight_decay: 5e-4\nlr: 2e-1\n")  # YAML 1.1 reads these as strings
    options = resolve_options(recipe)
    assert options.weight_decay == 5e-4 and options.lr == 0.2


class _Batches:
    channels_last = False
    padding_value = torch.full((3,), -1.5)

    def __init__(self, x, y):
        self.x, self.y = x, y

    def epoch(self, epoch):
        yield self.x, self.y

    def _finish(self, x):
        return x


def test_flip_tta_averages_the_softmax_of_image_and_mirror():
    from densenet.training.distributed import Dist

    torch.manual_seed(0)
    model = create_model("densenet_bc10_k4", num_classes=4)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    stats = evaluate(model, _Batches(x, y), torch.device("cpu"), Dist(), tta="flip")
    with torch.no_grad():
        probs = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
    expected = F.nll_loss(probs.log(), y).item()
    assert isinstance(stats, Stats) and stats.n == 6
    assert stats.loss == pytest.approx(expected, rel=1e-5)
    assert stats.error == pytest.approx(100.0 * (probs.argmax(1) != y).float().mean().item())
    plain = evaluate(model, _Batches(x, y), torch.device("cpu"), Dist())
    assert plain.loss != pytest.approx(stats.loss)  # the mirror really changed something


def test_flip_shift_tta_averages_the_softmax_over_six_views():
    from densenet.training.distributed import Dist

    torch.manual_seed(0)
    model = create_model("densenet_bc10_k4", num_classes=4).eval()
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    stats = evaluate(model, _Batches(x, y), torch.device("cpu"), Dist(), tta="flip-shift")
    views = []
    for image in (x, x.flip(-1)):  # each of the image and its mirror, as is and moved by one pixel both ways
        padded = F.pad(image, (1, 1, 1, 1), value=-1.5)  # _Batches.padding_value
        views += [image, padded[..., :8, :8], padded[..., 2:, 2:]]
    with torch.no_grad():
        probs = sum(model(v).softmax(-1) for v in views) / 6
    assert stats.loss == pytest.approx(F.nll_loss(probs.log(), y).item(), rel=1e-5)
    assert stats.error == pytest.approx(100.0 * (probs.argmax(1) != y).float().mean().item())
    flip = evaluate(model, _Batches(x, y), torch.device("cpu"), Dist(), tta="flip")
    assert flip.loss != pytest.approx(stats.loss)  # the shifted views really changed something
    # One view of the whole batch per call: every call has the batch's size, the one the compiled
    # evaluation graph is built for (train.py), never views x batch.
    sizes = []
    evaluate(model, _Batches(x, y), torch.device("cpu"), Dist(), tta="flip-shift",
             forward=lambda inputs: sizes.append(inputs.shape[0]) or model(inputs))
    assert sizes == [6] * 6


@pytest.mark.slow
def test_train_records_the_path_and_eager_forces_it(tmp_path, capsys, monkeypatch):
    import densenet.models.densenet as densenet_module

    blocks = []  # the run's model really runs the implementation the path chose and config.yaml records
    real = densenet_module.concat_free_block_forward
    monkeypatch.setattr(densenet_module, "concat_free_block_forward",
                        lambda block, x: blocks.append(block) or real(block, x))
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--schedule", "onecycle", "--lr", "0.2", "--label-smoothing", "0.1",
                 "--weight-decay-on", "weights", "--tta", "flip", "--eager", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "path: eager, NCHW, 1 threads, precision fp32 (--compile off)" in out
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["runtime"]["compile"] is False and config["runtime"]["channels_last"] is False
    assert config["runtime"]["block_impl"] == "concat_free" and blocks and "dense blocks: concat_free" in out
    assert config["schedule"] == "onecycle" and config["tta"] == "flip" and config["label_smoothing"] == 0.1
    # The run folder's config.yaml is a valid recipe again (its runtime record is not an option).
    assert resolve_options(run / "config.yaml").schedule == "onecycle"
    # densenet evaluate --tta flip gives the run's last (flip-averaged) test error.
    last = (run / "metrics.csv").read_text().splitlines()[-1].split(",")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--tta", "flip", "--json", "--device", "cpu", "--engine", "eager"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tta"] == "flip" and result["top1_error"] == pytest.approx(float(last[4]), abs=1e-3)
    capsys.readouterr()
    assert main(["train", *TINY, "--eager", "--compile", "on", "--out", str(tmp_path / "x")]) == 2  # contradictory
    assert "--eager means --compile off" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_amp_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(fast, "native_bf16", lambda device: True)
    assert fast.plan(TrainOptions(amp="auto"), cpu, total_steps=10).amp == "bf16"
    monkeypatch.setattr(fast, "native_bf16", lambda device: False)
    assert fast.plan(TrainOptions(amp="auto"), cpu, total_steps=10).amp == "none"
    assert fast.plan(TrainOptions(amp="bf16"), cpu, total_steps=10).amp == "bf16"  # asked for: kept
    assert fast.plan(TrainOptions(), cpu, total_steps=10).amp == "none"  # the default stays fp32


@pytest.mark.slow
def test_eval_every_skips_evaluations_but_always_evaluates_the_last_epoch(tmp_path, capsys):
    import csv

    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "3", "--eval-every", "2", "--eager", "--out", str(run)]) == 0
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["test_error"] != "" for row in rows] == [False, True, True]  # epoch 2 (every 2nd) and the last
    assert all(float(row["seconds"]) > 0 and row["train_error"] for row in rows)
    out = capsys.readouterr().out
    assert "epoch   1/3" in out and "test error" not in out.split("epoch   1/3")[1].splitlines()[0]
    assert (run / "curves.png").stat().st_size > 0 and (run / "model.safetensors").exists()
    # The run's summary line and the report read the last (evaluated) epoch.
    assert f"test error {float(rows[-1]['test_error']):.2f}%" in out


@pytest.mark.slow
def test_crop_padding_reaches_the_augmentation(monkeypatch, tmp_path):
    from densenet.training import engine

    seen = []
    real = engine.pad_crop_flip
    monkeypatch.setattr(engine, "pad_crop_flip",
                        lambda x, g, padding=4, size=None, **kw: seen.append(padding)
                        or real(x, g, padding, size, **kw))
    assert main(["train", *TINY, "--epochs", "1", "--crop-padding", "2", "--augment", "standard", "--eager",
                 "--out", str(tmp_path / "run")]) == 0
    assert seen and set(seen) == {2}


@pytest.mark.slow
def test_small_crops_train_the_first_epochs_and_full_size_the_rest(monkeypatch, tmp_path):
    from densenet.training import engine

    sizes, shapes = [], []
    real = engine.pad_crop_flip
    monkeypatch.setattr(engine, "pad_crop_flip",
                        lambda x, g, padding=4, size=None, **kw: sizes.append(size) or real(x, g, padding, size, **kw))
    real_forward = DenseNet.forward
    monkeypatch.setattr(DenseNet, "forward", lambda self, x: shapes.append((self.training, x.shape[-1]))
                        or real_forward(self, x))
    assert main(["train", *TINY, "--epochs", "3", "--batch-size", "1024", "--augment", "standard", "--small-crop",
                 "6", "--small-crop-epochs", "2", "--eager", "--out", str(tmp_path / "run")]) == 0
    per_epoch = len(sizes) // 3  # the digits: 2 training batches of 1024 per epoch
    assert sizes == [6] * (2 * per_epoch) + [None] * per_epoch
    trained = [side for training, side in shapes if training]
    assert trained == [6] * (2 * per_epoch) + [8] * per_epoch
    assert {side for training, side in shapes if not training} == {8}  # evaluation always at full size
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (config["small_crop"], config["small_crop_epochs"]) == (6, 2)


def test_small_crop_larger_than_the_images_or_on_streamed_data_is_refused(tmp_path, capsys):
    args = [*TINY, "--epochs", "2", "--augment", "standard", "--small-crop-epochs", "1", "--eager"]
    assert main(["train", *args, "--small-crop", "9", "--out", str(tmp_path / "a")]) == 2
    assert main(["train", *args, "--small-crop", "6", "--augment", "none", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("--small-crop") == 2 and "(these are 8)" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _flipped_per_epoch(flip: str, epochs: int = 3) -> list[torch.Tensor]:
    """Which of the digits' training images each epoch's batches show mirrored (padding 0: the image or its
    mirror image), by image index; images equal to their mirror image count as not flipped."""
    from densenet.data.augment import normalize
    from densenet.data.datasets import load_data
    from densenet.training.distributed import Dist
    from densenet.training.engine import Batches

    data = load_data("digits", augment="standard")
    images = data.train.images
    batches = Batches(data, data.train, 256, Dist(), torch.device("cpu"), train=True, augment=True, seed=5,
                      crop_padding=0, flip=flip)
    result = []
    for epoch in range(epochs):
        shown = torch.cat([x for x, _ in batches.epoch(epoch)])
        order = torch.tensor(batches.sampler._indices())
        mirrored = (shown - normalize(images[order].flip(-1), data.mean, data.std)).abs().flatten(1).amax(1) < 1e-6
        plain = (shown - normalize(images[order], data.mean, data.std)).abs().flatten(1).amax(1) < 1e-6
        assert bool((mirrored | plain).all())
        flipped = torch.zeros(len(images), dtype=torch.bool)
        flipped[order] = mirrored & ~plain
        result.append(flipped)
    return result


def test_alternate_flip_shows_every_image_both_ways_in_every_two_epochs():
    e0, e1, e2 = _flipped_per_epoch("alternate")
    from densenet.data.datasets import load_data

    images = load_data("digits").train.images
    asymmetric = ~(images == images.flip(-1)).flatten(1).all(1)
    assert bool((e0 ^ e1)[asymmetric].all()) and torch.equal(e0, e2)
    assert 0.4 < e0[asymmetric].float().mean() < 0.6  # a random half first
    r0, r1, _ = _flipped_per_epoch("random")
    assert 0.4 < (r0 ^ r1)[asymmetric].float().mean() < 0.6  # random flips: the same way round half the time
    assert torch.equal(_flipped_per_epoch("alternate", 1)[0], e0)  # reproducible from the seed


@pytest.mark.slow
def test_alternate_flip_on_unaugmented_data_is_refused(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--augment", "none", "--flip", "alternate", "--eager",
                 "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--flip alternate" in err and "Traceback" not in err and not (tmp_path / "a").exists()
    assert main(["train", *TINY, "--epochs", "1", "--augment", "standard", "--flip", "alternate", "--eager",
                 "--out", str(tmp_path / "b")]) == 0
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["flip"] == "alternate"


def test_time_paths_keeps_the_fastest_and_leaves_model_and_rng_alone(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # the suite stays eager
    cpu = torch.device("cpu")
    runtime = fast.plan(TrainOptions(dataset="cifar10"), cpu, total_steps=10**6)
    assert runtime.timed and runtime.compile  # a long CPU run: measured
    assert not fast.plan(TrainOptions(dataset="cifar10"), cpu, total_steps=10**6, distributed=True).timed
    assert not fast.plan(TrainOptions(dataset="cifar10", channels_last=False), cpu, total_steps=10**6).timed
    assert not fast.plan(TrainOptions(dataset="cifar10", compile="on"), cpu, total_steps=10**6).timed
    torch.manual_seed(0)
    model = create_model("densenet_bc10_k4", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    chosen = fast.time_paths(model, runtime, (3, 8, 8), 3, batch_size=4, steps=2, say=pytest.fail)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(chosen.rates) == {name for name, _, _ in fast.PATHS} and all(r > 0 for r in chosen.rates.values())
    best = max(chosen.rates, key=chosen.rates.get)
    assert (best, chosen.compile, chosen.channels_last) in fast.PATHS and not chosen.timed
    assert chosen.block_impl == fast.block_impl_for(chosen.compile, chosen.channels_last, "none", False)
    assert "timed fastest" in chosen.reason and best in chosen.reason


def test_time_paths_drops_a_path_whose_compiler_fails(monkeypatch):
    def broken(module, **kwargs):
        def fail(x):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    runtime = fast.plan(TrainOptions(dataset="cifar10"), torch.device("cpu"), total_steps=10**6)
    said = []
    chosen = fast.time_paths(create_model("densenet_bc10_k4", num_classes=3), runtime, (3, 8, 8), 3, batch_size=4,
                             steps=1, say=said.append)
    assert "compiled channels_last" not in chosen.rates and not chosen.compile and len(said) == 1


@pytest.mark.slow
def test_a_long_cpu_run_records_the_timed_paths(monkeypatch, tmp_path):
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    monkeypatch.setattr(fast, "COMPILE_MIN_STEPS", 1)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    runtime = yaml.safe_load((run / "config.yaml").read_text())["runtime"]
    assert set(runtime["rates"]) == {name for name, _, _ in fast.PATHS} and "timed fastest" in runtime["reason"]


def test_volumes_train_in_the_plain_layout():
    """channels_last is a 2D layout: a 3D run is never put in it (model.to(channels_last) fails on a 5D model)."""
    from densenet.errors import ConfigError
    from densenet.training.options import resolve_options

    long_run = resolve_options(None, {"dataset": "digits", "compile": "on"})
    assert fast.plan(long_run, torch.device("cpu"), 10_000).channels_last
    runtime = fast.plan(long_run, torch.device("cpu"), 10_000, spatial_dims=3)
    assert not runtime.channels_last and not runtime.timed and runtime.compile
    auto = resolve_options(None, {"dataset": "digits"})
    assert not fast.plan(auto, torch.device("cpu"), 10_000, spatial_dims=3).timed
    with pytest.raises(ConfigError, match="--channels-last is for 2D images"):
        fast.plan(resolve_options(None, {"dataset": "digits", "channels_last": True}), torch.device("cpu"), 10,
                  spatial_dims=3)
