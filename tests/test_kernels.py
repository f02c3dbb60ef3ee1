"""The op's paths against its dense specification: the CPU path (plain PyTorch) and the fused Triton kernels (on
CPU through Triton's interpreter, fp32), outputs and every gradient, the same upstream gradient through both."""
import importlib

import numpy as np
import pytest
import torch
import triton

from kernels import local_attention, local_attention_cpu, local_attention_dense, local_attention_triton
from kernels.arguments import check_interpreter

# one tolerance table: (atol, rtol) per dtype, for a path against the dense specification
TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-10, 1e-10)}
cpu_path = importlib.import_module("kernels.local_attention_cpu")  # the module (its tile and budget constants)


def make_inputs(B, R, C, K, H, W, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    r = torch.randn(B, R, C, H, W, generator=g, dtype=torch.float64)
    v = torch.randn(B, R, K, H, W, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, r, v)]


def assert_matches_dense(fn, inputs, *args, tol=None):
    """fn(*inputs, *args) against the dense specification: the output and the gradients of query, refs, values."""
    expected = local_attention_dense(*inputs, *args)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5), dtype=expected.dtype)
    grads_expected = torch.autograd.grad(expected, inputs, grad_out)
    out = fn(*inputs, *args)
    grads = torch.autograd.grad(out, inputs, grad_out)
    atol, rtol = tol or TOL[inputs[0].dtype]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    for name, g, g_expected in zip(("query", "refs", "values"), grads, grads_expected):
        torch.testing.assert_close(g, g_expected, atol=atol, rtol=rtol, msg=lambda m: f"d({name}): {m}")


