"""One local Ray per test session (or the cluster in RAY_ADDRESS), and shared synthetic data."""


import os
import re
import socket
import uuid

import pytest

from med3dvlm.runtime import apply_env_defaults

apply_env_defaults()  # offline HF, quiet Ray, NLTK data: as every entry point

# Ray Train's controller polls its workers every 2 s by default, and a run waits out a poll at each change of state
# (workers up, finished, shut down): ~7 of a tiny run's 24 s on this machine. The suite trains ~25 such runs, so its
# Ray (and every Ray its tests start) polls every 0.2 s; the code path is the same.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# An S3-compatible server (moto) on localhost stands in for a bucket. The endpoint and credentials go into the
# environment before any Ray starts, so every Ray process (workers, job drivers, other nodes) reaches the same store,
# exactly as AWS_* variables do on a real cluster.
S3_ENDPOINT = f"http://127.0.0.1:{free_port()}"
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
                  AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL_S3=S3_ENDPOINT)


@pytest.fixture(scope="session")
def s3_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = int(S3_ENDPOINT.rsplit(":", 1)[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3_ENDPOINT
    server.stop()


def new_bucket() -> str:
    """A fresh, empty bucket on the test S3 server: `s3://<name>`."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def bucket(s3_server):
    return new_bucket()


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from med3dvlm.runtime import init_ray

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
    from med3dvlm.data.preprocess import preprocess

    raw, _ = synthetic_m3d
    out = tmp_path_factory.mktemp("shards")
    cfg = load_config("tiny", ["data.rows_per_shard=16"])
    manifest = preprocess(cfg, raw, out, log=lambda *_: None)
    return out, manifest, cfg


FAST = ["train.stage1.batch_size=4", "train.stage2.batch_size=4", "train.stage3.batch_size=4",
        "train.stage1.epochs=3", "train.stage2.max_steps=6", "train.stage3.max_steps=6", "train.max_failures=0",
        "train.eval_every=0",  # validation (on by default) has its own tests
        "model.trainable=released_code"]  # the chain covers LoRA (the paper's stage 3) and a trained vision tower


def cfg_for(*extra):
    from med3dvlm.config import load_config

    return load_config("tiny", FAST + list(extra))


@pytest.fixture(scope="session")
def chain(shards, tmp_path_factory):
    """Stages 1 -> 2 -> 3 under ZeRO-2, each from the previous export (shared by training, evaluation and serving tests)."""
    from med3dvlm.train.driver import train

    out = tmp_path_factory.mktemp("ckpt")
    cfg = cfg_for()
    r1 = train(cfg, 1, str(shards[0]), str(out), log=lambda *_: None)
    r2 = train(cfg, 2, str(shards[0]), str(out), r1["export"], log=lambda *_: None)
    r3 = train(cfg, 3, str(shards[0]), str(out), r2["export"], log=lambda *_: None)
    return cfg, r1, r2, r3


# `make test-fast` runs the tests that need no Ray (`-m "not ray"`): a test is marked by the fixtures it uses.
RAY_FIXTURES = {"ray_session", "shards", "chain", "served", "cluster"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
    # The two-node test and the tests marked own_ray start Ray nodes of their own: they run first, before the
    # session's Ray exists (an idle local Ray took a tenth to a sixth of this 2-core machine)
    items.sort(key=lambda item: not ("cluster" in getattr(item, "fixturenames", ())
                                     or item.get_closest_marker("own_ray")))


def one_line_exit_2(capsys, fn) -> str:
    """`fn` run as an entry point's `__main__` runs it: exit 2 with one line on stderr, returned."""
    from pipelines.common import run_main

    with pytest.raises(SystemExit) as e:
        run_main(fn)
    # lines Ray forwards from its own processes (`(gcs_server) ...`, `(raylet) ...`) to this test process are not the
    # command's: a Ray started by an earlier test may log into any test's captured stderr
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines()
                     if not re.match(r"(\x1b\[\d+m)?\((pid=)?\w+", line)).strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err
