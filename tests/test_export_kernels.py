"""The Triton kernels of the integer runtime (qat.runtime.triton_ops) against the reference ops.

- In the interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so they run in the device
  lane, `TRITON_INTERPRET=1 pytest -m lane`): dequantization and activation codes
  exactly, W*A8 outputs exactly without split-K (same fp32 epilogue order) and within fp32 rounding
  with it, W*A16 within one output ulp of the reference (the GEMV, which does not round the weight to
  the activation dtype, within two).
- Offline compilation (no GPU): every Triton kernel with every tile configuration its launcher can pick
  compiles for sm_90 (TTIR; every seventh to a cubin, within an H100's shared memory).
- CUDA (only with a GPU): the compiled kernels and every dispatch choice at real sizes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import lane_only, needs_cuda, needs_triton
from helpers.int_ref import convert_weight, outlier_acts, outlier_weight, weight_spec

ROOT = Path(__file__).resolve().parents[1]
# CPU tensors take the reference path but in the device lane's own tests (conftest's no_interpreter).
pytestmark = pytest.mark.usefixtures("no_interpreter")

# ---------------------------------------------------------------------------------------------
# Triton kernels in the interpreter (the device lane).

# (M, K, N, group (None: per channel), bits, weight symmetric, activation symmetric, dtype, bias)
KERNEL_CASES = [
    (1, 64, 32, 32, 4, True, True, torch.bfloat16, False),
    (5, 128, 48, 32, 4, False, False, torch.bfloat16, True),
    (33, 128, 48, None, 4, True, False, torch.float32, True),
    (33, 64, 32, None, 8, True, True, torch.bfloat16, False),
    (5, 128, 48, None, 8, False, False, torch.float16, True),
    (1, 128, 48, None, 8, False, True, torch.bfloat16, True),
    (5, 64, 32, 32, 2, False, True, torch.bfloat16, False),
    (33, 128, 32, 32, 8, False, False, torch.bfloat16, True),
    (5, 128, 48, 64, 4, False, True, torch.float16, False),
    (1, 256, 32, None, 8, True, False, torch.bfloat16, True),  # a8 split-K inside one group
    (3, 256, 32, None, 4, False, True, torch.float32, False),
    (1, 384, 32, None, 4, True, True, torch.bfloat16, False),  # a group split into 3 parts
    (2, 1024, 48, 128, 4, False, True, torch.bfloat16, True),  # gemv: several K tiles and splits
]


def _ulp_close(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype) -> bool:
    """|out - ref| within two roundings to dtype plus fp32 accumulation, relative to sum |x||w|."""
    eps = torch.finfo(dtype).eps
    tol = (eps + 1e-5) * bound + 1e-30
    return bool(((out.double() - ref.double()).abs() <= tol).all())


def _check_interpreter() -> list[str]:
    from qat.runtime import ops, reference, triton_common, triton_ops

    errors = []

    def no_split(fn, *args):
        saved = triton_common._num_sms
        triton_common._num_sms = lambda index: 0  # no split-K: the epilogue's fp32 order equals the reference
        try:
            return fn(*args)
        finally:
            triton_common._num_sms = saved

    for i, (m, k, n, group, bits, wsym, asym_act, dtype, has_bias) in enumerate(KERNEL_CASES):
        where = f"case {i} M={m} K={k} N={n} g={group} bits={bits} wsym={wsym} act_sym={asym_act} {dtype}"
        w = outlier_weight(n, k, dtype, seed=i)
        fq, qweight, scale, zero, g, _, _ = convert_weight(w, weight_spec(bits, wsym, group))
        x = outlier_acts((m, k), dtype, seed=i)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(i)).to(dtype) if has_bias else None
        bound = x.double().abs() @ fq.double().abs().t() + (0 if bias is None else bias.double().abs())

        deq = triton_ops.dequantize(qweight, scale, zero, bits, g, k, dtype)
        if not torch.equal(deq, fq):
            errors.append(f"{where}: dequantize differs from the fake-quant weight")
        if not torch.equal(ops.dequantize_weight(qweight, scale, zero, bits, g, k, dtype), fq):
            errors.append(f"{where}: ops.dequantize_weight (dispatched) differs")

        ref16 = ops.linear_a16(x, qweight, scale, zero, bits, g, k, bias=bias, impl="reference")
        gemv = []
        if triton_ops.gemv_supported(bits, g, dtype):
            gemv = [("gemv split", triton_ops.linear_gemv(x, qweight, scale, zero, bits, g, bias)),
                    ("gemv no split", no_split(triton_ops.linear_gemv, x, qweight, scale, zero, bits, g, bias)),
                    ("gemv dispatched", ops.linear_a16(x, qweight, scale, zero, bits, g, k, bias=bias, impl="gemv"))]
        elif ops.resolve_impl("gemv", bits, False, m, n, k, g, x) != "triton":
            errors.append(f"{where}: gemv without support does not fall back to triton")
        for name, out in gemv + [("split", triton_ops.linear_a16(x, qweight, scale, zero, bits, g, bias)),
                          ("no split", no_split(triton_ops.linear_a16, x, qweight, scale, zero, bits, g, bias)),
                          ("dispatched", ops.linear_a16(x, qweight, scale, zero, bits, g, k, bias=bias))]:
            # The GEMV multiplies x by (code - zero) * scale in fp32, without first rounding the weight to
            # x.dtype as the fake-quant linear (and the tensor-core kernel) does: one more rounding apart.
            tol = 2 if name.startswith("gemv") else 1
            if out.dtype != dtype or not _ulp_close(out, ref16, tol * bound, dtype):
                errors.append(f"{where}: a16 {name} differs by {(out.double() - ref16.double()).abs().max()}")

        act_sym = not asym_act
        rq = reference.quantize_act_reference(x, act_sym)
        kq = triton_ops.quantize_act_int8(x, act_sym)
        if not (torch.equal(rq[0], kq[0]) and torch.equal(rq[1], kq[1])
                and (rq[2] is None and kq[2] is None or torch.equal(rq[2], kq[2]))):
            errors.append(f"{where}: activation codes/scales/zeros differ")

        ref8 = ops.linear_a8(x, qweight, scale, zero, bits, g, k, act_sym, bias=bias, impl="reference")
        exact = no_split(triton_ops.linear_a8, *kq, qweight, scale, zero, bits, g, bias, dtype)
        if not torch.equal(exact, ref8):
            errors.append(f"{where}: a8 without split differs by {(exact.double() - ref8.double()).abs().max()}")
        bound8 = bound * 1.02 + ref8.double().abs()  # quantized activations are within 1/255 of x
        for name, out in (("split", triton_ops.linear_a8(*kq, qweight, scale, zero, bits, g, bias, dtype)),
                          ("dispatched", ops.linear_a8(x, qweight, scale, zero, bits, g, k, act_sym, bias=bias))):
            if out.dtype != dtype or not _ulp_close(out, ref8, bound8, dtype):
                errors.append(f"{where}: a8 {name} differs by {(out.double() - ref8.double()).abs().max()}")

    # The kill switch sends everything to the reference even where kernels could run.
    os.environ["DISTQAT_INT_KERNELS"] = "0"
    try:
        import qat.runtime.triton_ops as T

        saved, T.linear_a8 = T.linear_a8, None  # would raise if called
        w = outlier_weight(32, 64, torch.bfloat16)
        _, qweight, scale, zero, g, _, _ = convert_weight(w, weight_spec(4, True, 32))
        ops.linear_a8(outlier_acts((3, 64), torch.bfloat16), qweight, scale, zero, 4, g, 64, True)
        T.linear_a8 = saved
    except TypeError:
        errors.append("DISTQAT_INT_KERNELS=0 still ran the Triton a8 kernel")
    finally:
        os.environ.pop("DISTQAT_INT_KERNELS")
    # 3-D input through the dispatcher, bits without a kernel (3) fall back to the reference.
    w = outlier_weight(32, 64, torch.bfloat16)
    fq, qweight, scale, zero, g, _, _ = convert_weight(w, weight_spec(3, False, 32))
    x = outlier_acts((2, 3, 64), torch.bfloat16)
    y = ops.linear_a16(x, qweight, scale, zero, 3, g, 64)
    if y.shape != (2, 3, 32) or not torch.equal(y, F.linear(x, fq)):
        errors.append("3-bit a16 fallback differs from F.linear on the fake-quant weight")
    return errors


@needs_triton
@lane_only
def test_triton_kernels_in_interpreter():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        assert _check_interpreter() == []


# ---------------------------------------------------------------------------------------------
# Offline compilation for a CUDA target: the interpreter (TRITON_INTERPRET=1) runs no compiler checks,
# so a kernel can pass every interpreter test and still not compile (tl.dot's dtype and shape rules).
# No GPU needed: Triton's frontend and NVIDIA backend (bundled ptxas) run on any machine.

SM90_MAX_SHARED = 232448  # bytes of shared memory one H100 block may opt into


def _compile_offline(case: dict, target, last: str):
    """Run triton's stages for `case` (a triton_cases.compile_cases entry) up to `last`; (module, metadata)."""
    from triton._C.libtriton import ir
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    src = ASTSource(fn=case["fn"], signature=case["signature"], constexprs=case["constexprs"])
    backend = make_backend(target)
    options = backend.parse_options(dict(case["options"]))
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         ctx)
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    metadata: dict = {}
    for ext, run in stages.items():
        module = run(module, metadata)
        if ext == last:
            break
    return module, metadata