# (B, R, C, K, H, W, radius, temperature): odd sizes, 1x1 image, radius beyond the image, C/K not powers of two
SHAPES = [
    (1, 1, 16, 4, 8, 8, 1, 1.0),
    (1, 1, 24, 3, 23, 41, 2, 0.7),
    (1, 3, 24, 3, 11, 13, 2, 1.0),
    (3, 1, 16, 16, 5, 6, 10, 1.0),
    (1, 1, 5, 2, 1, 1, 4, 2.0),
    (2, 3, 3, 1, 3, 17, 0, 0.5),
]
# (B, R, C, K, H, W, radius or one per reference, temperature, topk)
SELECTIVE = [
    (1, 3, 4, 2, 9, 11, (4, 1, 1), 1.0, 0),  # a wider window for the first reference
    (2, 2, 5, 3, 7, 6, (0, 2), 0.5, 0),
    (1, 3, 4, 2, 9, 11, (4, 1, 1), 1.0, 10),  # top-10 over the candidates of all references
    (2, 1, 3, 2, 6, 7, 2, 0.7, 1),  # top-1: a hard copy
    (1, 2, 3, 2, 2, 3, 3, 1.0, 50),  # more k than candidates: all of them
    (1, 2, 68, 3, 7, 10, (3, 1), 1.0, 10),  # model+lab's 68 channels: the fp32 geometry for more than 64
]
# the CPU path's own cases: strips and batches stacked in its buffers, radii grouped (non-consecutive: a copy)
CPU_CASES = SELECTIVE + [
    (2, 3, 68, 20, 13, 37, (3, 1, 3), 0.5, 0),  # model+lab, 20 labels, B=2, references of radius 3 not adjacent
    (3, 4, 8, 2, 19, 26, (6, 2, 2, 2), 1.0, 12),  # a first frame's wider window, top-k; strips on both edges
    (2, 1, 16, 16, 17, 17, 6, 1.0, 0),  # training's copy at a small size: radius 6, 16 labels
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_cpu_path_matches_dense(shape, dtype):
    *sizes, radius, temperature = shape
    assert_matches_dense(local_attention_cpu, make_inputs(*sizes, dtype=dtype), radius, temperature)


def integer_scores(inputs):
    """query and refs rounded to multiples of 1/2: every score is then exact in any summation order (in fp32 and in
    the GPU's 3xTF32), so both implementations see the same k-th score and the same ties. With random floats a
    score within rounding of the k-th may be kept by one and dropped by the other (or, in the fused op, by its
    forward and not by its backward, which computes the scores in another order): a boundary case no two
    arithmetics agree on, which only top-k's backward (unused by the project) would feel."""
    q, r, v = inputs
    return [(t.detach() * 2).round().div(2).requires_grad_() for t in (q, r)] + [v]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", CPU_CASES, ids=[str(s) for s in CPU_CASES])
def test_cpu_path_radii_topk_labels_match_dense(shape, dtype):
    *sizes, radius, temperature, topk = shape
    assert_matches_dense(local_attention_cpu, integer_scores(make_inputs(*sizes, dtype=dtype)), radius,
                         temperature, topk)


TOPK_CASES = [c for c in CPU_CASES if c[-1]] + [(1, 4, 6, 3, 21, 30, (9, 5, 5, 5), 0.5, 10)]  # long rows


@pytest.mark.parametrize("blocks", [16, 3])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("shape", TOPK_CASES, ids=[str(s) for s in TOPK_CASES])
def test_cpu_path_topk_without_autograd_matches_dense(shape, ties, blocks, monkeypatch):
    """Without autograd top-k takes its own path (_topk_copy: the k best gathered, the two-step search of _best for
    long rows, 3 blocks forcing it on every row here; the rows with ties at the k-th take the full softmax):
    distinct scores, and few distinct scores (ties at the k-th in most rows)."""
    monkeypatch.setattr(cpu_path, "BLOCKS", blocks)
    *sizes, radius, temperature, topk = shape
    inputs = [t.detach() for t in make_inputs(*sizes, dtype=torch.float64)]
    if ties:  # features in {-1, 0, 1}: few distinct scores, as Lab's flat colours give
        inputs = [inputs[0].div(2).round(), inputs[1].div(2).round(), inputs[2]]
    with torch.no_grad():
        out = local_attention_cpu(*inputs, radius, temperature, topk)
    torch.testing.assert_close(out, local_attention_dense(*inputs, radius, temperature, topk), atol=1e-12, rtol=1e-12)


def test_best_is_topk():
    """_best's two steps give torch.topk's values exactly (and columns holding them), ties included."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-20, 20, (3, 5, 1003), generator=g).double()  # many ties
    scores[0, 0, 7:] = float("-inf")
    for k in (1, 11):
        top, columns = cpu_path._best(scores, k)
        torch.testing.assert_close(top, scores.topk(k, dim=-1).values, atol=0, rtol=0)
        torch.testing.assert_close(scores.gather(-1, columns), top, atol=0, rtol=0)
        assert (columns.sort(-1).values.diff(dim=-1) > 0).all()  # k different columns


@pytest.mark.parametrize("budget", [1, 200_000])
def test_cpu_path_in_chunks_matches_dense(budget, monkeypatch):
    """Without autograd the CPU path takes strips a few at a time and tiles in chunks (one tile per chunk here)."""
    monkeypatch.setattr(cpu_path, "SCORE_BUDGET_BYTES", budget)
    inputs = [t.detach() for t in make_inputs(2, 3, 5, 3, 19, 29, dtype=torch.float64)]
    with torch.no_grad():
        out = local_attention_cpu(*inputs, (4, 2, 2), 0.8, 7)
    torch.testing.assert_close(out, local_attention_dense(*inputs, (4, 2, 2), 0.8, 7), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("tile", [(1, 1), (3, 5), (8, 4)])
def test_cpu_path_tile_shapes_match_dense(tile, monkeypatch):
    monkeypatch.setattr(cpu_path, "TILE_H", tile[0])
    monkeypatch.setattr(cpu_path, "TILE_W", tile[1])
    assert_matches_dense(local_attention_cpu, make_inputs(2, 2, 6, 3, 11, 14, dtype=torch.float64), (3, 1), 0.9, 5)


def test_cpu_path_non_contiguous_inputs():
    q, r, v = (t.detach() for t in make_inputs(2, 2, 12, 5, 9, 14, dtype=torch.float64))
    q = q.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).requires_grad_()  # channels-last
    r = torch.cat([r, r], 2)[:, :, ::2].requires_grad_()  # a strided slice
    v = v.transpose(3, 4).contiguous().transpose(3, 4).requires_grad_()
    assert not (q.is_contiguous() or r.is_contiguous() or v.is_contiguous())
    assert_matches_dense(local_attention_cpu, [q, r, v], 3)


@pytest.mark.parametrize("topk", [0, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_path_16bit_within_2x_of_dense_error(dtype, topk):
    """16-bit inputs (the softmax in fp32): the CPU path's error against fp64 at most twice the dense
    specification's own error in the same dtype (with top-k, the path without autograd)."""
    exact = make_inputs(1, 2, 24, 3, 10, 13, dtype=torch.float64)
    out_exact = local_attention_dense(*exact, 2, 4.0, topk).detach()
    low = [t.detach().to(dtype) for t in exact]
    err, err_dense = ((fn(*low, 2, 4.0, topk).double() - out_exact).abs().max().item()
                      for fn in (local_attention_cpu, local_attention_dense))
    assert err <= 2 * err_dense + 1e-6, (err, err_dense)


def test_cpu_path_gradcheck():
    inputs = make_inputs(2, 2, 3, 2, 4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, r, v: local_attention_cpu(q, r, v, (1, 2), 0.8), inputs)


def test_topk_changes_the_result():
    """Not a no-op: top-3 of a 5x5 window differs from the full softmax, top-1 copies one candidate's values."""
    q, r, v = (t.detach() for t in make_inputs(1, 1, 4, 2, 6, 6, dtype=torch.float64))
    full, top3 = local_attention_cpu(q, r, v, 2), local_attention_cpu(q, r, v, 2, 1.0, 3)
    assert (full - top3).abs().max() > 1e-3
    top1 = local_attention_cpu(q, r, v, 2, 1.0, 1)
    assert torch.isin(top1[0, 0].flatten(), v[0, 0, 0].flatten()).all()


def test_dense_specification_by_hand():
    """The specification itself on a case small enough to write out: a 1x2 map, one reference, radius 0 and 1."""
    q = torch.tensor([[[[1.0, 2.0]]]])  # (1, 1, 1, 2)
    k = torch.tensor([[[[[1.0, -1.0]]]]])  # (1, 1, 1, 1, 2)
    v = torch.tensor([[[[[10.0, 20.0]]]]])
    assert local_attention_dense(q, k, v, 0).tolist() == [[[[10.0, 20.0]]]]  # each position sees itself only
    w = torch.softmax(torch.tensor([[1.0, -1.0], [2.0, -2.0]]), -1)  # scores q_p * k_q, both positions in reach
    torch.testing.assert_close(local_attention_dense(q, k, v, 1)[0, 0, 0], w @ torch.tensor([10.0, 20.0]))


def test_dispatch_uses_the_cpu_path_on_cpu():
    inputs = [t.detach() for t in make_inputs(1, 1, 4, 2, 5, 5)]
    torch.testing.assert_close(local_attention(*inputs, 1), local_attention_cpu(*inputs, 1), atol=0, rtol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_triton_matches_dense(shape):
    *sizes, radius, temperature = shape
    assert_matches_dense(local_attention_triton, make_inputs(*sizes), radius, temperature)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2]], ids=[str(SHAPES[1]), str(SHAPES[2])])
