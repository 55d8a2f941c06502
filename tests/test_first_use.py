"""What a new user meets first: the README's first screen and file map, and the CPU line on a fresh clone."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT
from test_docker import FAKE_PYTHON

README = (ROOT / "README.md").read_text()
CPU_LINE = next(line for line in README.splitlines() if "./run_all.sh --quick" in line)


def code_lines(text: str) -> set[str]:
    """The lines inside ``` blocks."""
    return {line for block in re.findall(r"```\w*\n(.*?)```", text, re.DOTALL) for line in block.splitlines()}


def test_the_first_screen_names_the_main_job_the_tests_and_the_results():
    first_screen = "\n".join(README.splitlines()[:60])
    assert "docker run --gpus all" in first_screen and "./run_all.sh" in first_screen
    assert "python -m pytest -q tests" in first_screen
    assert "arxiv.org/abs/2603.01698" in first_screen  # the paper it tests, named and linked
    assert re.search(r"\| 200 \| \d+\.\d\d ± \d\.\d\d \|", first_screen)  # the measured table
    # the test command is the one CI runs
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-m pytest -q tests" in ci and "-r requirements.txt -r tests/requirements.txt" in ci


def test_the_readme_is_short_and_its_prose_fits_100_columns():
    assert len(README.encode()) <= 12 * 1024
    long = [line for line in README.splitlines() if len(line) > 100 and line not in code_lines(README)]
    assert long == []
    # only the three set-up-and-run one-liners are longer, so that each stays one line to paste
    assert len([line for line in code_lines(README) if len(line) > 100]) <= 3


def test_every_path_of_the_file_map_and_every_link_exists():
    file_map = README[README.index("## Files"):README.index("## Citation")]
    paths = re.findall(r"^\| `([^`]+)` \|", file_map, re.MULTILINE)
    assert len(paths) >= 10
    links = re.findall(r"\]\(((?!https?:)[^)#]+)\)", README)
    assert [p for p in paths + links if not (ROOT / p).exists()] == []


def tree_digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_the_cpu_line_on_a_fresh_clone_writes_its_own_runs_and_leaves_the_committed_ones(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("run_all.sh", "methods.py"):
        shutil.copy2(ROOT / name, clone / name)
    shutil.copytree(ROOT / "results" / "quick", clone / "results" / "quick")  # as committed
    before = tree_digest(clone / "results")
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    command = CPU_LINE[CPU_LINE.index("./run_all.sh"):].replace("./run_all.sh", str(clone / "run_all.sh"), 1)
    done = subprocess.run(["bash", "-c", command + f" --data-dir {tmp_path}"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=str(fake)))
    assert done.returncode == 0, done.stderr
    assert "done, skipped" not in done.stdout and "runs/" in done.stdout
    for method in ("random", "dm", "csdm"):
        assert (clone / "runs" / "quick" / "cifar10" / "if200" / "ipc10" / method / "results.json").exists()
    assert tree_digest(clone / "results") == before
    assert "distill.py --method csdm" in log.read_text()


def test_the_paper_bench_runs_ncfms_pipeline_with_a_shared_pool(tmp_path):
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--paper-bench", "--data-dir", str(tmp_path),
                           "--out", str(out)], capture_output=True, text=True, env=dict(os.environ, PYTHON=str(fake)))
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    distills = [line for line in calls if line.startswith("distill.py")]
    assert [line.split("--method ")[1].split()[0] for line in distills] == ["ncfm", "csdm"]
    for line in distills:
        assert "--preset ncfm-paper" in line and f"--pool-cache {out}/paper_cell/pool" in line
        assert "--pool-size 2" in line and "--iterations 400" in line and "--batch-real" not in line
    evaluations = [line for line in calls if line.startswith("evaluate.py --syn")]
    assert len(evaluations) == 2 and all("--num-eval 3 --epochs 200" in line for line in evaluations)
    assert (out / "paper_bench" / "dm" / "cifar10" / "if200" / "ipc10" / "csdm-paper" / "results.json").exists()


QUEUE_PYTHON = '''#!{python}
"""Stands in for the interpreter: each distill.py / evaluate.py call records its GPU and its start and end,
sleeps a little, and fails for the method named in FAIL_METHOD."""
import json, os, pathlib, sys, time
script, argv = pathlib.Path(sys.argv[1]).name, sys.argv[2:]
def value(option):
    return argv[len(argv) - 1 - argv[::-1].index(option) + 1]
if script in ("distill.py", "evaluate.py") and "--report" not in argv:
    start = time.time()
    time.sleep(0.4)
    if "--method" in argv and value("--method") == os.environ.get("FAIL_METHOD"):
        sys.exit(1)
    out = pathlib.Path(value("--out")) if "--out" in argv else pathlib.Path(value("--syn")).parent
    out.mkdir(parents=True, exist_ok=True)
    if script == "distill.py":
        (out / "synthetic.pt").write_text("")
    else:
        (out / "results.json").write_text("{{}}")
    with open({log!r}, "a") as log:
        log.write(json.dumps([script, str(out), os.environ.get("CUDA_VISIBLE_DEVICES"), start, time.time()]) + "\\n")
'''


def run_grid(tmp_path, env, *options):
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(QUEUE_PYTHON.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    done = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--quick", "--datasets", "cifar10", "--ifs", "10 200",
                           "--ipcs", "10", "--methods", "random dm csdm", "--data-dir", str(tmp_path), "--out",
                           str(tmp_path / "out"), *options], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=str(fake), **env))
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def most_at_once(calls) -> int:
    events = sorted([(start, 1) for *_, start, _ in calls] + [(end, -1) for *_, _, end in calls])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_the_grid_spreads_its_cells_over_the_gpus_one_job_per_gpu(tmp_path):
    done, calls = run_grid(tmp_path, {"CUDA_VISIBLE_DEVICES": "3,5,7"})
    assert done.returncode == 0, done.stderr
    assert {gpu for _, _, gpu, _, _ in calls} == {"3", "5", "7"}  # every job on one GPU of the list
    assert most_at_once(calls) == 3  # N devices, N concurrent jobs
    for gpu in ("3", "5", "7"):  # never two jobs at once on one GPU
        assert most_at_once([c for c in calls if c[2] == gpu]) == 1
    assert len({out for _, out, *_ in calls if out.endswith(("dm", "csdm", "random"))}) == 6


def test_jobs_per_gpu_and_a_failure_that_stops_nothing_else(tmp_path):
    done, calls = run_grid(tmp_path, {"CUDA_VISIBLE_DEVICES": "0", "FAIL_METHOD": "dm"}, "--jobs-per-gpu", "2")
    assert done.returncode == 1
    assert "2 runs failed" in done.stderr and "if10/ipc10/dm" in done.stderr and "if200/ipc10/dm" in done.stderr
    finished = {pathlib_name(out) for script, out, *_ in calls if script == "evaluate.py"}
    assert finished == {"random", "csdm"}  # both IFs' random and csdm ran to the end
    assert len([c for c in calls if c[0] == "evaluate.py"]) == 4 and most_at_once(calls) == 2


def test_on_a_cpu_the_grid_runs_one_cell_at_a_time(tmp_path):
    done, calls = run_grid(tmp_path, {"CUDA_VISIBLE_DEVICES": "0,1"}, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert most_at_once(calls) == 1 and {gpu for _, _, gpu, _, _ in calls} == {"0,1"}  # left as it was


def pathlib_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
