"""Sphinx configuration: the API reference from docstrings, the guides in Markdown (MyST).

Build with ``make docs`` (warnings are errors) into docs/_build/html.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "funcopt"
author = "the funcopt authors"
copyright = "2026, the funcopt authors"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo" if __import__("importlib.util").util.find_spec("furo") else "alabaster"
html_title = "funcopt"
