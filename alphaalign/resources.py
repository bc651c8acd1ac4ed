"""Files shipped inside the package, found through `importlib.resources` so that an installed wheel finds
them as a source checkout does: the launch templates (`launch_templates/`), the DeepSpeed configs
(`rl/deepspeed_configs/`), the labelled refusal set (`eval/refusal_labels.jsonl`) and the recipes with their
data (`recipes/`, a link to the checkout's top-level `recipes/` folder). pyproject.toml declares them as
package data.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from alphaalign.errors import UserError


def package_path(*parts: str) -> Path:
    """The path of a file or folder shipped in the package, e.g. `package_path("launch_templates")`."""
    root = files("alphaalign")
    if not isinstance(root, Path):  # imported from a zip: templates and recipe-relative data need real files
        raise UserError(f"alphaalign is imported from {root}, not from a folder: install it with pip")
    return root.joinpath(*parts)


def shipped_recipes() -> list[str]:
    """The names of the recipes shipped with alphaalign (`demo`, `alphaalign-qwen`, `rm/csrm-demo`, ...)."""
    folder = package_path("recipes")
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def recipe_file(path: str | Path) -> Path:
    """`path` itself when it exists, else the shipped recipe of that name (`demo`, `demo.yaml`,
    `rm/csrm-demo`), so that `alphaalign train demo` works from any folder once the wheel is installed."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute() or str(path).startswith("."):
        return given
    shipped = package_path("recipes", *given.parts)
    for candidate in (shipped, shipped.with_name(shipped.name + ".yaml")):
        if candidate.is_file():
            return candidate
    return given
