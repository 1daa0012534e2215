"""Where the package finds its own files: the config tree Hydra composes from."""
from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """The config tree: the copy shipped inside the installed package (`pip install .` puts `conf/` there
    as `llmk_lab/conf`), else `conf/` of the checkout the package is imported from (editable install).
    The shipped copy comes first, so a `conf/` folder that happens to sit next to an installed package
    (site-packages) is never taken for ours."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    return str(package.parent / "conf")
