"""The column sweep that SparseGPT and GPTQ share (Optimal Brain Surgeon, one column at a time).

With H = 2 X X^T the Hessian of a layer's squared output error on its calibration inputs X, and U
the upper Cholesky factor of H^-1, the sweep visits the columns of W left to right in blocks of
`blocksize`. Each column is replaced by its compressed value q (zero where pruned; the nearest grid
point where quantised; both in SparseGPT's joint mode), and its error (w - q) / U_jj is spread over
the columns not yet visited through row j of U: the OBS update that leaves the layer's output on X
as close as possible to the original. Within a block the updates are applied column by column,
to later blocks once per block (the "lazy batch" of the GPTQ paper); the arithmetic is that of the
authors' reference implementations (`fasterprune` and `fasterquant`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from llmk_lab.compression.one_shot import n_m_keep_mask
from llmk_lab.errors import UserError


def damped_inverse_factor(W: torch.Tensor, H: torch.Tensor, percdamp: float, name: str,
                          method: str) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damping)^-1; zeroes the weights of inputs that were always
    zero in `W` (in place) and keeps H invertible, as the references do."""
    H = H.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise UserError(f"{method}: the Hessian of {name} is not positive definite with "
                        f"compression.percdamp={percdamp}; raise percdamp (the papers use 0.01)") from None


@contextlib.contextmanager
def one_thread_on_cpu(device: torch.device):
    """The column loop is thousands of tiny operations: on CPU, thread hand-offs cost more than the
    arithmetic (measured 60x slower with 2 threads on a busy machine)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# quantize_column(position, column after pruning, upcoming(size) -> the next `size` columns' current values)
ColumnQuantizer = Callable[[int, torch.Tensor, Callable[[int], torch.Tensor]], torch.Tensor]


def obs_sweep(W: torch.Tensor, Hinv: torch.Tensor, blocksize: int, sparsity: float = 0.0, prune_n: int = 0,
              prune_m: int = 0, keep: Optional[torch.Tensor] = None,
              quantize_column: Optional[ColumnQuantizer] = None) -> torch.Tensor:
    """Compress `W` (rows, columns) in place; returns the pruned positions (bool).

    Pruning: unstructured `sparsity` chooses the mask adaptively per block from w^2 / U_jj^2 (exactly
    round(sparsity * numel) zeros in all, by cumulative rounding); `prune_m > 0` chooses N:M per group of
    M columns as they are reached. `keep` (True where kept) holds weights pruned before, forced to stay
    zero. `quantize_column` puts each column on a grid after its pruned weights are zeroed."""
    rows, columns = W.shape
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if prune_m == 0:
            # Adaptive mask selection: this block's lowest w^2 / [H^-1]_jj^2.
            n_block = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            mask1 = torch.zeros(W1.numel(), dtype=torch.bool, device=W.device)
            if n_block:
                scores = W1 ** 2 / d.reshape(1, -1) ** 2
                mask1[torch.topk(scores.flatten(), n_block, largest=False).indices] = True
            mask1 = mask1.view_as(W1)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if keep is not None:
            mask1 |= ~keep[:, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            if prune_m and i % prune_m == 0:
                group = W1[:, i:i + prune_m] ** 2 / d[i:i + prune_m].reshape(1, -1) ** 2
                mask1[:, i:i + prune_m] = ~n_m_keep_mask(group, prune_n, prune_m)
                if keep is not None:
                    mask1[:, i:i + prune_m] |= ~keep[:, i1 + i:i1 + i + prune_m]
            q = w.clone()
            q[mask1[:, i]] = 0
            if quantize_column is not None:
                # A group's parameters are fitted on W, whose columns in this block lack the block's own
                # updates so far: the references' choice (`fasterquant`, AutoGPTQ), kept for exactness.
                q = quantize_column(i1 + i, q, lambda size, j=i1 + i: W[:, j:j + size])
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return pruned
