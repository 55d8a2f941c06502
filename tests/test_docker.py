"""The Docker image and run_all.sh, checked without a Docker engine (none runs on the CI machines).

Each check is a function of the files' text that returns its problems (an empty list when all is well), so
that a test can also feed it a broken variant and see the problem caught."""
import ast
import fnmatch
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath

import data_lt
from conftest import ROOT


def read(name):
    return (ROOT / name).read_text()


# ------------------------------------------------------------------------------------------
# Reading a Dockerfile and a .dockerignore

def dockerfile_instructions(text):
    """[(INSTRUCTION, arguments)]: continuation lines joined, comment and blank lines dropped."""
    found, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        op, _, args = (pending + line).partition(" ")
        found.append((op.upper(), args.strip()))
        pending = ""
    if pending:
        op, _, args = pending.strip().partition(" ")
        found.append((op.upper(), args.strip()))
    return found


def arguments(args):
    """An instruction's arguments: the JSON (exec) form or the shell-words form."""
    if args.startswith("["):
        return list(json.loads(args))
    return shlex.split(args)


def env_values(text):
    """Every ENV key (KEY=VALUE or the legacy 'ENV KEY VALUE') and its last value, unexpanded."""
    env = {}
    for op, args in dockerfile_instructions(text):
        if op != "ENV":
            continue
        words = shlex.split(args, posix=True)
        if words and "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])
        else:
            env.update(word.split("=", 1) for word in words)
    return env


def copy_sources(text):
    """The source patterns of every COPY / ADD from the build context (not --from another stage)."""
    sources = []
    for op, args in dockerfile_instructions(text):
        if op not in ("COPY", "ADD"):
            continue
        flags = re.match(r"(\s*--\S+)*", args).group(0)
        if "--from" in flags:
            continue
        sources += arguments(args[len(flags):].strip())[:-1]  # the last word is the destination
    return sources


