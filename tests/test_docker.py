"""The Docker image and run_all.sh, checked without a Docker engine (none runs on the CI machines)."""
import os
import re
import subprocess

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
