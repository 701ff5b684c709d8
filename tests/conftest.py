"""One local Ray per test session (or the cluster in RAY_ADDRESS), and shared synthetic data."""


import pytest

import pipelines.common  # noqa: F401  (sets the offline / quiet environment defaults)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from pipelines.common import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_m3d(tmp_path_factory):
    """A small synthetic M3D tree with every kind of bad input planted."""
    from med3dvlm.data.synthetic import write_m3d_tree

    root = tmp_path_factory.mktemp("m3d")
    counts = write_m3d_tree(root, cases=16, seed=1, bad=True)
    return root, counts


@pytest.fixture(scope="session")
def shards(ray_session, synthetic_m3d, tmp_path_factory):
    """The synthetic tree preprocessed at the tiny config."""
    from med3dvlm.config import load_config
    from pipelines.preprocess import preprocess

    raw, _ = synthetic_m3d
    out = tmp_path_factory.mktemp("shards")
    cfg = load_config("tiny", ["data.rows_per_shard=16"])
    manifest = preprocess(cfg, raw, out, log=lambda *_: None)
    return out, manifest, cfg
