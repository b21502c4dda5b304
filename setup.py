"""cffi needs setup.py to declare the extension; everything else is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["pyctl/_build.py:ffibuilder"])
