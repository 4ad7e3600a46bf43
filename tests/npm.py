"""npm packages the tests need (the Node.js example's dependencies, tools such as
buf), installed with `npm ci` from a committed package-lock.json, and again only
when that lock file changed: a stamp in node_modules holds the hash installed."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

STAMP = ".lorapool-installed"


def have_npm() -> bool:
    return shutil.which("node") is not None and shutil.which("npm") is not None


def npm_ci(package_dir: Path, install_dir: Path | None = None) -> Path:
    """The node_modules folder of `package_dir`'s package.json and lock file,
    installed in `install_dir` (default: `package_dir` itself; another folder gets
    copies of the two files). Raises AssertionError with npm's output when npm ci fails."""
    install_dir = install_dir or package_dir
    lock = (package_dir / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock).hexdigest()
    modules = install_dir / "node_modules"
    stamp = modules / STAMP
    if stamp.is_file() and stamp.read_text() == digest:
        return modules
    if install_dir != package_dir:
        install_dir.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(package_dir / name, install_dir / name)
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
        cwd=install_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"npm ci failed in {install_dir}:\n{done.stderr}"
    stamp.write_text(digest)
    return modules
