"""The fused op on the GPU in the layouts the project really launches it with, against the PyTorch CPU path.

Training: bf16 features from the encoder under autocast in channels-last, split per frame by `view`/`unbind` as
`train.py` does, with the three gradients (query, references, labels). Propagation: `propagate.py`'s loop under
`inference_mode`, the shipped weights, references stacked per frame, the first frame's own radius, model+lab's 68
channels in fp16 (the default on a GPU) and model features in fp32. Triton
specialises stride-1 and size-1 arguments at launch, so these layouts compile kernels that random contiguous test
inputs never do. No video is read: the steps of the GPU run that need no PyAV run these with PyAV hidden.
"""
import numpy as np
import pytest
import torch

import model as model_module
import propagate
import train
from kernels import local_attention_cpu
from model import CorrFlow, ModelConfig

pytestmark = pytest.mark.gpu


def _training_copies(monkeypatch, op, feats, labels, B):
    """train.colourise on leaf copies of `feats` (same dtype and strides), scheduled sampling off (the copies from
    the model's own predictions carry gradients into the labels) -> (outputs, gradients of their sum of logs)."""
    monkeypatch.setattr(model_module, "local_attention", op)
    leaf = feats.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    lab = labels.detach().clone().requires_grad_()
    f0, f1, f2 = leaf.view(B, 3, -1, *feats.shape[-2:]).unbind(1)  # as train.py splits the batch's frames
    outs = train.colourise(f0, f1, f2, lab, False, ModelConfig.radius, ModelConfig.temperature)
    loss = sum(torch.log(p.float() + 1e-8).mean() for p in outs)
    grads = torch.autograd.grad(loss, (leaf, lab))
    return [o.detach() for o in outs], grads


def test_gpu_training_copies_as_train_py_runs_them(monkeypatch):
    torch.manual_seed(0)
    B, size = 4, 64
    net = CorrFlow(ModelConfig()).cuda().to(memory_format=torch.channels_last).train()
    feats = model_module.encode(net, torch.rand(B * 3, 3, size, size, device="cuda"), bf16=True)
    assert feats.dtype == torch.bfloat16 and feats.is_contiguous(memory_format=torch.channels_last)
    labels = torch.softmax(torch.randn(B, 3, 16, size // 4, size // 4, device="cuda"), 2)

    fused_op = model_module.local_attention  # the project's dispatch: the fused op for CUDA tensors
    exact = _training_copies(monkeypatch, local_attention_cpu, feats.double(), labels.double(), B)
    errors = {}
    for name, op in (("fused", fused_op), ("reference", local_attention_cpu)):
        outs, grads = _training_copies(monkeypatch, op, feats, labels, B)
        pairs = list(zip(outs, exact[0])) + list(zip(grads, exact[1]))
        errors[name] = [(a.double() - b).abs().max().item() for a, b in pairs]
    # the fused op's bf16 error (against fp64 on the same inputs) at most twice the PyTorch path's own bf16 error
    for err, err_ref in zip(errors["fused"], errors["reference"]):
        assert err <= 2 * err_ref + 1e-6, errors


def _frames(n=6, H=240, W=432, seed=0):
    """Smooth textured frames with a square that moves 3 px per frame, and its first mask."""
    rng = np.random.default_rng(seed)
    base = torch.nn.functional.interpolate(torch.tensor(rng.random((1, 3, H // 8, W // 8 + n)), dtype=torch.float32),
                                           scale_factor=8, mode="bilinear")[0].permute(1, 2, 0).numpy()
    frames, mask = [], np.zeros((H, W), np.uint8)
    for t in range(n):
        f = base[:, 3 * t:3 * t + W].copy()
        f[80:160, 100 + 3 * t:180 + 3 * t] = [0.9, 0.2, 0.1]
        frames.append((f * 255).astype(np.uint8))
    mask[80:160, 100:180] = 1
    return frames, mask


@pytest.mark.parametrize("topk", [0, 10])
@pytest.mark.parametrize("features, precision", [("model+lab", "auto"), ("model", "fp32")])
def test_gpu_propagation_as_propagate_py_runs_it(monkeypatch, features, precision, topk):
    """The default (model+lab, the encoder in bf16, references in fp16 on a GPU: 68 channels) and fp32 throughout."""
    frames, mask = _frames()
    cfg = propagate.PropagationConfig(features=features, precision=precision, topk=topk)  # the default otherwise
    encoders = propagate.load_encoder(None, features, torch.device("cuda"), precision)
    first = torch.nn.functional.one_hot(torch.tensor(mask, dtype=torch.long), 2).permute(2, 0, 1)[None].float()
    first = model_module.downsample_labels(first.cuda())

    def run(op):
        monkeypatch.setattr(propagate, "local_attention", op)
        return [p.cpu() for p in propagate._propagate(frames[0], iter(frames[1:]), first, cfg, encoders,
                                                      torch.device("cuda"))]

    def reference(query, refs, values, *args):  # fp32 from the stored values: what the kernels compute
        assert query.dtype == (torch.float16 if precision == "auto" else torch.float32)
        return local_attention_cpu(query.float(), refs.float(), values.float(), *args).to(query.dtype)

    fused_op = propagate.local_attention  # the project's dispatch: the fused op for CUDA tensors
    fused, ref = run(fused_op), run(reference)
    assert len(fused) == len(frames)
    if topk == 0:  # every candidate: the same softmax; fp32: 3xTF32 scores against exact fp32; fp16: the
        # kernels also round the probabilities to fp16 before weighting the labels
        tol = 1e-4 if precision == "fp32" else 2e-3
        for p, p_ref in zip(fused, ref):
            torch.testing.assert_close(p, p_ref, atol=tol, rtol=tol)
    else:  # a score within rounding of the k-th may fall on either side: the labels, not every probability
        for p, p_ref in zip(fused, ref):
            assert (p.argmax(1) == p_ref.argmax(1)).float().mean() >= 0.995
