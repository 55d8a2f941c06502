"""The house: imports flow one way, --overwrite never loses a run to a bad option, --compile falls back."""
import ast
import dataclasses
import hashlib
import os
import subprocess
import sys

import pytest
import torch

import distill
import runs
from conftest import ROOT, make_tiny_data, run_distill
from networks import build_network, reset_parameters_
from stacked import train_networks_stacked
from training import PROTOCOLS, train_network


def local_imports(path) -> set[str]:
    """The repository modules a file imports, at any depth (lazy imports included)."""
    local = {p.stem for p in ROOT.glob("*.py")}
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & local


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_imports_flow_one_way():
    graph = {path.stem: local_imports(path) - {path.stem} for path in ROOT.glob("*.py")}
    assert find_cycle(graph) is None, find_cycle(graph)
    assert "distill" not in graph["evaluate"]  # evaluation judges any set, however it was made
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the checker sees cycles


def digest_tree(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad", [["--data-dir", "MISSING"], ["--imbalance-factor", "0.5"], ["--alpha-head", "0.1"],
                                 ["--resume"]])
def test_overwrite_with_a_bad_option_keeps_the_old_run(bad, tmp_path, capsys):
    """Every input is checked before --overwrite deletes anything: the old run stays byte for byte."""
    out = tmp_path / "run"
    out.mkdir()
    for name, content in (("synthetic.pt", b"old set"), ("checkpoint.pt", b"old checkpoint"),
                          ("config.json", b"{}"), ("results.json", b'{"acc_mean": 50}'), ("loss.csv", b"1,2")):
        (out / name).write_bytes(content)
    before = digest_tree(out)
    data = tmp_path / "empty"
    data.mkdir()
    bad = [str(tmp_path / "missing") if a == "MISSING" else a for a in bad]
    with pytest.raises(SystemExit) as exit_info:
        distill.main(["--data-dir", str(data), *bad, "--overwrite", "--out", str(out), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert digest_tree(out) == before


def test_compile_without_a_c_compiler_warns_and_finishes(tmp_path):
    """With no C/C++ compiler reachable, --compile falls back to eager mode with one warning and the
    distillation finishes with the same set as an eager run."""
    script = f"""
import sys, warnings, torch
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
from conftest import make_tiny_data, run_distill
import distill
def run(*extra):
    args = distill.build_parser().parse_args(["--ipc", "2", "--iterations", "2", "--batch-real", "4", "--num-freqs",
        "16", "--width", "8", "--device", "cpu", "--precision", "fp32", "--out", {str(tmp_path / 'out')!r}, *extra])
    return run_distill(args, make_tiny_data(), torch.device("cpu"), log=lambda m: None)["images"]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    compiled = run("--compile")
eager = run()
lines = [str(w.message) for w in caught if "--compile" in str(w.message)]
print("WARNINGS", len(lines), lines[0] if lines else "")
print("SAME", torch.allclose(compiled, eager, atol=1e-5))
"""
    env = dict(os.environ, CXX=str(tmp_path / "no-compiler"), CC=str(tmp_path / "no-compiler"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), PATH=str(tmp_path / "empty-bin"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WARNINGS 1 --compile: torch.compile failed" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "running in eager mode" in done.stdout and "SAME True" in done.stdout


MALLOC_PROBE = """
import ctypes, sys
import torch
import runs

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
applied = runs.keep_freed_memory() if sys.argv[1] == "tuned" else False
before = libc.mallinfo2().hblkhd
activations = torch.empty(16 << 20, dtype=torch.uint8)  # a 64-image bf16 ConvNet activation is ~17 MB
print(applied, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.parametrize("mode, env, expect_applied, expect_mapped",
                         [("default", {}, False, True), ("tuned", {}, True, False),
                          ("tuned", {"MALLOC_TOP_PAD_": "131072"}, False, True)])
def test_keep_freed_memory_serves_activations_from_the_heap(mode, env, expect_applied, expect_mapped):
    """run_script's malloc setting: a 16 MB block comes from the heap (no fresh mmap, so no page faults on
    every forward pass) once keep_freed_memory has run, from mmap with glibc's defaults; and a user's own
    MALLOC_*_ variable wins over it."""
    try:
        import ctypes
        ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        pytest.skip("no glibc mallinfo2")
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], cwd=ROOT, env={**clean_env, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    applied, mapped = out[0] == "True", int(out[1])
    assert applied is expect_applied
    assert (mapped >= 16 << 20) is expect_mapped, mapped


# ------------------------------------------------------------------------------------------
# A compiled backward pass that fails: the step is taken again in eager mode

GENERATED_CODE = '''
import torch

class FailingBackward(torch.autograd.Function):
    """The identity, whose backward fails as Inductor's generated code failed on an NVIDIA H200."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("expected size 5==5, stride 2048==256 at dim=0")
'''


@pytest.fixture
def failing_compiled_backward(tmp_path, monkeypatch):
    """torch.compile replaced by fn whose output's backward raises a plain AssertionError from a module under an
    Inductor cache folder (as assert_size_stride does); returns the calls of compiled functions."""
    namespace = {}
    exec(compile(GENERATED_CODE, str(tmp_path / "torchinductor_test" / "generated.py"), "exec"), namespace)
    calls = []

    def fake_compile(fn, dynamic=None):
        return lambda *args: calls.append(fn) or namespace["FailingBackward"].apply(fn(*args))

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(runs.compile_or_eager, "warned", False)
    return calls


def trained_parameters(trainer: str, compile: bool) -> list[torch.Tensor]:
    """Two ConvNets x 2 epochs of the ncfm protocol (CutMix, crops) on 24 random images, batches of 10."""
    generators = [torch.Generator().manual_seed(100 + k) for k in range(2)]
    nets = [reset_parameters_(build_network("convnet", 3, 4, 16, width=8, depth=2), g) for g in generators]
    images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels, protocol = torch.arange(24) % 4, dataclasses.replace(PROTOCOLS["ncfm"], batch_size=10)
    if trainer == "stacked":
        train_networks_stacked(nets, images, labels, generators, protocol, epochs=2, compile=compile)
    else:
        for net, g in zip(nets, generators):
            train_network(net, images, labels, g, protocol, epochs=2, compile=compile)
    return [p.detach().clone() for net in nets for p in net.parameters()]


@pytest.mark.parametrize("trainer", ["one at a time", "stacked"])
def test_a_failing_compiled_backward_leaves_the_eager_run(trainer, failing_compiled_backward):
    """Evaluation's training: the first compiled step fails in its backward; one warning, eager mode from then
    on, and the trained networks equal those of an eager run bit for bit (the failed step's draws are kept)."""
    eager = trained_parameters(trainer, compile=False)
    with pytest.warns(UserWarning, match=r"torch.compile failed \(AssertionError: expected size") as caught:
        fell_back = trained_parameters(trainer, compile=True)
    assert failing_compiled_backward, "the compiled path never ran"
    assert len([w for w in caught if "torch.compile failed" in str(w.message)]) == 1
    assert all(torch.equal(a, b) for a, b in zip(eager, fell_back))


def test_a_failing_compiled_backward_leaves_the_eager_distillation(tmp_path, failing_compiled_backward):
    """Distillation: the same for the compiled extractor (3 iterations of csdm on the tiny set)."""
    def run(*extra):
        args = distill.build_parser().parse_args([
            "--ipc", "2", "--iterations", "3", "--batch-real", "4", "--num-freqs", "16", "--width", "8",
            "--device", "cpu", "--precision", "fp32", "--log-every", "100", "--out", str(tmp_path / "out"), *extra])
        return run_distill(args, make_tiny_data(), torch.device("cpu"), log=lambda m: None)

    eager = run()
    with pytest.warns(UserWarning, match="torch.compile failed"):
        fell_back = run("--compile")
    assert failing_compiled_backward, "the compiled path never ran"
    assert torch.equal(eager["packed_images"], fell_back["packed_images"])
    assert [loss for _, loss, _ in eager["history"]] == [loss for _, loss, _ in fell_back["history"]]


def test_other_errors_in_a_step_are_not_taken_for_compiler_failures():
    """An AssertionError of the project's own code, or any error with nothing compiled, passes through and
    leaves compilation on."""
    compiled = runs.compile_or_eager(lambda x: x, enabled=True)

    def step():
        raise AssertionError("a check of the computation itself")

    with pytest.raises(AssertionError, match="the computation itself"):
        runs.step_or_fall_back(step, [compiled])
    assert compiled.enabled
    with pytest.raises(ValueError):
        runs.step_or_fall_back(lambda: int("x"), [runs.compile_or_eager(lambda x: x, enabled=False)])

    def disk_error():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):  # a disk error is not retried in eager mode
        runs.step_or_fall_back(disk_error, [compiled])
    assert compiled.enabled
