"""Every option's schema in Hydra's ConfigStore before composing, without importing the methods.

Composing a config, `--cfg job` and the one-line config errors take a fraction of a second because
of this module: the method files are read, not imported (torch, transformers, peft and Lightning take
seconds), and the values a user set are checked against the schemas read that way
(`check_values_lightly`). A run imports the real modules afterwards, and their registrations store the
same schemas again (`llmk_lab.registry`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from llmk_lab.assets import refuse_missing_model_path
from llmk_lab.config import RunConfig, register_schemas
from llmk_lab.registry import to_settings

# --- schemas without importing the methods -------------------------------------------------------------------
#
# Hydra needs every option's schema in its ConfigStore when it composes, but the method modules
# import torch, transformers, peft and Lightning (seconds). `store_schemas_lightly` reads each
# method file instead, finds `@REGISTRY.register("name", config=SomeConfig)`, and runs only the
# statements a config dataclass can depend on (light imports, constants, functions, dataclasses,
# imports from other llmk_lab modules read the same way). The classes it makes carry the real
# module's name, so a pickled config (a sweep's workers) resolves to the real classes; and when a
# run imports the real modules, their registration stores the real schemas over these.
# A dataclass that cannot be made this way (its definition needs torch) makes its file load the
# normal way, so the result is always right, only slower.

_LIGHT_MODULES = {"__future__", "dataclasses", "typing", "enum", "re", "math", "os", "pathlib", "collections",
                  "functools", "itertools", "fnmatch", "llmk_lab.errors"}
_light_cache: dict[str, dict[str, Any]] = {}
_light_modules: dict[str, Any] = {}  # module name -> the stand-in module object read from its file
_light_schemas: dict[str, dict[str, type]] = {}  # group -> option name -> schema, as stored lightly


def _module_file(module: str):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_dataclass_def(node) -> bool:
    import ast

    def name(d):
        d = d.func if isinstance(d, ast.Call) else d
        return d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", None)

    return isinstance(node, ast.ClassDef) and any(name(d) == "dataclass" for d in node.decorator_list)


class _NotLight(Exception):
    pass


def light_namespace(module: str) -> dict[str, Any]:
    """The names of `module` that can be defined without its heavy imports (see above)."""
    import __future__

    import ast
    import importlib
    import sys
    import types

    if module in _light_cache:
        return _light_cache[module]
    if module in sys.modules:  # already imported for real: nothing to save
        _light_cache[module] = vars(sys.modules[module])
        return _light_cache[module]
    path = _module_file(module)
    if path is None:
        raise _NotLight(module)
    fake = types.ModuleType(module)
    fake.__file__ = str(path)
    namespace = vars(fake)
    _light_cache[module], _light_modules[module] = namespace, fake
    # dataclasses and typing.get_type_hints look the class's module up in sys.modules while a class
    # is made and stored; the stand-in is there only for that and never replaces a real import.
    sys.modules.setdefault(module, fake)
    flags = 0
    try:
        for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in _LIGHT_MODULES or alias.name in _LIGHT_MODULES:
                        namespace[alias.asname or alias.name.split(".")[0]] = importlib.import_module(
                            alias.name if alias.asname else alias.name.split(".")[0])
                continue
            if isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:  # relative import
                    parts = module.split(".")
                    base = parts[:len(parts) - node.level + (1 if path.name == "__init__.py" else 0)]
                    source = ".".join(base + ([source] if source else []))
                if source in _LIGHT_MODULES or source.split(".")[0] in _LIGHT_MODULES - {"llmk_lab"}:
                    if source == "__future__":  # the module's own compiler flags, for its statements below
                        for alias in node.names:
                            flags |= getattr(__future__, alias.name).compiler_flag
                        continue
                    imported = importlib.import_module(source)
                    for alias in node.names:
                        namespace[alias.asname or alias.name] = getattr(imported, alias.name)
                elif source.startswith("llmk_lab"):
                    try:
                        other = light_namespace(source)
                    except _NotLight:
                        continue
                    for alias in node.names:
                        if alias.name in other:
                            namespace[alias.asname or alias.name] = other[alias.name]
                continue
            dataclass_def = _is_dataclass_def(node)
            if not (dataclass_def or isinstance(node, (ast.Assign, ast.AnnAssign, ast.FunctionDef))):
                continue
            try:
                exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec", flags=flags, dont_inherit=True),
                     namespace)
            except Exception as err:  # a statement that needs what we did not import
                if dataclass_def:
                    raise _NotLight(f"{module}.{node.name}: {err}") from None
    finally:
        if sys.modules.get(module) is fake:
            del sys.modules[module]
    return namespace


def _registrations(path, registry_name: str) -> list[tuple[str, str]]:
    """(option name, config class name) of every `@<registry_name>.register("name", config=Cls)` in a file."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.ClassDef):
            continue
        for d in node.decorator_list:
            if (isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "register"
                    and isinstance(d.func.value, ast.Name) and d.func.value.id == registry_name
                    and d.args and isinstance(d.args[0], ast.Constant)):
                config = next((k.value.id for k in d.keywords if k.arg == "config" and isinstance(k.value, ast.Name)),
                              None)
                if config:
                    found.append((d.args[0].value, config))
    return found