def test_triton_16bit_tile_shapes_match_dense(shape, monkeypatch):
    """The tile and chunk shape of fp16/bf16 inputs (the interpreter cannot run bf16 dots), on fp32 inputs."""
    la = importlib.import_module("kernels.local_attention")
    monkeypatch.setitem(la.CONFIGS, torch.float32, la.CONFIGS[torch.bfloat16])
    *sizes, radius, temperature = shape
    assert_matches_dense(local_attention_triton, make_inputs(*sizes), radius, temperature)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", SELECTIVE, ids=[str(s) for s in SELECTIVE])
def test_triton_radii_and_topk_match_dense(shape):
    """Per-reference radii and top-k in the fused op: output and the three gradients (top-k masks the backward
    the same way; the selected set is fixed, so the gradient is the plain softmax's over it)."""
    *sizes, radius, temperature, topk = shape
    assert_matches_dense(local_attention_triton, integer_scores(make_inputs(*sizes)), radius, temperature, topk)


@pytest.mark.interpreter
@pytest.mark.parametrize("topk", [0, 10])
def test_triton_fp16_propagation_matches_fp32_dense_of_its_values(topk):
    """What propagation runs on a GPU: fp16 queries, references and labels, model+lab's 68 channels (padded to 128),
    the first frame's wider window, no gradient. The kernels multiply the fp16 values exactly and sum in fp32; only
    the probabilities (rounded to fp16 before weighting the labels) and the fp16 output differ from the fp32
    specification on the same values."""
    q, r, _ = make_inputs(1, 3, 68, 2, 9, 13)
    v = torch.softmax(torch.randn(1, 3, 2, 9, 13, generator=torch.Generator().manual_seed(1)), 2)
    q, r, v = (t.detach().half() for t in (q, r, v))
    with torch.inference_mode():
        out = local_attention_triton(q, r, v, [3, 2, 2], 4.0, topk)
        expected = local_attention_dense(q.float(), r.float(), v.float(), [3, 2, 2], 4.0, topk)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.interpreter),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_non_contiguous_inputs(device):
    """On the GPU too: Triton specialises stride-1 arguments at launch, which the interpreter never exercises."""
    B, R, C, K, H, W = 2, 2, 12, 5, 9, 14
    g = torch.Generator().manual_seed(1)
    # channels-last query, refs sliced out of a larger tensor, values transposed in H/W
    q = torch.randn(B, H, W, C, generator=g).to(device).permute(0, 3, 1, 2).requires_grad_()
    r = torch.randn(B, R, 2 * C, H, W, generator=g).to(device)[:, :, ::2].requires_grad_()
    v = torch.randn(B, R, K, W, H, generator=g).to(device).transpose(3, 4).requires_grad_()
    assert not (q.is_contiguous() or r.is_contiguous() or v.is_contiguous())
    out_ref = local_attention_dense(q, r, v, 3)
    grad_out = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, (q, r, v), grad_out)
    out = local_attention_triton(q, r, v, 3)
    grads = torch.autograd.grad(out, (q, r, v), grad_out)
    out_tol, grad_tol = (2e-5, 2e-5) if device == "cpu" else (1e-4, 1e-3)  # the GPU's fp32 dots are 3xTF32
    torch.testing.assert_close(out, out_ref, atol=out_tol, rtol=out_tol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=grad_tol, rtol=grad_tol)


