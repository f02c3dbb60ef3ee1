"""The CorrFlow encoder's shape, checkpoint loading errors, and the precision rule with its cached bf16 probe."""
import dataclasses
import json

import pytest
import torch

import model as model_module
from model import (CHECKPOINT_FORMAT, PROBE_SIZE, CorrFlow, ModelConfig, bf16_faster, downsample_labels, encode,
                   encoder_in_bf16, export_weights, label_argmax, load_checkpoint)


def test_parameter_count_and_output_stride():
    model = CorrFlow()
    assert sum(p.numel() for p in model.parameters()) == 5_291_648  # as CorrFlow's published encoder
    with torch.no_grad():
        feats = model.eval()(torch.rand(2, 3, 64, 96))
    assert feats.shape == (2, 64, 16, 24)


def test_downsample_labels_averages_one_hots():
    labels = torch.zeros(1, 2, 4, 8)
    labels[0, 1, :, :2] = 1  # class 1 on 2 of the 4 columns of the first 4x4 cell
    labels[0, 0] = 1 - labels[0, 1]
    small = downsample_labels(labels)
    assert small.shape == (1, 2, 1, 2)
    torch.testing.assert_close(small[0, :, 0, 0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(small[0, :, 0, 1], torch.tensor([1.0, 0.0]))



def test_label_argmax_is_torchs_argmax_over_the_labels_first_on_ties():
    probs = torch.randint(0, 3, (2, 4, 9, 7)).float()  # few distinct values: many ties
    assert torch.equal(label_argmax(probs), probs.argmax(1))
    assert torch.equal(label_argmax(probs[0]), probs[0].argmax(0))
    assert label_argmax(torch.zeros(3, 1, 1)).item() == 0


def _write(path, obj):
    torch.save(obj, path)
    return path


def test_checkpoint_round_trip_and_export(tmp_path):
    model = CorrFlow()
    ckpt = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": {},
            "model_config": dataclasses.asdict(ModelConfig()), "centroids": torch.randn(16, 2), "step": 3}
    src = _write(tmp_path / "ckpt.pt", ckpt)
    export_weights(src, tmp_path / "small.pt")
    loaded, centroids, meta = load_checkpoint(tmp_path / "small.pt")
    assert meta["step"] == 3 and centroids.shape == (16, 2)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(b, a.half().float() if a.is_floating_point() else a, msg=name)


@pytest.mark.parametrize("content,match", [
    (None, "not found"),
    (b"not a checkpoint", "not a readable checkpoint"),
    ({"weights": 1}, "not a CorrFlow checkpoint"),
    ({"format": CHECKPOINT_FORMAT, "model": {"x": torch.zeros(1)}, "model_config": {}}, "do not match"),
])
def test_bad_checkpoints_give_one_line_errors(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ValueError, match=match) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and "bad.pt" in str(info.value)


def test_bf16_probe_times_both_and_leaves_the_model_as_it_was():
    model = CorrFlow().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    faster, t32, t16 = bf16_faster(model, 32, backward=True)
    assert isinstance(faster, bool) and t32 > 0 and t16 > 0 and faster == (t16 < 0.9 * t32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert model.stem[0].weight.is_contiguous() and all(p.grad is None for p in model.parameters())
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        plain, fp32 = model(x), encode(model, x, bf16=False)
        bf16 = encode(model.to(memory_format=torch.channels_last), x, bf16=True)
    assert fp32.dtype == bf16.dtype == torch.float32 and fp32.shape == bf16.shape == (2, 64, 8, 8)
    assert torch.equal(fp32, plain) and not torch.equal(fp32, bf16)
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=1).min() > 0.99


def test_one_precision_rule_for_training_and_propagation(monkeypatch):
    def no_probe(*args):
        raise AssertionError("probed")

    monkeypatch.setattr(model_module, "bf16_faster", no_probe)
    cpu = torch.device("cpu")
    assert not encoder_in_bf16("fp32", cpu) and encoder_in_bf16("bf16", cpu) and encoder_in_bf16("fp16", cpu)
    assert encoder_in_bf16("auto", torch.device("cuda"))  # a GPU runs the encoder in bf16 without asking
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        encoder_in_bf16("fp8", cpu)


def test_the_probe_is_measured_once_per_machine_and_its_cache_may_be_broken(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def probe(net, size, backward):
        calls.append((size, backward))
        return backward, 0.2, 0.1 if backward else 0.3  # faster for training, not for propagation

    monkeypatch.setattr(model_module, "bf16_faster", probe)
    lines = []
    cpu = torch.device("cpu")
    assert encoder_in_bf16("auto", cpu, backward=True, report=lines.append)
    assert not encoder_in_bf16("auto", cpu, backward=False)
    assert encoder_in_bf16("auto", cpu, backward=True, report=lines.append)  # from the cache
    assert calls == [(PROBE_SIZE[True], True), (PROBE_SIZE[False], False)]
    assert "(measured)" in lines[0] and "(cached)" in lines[1] and "bf16 is faster" in lines[1]
    cache = tmp_path / "corrflow" / "bf16_probe.json"
    assert len(json.loads(cache.read_text())) == 2 and not list(cache.parent.glob(".*tmp*"))  # written whole
    cache.write_text("{not json")  # a broken cache is measured over, and rewritten
    assert encoder_in_bf16("auto", cpu, backward=True) and len(calls) == 3
    assert json.loads(cache.read_text())
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache / "below_a_file"))  # a cache that cannot be written:
    assert encoder_in_bf16("auto", cpu, backward=True) and len(calls) == 4  # the answer still comes


def test_the_probe_leaves_the_random_stream_as_it_was(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(model_module, "PROBE_SIZE", {True: 16, False: 16})
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    model_module.probe_bf16(backward=False)
    assert torch.equal(torch.rand(3), expected)
