"""What evaluation reads: the evaluated split of the shards as a Ray Dataset (in shard order, optionally limited),
the shuffled-image control's re-pairing, and the actor pool's arguments."""

from __future__ import annotations


def dataset(ec, columns: list[str]):
    from med3dvlm.data.shards import read_shards
    from med3dvlm.runtime import configure_data_context

    configure_data_context(preserve_order=True)  # "the first N test pairs" means shard order

    def read(cols):
        ds = read_shards(ec.shards, split=ec.splits if len(ec.splits) > 1 else ec.splits[0],
                         split_field=ec.split_field, columns=cols)
        return ds.limit(ec.limit) if ec.limit else ds

    if not ec.shuffle_images:
        return read(columns)
    return rotate_volumes(read(["volume_id", "case_id", "volume"]), read([c for c in columns if c != "volume"]))


def rotate_volumes(volumes, texts):
    """The shuffled-image control's data: each row of `texts` takes another row's volume from `volumes` (the same
    rows). Rows are ordered by (case, volume id), so a case's series lie together, and row i takes the volume of row
    (i + n//2) mod n (`baselines.rotation`): never its own case's unless one case holds half the rows. The evaluated
    volumes are put in the object store once (through the driver) to be re-paired; an optional control, sized as
    the evaluation."""
    import ray

    from med3dvlm.eval.baselines import rotation

    refs, cases = {}, {}
    for b in volumes.iter_batches(batch_size=16, batch_format="numpy"):
        for vid, case, vol in zip(b["volume_id"], b["case_id"], b["volume"]):
            refs[str(vid)], cases[str(vid)] = ray.put(vol), str(case)
    order = sorted(refs, key=lambda v: (cases[v], v))
    rot = rotation(len(order))
    partner = {order[i]: refs[order[rot[i]]] for i in range(len(order))}
    return texts.map_batches(_partner_volumes, fn_kwargs={"partner": partner}, batch_format="numpy")


def _partner_volumes(batch: dict, partner: dict) -> dict:
    import numpy as np
    import ray

    from med3dvlm.data.shards import qa_as_lists

    batch["volume"] = np.stack(ray.get([partner[str(v)] for v in batch["volume_id"]]))
    return qa_as_lists(batch)


def pool_args(ec) -> dict:
    from ray.data import ActorPoolStrategy

    return {"compute": ActorPoolStrategy(size=ec.replicas), "batch_size": ec.batch_size, "batch_format": "numpy",
            "num_cpus": ec.cpus_per_replica, "num_gpus": ec.gpus_per_replica}
