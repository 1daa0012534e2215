"""Lets Lightning's FSDP run on CPU processes (gloo) for `tests/test_hardware.py`, in the processes that test
starts (`PYTHONPATH` holds this folder and `LLMK_LAB_TEST_FSDP_ON_CPU=1`). FSDP is for GPUs and llmk_lab
refuses it on CPU; this lifts three CPU-only obstacles so that the run's own FSDP path (sharded training,
the whole model gathered onto rank zero, the rank-zero stages and exports, the checkpoint every process
saves) runs here as it does on GPUs:

1. llmk_lab's refusal of `hardware.strategy=fsdp` on CPU (`hardware.check_available`);
2. torch's FSDP asks for an accelerator unless given `device_id`, which Lightning leaves unset on CPU;
3. Lightning gathers full state dicts with `offload_to_cpu=True`, which crashes torch on tensors already on CPU.
"""
import os

if os.environ.get("LLMK_LAB_TEST_FSDP_ON_CPU") == "1":
    import contextlib
    import types

    import pytorch_lightning.strategies.fsdp as lightning_fsdp
    import torch
    import torch.distributed.fsdp.fully_sharded_data_parallel as torch_fsdp

    import llmk_lab.hardware as hardware

    _check_available = hardware.check_available

    def check_available(hw):
        if hw.strategy == "fsdp":  # every other check as for DDP on CPU processes
            hw = types.SimpleNamespace(**{k: getattr(hw, k) for k in ("accelerator", "devices", "num_nodes",
                                                                    "precision")}, strategy="ddp")
        return _check_available(hw)

    hardware.check_available = check_available
    _init_device_handle = torch_fsdp._init_device_handle

    def init_device_handle(state, module, ignored_params, device_id):
        if device_id is None and not torch.cuda.is_available():
            device_id = torch.device("cpu")
        return _init_device_handle(state, module, ignored_params, device_id)

    torch_fsdp._init_device_handle = init_device_handle

    @contextlib.contextmanager
    def full_state_dict_context(module, world_size, rank0_only=True):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.api import FullOptimStateDictConfig

        with FSDP.state_dict_type(module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
                                  state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                  optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False,
                                                                                   rank0_only=rank0_only)):
            yield

    lightning_fsdp._get_full_state_dict_context = full_state_dict_context
