"""Package discovery (metadata lives in pyproject.toml).

The model definitions live in the top-level models/ folder, as the project layout wants,
and install as the `reft_models` package so they never clash with a user's own `models`.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["reft", "reft.*"]) + ["reft_models"],
    package_dir={"reft_models": "models"},
)
