"""SparseGPT (Frantar & Alistarh 2023): prune one layer and reconstruct its output from the kept weights.

For a layer W [rows, cols] with calibration inputs X, pruning weight (r, j)
and letting the later weights of row r absorb its error costs
w_rj^2 / [H^-1]_jj (H = X X^T / n, the Hessian of the layer's squared
output error); the optimal update of the other weights of the row is
-w_rj / [H^-1]_jj * H^-1[j, :] (the OBS update). With U the upper Cholesky
factor of H^-1, processing the columns left to right makes every later
update a row of U, so each column costs one outer product. Columns are
processed in blocks of `block` columns: within a block column by column, and
the block's accumulated error carried into every later column in one product.

Which weights are pruned is chosen per selection segment (a block, or under
N:M one group of M columns, as in the paper) from the weights as updated so
far, lowest w^2 / U_jj^2 first. Exactness: each segment gets a whole quota
(proportional to its size, never below the weights of it already pruned,
never above its cap), the quotas adding up to the layer's count exactly;
within a segment the quota's lowest keys are taken by the shared exact
selection (ties by the tie hash). Weights pruned before carry the lowest key,
so they are always taken again, and end exactly zero: the OBS updates of
earlier columns may move them, but at their own column they are set to zero
and their error is carried on like any other.

Dead inputs (a column whose calibration inputs are all zero, H_jj = 0): H
is singular there. The paper sets H_jj = 1 and zeroes the column's weights,
which would zero weights it does not count as pruned. Here H_jj is set to the
mean of the live diagonal instead and the weights are left as they are: a
dead input is treated as an ordinary input of average scale, uncorrelated
with the others, so its weights are neither pruned for free nor protected,
and the result does not depend on the scale of the inputs.
"""

from __future__ import annotations

import torch

from lib.errors import KpruneError
from lib.pruning.scope import lowest
from lib.pruning.selection import INT32_MIN
from lib.pruning.structure import nm_cap_


def spread(total: int, sizes: list[int], floors: list[int], caps: list[int]) -> list[int]:
    """Whole counts per segment adding up to `total`: about proportional to `sizes`, each in [floor, cap]."""
    n = sum(sizes)
    if not sum(floors) <= total <= sum(caps):
        raise ValueError(f"{total} cannot be spread between {sum(floors)} already pruned and a cap of {sum(caps)}")
    ideal = [total * s / n for s in sizes]
    counts = [min(c, max(f, int(x))) for x, f, c in zip(ideal, floors, caps)]
    order = sorted(range(len(sizes)), key=lambda i: (-(ideal[i] - int(ideal[i])), i))  # largest remainder first
    diff = total - sum(counts)
    while diff:
        room = [i for i in (order if diff > 0 else order[::-1])
                if (counts[i] < caps[i] if diff > 0 else counts[i] > floors[i])]
        each = max(1, abs(diff) // len(room))
        for i in room:
            change = min(each, abs(diff), caps[i] - counts[i] if diff > 0 else counts[i] - floors[i])
            counts[i] += change if diff > 0 else -change
            diff += -change if diff > 0 else change
            if not diff:
                break
    return counts


def inverse_hessian_factor(hessian: torch.Tensor, count: float, dampening: float, name: str) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damping)^-1, float32, for H = `hessian` / `count`."""
    h = hessian.double() / count
    diag = h.diagonal()
    dead = diag == 0
    live = diag[~dead]
    scale = live.mean() if live.numel() else torch.ones((), dtype=h.dtype, device=h.device)
    diag.copy_(torch.where(dead, scale, diag))  # a dead input: an ordinary one of average scale (module doc)
    diag.add_(dampening * diag.mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise KpruneError(f"sparsegpt: the Hessian of {name}'s calibration inputs is not positive definite even "
                          f"with SPARSEGPT_DAMPENING={dampening:g}; raise SPARSEGPT_DAMPENING or "
                          "CALIBRATION_BATCHES")
    inverse = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(inverse, upper=True).float()


@torch.no_grad()
def prune_layer_(w: torch.Tensor, u: torch.Tensor, pruned: torch.Tensor, count: int, *, block: int,
                 nm: tuple[int, int] | None = None, first_index: int = 0) -> torch.Tensor:
    """Prune `count` weights of `w` [rows, cols] (float32, updated in place) with SparseGPT; returns the mask.

    `u` is the upper Cholesky factor of the inverse Hessian, `pruned` the bool
    mask of the weights pruned before (all of them are in the result);
    `nm` = (n, m) caps every group of m consecutive columns of a row at m - n
    pruned. `block` must be a multiple of m.
    """
    rows, cols = w.shape
    seg = nm[1] if nm else block
    if nm and block % seg:
        raise ValueError(f"block {block} is no multiple of M = {seg}")
    starts = list(range(0, cols, seg))
    lengths = [min(seg, cols - s) for s in starts]
    per_column = torch.nn.functional.pad(pruned.sum(0), (0, -cols % seg))  # one read of the old mask
    floors = [int(x) for x in per_column.view(-1, seg).sum(1).tolist()]
    caps = [rows * n // nm[1] * (nm[1] - nm[0]) if nm else rows * n for n in lengths]
    quotas = spread(count, [rows * n for n in lengths], floors, caps)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    segment = 0
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        work, u1 = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        d = u1.diagonal()
        errors = torch.zeros_like(work)
        for j in range(b1 - b0):
            if segment < len(starts) and b0 + j == starts[segment]:  # choose the next segment's weights
                n = lengths[segment]
                key = (work[:, j:j + n].square() / d[j:j + n].square()).contiguous().view(torch.int32)
                key.masked_fill_(pruned[:, b0 + j:b0 + j + n], INT32_MIN)  # pruned stay pruned
                if nm:
                    nm_cap_(key, key.shape, *nm)
                chosen = lowest([key.reshape(-1)], quotas[segment], first_index + (b0 + j) * rows)[0]
                mask[:, b0 + j:b0 + j + n] = chosen.view(rows, n)
                segment += 1
            column = work[:, j]
            kept = column * mask[:, b0 + j].logical_not()
            error = (column - kept) / d[j]
            work[:, j:].sub_(error[:, None] * u1[j, j:][None, :])
            work[:, j] = kept  # exactly: zero where pruned, the weight itself where kept
            errors[:, j] = error
        w[:, b0:b1] = work
        w[:, b1:].sub_(errors @ u[b0:b1, b1:])
    return mask
