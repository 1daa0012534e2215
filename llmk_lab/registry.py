"""Registries for our own methods: one decorator call stores the class and its schema.

    @COMPRESSION.register("magnitude", config=MagnitudeConfig)
    class MagnitudePruning(CompressionMethod): ...

The schema is also stored in Hydra's ConfigStore as `<group>/schema_<name>`, so
`conf/<group>/<name>.yaml` can list it in its defaults and a misspelt key or a
wrong type fails when Hydra composes the config, naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmk_lab.config_errors import closest_key_hint
from llmk_lab.errors import InvalidValue, UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    cls: type[T]
    config: Optional[type]  # the option's schema; None where the registry composes no config node (tasks)


class Registry(Generic[T]):
    def __init__(self, group: str, key: str = "method", store_schemas: bool = True):
        self.group = group  # config group, e.g. "compression"
        self.key = key  # field of the node that names the entry
        # Only groups selected with `group=option` need their schemas in Hydra's ConfigStore.
        self.store_schemas = store_schemas
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, config: Optional[type] = None) -> Callable[[type[T]], type[T]]:
        if config is None and self.store_schemas:
            raise TypeError(f"{self.group} {name!r} needs a config dataclass: Hydra composes its options")
        if config is not None and not dataclasses.is_dataclass(config):
            raise TypeError(f"{config!r} must be a dataclass")

        def decorate(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"{self.group} {name!r} is registered twice")
            self._entries[name] = Entry(name, cls, config)
            if self.store_schemas:
                ConfigStore.instance().store(group=self.group, name=f"schema_{name}", node=config)
            cls.registered_name = name  # type: ignore[attr-defined]
            return cls

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str, key: str | None = None) -> Entry[T]:
        if name not in self._entries:
            raise InvalidValue(key or f"{self.group}.{self.key}", name, f"one of {self.names()}")
        return self._entries[name]

    def settings(self, node: Any, path: str) -> Any:
        """Validate a config node against its registered schema and return the dataclass.

        `path` is where the node sits in the full config (e.g. `compression` or
        `compression.steps[1]`), so errors name the full key.
        """
        node = node if isinstance(node, DictConfig) else OmegaConf.create(node)
        name = node.get(self.key)
        entry = self.get(name, f"{path}.{self.key}")
        return to_settings(entry.config, node, path)

    def build(self, node: Any, path: str) -> T:
        settings = self.settings(node, path)
        return self.get(getattr(settings, self.key)).cls(settings)  # type: ignore[call-arg]


def to_settings(schema: type, node: Any, path: str) -> Any:
    """Merge `node` onto `schema` and instantiate it, running its `__post_init__` checks."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except InvalidValue as err:
        raise err.under(path) from None
    except OmegaConfBaseException as err:
        key = f"{path}.{err.full_key}" if getattr(err, "full_key", None) else path
        msg = str(err).splitlines()[0]
        if "not in" in msg and dataclasses.is_dataclass(schema):  # `+train.lrr=...`: name the closest key
            msg = closest_key_hint(key, [f.name for f in dataclasses.fields(schema)])
        raise UserError(f"{key}: {msg}") from None


def import_submodules(package_name: str, package_path) -> None:
    """Import every module of a package, so each method file registers itself on import."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(package_path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