def _bad_arguments():
    q, r, v = (t.detach() for t in make_inputs(1, 2, 4, 3, 5, 6))
    return [
        ("query must be", (q[0], r, v, 1, 1.0)),
        ("refs must be", (q, r[0], v, 1, 1.0)),
        ("values must be", (q, r, v[0], 1, 1.0)),
        ("do not match query", (q, r[:, :, :3], v, 1, 1.0)),
        ("do not match query", (q, r[..., :5], v, 1, 1.0)),
        ("do not match query", (torch.cat([q, q]), r, v, 1, 1.0)),
        ("do not match refs", (q, r, v[:, :1], 1, 1.0)),
        ("do not match refs", (q, r, v[..., :4, :], 1, 1.0)),
        ("radius", (q, r, v, -1, 1.0)),
        ("radius", (q, r, v, 1.5, 1.0)),
        ("radius", (q, r, v, (1, 2, 3), 1.0)),  # three radii for two references
        ("radius", (q, r, v, (1, -1), 1.0)),
        ("temperature", (q, r, v, 1, 0.0)),
        ("temperature", (q, r, v, 1, -2.0)),
        ("temperature", (q, r, v, 1, float("nan"))),
        ("floating-point", (q.long(), r.long(), v.long(), 1, 1.0)),
        ("dtypes differ", (q, r.double(), v, 1, 1.0)),
        ("empty input", (q[..., :0], r[..., :0], v[..., :0], 1, 1.0)),
    ]


@pytest.mark.parametrize("fn", [local_attention_dense, local_attention_cpu, local_attention_triton,
                                local_attention])
def test_bad_arguments_raise_value_error(fn):
    for match, args in _bad_arguments():
        with pytest.raises(ValueError, match=match) as info:
            fn(*args)
        assert "\n" not in str(info.value)


def test_fused_op_refuses_inputs_past_its_launch_limits():
    # meta tensors: shapes without memory, so that 2^31-element inputs cost nothing; the check runs before a launch
    def meta(*shape):
        return torch.empty(*shape, device="meta")

    cases = [  # 101 references of 64 channels at 540x960 (a 4K frame at stride 4) pass 2^31 elements
        ("32-bit offsets: refs", (meta(1, 64, 540, 960), meta(1, 101, 64, 540, 960), meta(1, 101, 16, 540, 960))),
        ("32-bit offsets: values", (meta(1, 8, 4, 4), meta(1, 1, 8, 4, 4), meta(1, 1, 2**27, 4, 4))),
        ("grid's second axis", (meta(1000, 8, 4, 4), meta(1000, 66, 8, 4, 4), meta(1000, 66, 2, 4, 4))),
    ]
    for match, args in cases:
        with pytest.raises(ValueError, match=match) as info:
            local_attention_triton(*args, 1)
        assert "\n" not in str(info.value)
    # a view whose strides reach past 2^31 elements although it holds few
    wide = torch.empty(2, 1, device="meta").as_strided((2, 1, 1, 1), (2**31, 1, 1, 1))
    with pytest.raises(ValueError, match="32-bit offsets: query"):
        local_attention_triton(wide, meta(2, 1, 1, 1, 1), meta(2, 1, 1, 1, 1), 1)


@pytest.mark.parametrize("triton_version, numpy_version, runs", [
    ("3.6.0", "2.4.0", False), ("3.6.0", "2.3.5", True), ("3.7.0", "2.4.6", True)])
