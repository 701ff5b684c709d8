"""Checkpoints: every rank saves its DeepSpeed shard and Ray Train reports it (a restarted worker group resumes from
the last one, `engine.resume`), every `train.checkpoint_every` steps (or each epoch) and at the last; and the record
of which node ran which rank at each (re)start."""

from __future__ import annotations

import json
import tempfile

import torch

from med3dvlm import storage
from med3dvlm.train.plan import due


class Checkpointer:
    """Asked after every step whether a checkpoint is due; saves and reports it, or reports figures alone."""

    def __init__(self, every: int, total: int):
        self.every, self.total = every, total

    def due(self, done: int) -> bool:
        return due(done, self.every, self.total)

    def save(self, engine, metrics: dict, step: int) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            # a collective: every rank saves its shard; with every rank's random state (dropout), which DeepSpeed
            # keeps in rank 0's file, so that a resumed run repeats an uninterrupted one
            engine.save_checkpoint(d, tag="ds", client_state={"step": step, "rng": rng_states()})
            ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"checkpoint_step{step + 1:07d}")

    @staticmethod
    def report(metrics: dict) -> None:
        import ray.train

        ray.train.report(dict(metrics))


def rng_states() -> list:
    """Every rank's torch random state, in rank order (a collective)."""
    import torch.distributed as dist

    states = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(states, torch.get_rng_state())
    else:
        states = [torch.get_rng_state()]
    return states


def record_placement(export: str | None, start: int, rank: int, world: int) -> None:
    """Append this (re)start's rank -> node map to <export>/placement.json (which node ran which worker)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    nodes = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(nodes, node)
    else:
        nodes = [node]
    if rank == 0 and export:
        f = storage.join(export, "placement.json")
        runs = storage.read_json(f) if storage.is_file(f) else []
        runs.append({"start_step": start, "nodes": nodes})
        storage.write_text(f, json.dumps(runs, indent=1))
