"""Package layout for setuptools; the metadata lives in pyproject.toml.

`conf/` stays at the top of the repository (where users and the README look
for it) and is shipped inside the package as `llmk_lab/conf`, so an installed
llmk_lab (`pip install .`) composes its configs from any directory;
`llmk_lab.cli.config_dir()` finds either copy. `hydra_plugins/` holds the Ray launcher, where Hydra's
plugin discovery looks (a namespace package, shared with the other Hydra plugins).
"""
from setuptools import find_namespace_packages, find_packages, setup

setup(
    packages=(find_packages(include=["llmk_lab", "llmk_lab.*"]) + ["llmk_lab.conf"]
              + find_namespace_packages(include=["hydra_plugins.*"])),
    package_dir={"llmk_lab.conf": "conf"},
    package_data={"llmk_lab.conf": ["*.yaml", "**/*.yaml"], "llmk_lab": ["lm_eval_tasks/*.yaml"]},
)
