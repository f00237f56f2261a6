"""Container recipes, their install script, and CI's use of that script.

No container engine runs in CI, so the recipes are checked by reading them: what they copy, what
they run, and that they run the very script CI installs with.
"""

import configparser
import fnmatch
import json
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = "containers/install.sh"
DOCKERFILES = ("containers/Dockerfile", "containers/Dockerfile.gpu")
APPTAINER_DEF = "containers/cmb-workflow.def"
RECIPES = DOCKERFILES + (APPTAINER_DEF,)
GPU_RECIPES = ("containers/Dockerfile.gpu", APPTAINER_DEF)
MOUNTS = ("/data", "/out", "/models")


def _dockerfile(name):
    """[(INSTRUCTION, arguments)]: comment lines dropped, continuation lines joined."""
    lines = [line for line in (REPO / name).read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(word.upper(), rest.strip()) for word, rest in
            (line.strip().split(None, 1) for line in joined.splitlines())]


def _def_sections(name):
    """{"header": text, "files": text, "post": text, ...} of an Apptainer definition file."""
    sections, current = {"header": []}, "header"
    for line in (REPO / name).read_text().splitlines():
        match = re.match(r"%(\w+)", line)
        if match:
            current = match.group(1)
            sections[current] = []
        else:
            sections[current].append(line)
    return {key: "\n".join(lines) for key, lines in sections.items()}


def _shell_lines(text):
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _copies(recipe):
    """{path in the image: path in the repository} of what the recipe copies from the host."""
    copies = {}
    if recipe == APPTAINER_DEF:
        for line in _shell_lines(_def_sections(recipe)["files"]):
            source, destination = line.split()
            copies[PurePosixPath(destination)] = source
        return copies
    for instruction, arguments in _dockerfile(recipe):
        if instruction not in ("COPY", "ADD"):
            continue
        words = shlex.split(arguments)
        assert not any(word.startswith("--from") for word in words), "copies from a stage"
        *sources, destination = [word for word in words if not word.startswith("--")]
        for source in sources:
            # Docker copies a directory's contents, and into DEST/ a file keeps its name.
            into = destination.endswith("/") and not (REPO / source).is_dir()
            copies[PurePosixPath(destination) / (Path(source).name if into else "")] = source
    return copies


def _build_commands(recipe):
    if recipe == APPTAINER_DEF:
        return _shell_lines(_def_sections(recipe)["post"])
    return [arguments for instruction, arguments in _dockerfile(recipe) if instruction == "RUN"]


def _install_calls(commands):
    """Argument lists of every install.sh call in these shell command lines."""
    calls = []
    for command in commands:
        for part in re.split(r"&&|;|\|\|", command):
            words = shlex.split(part)
            while words and re.match(r"\w+=", words[0]):  # VAR=value prefixes
                words.pop(0)
            if words and words[0].endswith(INSTALL_SCRIPT):
                calls.append(words)
    return calls


def _option(words, name):
    return words[words.index(name) + 1] if name in words else None


def _runtime_env(recipe):
    if recipe == APPTAINER_DEF:
        pairs = [line.removeprefix("export ") for line in
                 _shell_lines(_def_sections(recipe)["environment"])]
    else:
        pairs = [word for instruction, arguments in _dockerfile(recipe) if instruction == "ENV"
                 for word in shlex.split(arguments)]
    return dict(pair.split("=", 1) for pair in pairs)


def _setup_cfg():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return config


def _readme_test_command():
    """The test command of README's "Run the tests" line (what follows the last &&)."""
    readme = (REPO / "README.md").read_text()
    line = readme.split("Run the tests:", 1)[1].strip().splitlines()[0]
    return line.rsplit("&&", 1)[1].strip()


def _dockerignored(path, patterns):
    parts = PurePosixPath(path).parts
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        for pattern in patterns:
            if pattern.startswith("**/"):
                if fnmatch.fnmatch(parts[depth - 1], pattern[3:]):
                    return True
            elif fnmatch.fnmatch(prefix, pattern.lstrip("/")):
                return True
    return False


