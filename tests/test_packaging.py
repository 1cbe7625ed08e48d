"""
The package as users get it: C{python -m build} makes the sdist and, from
the sdist, the wheel, out of a copy of the working tree (every file git
lists, uncommitted and untracked ones included, ignored ones left out). The
wheel is installed into a new venv with pip, its dependencies from the
package index at the versions this test run uses, and what it installs runs
there: C{twistd}'s plugin list, C{tsmux --version}, the C{tsmux:} endpoint
string.

All of it is done once per test run, by the first test that needs it (about
half a minute), and shared. It needs the package index (pip's, as configured)
for the build's setuptools and the dependencies: if the index cannot be
reached the tests skip, unless C{TSMUX_REQUIRE_INTEGRATION=1} (CI) makes that
a failure.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ._tailnet import REPO_ROOT, integrationRequired

# What pip says when it cannot reach the package index (no network, no mirror).
UNREACHABLE = (
    "No matching distribution found",
    "Could not find a version that satisfies",
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeoutError",
)


@dataclasses.dataclass(frozen=True)
class Packaged:
    files: frozenset[str]
    """The working tree's files that were built, relative to its top."""
    version: str
    """C{__version__} in tsmux/_version.py."""
    sdist: str
    wheel: str
    venv: str
    """A new venv with the wheel and its dependencies installed."""
    work: str
    """The directory of all of the above, removed at exit; commands run in it."""

    def modules(self) -> set[str]:
        """The package's modules and the plugins, as the wheel should hold them."""
        return {name for name in self.files if name.startswith(("tsmux/", "twisted/plugins/")) and name.endswith(".py")}

    def bin(self, name: str) -> str:
        return os.path.join(self.venv, "bin", name)

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=self.work, env=environment())


_outcome: list[Packaged | Exception] = []


def packaged() -> Packaged:
    """Build and install once per test run; later calls get the same result, or the same skip or failure."""
    if not _outcome:
        try:
            _outcome.append(_package())
        except Exception as e:
            _outcome.append(e)
    outcome = _outcome[0]
    if isinstance(outcome, Packaged):
        return outcome
    if isinstance(outcome, SkipTest):
        raise SkipTest(*outcome.args)
    raise AssertionError(f"building or installing the package failed: {outcome}") from outcome


def unavailable(reason: str) -> SkipTest:
    """A missing prerequisite: the skip to raise, or a failure at once where the tests must run (CI)."""
    if integrationRequired():
        raise AssertionError(f"{reason} (TSMUX_REQUIRE_INTEGRATION=1)")
    return SkipTest(reason)


def environment() -> dict[str, str]:
    """This environment without what would put another tsmux than the wheel's on the path."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")
    }
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def run(what: str, argv: list[str], cwd: str, timeout: float = 600) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=environment())
    if result.returncode == 0:
        return
    output = result.stdout + result.stderr
    said = [line.strip(" <") for line in output.splitlines() if any(words in line for words in UNREACHABLE)]
    if said:
        raise unavailable(f"{what} needs the package index, which did not answer: {said[0]}")
    raise AssertionError(f"{what} failed (exit {result.returncode}):\n{output[-6000:]}")


def copyWorkingTree(destination: str) -> frozenset[str]:
    """Copy what git lists (tracked or untracked, not ignored), as it is now, into C{destination}."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
        )
    except FileNotFoundError:
        raise unavailable("git is not installed: the files to package are the ones git lists") from None
    if listing.returncode != 0:
        raise unavailable(f"{REPO_ROOT} is not a git work tree: {listing.stderr.strip()}")
    files = set()
    for name in listing.stdout.split("\0"):
        source = os.path.join(REPO_ROOT, name)
        # A tracked file deleted in the work tree is still listed.
        if not name or not os.path.lexists(source):
            continue
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
        files.add(name)
    return frozenset(files)