def _match_parts(pattern, parts):
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match_parts(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match_parts(pattern[1:], parts[1:])


def context_match(pattern, path):
    """Docker's rule for COPY sources and .dockerignore lines: the pattern names the path or a folder
    above it; '*' stays inside one path component, '**' spans any number of them."""
    pattern_parts = [p for p in PurePosixPath(pattern.strip().lstrip("/")).parts if p != "."]
    parts = PurePosixPath(path).parts
    return any(_match_parts(pattern_parts, parts[:i]) for i in range(len(parts) + 1))


def ignored(path, dockerignore_text):
    """True if .dockerignore keeps path out of the build context (the last matching line wins)."""
    verdict = False
    for line in dockerignore_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        if context_match(line.lstrip("!"), path):
            verdict = not negated
    return verdict


def in_image(path, dockerfile_text, dockerignore_text):
    return (not ignored(path, dockerignore_text)
            and any(context_match(source, path) for source in copy_sources(dockerfile_text)))


# ------------------------------------------------------------------------------------------
# (a) every module the image's scripts import is copied into it

def scripts_called(run_all_text):
    """The Python scripts a shell script runs ("$PYTHON" x.py, python x.py, python3 -u x.py)."""
    code = "\n".join(line for line in run_all_text.splitlines() if not line.lstrip().startswith("#"))
    pattern = r'(?:"\$\{?PYTHON\}?"|\$\{?PYTHON\}?|\bpython3?)\s+(?:-\w+\s+)*([\w./-]+\.py)\b'
    return sorted(set(re.findall(pattern, code)))


def imported_names(source, rel_path="x.py"):
    """Every module name an import statement names, anywhere in the file (lazy imports in functions too);
    relative imports resolved against the file's folder."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = list(PurePosixPath(rel_path).parent.parts)
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module:
                names.add(module)
            names.update(f"{module}.{alias.name}".lstrip(".") for alias in node.names if alias.name != "*")
    return names


def local_files(name, root):
    """The repository files a dotted module name loads (a.py, or a/__init__.py and a/b.py, ...)."""
    parts, files = name.split("."), []
    for i in range(1, len(parts) + 1):
        stem = "/".join(parts[:i])
        files += [f for f in (f"{stem}.py", f"{stem}/__init__.py") if (Path(root) / f).is_file()]
    return files


def modules_needed(scripts, root):
    """The scripts and every repository module they import, transitively (paths relative to root)."""
    todo, seen = list(scripts), set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        for name in imported_names((Path(root) / rel).read_text(), rel):
            todo += local_files(name, root)
    return seen


def uncopied_modules(run_all_text, dockerfile_text, dockerignore_text, root=ROOT):
    scripts = scripts_called(run_all_text)
    if not scripts:
        return ["run_all.sh calls no Python script that the check could find"]
    return [f"{rel} is read by the image's scripts ({', '.join(scripts)}) but not copied into it"
            for rel in sorted(modules_needed(scripts, root)) if not in_image(rel, dockerfile_text, dockerignore_text)]


def test_every_module_the_scripts_import_is_copied():
    assert {"distill.py", "evaluate.py"} <= set(scripts_called(read("run_all.sh")))
    needed = modules_needed(scripts_called(read("run_all.sh")), ROOT)
    assert {"data_lt.py", "networks.py"} <= needed
    assert uncopied_modules(read("run_all.sh"), read("Dockerfile"), read(".dockerignore")) == []


def test_uncopied_modules_are_caught(tmp_path):
    listed = read("Dockerfile").replace("COPY *.py run_all.sh ./",
                                        "COPY data_lt.py distill.py evaluate.py run_all.sh ./")
    problems = uncopied_modules(read("run_all.sh"), listed, read(".dockerignore"))
    assert any(p.startswith("networks.py ") for p in problems) and any(p.startswith("sdd.py ") for p in problems)
    problems = uncopied_modules(read("run_all.sh"), read("Dockerfile"), read(".dockerignore") + "\nsdd.py\n")
    assert [p.split()[0] for p in problems] == ["sdd.py"]
    assert uncopied_modules("# python distill.py\n", read("Dockerfile"), "")  # no script found is a problem
    # transitively, through a lazy import inside a function and a package
    (tmp_path / "pkg").mkdir()
    (tmp_path / "main.py").write_text("import os\nfrom helper import f\n")
    (tmp_path / "helper.py").write_text("def f():\n    import pkg.deep\n")
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "deep.py").write_text("from . import leaf\n")
    (tmp_path / "pkg" / "leaf.py").write_text("")
    assert modules_needed(["main.py"], tmp_path) == {"main.py", "helper.py", "pkg/__init__.py", "pkg/deep.py",
                                                     "pkg/leaf.py"}
    problems = uncopied_modules('"$PYTHON" main.py\n', "FROM x\nCOPY *.py ./\n", "", tmp_path)
    assert sorted(p.split()[0] for p in problems) == ["pkg/__init__.py", "pkg/deep.py", "pkg/leaf.py"]
    assert uncopied_modules('"$PYTHON" main.py\n', "FROM x\nCOPY *.py ./\nCOPY pkg pkg/\n", "", tmp_path) == []
    assert uncopied_modules('"$PYTHON" main.py\n', "FROM x\nCOPY . .\n", "**/leaf.py\n", tmp_path) == [
        "pkg/leaf.py is read by the image's scripts (main.py) but not copied into it"]


def test_context_matching_follows_docker():
    assert context_match("*.py", "distill.py") and not context_match("*.py", "tests/test_docker.py")
    assert context_match(".", "tests/conftest.py") and context_match("tests", "tests/conftest.py")
    assert context_match("**/__pycache__", "__pycache__/x.pyc") and context_match("**/__pycache__", "a/__pycache__/x")
    assert ignored("x.py", "*.py\n!x.py\n") is False and ignored("y.py", "*.py\n!x.py\n") is True
    assert copy_sources('COPY --chown=1:1 ["a.py", "b c.py", "./"]\nCOPY --from=build /x /y\nADD d.sh \\\n  /e/\n') \
        == ["a.py", "b c.py", "d.sh"]


# ------------------------------------------------------------------------------------------
# (b) every third-party import is installed by requirements.txt

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line):
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return canonical(match.group(1)) if match else None


def installed_by(requirements_text, requires=importlib.metadata.requires):
    """The distributions requirements.txt installs: those it lists and, transitively, their dependencies
    (extras left out), as the installed metadata declares them."""
    todo = [requirement_name(line) for line in requirements_text.splitlines()
            if line.strip() and not line.lstrip().startswith(("#", "-"))]
    seen = set()
    while todo:
        name = todo.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            dependencies = requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            dependencies = []
        todo += [requirement_name(d) for d in dependencies if not re.search(r"\bextra\s*==", d)]
    return seen


def third_party_imports(sources, local_names=()):
    """Top-level names imported by the given sources that are neither the standard library nor local."""
    tops = {name.split(".")[0] for source in sources for name in imported_names(source)}
    return {t for t in tops if t and t not in sys.stdlib_module_names and t not in set(local_names)}


def unsatisfied_imports(imports, requirements_text, distributions=None, requires=importlib.metadata.requires):
    """The import names no distribution installed by requirements_text provides (an import that is not
    installed here is looked up under its own name)."""
    distributions = importlib.metadata.packages_distributions() if distributions is None else distributions
    allowed = installed_by(requirements_text, requires)
    return [f"'import {name}' (distribution {', '.join(distributions.get(name, [name]))}) is neither in "
            f"requirements.txt nor a dependency of what it lists"
            for name in sorted(imports) if not {canonical(d) for d in distributions.get(name, [name])} & allowed]


def image_imports():
    modules = modules_needed(scripts_called(read("run_all.sh")), ROOT)
    return third_party_imports([read(m) for m in modules], {Path(m).parts[0].removesuffix(".py") for m in modules})


def test_requirements_cover_every_third_party_import():
    imports = image_imports()
    assert {"torch", "torchvision"} <= imports
    assert unsatisfied_imports(imports, read("requirements.txt")) == []


def test_missing_requirements_are_caught():
    imports = image_imports() | {"einops", "PIL"}
    requirements = read("requirements.txt")
    without_einops = "\n".join(line for line in requirements.splitlines() if not line.startswith("einops"))
    assert [p.split()[1] for p in unsatisfied_imports(imports, without_einops)] == ["einops'"]
    # pillow (PIL) comes only through torchvision and matplotlib
    bare = "\n".join(line for line in requirements.splitlines() if not line.startswith(("torchvision", "matplotlib")))
    problems = " ".join(unsatisfied_imports(imports, bare))
    assert "'import PIL' (distribution pillow)" in problems and "'import torchvision'" in problems
    assert unsatisfied_imports({"scipy_not_here"}, requirements) != []
    # through a dependency's dependency, extras left out
    fake = {"a": ["b>=1", "c ; extra == 'full'"], "b": ["Pillow_Fork (>=2)"], "c": [], "pillow-fork": []}
    assert installed_by("a==1  # comment\n-r other.txt\n", fake.get) == {"a", "b", "pillow-fork"}
    assert unsatisfied_imports({"P", "C"}, "a\n", {"P": ["pillow_fork"], "C": ["c"]}, fake.get) == [
        "'import C' (distribution c) is neither in requirements.txt nor a dependency of what it lists"]


# ------------------------------------------------------------------------------------------
# (c) a C/C++ compiler for torch.compile

CXX_PACKAGE = re.compile(r"(build-essential|g\+\+(-\d+)?|clang(-\d+)?)$")


def apt_installs(run_args):
    """(packages, options) of each apt-get / apt install in a RUN command."""
    found = []
    for command in re.split(r"&&|\|\||;", run_args):
        words = command.split()
        for i, word in enumerate(words[:-1]):
            if word in ("apt-get", "apt") and "install" in words[i + 1:]:
                rest = words[words.index("install", i) + 1:]
                found.append(([w for w in rest if not w.startswith("-")], [w for w in rest if w.startswith("-")]))
                break
    return found


def compiler_problems(dockerfile_text):
    """torch.compile builds C++ on the CPU (Inductor, g++) and C on CUDA (Triton's launcher, gcc): the image
    needs g++ (which brings gcc): a -devel base, or an apt-get install of build-essential / g++ / clang."""
    instructions = dockerfile_instructions(dockerfile_text)
    base = next(args for op, args in instructions if op == "FROM")
    if re.search(r"-devel\b", base):
        return []
    problems = []
    for op, args in instructions:
        if op != "RUN":
            continue
        for packages, options in apt_installs(args):
            if not any(CXX_PACKAGE.match(p) for p in packages):
                continue
            if "--no-install-recommends" not in options:
                problems.append("the compiler's apt-get install lacks --no-install-recommends")
            if "apt-get update" not in args:
                problems.append("the compiler's RUN does not apt-get update first (the base has no package lists)")
            if "rm -rf /var/lib/apt/lists" not in args:
                problems.append("the compiler's RUN leaves the apt lists in the image (rm -rf /var/lib/apt/lists/*)")
            return problems
    return [f"no C++ compiler in the image ({base} is a runtime base): torch.compile (--compile, run_all.sh) "
            f"needs one; apt-get install build-essential, or use a -devel base"]


def test_the_image_has_a_compiler():
    assert compiler_problems(read("Dockerfile")) == []


def test_a_missing_compiler_is_caught():
    dockerfile = read("Dockerfile")
    run = next(f"RUN {args}" for op, args in dockerfile_instructions(dockerfile)
               if op == "RUN" and "build-essential" in args)
    start = dockerfile.index("RUN apt-get")
    original = dockerfile[start:dockerfile.index("\n", dockerfile.index("/var/lib/apt/lists", start))]
    assert "build-essential" in run and original in dockerfile
    assert "no C++ compiler" in " ".join(compiler_problems(dockerfile.replace(original, "")))
    assert "no C++ compiler" in " ".join(compiler_problems(dockerfile.replace("build-essential", "gcc")))
    assert compiler_problems(dockerfile.replace("build-essential", "g++-12")) == []
    sloppy = compiler_problems(dockerfile.replace(" --no-install-recommends", "")
                               .replace(" \\\n && rm -rf /var/lib/apt/lists/*", ""))
    assert len(sloppy) == 2 and "--no-install-recommends" in sloppy[0] and "apt lists" in sloppy[1]
    devel = re.sub(r"^FROM .*$", "FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-devel", dockerfile.replace(original, ""),
                   flags=re.MULTILINE)
    assert compiler_problems(devel) == []


# ------------------------------------------------------------------------------------------
# (d) data, results and cache are volumes; the commit is a build argument

def run_all_default_out(run_all_text):
    match = re.search(r'\bOUT="([^"$]+)"', run_all_text)
    return match.group(1) if match else "runs"


def volume_problems(dockerfile_text, run_all_text, data_dir=getattr(data_lt, "DEFAULT_DATA_DIR", "data")):
    instructions = dockerfile_instructions(dockerfile_text)
    workdirs = [args for op, args in instructions if op == "WORKDIR"]
    volumes = {os.path.normpath(v) for op, args in instructions if op == "VOLUME" for v in arguments(args)}
    env = env_values(dockerfile_text)
    problems = []
    if not workdirs:
        return ["no WORKDIR: the data and results folders are relative to it"]
    needed = {"data (torchvision's downloads)": os.path.join(workdirs[-1], data_dir),
              "results": os.path.join(workdirs[-1], run_all_default_out(run_all_text))}
    if "CSDM_CACHE_DIR" in env:
        needed["the cache (CSDM_CACHE_DIR)"] = env["CSDM_CACHE_DIR"]
    else:
        problems.append("ENV CSDM_CACHE_DIR is not set: the decoded splits would be cached in the container's "
                        "own ~/.cache/csdm and lost with it")
    problems += [f"{what}: {path} is not a VOLUME" for what, path in needed.items()
                 if os.path.normpath(path) not in volumes]
    ops = [op for op, _ in instructions]
    arg = [i for i, (op, args) in enumerate(instructions) if op == "ARG" and args.split("=")[0] == "GIT_COMMIT"]
    if not arg or arg[0] < ops.index("FROM"):
        problems.append("no ARG GIT_COMMIT in the build stage (after FROM)")
    committed = [i for i, (op, args) in enumerate(instructions)
                 if op == "ENV" and re.search(r"\bCSDM_GIT_COMMIT=\$\{?GIT_COMMIT\}?(\s|$)", args)]
    if not committed or (arg and committed[-1] < arg[0]):
        problems.append("no ENV CSDM_GIT_COMMIT=$GIT_COMMIT after the ARG: run records would not name the commit")
    return problems


def header_problems(dockerfile_text):
    """The header comment shows how to build (with the commit) and run (with every volume mounted)."""
    header = []
    for line in dockerfile_text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# ").rstrip())
    commands = " ".join(header).replace("\\ ", " ")
    problems = []
    if not re.search(r"docker build --build-arg GIT_COMMIT=\$\(git rev-parse HEAD\)", commands):
        problems.append("the header lacks 'docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) ...'")
    run = re.search(r"docker run (.*?\./run_all\.sh)", commands)
    if not run:
        return problems + ["the header lacks a 'docker run ... ./run_all.sh' line"]
    mounted = {os.path.normpath(m) for m in re.findall(r"-v\s+\"?[^\s:\"]+:([^\s\"]+)", run.group(1))}
    volumes = {os.path.normpath(v) for op, args in dockerfile_instructions(dockerfile_text)
               if op == "VOLUME" for v in arguments(args)}
    problems += [f"the header's docker run does not mount {v}" for v in sorted(volumes - mounted)]
    if "--gpus" not in run.group(1):
        problems.append("the header's docker run does not pass --gpus")
    return problems


def test_volumes_and_commit():
    assert volume_problems(read("Dockerfile"), read("run_all.sh")) == []
    assert header_problems(read("Dockerfile")) == []


def test_missing_volumes_and_commit_are_caught():
    dockerfile, run_all = read("Dockerfile"), read("run_all.sh")
    volume = next(args for op, args in dockerfile_instructions(dockerfile) if op == "VOLUME")
    no_cache = dockerfile.replace(volume, json.dumps([v for v in json.loads(volume) if "cache" not in v]))
    assert volume_problems(no_cache, run_all) == ["the cache (CSDM_CACHE_DIR): /workspace/cache is not a VOLUME"]
    assert header_problems(no_cache) == []  # mounting more than the volumes is fine
    no_results = dockerfile.replace(volume, json.dumps([v for v in json.loads(volume) if "runs" not in v]))
    assert volume_problems(no_results, run_all) == ["results: /workspace/csdm/runs is not a VOLUME"]
    assert volume_problems(dockerfile, run_all.replace('OUT="runs"', 'OUT="out"')) == [
        "results: /workspace/csdm/out is not a VOLUME"]
    assert "CSDM_CACHE_DIR is not set" in volume_problems(dockerfile.replace("CSDM_CACHE_DIR=", "X="), run_all)[0]
    assert volume_problems(dockerfile.replace("ARG GIT_COMMIT=unknown\n", ""), run_all)[0].startswith("no ARG")
    assert volume_problems(dockerfile.replace("CSDM_GIT_COMMIT=$GIT_COMMIT", "CSDM_GIT_COMMIT=unknown"),
                           run_all)[0].startswith("no ENV CSDM_GIT_COMMIT")
    assert volume_problems(dockerfile.replace("$GIT_COMMIT", "${GIT_COMMIT}"), run_all) == []
    assert header_problems(dockerfile.replace("-v csdm-cache:/workspace/cache ", "")) == [
        "the header's docker run does not mount /workspace/cache"]
    assert header_problems(dockerfile.replace("--build-arg GIT_COMMIT=$(git rev-parse HEAD) ", ""))[0].startswith(
        "the header lacks 'docker build")


# ------------------------------------------------------------------------------------------
# The rest of the Dockerfile

def instructions():
    return [f"{op} {args}" for op, args in dockerfile_instructions(read("Dockerfile"))]


def pinned(requirements_text: str, package: str) -> str | None:
    """The version requirements.txt pins `package` to (package==X), or None."""
    match = re.search(rf"^{re.escape(package)}==([\w.]+)\s*$", requirements_text, re.MULTILINE)
    return match.group(1) if match else None


def version_problems(dockerfile_text: str, requirements_text: str, installed: dict[str, str]) -> list[str]:
    """The image runs what the tests ran: a pinned Python base of the tests' minor version, torch and
    torchvision pinned in requirements.txt to the versions installed here, and the image installing it."""
    base = next(args for op, args in dockerfile_instructions(dockerfile_text) if op == "FROM")
    problems = []
    match = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim(-\w+)?", base)
    if not match:
        problems.append(f"FROM {base}: not a pinned python:X.Y.Z-slim base")
    elif match.group(1) != installed["python"]:
        problems.append(f"FROM {base}: Python {match.group(1)}, the tests run {installed['python']}")
    for package in ("torch", "torchvision"):
        version = pinned(requirements_text, package)
        if version is None:
            problems.append(f"requirements.txt does not pin {package}==X")
        elif version != installed[package].split("+")[0]:
            problems.append(f"requirements.txt pins {package}=={version}, the tests run {installed[package]}")
    if not re.search(r"pip install [^\n]*-r requirements\.txt", dockerfile_text):
        problems.append("the image does not pip install -r requirements.txt")
    return problems


def installed_versions() -> dict[str, str]:
    return {"python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "torch": importlib.metadata.version("torch"), "torchvision": importlib.metadata.version("torchvision")}


def test_the_image_runs_the_versions_the_tests_ran():
    assert version_problems(read("Dockerfile"), read("requirements.txt"), installed_versions()) == []


def test_version_drift_is_caught():
    dockerfile, requirements, here = read("Dockerfile"), read("requirements.txt"), installed_versions()
    older = re.sub(r"^FROM .*$", "FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime", dockerfile, flags=re.MULTILINE)
    assert "not a pinned python" in " ".join(version_problems(older, requirements, here))
    assert "pins torch==2.7.1" in " ".join(version_problems(
        dockerfile, requirements.replace(f"torch=={pinned(requirements, 'torch')}", "torch==2.7.1"), here))
    assert "does not pin torchvision" in " ".join(version_problems(
        dockerfile, re.sub(r"^torchvision==.*$", "torchvision>=0.19", requirements, flags=re.MULTILINE), here))
    assert "the tests run 3.10" in " ".join(version_problems(dockerfile, requirements, dict(here, python="3.10")))


def test_every_copy_source_is_in_the_context_and_requirements_come_first():
    dockerfile, dockerignore = read("Dockerfile"), read(".dockerignore")
    files = []  # the build context: every file .dockerignore lets through
    for folder, subfolders, names in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT)
        subfolders[:] = [d for d in subfolders if not ignored((rel / d).as_posix(), dockerignore)]
        files += [(rel / n).as_posix() for n in names if not ignored((rel / n).as_posix(), dockerignore)]
    for source in copy_sources(dockerfile):
        assert any(context_match(source, f) for f in files), \
            f"Dockerfile copies {source}, which matches no file of the build context"
    for needed in ("requirements.txt", "run_all.sh", "distill.py", "evaluate.py"):
        assert in_image(needed, dockerfile, dockerignore), needed
    order = [line.split()[0] for line in instructions()]
    assert instructions()[order.index("COPY")].split()[1] == "requirements.txt"
    pip = next(i for i, line in enumerate(instructions()) if line.startswith("RUN pip install"))
    assert pip < max(i for i, op in enumerate(order) if op == "COPY")  # install, then code


def test_the_image_runs_run_all():
    assert instructions()[-1] == 'CMD ["./run_all.sh"]'
    script = ROOT / "run_all.sh"
    assert os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


# ------------------------------------------------------------------------------------------
# run_all.sh

def test_run_all_rejects_bad_options():
    for argv, option in ((["--methods", "gan"], "--methods"), (["--frobnicate"], "--frobnicate"),
                         (["--data-dir", "/nonexistent/x"], "--data-dir"), (["--ifs"], "--ifs"),
                         (["--ablation", "colour"], "--ablation"), (["--cpu-bench"], "--data-dir"),
                         (["--seed", "-1"], "--seed"), (["--datasets", "mnist"], "--datasets"),
                         (["--precision", "fp16"], "--precision"), (["--full-cell", "--quick"], "--quick"),
                         (["--full-cell", "--ifs", "10"], "--ifs"), (["--full-cell", "--seed", "3"], "--seed"),
                         (["--soft-cell", "--seed", "3", "--data-dir", "/tmp"], "--seed"),
                         (["--ablation", "kernel", "--full-cell"], "--full-cell"),
                         (["--cpu-bench", "--methods", "dm", "--data-dir", "/tmp"], "--methods")):
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
    (out / "synthetic.pt").write_text(" ".join(argv))
elif script == "evaluate.py" and ("--syn" in argv or "--baseline" in argv):
    if "--syn" in argv and not pathlib.Path(value("--syn")).exists():
        sys.exit("evaluate.py: error: --syn: no such file " + value("--syn"))
    out = pathlib.Path(value("--out")) if "--out" in argv else pathlib.Path(value("--syn")).parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text("{{}}")
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


def test_grid_folders_keep_budgets_and_seeds_apart(tmp_path):
    """--quick and other seeds fill folders of their own; a finished folder made with other options is refused
    in one line (here before anything runs), never skipped as if it were this run's; the same options skip it."""
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    results = tmp_path / "results"

    def grid(*options):
        command = ["bash", str(ROOT / "run_all.sh"), "--datasets", "cifar10", "--ifs", "200", "--ipcs", "10",
                   "--methods", "random dm", "--data-dir", str(tmp_path), "--out", str(results), *options]
        return subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHON=str(fake)))

    assert grid("--quick", "--precision", "fp32").returncode == 0
    assert grid("--quick", "--seed", "1", "--precision", "fp32").returncode == 0
    assert grid("--precision", "fp32").returncode == 0
    for root in (results / "quick", results / "quick" / "seed1", results):
        assert (root / "cifar10" / "if200" / "ipc10" / "dm" / "results.json").exists(), root
    distills = [line for line in log.read_text().splitlines() if line.startswith("distill.py")]
    assert ["--iterations 200 " in line for line in distills] == [True, True, False]
    calls = len(log.read_text().splitlines())
    assert "done, skipped" in grid("--quick", "--precision", "fp32").stdout
    other = grid("--quick", "--precision", "bf16")  # the same folders, another precision
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert "holds a finished run made with other options" in other.stderr and "precision fp32" in other.stderr
    assert [line.split()[0] for line in log.read_text().splitlines()[calls:]] == ["evaluate.py"]  # the report
    # a folder from before run_all.budget is judged by the networks x epochs its results.json records
    legacy = results / "cifar10" / "if200" / "ipc10" / "random"
    (legacy / "run_all.budget").unlink()
    (legacy / "results.json").write_text(json.dumps({"num_eval": 2, "epochs": 300}, indent=2))
    done = grid("--precision", "fp32")
    assert done.returncode == 2 and "(2 networks x 300 epochs), not (5 networks x 1000 epochs)" in done.stderr
    (legacy / "results.json").write_text(json.dumps({"num_eval": 5, "epochs": 1000}, indent=2))
    assert f"{legacy}: done, skipped" in grid("--precision", "fp32").stdout