@pytest.mark.parametrize("recipe", RECIPES)
def test_entry_point_is_cmb_workflow(recipe):
    if recipe == APPTAINER_DEF:
        assert _shell_lines(_def_sections(recipe)["runscript"]) == ['exec cmb-workflow "$@"']
    else:
        entrypoints = [arguments for instruction, arguments in _dockerfile(recipe)
                       if instruction == "ENTRYPOINT"]
        assert [json.loads(arguments) for arguments in entrypoints] == [["cmb-workflow"]]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_copies_files_of_the_repository(recipe):
    copies = _copies(recipe)
    assert copies
    for source in copies.values():
        assert (REPO / source).exists(), f"{recipe} copies {source}, which is not in the repository"
    if recipe in DOCKERFILES:
        patterns = _shell_lines((REPO / ".dockerignore").read_text())
        tracked = subprocess.run(["git", "ls-files", *copies.values()], cwd=REPO, check=True,
                                 capture_output=True, text=True).stdout.split()
        for path in [*copies.values(), *tracked]:
            assert not _dockerignored(path, patterns), f".dockerignore drops {path}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_copies_what_pip_install_reads_into_one_tree(recipe):
    metadata, options = _setup_cfg()["metadata"], _setup_cfg()["options.packages.find"]
    needed = {"pyproject.toml", "setup.cfg", INSTALL_SCRIPT,
              metadata["long_description"].removeprefix("file:").strip(),
              *metadata["license_files"].split(),
              *(package.rstrip("*") for package in options["include"].split())}
    image_path = {source: destination for destination, source in _copies(recipe).items()}
    assert needed <= set(image_path), f"{recipe} does not copy {needed - set(image_path)}"
    root = image_path["pyproject.toml"].parent
    for source in needed:
        assert image_path[source] == root / source


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_installs_with_the_copied_install_script(recipe):
    calls = _install_calls(_build_commands(recipe))
    assert len(calls) == 1, f"{recipe} must call {INSTALL_SCRIPT} once"
    (call,) = calls
    script_in_image = {source: destination for destination, source in
                       _copies(recipe).items()}[INSTALL_SCRIPT]
    assert PurePosixPath(call[0]) == script_in_image
    assert "--system-test-deps" not in call, "test-only system packages in an image"
    venv = _option(call, "--venv")
    assert venv and venv.startswith("/")
    # The entry point must resolve to the installed cmb-workflow.
    assert _runtime_env(recipe)["PATH"].split(":")[0] == f"{venv}/bin"
    extras = set((_option(call, "--extras") or "").split(",")) - {""}
    assert extras <= set(_setup_cfg()["options.extras_require"])
    assert ("gpu" in extras) == (recipe in GPU_RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_prepares_mounts_and_needs_no_network(recipe):
    created = set()
    for command in _build_commands(recipe):
        for part in command.split("&&"):
            words = shlex.split(part)
            if words[:1] == ["mkdir"]:
                created.update(words[1:])
    assert set(MOUNTS) <= created
    # Nipype looks online for a newer release unless told not to.
    assert _runtime_env(recipe)["NIPYPE_NO_ET"] == "1"


def test_ci_installs_with_the_same_script_then_runs_readme_tests():
    ci = REPO / ".ci" / "run"
    assert ci.stat().st_mode & stat.S_IXUSR
    commands = _shell_lines(ci.read_text())
    (call,) = _install_calls(commands)
    assert call[0] == INSTALL_SCRIPT
    assert "--system-test-deps" in call and _option(call, "--extras") == "test"
    venv = _option(call, "--venv")
    assert commands[-1] == f". {venv}/bin/activate && {_readme_test_command()}"
    assert _readme_test_command() == "python -m pytest -q tests"


def test_install_script_is_executable_and_valid_bash():
    script = REPO / INSTALL_SCRIPT
    assert script.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(script), str(REPO / ".ci" / "run")], check=True)


@pytest.mark.parametrize("arguments", [[], ["--extras", "test"], ["--venv"], ["--bogus"]])
def test_install_script_refuses_bad_usage(arguments):
    result = subprocess.run([str(REPO / INSTALL_SCRIPT), *arguments], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: containers/install.sh")


def test_container_docs_show_every_recipe_mount_and_gpu_flag():
    section = (REPO / "docs" / "containers.md").read_text()
    for recipe in DOCKERFILES:
        assert f"docker build -f {recipe} " in section
    assert re.search(rf"apptainer build \S+\.sif {APPTAINER_DEF}", section)
    assert "--gpus all" in section and "apptainer run --nv" in section
    for mount in MOUNTS:
        assert f"`{mount}`" in section  # described
        assert f":{mount}:" in section or f":{mount} " in section  # and mounted in an example
    assert "#SBATCH --gres=gpu" in section