def constraints(path: str) -> None:
    """Pin every distribution this test run imports from, so that the venv gets the versions under test."""
    pins: dict[str, str] = {}
    for distribution in importlib.metadata.distributions():
        # A broken install may have no name. The first of a name on sys.path is the one imported; tsmux comes
        # from the wheel.
        name = distribution.metadata["Name"] if "Name" in distribution.metadata else ""
        if name and name.lower() != "tsmux":
            pins.setdefault(re.sub(r"[-_.]+", "-", name).lower(), distribution.version)
    with open(path, "w") as f:
        f.writelines(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def _package() -> Packaged:
    work = tempfile.mkdtemp(prefix="tsmux-packaging-")
    atexit.register(shutil.rmtree, work, True)
    # Run, not looked up: a build/ directory left in the work tree would pass for the package.
    probe = subprocess.run(
        [sys.executable, "-m", "build", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=work,
        env=environment(),
    )
    if probe.returncode != 0:
        said = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise unavailable(f"python -m build does not run (pip install '.[test]' installs build): {said}")
    source = os.path.join(work, "source")
    files = copyWorkingTree(source)
    with open(os.path.join(source, "tsmux", "_version.py"), encoding="utf-8") as f:
        version = re.search(r'__version__ = "([^"]+)"', f.read())
    assert version is not None, "tsmux/_version.py has no __version__"

    dist = os.path.join(work, "dist")
    run("python -m build", [sys.executable, "-m", "build", "--outdir", dist, source], cwd=work)
    [sdist] = glob.glob(os.path.join(dist, "*.tar.gz"))
    [wheel] = glob.glob(os.path.join(dist, "*.whl"))

    venv = os.path.join(work, "venv")
    run("python -m venv", [sys.executable, "-m", "venv", venv], cwd=work)
    pins = os.path.join(work, "constraints.txt")
    constraints(pins)
    python = os.path.join(venv, "bin", "python")
    run("pip install of the wheel", [python, "-m", "pip", "install", "--constraint", pins, wheel], cwd=work)
    return Packaged(files, version.group(1), sdist, wheel, venv, work)


class PackagingTests(SynchronousTestCase):
    def test_wheelFiles(self) -> None:
        """
        The wheel holds tsmux's modules and the two plugin modules, and no C{__init__.py} in C{twisted/} or
        C{twisted/plugins/}: installed, those would replace Twisted's own.
        """
        package = packaged()
        with zipfile.ZipFile(package.wheel) as wheel:
            names = set(wheel.namelist())
            distInfo = f"tsmux-{package.version}.dist-info/"
            metadata = wheel.read(distInfo + "METADATA").decode("utf-8")
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        modules = package.modules()
        self.assertIn("twisted/plugins/tsmux_plugin.py", modules)
        self.assertIn("twisted/plugins/tsmux_endpoints.py", modules)
        self.assertEqual({name for name in names if not name.startswith(distInfo)}, modules)
        self.assertEqual(os.path.basename(package.wheel), f"tsmux-{package.version}-py3-none-any.whl")
        self.assertIn(f"\nVersion: {package.version}\n", metadata)

    def test_sdistFiles(self) -> None:
        """
        The sdist (which the wheel was built from) holds what the wheel needs, and nothing from outside the
        listed files but what setuptools writes.
        """
        package = packaged()
        top = f"tsmux-{package.version}/"
        with tarfile.open(package.sdist) as sdist:
            members = {member.name for member in sdist.getmembers() if member.isfile()}
        self.assertTrue(all(name.startswith(top) for name in members), sorted(members))
        members = {name[len(top) :] for name in members}
        generated = {
            name for name in members if name in ("PKG-INFO", "setup.cfg") or name.startswith("tsmux.egg-info/")
        }
        self.assertIn("PKG-INFO", generated)
        self.assertEqual(members - generated - package.files, set(), "files in the sdist that git does not list")
        # Everything git lists, so the tests and the docs run from the sdist too.
        self.assertEqual(package.files - members, set(), "files missing from the sdist")

    def test_twistdListsThePlugin(self) -> None:
        package = packaged()
        result = package.run(package.bin("twistd"), "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"\n +tsmux +\S")

    def test_version(self) -> None:
        package = packaged()
        result = package.run(package.bin("tsmux"), "--version")
        self.assertEqual((result.returncode, result.stdout), (0, f"tsmux {package.version}\n"), result.stderr)

    def test_endpointString(self) -> None:
        """The C{tsmux:} string makes a L{tsmux.client.TsmuxEndpoint}, all of it from the venv."""
        package = packaged()
        script = "\n".join(
            (
                "from twisted.internet import reactor",
                "from twisted.internet.endpoints import clientFromString",
                "from twisted.internet.interfaces import IStreamClientEndpoint",
                "from twisted.plugins import tsmux_endpoints, tsmux_plugin",
                "import tsmux.client",
                "endpoint = clientFromString(reactor, 'tsmux:host=peer:port=22:path=/run/t.sock:timeout=5')",
                "assert isinstance(endpoint, tsmux.client.TsmuxEndpoint), endpoint",
                "assert IStreamClientEndpoint.providedBy(endpoint), endpoint",
                "print(endpoint.host, endpoint.port, endpoint.socketPath)",
                "for module in (tsmux.client, tsmux_endpoints, tsmux_plugin):",
                "    print(module.__file__)",
            )
        )
        result = package.run(package.bin("python"), "-c", script)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0], "peer 22 /run/t.sock")
        self.assertEqual(len(lines), 4, result.stdout)
        for path in lines[1:]:
            self.assertTrue(os.path.realpath(path).startswith(os.path.realpath(package.venv) + os.sep), path)
