"""Package layout for setuptools; the metadata lives in pyproject.toml.

`conf/` stays at the top of the repository (where users and the README look
for it) and is shipped inside the package as `llmk_lab/conf`, so an installed
llmk_lab (`pip install .`) composes its configs from any directory;
`llmk_lab.cli.config_dir()` finds either copy.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["llmk_lab", "llmk_lab.*"]) + ["llmk_lab.conf"],
    package_dir={"llmk_lab.conf": "conf"},
    package_data={"llmk_lab.conf": ["*.yaml", "**/*.yaml"], "llmk_lab": ["lm_eval_tasks/*.yaml"]},
)