def store_schemas_lightly(package: str, registry_name: str, group: str) -> dict[str, type]:
    """Store the schema of every option registered in `package` under `<group>/schema_<name>`,
    reading the files instead of importing them; returns {name: schema}. `light_fallbacks` lists
    the modules that had to be imported the normal way."""
    import importlib

    folder = _module_file(package).parent
    schemas: dict[str, type] = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = f"{package}.{path.stem}"
        entries = _registrations(path, registry_name)
        if not entries:
            continue
        try:
            namespace = light_namespace(module)
            with _stand_ins():
                for name, config in entries:
                    schema = namespace[config]
                    ConfigStore.instance().store(group=group, name=f"schema_{name}", node=schema)
                    schemas[name] = schema
                    _light_schemas.setdefault(group, {})[name] = schema
        except (_NotLight, KeyError) as err:
            light_fallbacks.append(f"{module} ({err})")
            importlib.import_module(module)  # registers itself, the schema included
    return schemas


light_fallbacks: list[str] = []


def check_values_lightly(cfg: Any) -> None:
    """Every schema's value checks (`__post_init__`) on a composed config, with the schemas stored
    lightly: an out-of-range value is refused in a fraction of a second, before a run imports torch.
    The run's own `plan` checks everything again, combinations included."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for field in dataclasses.fields(RunConfig):
        node = plain.get(field.name)
        if field.default_factory is not dataclasses.MISSING:  # a nested schema
            to_settings(type(field.default_factory()), node or {}, field.name)
        elif isinstance(node, dict) and field.name in _light_schemas:
            schema = _light_schemas[field.name].get(node.get("method"))
            if schema is not None:  # an unknown name is for `plan` to refuse, with the list of names
                with _stand_ins():
                    to_settings(schema, node, field.name)
                    _check_nested_options(node, field.name)
    # A model path that does not exist (often one another experiment writes), in the order the run loads them.
    model = plain.get("model") or {}
    if model.get("tokenizer") or model.get("name_or_path"):
        refuse_missing_model_path(model.get("tokenizer") or model["name_or_path"],
                                  "model.tokenizer" if model.get("tokenizer") else "model.name_or_path")
    if model.get("from_config") is None and model.get("name_or_path"):
        refuse_missing_model_path(model["name_or_path"], "model.name_or_path")


def _check_nested_options(node: dict, path: str) -> None:
    """Options listed inside an option (a chain's `steps`): each item naming a known option is checked too."""
    group = path.split(".")[0]
    for key, value in node.items():
        if not isinstance(value, list):
            continue
        for i, item in enumerate(value):
            schema = _light_schemas[group].get(item.get("method")) if isinstance(item, dict) else None
            if schema is not None:
                to_settings(schema, item, f"{path}.{key}[{i}]")
                _check_nested_options(item, f"{path}.{key}[{i}]")


class _stand_ins:
    """While Hydra stores the schemas it reads their type hints from their modules' globals (base
    classes' too): the stand-ins are in sys.modules for that moment only, never over a real module."""

    def __enter__(self):
        import sys

        self.installed = [name for name, fake in _light_modules.items() if sys.modules.setdefault(name, fake) is fake]

    def __exit__(self, *exc):
        import sys

        for name in self.installed:
            if sys.modules.get(name) is _light_modules[name]:
                del sys.modules[name]


# Registries whose options Hydra composes (`group=option`): (package, registry variable, config group).
SCHEMA_REGISTRIES = (("llmk_lab.compression", "COMPRESSION", "compression"), ("llmk_lab.peft", "PEFT", "peft"))


def register_all() -> None:
    """Put every schema in Hydra's ConfigStore before composing, without importing torch & co.

    The method files are read, not imported (`store_schemas_lightly`): composing,
    `--cfg job` and config errors take a fraction of a second; the methods themselves (and
    torch, transformers, peft, Lightning) are imported once a run starts, and store the same
    schemas again when they register.
    """
    for package, registry_name, group in SCHEMA_REGISTRIES:
        store_schemas_lightly(package, registry_name, group)
    register_schemas()