def test_an_interpreter_that_cannot_run_the_kernels_is_named_in_one_line(triton_version, numpy_version, runs,
                                                                         monkeypatch):
    # Triton 3.6's interpreter converts one-element arrays with int(), which NumPy 2.4 refuses
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(np, "__version__", numpy_version)
    cpu = torch.zeros(1, 4, 3, 3)
    if runs:
        check_interpreter(cpu)
        check_interpreter(cpu.to("meta"))  # meta tensors stand for CUDA ones: no interpreter
    else:
        with pytest.raises(RuntimeError) as info:
            local_attention_triton(cpu, cpu[:, None], cpu[:, None, :2], 1)
        assert str(info.value) == (f"Triton {triton_version}'s CPU interpreter cannot run with NumPy "
                                   f"{numpy_version}: install numpy<2.4 or triton>=3.7")
        check_interpreter(cpu.to("meta"))


# ---------------------------------------------------------------------------------------------- GPU only


# the shapes above plus the training and propagation cases' channels (.ci/compile_check.py compiles these too)
GPU_SHAPES = SHAPES + [(4, 1, 64, 16, 64, 64, 6, 1.0), (1, 4, 64, 8, 30, 54, 12, 1.0)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[str(s) for s in GPU_SHAPES])
def test_gpu_fp32_matches_reference(shape):
    """fp32 on a GPU: the kernels' dots run in 3xTF32 (each operand as a TF32 head plus a TF32 tail, three
    tensor-core products: about 22 of fp32's 24 mantissa bits per product, accumulation in fp32), the CPU path in
    exact fp32 (torch's default, no TF32 in matmuls). That is a few times fp32's rounding per product, far below
    these tolerances (kept from the exact-fp32 kernel); plain TF32 (~1e-3 relative) would not meet them."""
    *sizes, radius, temperature = shape
    inputs = make_inputs(*sizes, device="cuda")
    out_ref = local_attention_cpu(*inputs, radius, temperature)
    grad_out = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, inputs, grad_out)
    out = local_attention_triton(*inputs, radius, temperature)
    grads = torch.autograd.grad(out, inputs, grad_out)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 1, 64, 16, 37, 29, 6, 8.0), (1, 3, 24, 3, 23, 41, 4, 4.0)])
def test_gpu_low_precision_within_2x_of_reference_error(dtype, shape):
    """In fp16/bf16, the kernel's error (vs fp64) is at most twice the plain PyTorch op's own error."""
    *sizes, radius, temperature = shape
    exact = make_inputs(*sizes, dtype=torch.float64, device="cuda")
    out_exact = local_attention_cpu(*exact, radius, temperature)
    grad_out = torch.randn_like(out_exact)
    grads_exact = torch.autograd.grad(out_exact, exact, grad_out)

    def errors(fn):
        low = [t.detach().to(dtype).requires_grad_() for t in exact]
        out = fn(*low, radius, temperature)
        grads = torch.autograd.grad(out, low, grad_out.to(dtype))
        pairs = [(out, out_exact)] + list(zip(grads, grads_exact))
        return [(a.double() - b).abs().max().item() for a, b in pairs]

    for err, err_ref in zip(errors(local_attention_triton), errors(local_attention_cpu)):
        assert err <= 2 * err_ref + 1e-6, (err, err_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SELECTIVE[:-1], ids=[str(s) for s in SELECTIVE[:-1]])
def test_gpu_radii_and_topk_match_reference(shape):
    """Per-reference radii and top-k, fp32 on a GPU (scores exact in 3xTF32 too: see integer_scores)."""
    *sizes, radius, temperature, topk = shape
    inputs = integer_scores(make_inputs(*sizes, device="cuda"))
    out_ref = local_attention_cpu(*inputs, radius, temperature, topk)
    grad_out = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, inputs, grad_out)
    out = local_attention_triton(*inputs, radius, temperature, topk)
    grads = torch.autograd.grad(out, inputs, grad_out)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_wide_fp32_features_run_the_cpu_path():
    """model+lab's 68 fp32 channels: the fused op would spill registers, so the dispatch runs the CPU path."""
    inputs = [t.detach() for t in make_inputs(1, 2, 68, 3, 30, 54, device="cuda")]
    with pytest.warns(UserWarning, match="running the PyTorch reference"):
        out = local_attention(*inputs, [12, 6], 1.0, 10)
    torch.testing.assert_close(out, local_attention_cpu(*inputs, [12, 6], 1.0, 10), atol=0, rtol=0)
