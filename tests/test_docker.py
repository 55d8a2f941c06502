"""The Docker image and run_all.sh, checked without a Docker engine (none runs on the CI machines)."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def instructions():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_base_image_is_a_pinned_cuda_pytorch_image():
    base = instructions()[0]
    assert base.startswith("FROM pytorch/pytorch:")
    tag = base.split(":", 1)[1]
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), tag  # never 'latest'


def test_every_copied_file_exists_and_requirements_come_first():
    copies = [line.split()[1:-1] for line in instructions() if line.startswith("COPY")]
    for sources in copies:
        for source in sources:
            assert (ROOT / source).is_file(), f"Dockerfile copies {source}, which is not in the repository"
    order = [line.split()[0] for line in instructions()]
    assert instructions()[order.index("COPY")].split()[1] == "requirements.txt"
    assert order.index("RUN") < max(i for i, op in enumerate(order) if op == "COPY")  # install, then code
    copied = {source for sources in copies for source in sources}
    imported = {f"{m}.py" for m in ("data_lt", "networks", "sdd", "distill", "evaluate")}
    assert imported <= copied and "run_all.sh" in copied


def test_the_image_runs_run_all():
    assert instructions()[-1] == 'CMD ["./run_all.sh"]'
    script = ROOT / "run_all.sh"
    assert os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_run_all_rejects_bad_options():
    for argv, option in ((["--methods", "gan"], "--methods"), (["--frobnicate"], "--frobnicate"),
                         (["--data-dir", "/nonexistent/x"], "--data-dir"), (["--ifs"], "--ifs"),
                         (["--ablation", "colour"], "--ablation"), (["--cpu-bench"], "--data-dir"),
                         (["--seed", "-1"], "--seed"), (["--datasets", "mnist"], "--datasets")):
        done = subprocess.run(["bash", str(ROOT / "run_all.sh"), *argv], capture_output=True, text=True)
        assert done.returncode == 2 and option in done.stderr and len(done.stderr.strip().splitlines()) == 1


FAKE_PYTHON = '''#!{python}
"""Stands in for the interpreter: logs each call; distill.py writes a checkpoint naming its iteration count,
evaluate.py --syn writes results.json."""
import pathlib, sys
script, argv = pathlib.Path(sys.argv[1]).name, sys.argv[2:]
with open({log!r}, "a") as log:
    log.write(script + " " + " ".join(argv) + "\\n")
def value(option):
    return argv[len(argv) - 1 - argv[::-1].index(option) + 1]  # the last one wins, as in argparse
if script == "distill.py":
    out = pathlib.Path(value("--out"))
    out.mkdir(parents=True, exist_ok=True)
    before = (out / "checkpoint.pt").read_text() if "--resume" in argv else "none"
    (out / "checkpoint.pt").write_text(value("--iterations"))
    (out / "continued_from").write_text(before)
elif script == "evaluate.py" and "--syn" in argv:
    (pathlib.Path(value("--syn")).parent / "results.json").write_text("{{}}")
'''


def test_budget_ablation_continues_each_shorter_run(tmp_path):
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    done = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--ablation", "budget", "--data-dir", str(tmp_path),
                           "--out", str(tmp_path / "results")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=str(fake)))
    assert done.returncode == 0, done.stderr
    runs = tmp_path / "results" / "ablations" / "budget"
    for method in ("dm", "csdm"):
        assert (runs / f"{method}-it300" / "continued_from").read_text() == "none"
        for shorter, longer in ((300, 1000), (1000, 3000), (3000, 6000)):
            assert (runs / f"{method}-it{longer}" / "continued_from").read_text() == str(shorter)
            assert (runs / f"{method}-it{longer}" / "checkpoint.pt").read_text() == str(longer)
    distills = [line for line in log.read_text().splitlines() if line.startswith("distill.py")]
    assert len(distills) == 8 and all("--val-per-class 100" in line for line in distills)
    # a second call finds every run done and distils nothing
    subprocess.run(["bash", str(ROOT / "run_all.sh"), "--ablation", "budget", "--data-dir", str(tmp_path),
                    "--out", str(tmp_path / "results")], capture_output=True, text=True, check=True,
                   env=dict(os.environ, PYTHON=str(fake)))
    assert sum(line.startswith("distill.py") for line in log.read_text().splitlines()) == 8