def _offline_target():
    try:
        from triton._C.libtriton import ir  # noqa: F401
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource  # noqa: F401
        from triton.compiler.compiler import make_backend

        target = GPUTarget("cuda", 90, 32)
        make_backend(target)
        return target
    except Exception as e:  # an API this test does not know: skip rather than fail
        pytest.skip(f"offline triton compilation unavailable here ({type(e).__name__}: {e})")


@needs_triton
@pytest.mark.parametrize("part", ["a8", "a16", "gemv", "dequant", "act_quant"])
def test_kernels_compile_for_a_gpu_target_offline(part, monkeypatch):
    """Every Triton kernel with every tile configuration its launcher can choose compiles to TTIR for
    sm_90; every seventh case goes on to a cubin (bundled ptxas) and must fit in an H100's shared memory."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    code = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
import test_export_kernels as t
import triton_cases
target = t._offline_target_or_exit()
cases = [c for c in triton_cases.compile_cases(flag_variants=False) if c["name"].split()[0] == {part!r}]
assert cases, "no cases"
failures = []
for i, case in enumerate(cases):
    last = "cubin" if i % 7 == 0 else "ttir"
    try:
        _, md = t._compile_offline(case, target, last)
    except Exception as e:
        failures.append(f"{{case['name']}} ({{last}}): {{type(e).__name__}}: {{str(e)[-1500:]}}")
        continue
    if last == "cubin" and md.get("shared", 0) > t.SM90_MAX_SHARED:
        failures.append(f"{{case['name']}}: {{md['shared']}} bytes of shared memory")
print("\\n".join(failures) or f"OK {{len(cases)}}")
"""
    # A subprocess: TRITON_INTERPRET is read when the kernels are defined.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip()[-500:])
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1].startswith("OK"), \
        f"{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"


