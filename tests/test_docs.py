"""The README and config.example.toml describe every setting, and the example is valid."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mito  # noqa: E402

SECTIONS = {"worker": mito.WORKER_OPTIONS, "coordinator": mito.COORDINATOR_OPTIONS,
            "client": mito.CLIENT_OPTIONS}


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_table_lists_every_option(section):
    readme = read("README.md")
    table = readme.split(f"### [{section}]", 1)[1].split("###", 1)[0]
    for option in SECTIONS[section]:
        assert f"| `{option.key}` |" in table, option.key
        assert f"`{option.env}`" in table, option.env
        for flag in option.flags:
            assert f"`{flag}`" in table, flag


@pytest.mark.parametrize("section", SECTIONS)
def test_example_config_names_every_key_and_holds_the_defaults(section, tmp_path, monkeypatch):
    example = read("config.example.toml")
    block = example.split(f"[{section}]", 1)[1].split("\n[", 1)[0]
    for option in SECTIONS[section]:
        assert option.key in block, option.key
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for option in SECTIONS[section]:
        monkeypatch.delenv(option.env, raising=False)
    from_file = mito.load_settings(section, SECTIONS[section], {},
                                   os.path.join(ROOT, "config.example.toml"))
    defaults = mito.load_settings(section, SECTIONS[section], {}, None)
    assert vars(from_file) == vars(defaults)


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    blocks = read("README.md").split("```sh\n")
    first, second = blocks[1].split("```")[0].strip(), blocks[2].split("```")[0].strip()
    assert first.startswith("python3 mito.py coordinator --workers 2")
    assert "client tasks submit" in first
    assert second in read(".ci/run")


def test_mito_imports_only_the_standard_library():
    import ast
    tree = ast.parse(read("mito.py"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def test_version_flags():
    for argv in (["--version"], ["worker", "-V"], ["coordinator", "-V"], ["client", "-V"]):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "mito.py"), *argv],
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == f"mito.py {mito.__version__}"


def test_no_merge_conflict_markers_are_left_behind():
    """A merge resolved in a hurry once left `<<<<<<< HEAD` ... `>>>>>>> main` in the
    README; in mito.py they would not even parse."""
    names = ["README.md", "mito.py", "config.example.toml"] + [
        os.path.join("tests", name) for name in os.listdir(os.path.join(ROOT, "tests"))
        if name.endswith(".py")]
    markers = ("<" * 7 + " ", "=" * 7 + "\n", ">" * 7 + " ")
    left = [f"{name}:{number}" for name in names
            for number, line in enumerate(read(name).splitlines(keepends=True), 1)
            if line.startswith(markers)]
    assert left == []
