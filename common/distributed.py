"""Data-parallel full-batch training across processes (torch.distributed, launched by
`torchrun`, or `srun` + torchrun under Slurm): start-up from torchrun's environment, who is the
main rank, each rank's share of the ghost batches, and the sums that make a step over shared
ghost batches the same function as in one process.

A step over G ghost batches on K ranks: rank r takes the contiguous ghost batches
[start_r, stop_r) (the first G mod K ranks one more), accumulates sum_k (n_k / N) grad l_k over
them, and the gradients are summed over the ranks. BatchNorm running statistics follow the
recurrence r <- (1 - m) r + m s_k over the ghost batches in order, which is linear:

    r_G = (1 - m)^G r_0 + sum_ranks (1 - m)^(G - stop_r) R_r,   R_r = the recurrence run from 0
                                                                      over rank r's batches

so every rank ends the step with the running statistics (and parameters) of one process, up to
float rounding. Ranks hold the whole data set; only the work is split.
"""
import contextlib
import os

import torch
import torch.distributed as dist

from .estimators import BN_TYPES


def init_from_env(device):
    """Joins the process group described by torchrun's environment (WORLD_SIZE > 1), with NCCL
    for CUDA and gloo for CPU; on CUDA each rank takes GPU LOCAL_RANK.

    Args:
        device: the torch.device asked for (cuda or cpu).
    Returns:
        (group, device): the WORLD group (None in a single process) and the rank's device.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.group.WORLD, device


def rank(group=None):
    """This process's rank in `group` (0 without one)."""
    return 0 if group is None else dist.get_rank(group)


def world_size(group=None):
    """Number of ranks in `group` (1 without one)."""
    return 1 if group is None else dist.get_world_size(group)


def is_main(group=None):
    """Whether this rank writes results, checkpoints and plots (rank 0)."""
    return rank(group) == 0


def barrier(group=None):
    """Waits for every rank (e.g. until rank 0 has written a file the others read)."""
    if group is not None:
        dist.barrier(group)


def share(count, group=None):
    """(start, stop) of this rank's contiguous share of `count` items: the first count mod K
    ranks take one more, so an uneven count is split, not refused (a rank may get none)."""
    k, r = world_size(group), rank(group)
    size, extra = divmod(count, k)
    start = r * size + min(r, extra)
    return start, start + size + (r < extra)


@contextlib.contextmanager
def shared_bn_statistics(model, start, stop, total, group):
    """Context for a rank's ghost batches [start, stop) of `total`: afterwards every BN layer's
    running statistics are those one process would have after all `total` batches in order
    (module docstring), and num_batches_tracked has grown by `total`. Needs a momentum (the
    cumulative average, momentum=None, is refused)."""
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.training
           and m.track_running_stats and m.running_mean is not None]
    if any(m.momentum is None for m in bns):
        raise ValueError("shared ghost batches need BatchNorm momentum; momentum=None refused")
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in bns]
    for m in bns:  # R_r: the recurrence from 0
        m.running_mean.zero_()
        m.running_var.zero_()
    try:
        yield
    except BaseException:
        for m, (mean, var, tracked) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
        raise
    if not bns:
        return
    pieces = []
    for m, (mean, var, _) in zip(bns, saved):
        keep = 1.0 - m.momentum
        for buf, initial in ((m.running_mean, mean), (m.running_var, var)):
            piece = buf * keep ** (total - stop)
            if rank(group) == 0:
                piece = piece + initial * keep ** total
            pieces.append(piece.reshape(-1))
    flat = torch.cat(pieces)  # (sum of 2 * channels,)
    dist.all_reduce(flat, group=group)
    chunks = iter(torch.split(flat, [p.numel() for p in pieces]))
    for m, (_, _, tracked) in zip(bns, saved):
        m.running_mean.copy_(next(chunks).view_as(m.running_mean))
        m.running_var.copy_(next(chunks).view_as(m.running_var))
        m.num_batches_tracked.copy_(tracked + total)


def all_reduce_gradients(model, loss_sum, correct, group):
    """Sums `.grad` (each rank's already weighted by n_k / N) and the loss and correct-count
    sums over the ranks, in one gradient buffer and one float64 buffer. A parameter keeps
    `.grad` None only if it has none on every rank (as in one process).

    Returns:
        (loss sum, correct count) over all ranks.
    """
    params = list(model.parameters())
    flags = [float(p.grad is not None) for p in params]
    stats = torch.tensor([loss_sum, correct] + flags, dtype=torch.float64)
    ref = params[0]
    grads = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                       for p in params])  # (P,)
    stats = stats.to(ref.device)
    dist.all_reduce(grads, group=group)
    dist.all_reduce(stats, group=group)
    stats = stats.tolist()
    for p, g, has in zip(params, torch.split(grads, [p.numel() for p in params]), stats[2:]):
        p.grad = g.view_as(p) if has > 0 else None  # views into the summed buffer
    return stats[0], int(round(stats[1]))
