"""tsmux: SOCKS5 and tailscaled's LocalAPI on one Unix socket."""

import os
import re

from setuptools import find_packages, setup
from setuptools.command.sdist import sdist


class CompleteSdist(sdist):
    """
    An sdist that carries what the tests, the docs and CI need (tests/, docs/, .ci/, tox.ini,
    LICENSE): the project keeps no MANIFEST.in at the top.
    """

    def make_distribution(self) -> None:
        # setuptools takes the file list from egg_info's manifest; add to it just before the archive is made.
        for top in ("tests", "docs", ".ci"):
            for directory, subdirectories, names in os.walk(top):
                subdirectories[:] = [d for d in subdirectories if d not in ("_build", "__pycache__", ".hypothesis")]
                self.filelist.extend(os.path.join(directory, name) for name in names if not name.endswith(".pyc"))
        self.filelist.extend(name for name in ("tox.ini", "LICENSE", ".gitignore") if os.path.exists(name))
        self.filelist.sort()
        self.filelist.remove_duplicates()
        super().make_distribution()


with open("README.md", encoding="utf-8") as readme:
    longDescription = readme.read()
with open("tsmux/_version.py", encoding="utf-8") as versionFile:
    version = re.search(r'__version__ = "([^"]+)"', versionFile.read()).group(1)  # type: ignore[union-attr]

setup(
    name="tsmux",
    version=version,
    description="SOCKS5 and tailscaled's LocalAPI on one Unix socket",
    long_description=longDescription,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # twisted/plugins is a namespace directory: no __init__.py may ship there,
    # or Twisted's own package would be overwritten.
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    install_requires=[
        "twisted>=24.7",
        "zope.interface>=6",
        "treq>=24.9",
    ],
    extras_require={
        # HTTPS through tsmux.client.agent needs Twisted's TLS extras.
        "tls": ["twisted[tls]"],
        # build: tests/test_packaging.py builds the sdist and the wheel with it.
        "test": ["pytest>=8", "pytest-twisted>=1.14", "hypothesis>=6.100", "twisted[tls]", "build>=1.0"],
        "lint": ["ruff>=0.6"],
        # docutils 0.22 breaks the man page's cross-references with Sphinx 9.0 (sphinx-doc/sphinx#14427:
        # "Security model <>"); 0.21 renders them as text.
        "docs": ["sphinx>=7", "docutils<0.22"],
    },
    entry_points={"console_scripts": ["tsmux = tsmux._cli:main"]},
    cmdclass={"sdist": CompleteSdist},
    classifiers=[
        "Framework :: Twisted",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: Proxy Servers",
    ],
)
