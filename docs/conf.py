# Sphinx configuration for tsmux's documentation.
# Build: sphinx-build -W -b html docs docs/_build/html   (or: tox -e docs, which builds the man page too)
# The man page, tsmux(8): sphinx-build -W -b man docs docs/_build/man, then man -l docs/_build/man/tsmux.8

import os
import re

project = "tsmux"
author = "tsmux contributors"
copyright = "tsmux contributors"
# One version for the package and the documentation: tsmux/_version.py, read as setup.py reads it.
versionFile = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tsmux", "_version.py")
with open(versionFile, encoding="utf-8") as f:
    release = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)  # type: ignore[union-attr]
version = release

# Sphinx built-ins only.
extensions = []

root_doc = "index"
exclude_patterns = ["_build"]
highlight_language = "none"

html_theme = "alabaster"
html_title = "tsmux"

# tsmux(8) is the usage page: how each protocol is used, then the command line's options, exit status and logs.
# Section 8: tsmux is a daemon, normally run by root or by systemd.
man_pages = [("usage", "tsmux", "SOCKS5, HTTP CONNECT and tailscaled's LocalAPI on one Unix socket", [author], 8)]