def test_int_dots_name_their_out_dtype():
    """triton <= 3.6 defaults tl.dot's out_dtype to fp32 and rejects an int32 accumulator (the W*A8
    kernel failed so on an H100); triton >= 3.9 infers it, so compiling with a new triton cannot catch
    this. Every tl.dot given an accumulator must name out_dtype."""
    import ast

    trees = [ast.parse(path.read_text()) for path in sorted((ROOT / "qat" / "runtime").glob("triton_*.py"))]
    dots = [n for tree in trees for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and n.func.attr == "dot" and isinstance(n.func.value, ast.Name)
            and n.func.value.id == "tl"]
    assert dots
    for call in dots:
        has_acc = len(call.args) >= 3 or any(kw.arg == "acc" for kw in call.keywords)
        if has_acc:
            assert any(kw.arg == "out_dtype" for kw in call.keywords), f"line {call.lineno}: tl.dot without out_dtype"


def _offline_target_or_exit():
    try:
        return _offline_target()
    except BaseException as e:  # pytest.skip outside pytest: exit 77, the caller skips
        print(f"skip: {e}")
        sys.exit(77)


# ---------------------------------------------------------------------------------------------
# CUDA: the compiled kernels at real sizes, every implementation of every path.

CUDA_CASES = [
    (4, True, 128, True), (4, False, 128, False), (4, True, None, True), (8, True, None, True),
    (8, False, None, False), (8, True, 128, True),
]


@needs_cuda
@pytest.mark.parametrize("bits,wsym,group,act_sym", CUDA_CASES)
@pytest.mark.parametrize("m", [1, 16, 100, 1024])
def test_cuda_paths_match_reference(bits, wsym, group, act_sym, m, monkeypatch):
    from qat.runtime import ops, reference

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    k, n = 4096, 1024
    w = outlier_weight(n, k, torch.bfloat16, seed=m)
    fq, qweight, scale, zero, g, _, _ = (t.cuda() if isinstance(t, torch.Tensor) else t
                                         for t in convert_weight(w, weight_spec(bits, wsym, group)))
    x = outlier_acts((m, k), torch.bfloat16, seed=m).cuda()
    bias = torch.randn(n, device="cuda").bfloat16()
    assert torch.equal(ops.dequantize_weight(qweight, scale, zero, bits, g, k, torch.bfloat16), fq)
    bound = x.double().abs() @ fq.double().abs().t() + bias.double().abs()
    ref16 = ops.linear_a16(x, qweight, scale, zero, bits, g, k, bias=bias, impl="reference")
    for impl in ops.IMPLS[ops.path_name(bits, False)] + (None,):
        out = ops.linear_a16(x, qweight, scale, zero, bits, g, k, bias=bias, impl=impl)
        # tinygemm rounds an asymmetric zero to bf16 and may accumulate differently: twice the bound.
        tol = 2 if impl in ("tinygemm", "gemv", None) else 1
        assert _ulp_close(out, ref16, tol * bound, torch.bfloat16), f"a16 {impl}"
    from qat.runtime import tinygemm

    if bits == 4 and group in tinygemm.TINYGEMM_GROUPS:  # the packing convention held on this GPU
        assert tinygemm._tinygemm_state["disabled"] is None, tinygemm._tinygemm_state["disabled"]
    rq = reference.quantize_act_reference(x, act_sym)
    kq = ops.quantize_act_int8(x, act_sym)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(rq, kq))
    ref8 = ops.linear_a8(x, qweight, scale, zero, bits, g, k, act_sym, bias=bias, impl="reference")
    for impl in ops.IMPLS[ops.path_name(bits, True)] + (None,):
        out = ops.linear_a8(x, qweight, scale, zero, bits, g, k, act_sym, bias=bias, impl=impl)
        assert _ulp_close(out, ref8, bound * 1.02 + ref8.double().abs(), torch.bfloat16), f"a8 {impl}"