def test_a_rerun_skips_evaluations_into_other_folders_however_out_is_spelled(tmp_path):
    """--protocol-bench's NCFM evaluations record the set they score as a path inside --out, so `--out results`
    and `--out ./results/` are the same run."""
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    skipped = []
    for out in (f"{tmp_path}/results", f"{tmp_path}/./results/", f"{tmp_path}/../{tmp_path.name}/results"):
        done = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--protocol-bench", "--data-dir", str(tmp_path),
                               "--out", out], capture_output=True, text=True, env=dict(os.environ, PYTHON=str(fake)))
        assert done.returncode == 0, done.stderr
        skipped.append(done.stdout.count("done, skipped"))
    assert skipped == [0, 12, 12]  # 6 sets under DM's protocol and their 6 evaluations under NCFM's
    distills = [line for line in log.read_text().splitlines() if line.startswith("distill.py")]
    assert len(distills) == 4  # dm and csdm at IF 200 and 10, once


def test_full_cell_runs_the_headline_first_at_the_full_budget_and_releases_sets(tmp_path):
    """run_all.sh --full-cell: csdm, dm and random at IF 200 before anything else, 20,000 iterations at
    batch-real 256 and 5 x 1000 epochs, DM as published at factor 1 with class pairing, every set evaluated
    under NCFM's protocol too, each distilled set copied to results/sets/, sdm last; an evaluation that kept
    networks of an interrupted sitting is continued with --resume; a rerun redoes nothing."""
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    results = tmp_path / "results"
    command = ["bash", str(ROOT / "run_all.sh"), "--full-cell", "--data-dir", str(tmp_path), "--out", str(results)]
    (results / "full_cell" / "dm" / "cifar10" / "if200" / "full" / "evaluation.partial").mkdir(parents=True)
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHON=str(fake)))
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    distills = [line for line in calls if line.startswith("distill.py")]
    assert all("--iterations 20000 --batch-real 256" in line and "--val-per-class" not in line for line in distills)
    assert [line.split("--method ")[1].split()[0] + " " + line.split("--imbalance-factor ")[1].split()[0]
            for line in distills] == ["csdm 200", "dm 200", "csdm 10", "dm 10", "dm 200", "csdm 200", "dm 200", "sdm 200"]
    assert ["--seed 1 " in line for line in distills] == [False] * 5 + [True] * 2 + [False]
    assert all("_seed1/" in line for line in distills[5:7])
    assert "--factor 1 --dsa-pairing class" in distills[4]
    evaluations = [line for line in calls if line.startswith("evaluate.py")]
    assert evaluations[2].startswith("evaluate.py --baseline random") and "--imbalance-factor 200" in evaluations[2]
    assert sum("--protocol ncfm" in line for line in evaluations) == 6
    assert all("--num-eval 5 --epochs 1000" in line for line in evaluations if "--baseline full" not in line)
    full = [line for line in evaluations if "--baseline full" in line]
    assert len(full) == 1 and "--num-eval 5 --epochs 200" in full[0] and "--imbalance-factor 200" in full[0]
    assert "--seed 0 " in full[0]  # the second seed's runs leave the seed as it was
    assert [line.endswith(" --resume") for line in evaluations] == ["--baseline full" in line for line in evaluations]
    seed1_sets = [line for line in evaluations if "_seed1/" in line and "--syn" in line]
    assert len(seed1_sets) == 2 and all("--epochs 1000" in line and "--seed" not in line for line in seed1_sets)
    randoms = [line for line in evaluations if "--baseline random" in line]
    assert [line.split("--factor ")[1].split()[0] for line in randoms] == ["2", "2", "1", "2", "2", "2"]
    assert "--seed 1 " in randoms[-1] and "--seed 0 " in randoms[0]
    assert all("--eval-seed 0 " in line for line in randoms + full)  # judged by the sets' networks
    assert all("--precision bf16" in line for line in distills + evaluations)  # resumable on any machine
    assert calls[-1].startswith("report.py") and "full_cell_seed1.md" in calls[-1]
    assert calls[-2].startswith("report.py") and "full_cell.md" in calls[-2]
    released = sorted(path.name for path in (results / "sets").iterdir())
    assert released == sorted(f"cifar10-if{i}-ipc10-{m}.pt" for i, m in
                              [(200, "csdm"), (200, "dm"), (10, "csdm"), (10, "dm"), (200, "dm-f1"), (200, "sdm")])
    assert "--method dm" in (results / "sets" / "cifar10-if200-ipc10-dm-f1.pt").read_text()
    leftover = results / "full_cell" / "dm" / "cifar10" / "if200" / "ipc10" / "csdm" / "evaluation.partial"
    leftover.mkdir()  # kept networks of a finished evaluation: a stop between results.json and their removal
    subprocess.run(command, capture_output=True, text=True, check=True, env=dict(os.environ, PYTHON=str(fake)))
    again = log.read_text().splitlines()[len(calls):]
    assert [line.split()[0] for line in again] == ["report.py", "report.py"] and not leftover.exists()


