"""The one device predicate (qat/device.py) and the test markers that go with it: dispatchers ask
`device_path`, nothing else in qat/ reads `.is_cuda`, and every GPU-only test carries @pytest.mark.cuda."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qat import device

ROOT = Path(__file__).resolve().parents[1]


def test_device_path_is_the_gpu_or_the_interpreter_for_triton_ops(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setattr(device, "_HAVE_TRITON", True)
    for value, interpreted in (("0", False), ("1", True), ("true", True), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert device.interpret_mode() is interpreted
        for op in device.TRITON_OPS:
            assert device.device_path(cpu, op) is interpreted, (op, value)
        for op in device.CUDA_ONLY:  # no interpreter stands in for a CUDA-only op
            assert device.device_path(cpu, op) is False, (op, value)
    monkeypatch.setattr(device, "_HAVE_TRITON", False)  # no triton: no Triton kernel, interpreter or not
    assert not any(device.device_path(cpu, op) for op in device.TRITON_OPS)
    with pytest.raises(KeyError, match="declare it in qat/device.py"):
        device.device_path(cpu, "warp_drive")


def test_only_the_predicate_reads_the_tensors_device():
    """`grep -rn "\\.is_cuda" qat`, comments aside: the one place is qat/device.py's on_cuda."""
    hits = []
    for path in sorted((ROOT / "qat").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\.is_cuda\b", code):
                hits.append(f"{path.relative_to(ROOT)}:{n}")
    assert hits == ["qat/device.py:" + str(_line_of(ROOT / "qat" / "device.py", "return t.is_cuda"))], hits


def _line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_every_dispatcher_names_a_declared_op():
    """Each device_path(..., "<op>") in qat/ names an op of TRITON_OPS or CUDA_ONLY, and each declared op is asked."""
    used = set()
    for path in (ROOT / "qat").rglob("*.py"):
        # device_path(t, "op"), and the kernels package's _kernel_runs(t, bits, "op") that calls it
        used |= set(re.findall(r"(?:device_path|_kernel_runs)\([^()]+, \"(\w+)\"\)", path.read_text()))
    declared = set(device.TRITON_OPS) | set(device.CUDA_ONLY)
    assert used == declared, (used - declared, declared - used)


def collected_markers(request) -> dict[str, set[str]]:
    """{node id: marker names} of every test in tests/: this session's items when it collected every test file
    (a full run), else a `--collect-only` run of its own."""
    items = request.session.items
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    if {Path(str(i.path)).name for i in items} >= files:
        return {i.nodeid: {m.name for m in i.iter_markers()} for i in items}
    script = ("import sys, pytest\n"
              "class P:\n"
              "    def pytest_collection_finish(self, session):\n"
              "        for i in session.items:\n"
              "            print('ITEM', i.nodeid, ','.join(sorted({m.name for m in i.iter_markers()})))\n"
              "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests'], plugins=[P()]))\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("ITEM "):
            _, nodeid, *marks = line.split(" ")
            out[nodeid] = set(marks[0].split(",")) if marks and marks[0] else set()
    return out


def test_every_gpu_only_test_carries_the_marker(request):
    """`pytest -m cuda` (bench/gpu_suite.sh's cuda_tests part) must list every GPU-only test: a test whose name or
    parameters say CUDA is marked, and the ones that need a GPU without saying so in their name (vLLM) are too."""
    marks = collected_markers(request)
    assert len(marks) > 500
    unmarked = [n for n, m in marks.items() if "cuda" in n.lower() and "cuda" not in m]
    assert not unmarked, f"tests named for CUDA without @pytest.mark.cuda: {unmarked}"
    gpu_only = {n for n, m in marks.items() if "cuda" in m}
    assert any("vllm" in n for n in gpu_only)
    assert len(gpu_only) >= 50


def test_the_lane_coverage_report_covers_every_dispatcher():
    """tests/scripts/lane_coverage.py reports on its DISPATCHERS: each is a function of its file, and every function
    in qat/ that calls device_path is one of them, so a new dispatcher cannot drop out of the report."""
    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    try:
        import lane_coverage
    finally:
        sys.path.remove(str(ROOT / "tests" / "scripts"))
    listed = {(rel, name) for rel, names in lane_coverage.DISPATCHERS.items() for name in names}
    for rel, name in listed:
        assert name in lane_coverage.spans(ROOT / rel), (rel, name)
    callers = {(str(path.relative_to(ROOT)), name) for path in (ROOT / "qat").rglob("*.py")
               for name, fn in lane_coverage.functions(ast.parse(path.read_text()))
               if "device_path" in {c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call)
                                    and isinstance(c.func, ast.Name)}}
    callers.discard(("qat/device.py", "device_path"))
    assert len(callers) >= 8 and callers <= listed, callers - listed
