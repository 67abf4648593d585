"""Random states of a training run: seeding, and the per-rank states a checkpoint keeps so that a
resumed run draws the same dropout masks as an uninterrupted one."""
import random

import numpy as np
import torch


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_rank(seed, rank):
    """Give each rank its own random stream (dropout) once the model is built. Rank 0 keeps the
    stream it has, so a single-process run is unchanged; without this every rank would draw the
    same dropout masks for its slice of the global batch."""
    if rank:
        seed_everything((seed + 1_000_003 * rank) % 2**32)  # numpy takes seeds below 2**32


def rng_state(device):
    """The random state that dropout draws from: the CPU generator and, on CUDA, this rank's GPU's."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(device, state):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def saved_rng_states(rng, device):
    """A checkpoint's per-rank random states in the form ``rng_state`` makes. Older checkpoints kept
    one state (a dict) holding the CUDA states of every visible GPU (a list); a checkpoint loaded
    with map_location on a GPU holds CUDA tensors, while the generators take CPU bytes."""
    states = []
    for state in [rng] if isinstance(rng, dict) else rng:
        cuda = state.get("cuda")
        if isinstance(cuda, list):
            cuda = cuda[min(device.index or 0, len(cuda) - 1)] if cuda else None
        states.append({"torch": state["torch"].cpu(), "cuda": None if cuda is None else cuda.cpu()})
    return states