def test_soft_jobs_evaluate_the_full_cells_sets_and_their_random_rulers_under_one_teacher_folder(tmp_path):
    """--soft-bench: csdm, dm and random at IF 200, each under hard and soft labels at 3 x 300 epochs, the
    sets read from the full cell's folders; --soft-cell: soft labels only at 5 x 1000 epochs, IF 200 then 10,
    dm-f1 and random at factor 1 at IF 200; every soft call keeps its teacher in OUT/teachers; a rerun redoes
    nothing."""
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    results = tmp_path / "results"
    for imbalance, method in [(200, "csdm"), (200, "dm"), (200, "dm-f1"), (10, "csdm"), (10, "dm")]:
        folder = results / "full_cell" / "dm" / "cifar10" / f"if{imbalance}" / "ipc10" / method
        folder.mkdir(parents=True)
        (folder / "synthetic.pt").write_text("a set")

    def job(flag):
        command = ["bash", str(ROOT / "run_all.sh"), flag, "--data-dir", str(tmp_path), "--out", str(results)]
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHON=str(fake)))
        assert done.returncode == 0, done.stderr
        return [line for line in log.read_text().splitlines() if line.startswith("evaluate.py")]

    bench = job("--soft-bench")
    assert len(bench) == 6 and all("--num-eval 3 --epochs 300" in line for line in bench)
    soft = [line for line in bench if "--labels soft" in line]
    assert len(soft) == 3 and all(f"--teacher-cache {results}/teachers" in line for line in soft)
    assert sum("--baseline random" in line for line in bench) == 2
    assert all("/full_cell/dm/cifar10/if200/ipc10/" in line for line in bench if "--syn" in line)
    cell = job("--soft-cell")[6:]
    assert len(cell) == 8 and all("--labels soft" in line and "--num-eval 5 --epochs 1000" in line for line in cell)
    randoms = [line for line in cell if "--baseline random" in line]
    assert [line.split("--factor ")[-1].split()[0] for line in randoms] == ["2", "1", "2"]
    assert ["--imbalance-factor 200" in line for line in randoms] == [True, True, False]
    assert len(job("--soft-bench")) == 14  # a rerun: nothing but the report again
