"""The house: imports flow one way, --overwrite never loses a run to a bad option, --compile falls back."""
import ast
import hashlib
import os
import subprocess
import sys

import pytest

import distill
from conftest import ROOT


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
from conftest import make_tiny_data
import distill
def run(*extra):
    args = distill.build_parser().parse_args(["--ipc", "2", "--iterations", "2", "--batch-real", "4", "--num-freqs",
        "16", "--width", "8", "--device", "cpu", "--precision", "fp32", "--out", {str(tmp_path / 'out')!r}, *extra])
    return distill.distill(args, make_tiny_data(), torch.device("cpu"), log=lambda m: None)["images"]
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
