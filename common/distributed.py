"""torch.distributed helpers: process-group setup under torchrun and gathers across ranks.

Under ``torchrun --nproc_per_node N train.py ...`` every process trains on its slice of each
global batch; the losses gather embeddings (with gradients) so that the contrastive and the
distillation terms see the whole global batch, exactly as one process with that batch would.
Work done by rank 0 alone (checkpoints, the teacher cache, ranking the evaluation set) goes
through ``on_main``, so that its result, or its error, reaches every rank.
"""
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device):
    """Join the process group torchrun describes in the environment; a single process otherwise.
    Returns (DistInfo, device): under CUDA each process takes the GPU of its local rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size()), device


def close_distributed(synchronize=True):
    """Leave the process group, if any, before the interpreter exits: torn down at exit, its worker
    threads abort the process. With ``synchronize``, once every rank has got here, so that none
    leaves while another still exchanges data with it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(tensor):
    """Concatenate every rank's ``tensor`` along dim 0; gradients flow back to each rank's slice."""
    if world_size() == 1:
        return tensor
    from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor
    # Its backward reduce-scatters (sums) the gradients of the gathered copies back to their owners.
    return wait_tensor(all_gather_single_autograd(tensor.contiguous(), gather_dim=0, group=dist.group.WORLD))



@torch.no_grad()
def gather(tensor):
    """Concatenate every rank's ``tensor`` along dim 0, without gradients (equal shapes required)."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def gather_to_main(obj):
    """Every rank's ``obj`` (any picklable value) in rank order on rank 0; None on the other ranks."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def gather_objects(obj):
    """Every rank's ``obj`` (any picklable value), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj):
    """Rank 0's ``obj`` (any picklable value), on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn):
    """``fn()`` on rank 0, its result on every rank (keep it small: it is pickled and broadcast).
    An exception raised there is raised on every rank, instead of leaving the other ranks waiting
    forever at their next collective call."""
    if world_size() == 1:
        return fn()
    outcome = error = None
    if rank() == 0:
        try:
            outcome = (True, fn())
        except Exception as e:
            error = e
            outcome = (False, e if _picklable(e) else RuntimeError(f"on rank 0: {type(e).__name__}: {e}"))
    ok, value = broadcast_from_main(outcome)
    if error is not None:
        raise error
    if not ok:
        value.same_on_every_rank = True  # rank 0 reports it (common.errors)
        raise value
    return value


def _picklable(obj):
    try:
        pickle.loads(pickle.dumps(obj))
        return True
    except Exception:
        return False
