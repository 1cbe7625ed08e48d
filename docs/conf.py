# Sphinx configuration for tsmux's documentation.
# Build: sphinx-build -W -b html docs docs/_build/html   (or: tox -e docs)

project = "tsmux"
author = "tsmux contributors"
copyright = "tsmux contributors"
release = "0.1.0"
version = release

# Sphinx built-ins only.
extensions = []

root_doc = "index"
exclude_patterns = ["_build"]
highlight_language = "none"

html_theme = "alabaster"
html_title = "tsmux"
