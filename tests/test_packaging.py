"""Packaging: the license and extras in the built metadata, exact versions in
constraints.txt, a client that imports without torch, the server commands' install
hint, and the files package-data ships (py.typed, the .proto, the C kernels). Nothing here
installs from the network; the wheel is built offline from a copy of the tree."""

from __future__ import annotations

import email
import importlib.metadata
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HINT = "pip install 'lorapool[server]'"

# Installs a finder that makes torch and transformers unimportable, as in an
# environment with only the base install.
BLOCK_SERVER_DEPS = textwrap.dedent(
    """
    import importlib.abc, sys

    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "transformers"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _Blocked())
    """
)


def run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_SERVER_DEPS + textwrap.dedent(code)],
        cwd=tmp_path,  # not the repository root, whose folders would shadow the package
        capture_output=True,
        text=True,
        timeout=120,
    )


def requirement_names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


# --- the metadata -----------------------------------------------------------------


def test_pyproject_declares_the_license_and_extras():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "Copyright 2026 The lorapool authors" in license_text
    # SPDX license expressions need setuptools 77 at build time
    (setuptools_req,) = [
        Requirement(r) for r in PYPROJECT["build-system"]["requires"] if "setuptools" in r
    ]
    assert not setuptools_req.specifier.contains("76.9")
    assert set(project["optional-dependencies"]) >= {"server", "dev"}


def test_base_install_is_the_client():
    base = requirement_names(PYPROJECT["project"]["dependencies"])
    assert base == {"grpcio", "grpcio-health-checking", "grpcio-status", "protobuf", "tqdm"}
    server = requirement_names(PYPROJECT["project"]["optional-dependencies"]["server"])
    assert {"torch", "transformers", "safetensors", "tokenizers", "huggingface-hub"} <= server
    assert {"xxhash", "numpy", "grpcio-reflection", "prometheus-client"} <= server
    dev = PYPROJECT["project"]["optional-dependencies"]["dev"]
    assert "lorapool[server]" in dev


def stub_versions() -> tuple[Version, Version]:
    """(protobuf, grpcio) versions the committed stubs were generated with."""
    v1 = ROOT / "protos/lorapool/v1"
    pb = re.search(r"# Protobuf Python Version: (\S+)", (v1 / "lorapool_pb2.py").read_text())
    grpc = re.search(r"GRPC_GENERATED_VERSION = '(\S+)'", (v1 / "lorapool_pb2_grpc.py").read_text())
    assert pb and grpc
    return Version(pb.group(1)), Version(grpc.group(1))


def test_ranges_admit_no_runtime_older_than_the_stubs():
    protobuf_gen, grpc_gen = stub_versions()
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["server"]]
    for req in reqs:
        name = canonicalize_name(req.name)
        if name == "protobuf":
            floor = protobuf_gen
        elif name.startswith("grpcio"):
            floor = grpc_gen
        else:
            assert "==" not in str(req.specifier), f"{req}: a range, not a pin"
            continue
        below = Version(f"{floor.major}.{floor.minor}.{floor.micro - 1}") if floor.micro else None
        assert req.specifier.contains(floor), req
        assert below is None or not req.specifier.contains(below), f"{req} admits {below}"


def test_constraints_pin_every_declared_dependency():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    project = PYPROJECT["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += [r for r in extra if not r.startswith("lorapool")]
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {req}"
    # a CPU wheel of exactly this torch is on the CI machines; anything else is a
    # multi-GB CUDA download
    assert pins["torch"] == "2.13.0"
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


def test_installed_metadata_matches_pyproject():
    """The environment's lorapool (editable) was installed from this pyproject;
    `make` reinstalls when it changes."""
    meta = importlib.metadata.metadata("lorapool")
    assert meta["License-Expression"] == "Apache-2.0"
    assert {"server", "dev"} <= set(meta.get_all("Provides-Extra") or [])


# --- the built wheel ---------------------------------------------------------------

SOURCES = ["pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "constraints.txt"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    """A wheel built without isolation (no network) from a copy of the tree."""
    import setuptools

    if Version(setuptools.__version__) < Version("77"):
        pytest.skip(f"setuptools {setuptools.__version__} cannot build SPDX license metadata")
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in set(PYPROJECT["tool"]["setuptools"]["package-dir"].values()):
        top = folder.split("/")[0]
        if not (src / top).exists():
            shutil.copytree(ROOT / top, src / top, ignore=ignore)
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    name = done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(out / name) as archive:
        yield archive


def wheel_metadata(wheel: zipfile.ZipFile):
    (path,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(wheel.read(path))


def test_wheel_metadata_declares_apache_and_the_extras(wheel):
    meta = wheel_metadata(wheel)
    assert meta["License-Expression"] == "Apache-2.0"
    assert set(meta.get_all("Provides-Extra")) >= {"server", "dev"}
    base = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert requirement_names(base) == {
        "grpcio",
        "grpcio-health-checking",
        "grpcio-status",
        "protobuf",
        "tqdm",
    }
    names = wheel.namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_wheel_ships_py_typed_and_the_proto(wheel):
    names = set(wheel.namelist())
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        path = package.replace(".", "/")
        assert f"{path}/__init__.py" in names, package
    assert "lorapool/py.typed" in names
    assert "lorapool/v1/lorapool.proto" in names
    assert "lorapool/v1/lorapool_pb2.pyi" in names
    # the descriptor set with comments, which reflection serves
    assert "lorapool/v1/lorapool.binpb" in names
    # the C kernels' sources, which the server compiles on first use
    sources = [*(ROOT / "server" / "model").glob("*.[ch]")]
    assert any(s.suffix == ".h" for s in sources)
    for source in sources:
        assert f"lorapool/server/model/{source.name}" in names
    # the wheel's proto is the committed one
    assert (
        wheel.read("lorapool/v1/lorapool.proto")
        == (ROOT / "protos/lorapool/v1/lorapool.proto").read_bytes()
    )


def test_package_data_files_exist_in_the_tree():
    package_dir = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["*"] == ["py.typed"]
    assert "*.proto" in PYPROJECT["tool"]["setuptools"]["package-data"]["lorapool.v1"]
    for folder in package_dir.values():
        assert (ROOT / folder / "py.typed").is_file(), folder
    assert (ROOT / package_dir["lorapool.v1"] / "lorapool.proto").is_file()
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "recursive-include protos *.proto" in manifest


# --- a client without torch ------------------------------------------------------


def test_client_imports_without_torch(tmp_path):
    done = run_blocked(
        """
        import sys
        import lorapool
        import lorapool.client, lorapool.convert, lorapool.v1
        from lorapool.v1 import lorapool_pb2, lorapool_pb2_grpc
        from lorapool import LoraPoolClient, SamplingParams
        heavy = sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)
        assert not heavy, heavy
        print("ok")
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_client_commands_work_without_torch(tmp_path):
    done = run_blocked(
        """
        import sys
        from lorapool.client.cli import main
        try:
            main(["stats", "--help"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        assert "torch" not in sys.modules
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: lorapool stats" in done.stdout


@pytest.mark.parametrize("command", ["serve", "make-demo"])
def test_server_commands_without_the_extra_name_it(command, tmp_path):
    done = run_blocked(
        f"""
        import sys
        from lorapool.client.cli import main
        sys.exit(main([{command!r}, "--help"]))
        """,
        tmp_path,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert HINT in lines[0] and "'torch'" in lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_missing_lorapool_module_is_not_an_install_problem():
    from lorapool.client import cli

    with pytest.raises(ModuleNotFoundError):
        cli._import_command("serve", "lorapool.server.no_such_module")
