"""llmk_lab: compose model x data x compression x PEFT x hardware into reproducible, tracked runs."""

__version__ = "0.1.0"

# Registries whose options Hydra composes (`group=option`): (package, registry variable, config group).
SCHEMA_REGISTRIES = (("llmk_lab.compression", "COMPRESSION", "compression"), ("llmk_lab.peft", "PEFT", "peft"))


def register_all() -> None:
    """Put every schema in Hydra's ConfigStore before composing, without importing torch & co.

    The method files are read, not imported (`registry.store_schemas_lightly`): composing,
    `--cfg job` and config errors take a fraction of a second; the methods themselves (and
    torch, transformers, peft, Lightning) are imported once a run starts, and store the same
    schemas again when they register.
    """
    from llmk_lab import config
    from llmk_lab.registry import store_schemas_lightly

    for package, registry_name, group in SCHEMA_REGISTRIES:
        store_schemas_lightly(package, registry_name, group)
    config.register_schemas()


def _quiet_third_party_import_noise() -> None:
    # torchao probes for GPU kernels at import and logs each one it cannot load
    # on a CPU build; torch logs a deprecation from torchao's pytree registration.
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


_quiet_third_party_import_noise()
