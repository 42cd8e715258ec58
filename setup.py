"""Build script. All metadata lives in pyproject.toml; this file exists so that compiled
extensions (torch.utils.cpp_extension) can be added to ``setup()`` later."""
from setuptools import setup

setup()
