"""llmk_lab: compose model x data x compression x PEFT x hardware into reproducible, tracked runs."""

__version__ = "0.1.0"

def _quiet_third_party_import_noise() -> None:
    # torchao probes for GPU kernels at import and logs each one it cannot load
    # on a CPU build; torch logs a deprecation from torchao's pytree registration; bitsandbytes (imported by
    # peft) warns on CPUs where its optional `kernels` package would give a faster 4-bit kernel, and falls
    # back to its own. None is the user's to act on, and each broke the entry points' one-line errors.
    import logging

    for name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)


_quiet_third_party_import_noise()
