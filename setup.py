"""Build script. Metadata lives in pyproject.toml; this file exists for the C++ extension
(csrc/), which compiles against the torch already installed: install with
``pip install --no-build-isolation -e ".[dev]"`` after installing torch."""
from setuptools import setup

setup()
