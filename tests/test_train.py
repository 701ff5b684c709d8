"""The three training stages on Ray Train + DeepSpeed ZeRO (2 CPU workers, gloo), resume, export, bad input."""

import json
import os
import time
from pathlib import Path

import pytest
import torch

from med3dvlm.config import load_config
from med3dvlm.runtime import UserError
from med3dvlm.train.driver import train

from conftest import cfg_for


def _ds_module_state(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["module"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_and_its_loss_falls(chain, stage):
    r = chain[stage]
    h = r["history"]
    assert len(h) == h[-1]["step"] + 1 and h[0]["step"] == 0
    assert r["figures"]["loss_last"] < r["figures"]["loss_first"]
    assert all(k in h[0] for k in ("lr", "samples_per_s", "data_wait_s", "compute_s"))
    if stage == 1:
        assert "t" in h[0] and "b" in h[0] and h[-1]["b"] != h[0]["b"]
    run = json.loads((Path(r["export"]) / "run.json").read_text())
    assert run["figures"]["steps"] == len(h) and (Path(r["export"]) / "curves.png").stat().st_size > 0


def test_export_equals_the_trained_weights_and_reloads(chain):
    from safetensors.torch import load_file

    from med3dvlm.models.clip import CLIPModel
    from med3dvlm.models.vlm import VLM

    cfg, r1, _, r3 = chain
    for r, cls in ((r1, CLIPModel), (r3, VLM)):
        exported = load_file(Path(r["export"]) / "model.safetensors")
        trained = _ds_module_state(r["checkpoint"])
        assert set(trained) <= set(exported)
        assert all(torch.equal(trained[k].float(), exported[k].float()) for k in trained)
        model = cls.from_pretrained(r["export"])
        assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())
    # the stage-3 export carries its LoRA adapters and generates
    vlm = VLM.from_pretrained(r3["export"]).eval()
    assert vlm.lora and vlm.generate(torch.rand(1, 1, *cfg.data.shape), [" Which organ?"], max_new_tokens=3)[0] is not None


def test_a_rerun_in_the_shards_order_repeats_the_trajectory(chain, shards, tmp_path):
    """`train.preserve_order` (the tiny preset's; augmentation off): the session chain's stage 1 run again gives the
    same losses step for step. Without it the order of the blocks reaching the workers followed which Ray worker
    finished first, and so did every batch: two `make demo` runs of one commit printed different tables
    (2026-11-30, R@1 39.3 and 50.0)."""
    cfg = chain[0]
    assert cfg.train.preserve_order and not cfg.train.augment
    again = train(cfg, 1, str(shards[0]), str(tmp_path), log=lambda *_: None)
    first = [h["loss"] for h in chain[1]["history"]]
    assert [h["loss"] for h in again["history"]] == pytest.approx(first, rel=1e-6) and len(first) > 2


def test_a_zero3_run_that_loses_a_worker_resumes_and_exports_the_trained_weights(shards, tmp_path):
    """One run for two behaviours (a Ray Train run costs ~35 s here): a worker fails at step 4, the run restarts from
    its last checkpoint under ZeRO-3 (partitioned parameters and optimizer state), and the export gathers every
    parameter module by module into the weights the last checkpoint holds."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from med3dvlm.models.clip import CLIPModel

    cfg = cfg_for("train.zero_stage=3", "train.fail_at_step=4", "train.checkpoint_every=2", "train.max_failures=1",
                  "train.stage1.epochs=3")
    r = train(cfg, 1, str(shards[0]), str(tmp_path), log=lambda *_: None)
    h = r["history"]
    assert r["figures"]["loss_last"] < r["figures"]["loss_first"]  # the resumed steps under ZeRO-3 still learn
    # the restarted worker began after the last checkpoint Ray Train had registered when the worker died at step 4:
    # step index 3's (saved just before) or, when its registration had not finished, step index 1's
    assert r["figures"]["restored_from_checkpoint"] and h[0]["step"] in (2, 4)
    total = json.loads((Path(r["export"]) / "run.json").read_text())["figures"]["last_step"] + 1
    assert h[-1]["step"] == total - 1 and total >= 6
    exported = load_file(Path(r["export"]) / "model.safetensors")
    with r["checkpoint"].as_directory() as d:
        trained = get_fp32_state_dict_from_zero_checkpoint(d, tag="ds")
    assert set(trained) <= set(exported)
    for k, v in trained.items():
        assert torch.equal(v.float(), exported[k].float()), k
    m = CLIPModel.from_pretrained(r["export"])
    assert all(v.numel() > 0 for v in m.state_dict().values())  # gathered, not ZeRO-3 placeholders


def test_a_local_ray_starts_no_preemption_watcher(chain):
    """Ray Train's preemption watcher polls for nodes being drained (autoscaled or spot clusters): a local Ray has
    none to drain, and Ray logs an error-level line for each watcher it starts (ray-project/ray#53727)."""
    from ray.util.state import list_actors

    def count(cls: str) -> int:  # filtered by the state API itself: the session's other actors cannot crowd it out
        return len(list_actors(filters=[("class_name", "=", cls)], limit=10_000))

    assert count("RayTrainWorker") > 0 and count("PreemptionWatcher") == 0


CHURN = """
import ctypes, resource, threading

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def churn():  # a training step's pattern (torch's CPU tensors come from malloc): large blocks written and freed
    for _ in range(20):
        p = libc.malloc(128 << 20)
        ctypes.memset(p, 1, 128 << 20)
        libc.free(p)

before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = threading.Thread(target=churn)  # Ray Train runs the loop in a thread of the worker process
t.start()
t.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_train_workers_and_preprocessing_run_with_an_allocator_that_keeps_freed_memory(chain):
    """Ray Train's workers and the preprocessing tasks get `runtime.allocator_env` (their runtime envs hold it), and
    in a process with those variables glibc reuses a freed 128 MB block instead of faulting the next one in page by
    page."""
    import subprocess
    import sys

    from ray.util.state import list_actors, list_tasks

    from med3dvlm.runtime import KEEP_FREED_MEMORY

    workers = [a.serialized_runtime_env for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False)
               if a.class_name == "RayTrainWorker"]
    shard_tasks = [t.runtime_env_info["serialized_runtime_env"] for t in list_tasks(
        detail=True, limit=10_000, raise_on_missing_output=False) if "process_shard_row" in (t.name or "")]
    assert workers and shard_tasks
    for serialized in workers + shard_tasks:
        env = json.loads(serialized or "{}").get("env_vars", {})
        assert {k: env.get(k) for k in KEEP_FREED_MEMORY} == KEEP_FREED_MEMORY

    def faults(extra: dict) -> int:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", CHURN], env={**base, **extra}, capture_output=True, text=True,
                             check=True)
        return int(out.stdout)

    kept, default = faults(KEEP_FREED_MEMORY), faults({})
    assert default > 20 * 30_000 and kept < default / 5  # 32,768 pages a block: 20 blocks by default, ~1 kept


def _other_vocabulary(export: str, out) -> str:
    """A copy of a stage-2 export whose tokenizer has one more token than the config's LLM tokenises with."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(export, out)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    tok.add_tokens(["hepatomegaly"])
    tok.save_pretrained(out / "tokenizer")
    return str(out)


def test_bad_input_fails_before_any_worker_starts(shards, tmp_path, chain):
    cfg = cfg_for()
    s = str(shards[0])
    other = _other_vocabulary(chain[2]["export"], tmp_path / "other-vocab")
    cases = [
        (lambda: train(cfg, 3, s, str(tmp_path), other), r"its tokenizer \(\d+ tokens\) is not model.llm=tiny-qwen2's"),
        (lambda: train(cfg_for("model.llm=/no/such/llm"), 3, s, str(tmp_path), chain[2]["export"]), "does not exist"),
        (lambda: train(cfg, 1, str(tmp_path / "nothing"), str(tmp_path)), "no shards there"),
        (lambda: train(cfg, 2, s, str(tmp_path)), "pass --init"),
        (lambda: train(cfg, 3, s, str(tmp_path), chain[1]["export"]), "needs the export of stage 2"),
        (lambda: train(cfg, 2, s, str(tmp_path), str(tmp_path)), "not an exported model directory"),
        (lambda: train(load_config("tiny", ["data.shape=[16,64,64]"]), 1, s, str(tmp_path)), "shape"),
        (lambda: train(cfg_for("train.num_workers=64"), 1, s, str(tmp_path)), "CPUs"),
        (lambda: train(cfg_for("train.closed_orders=5"), 2, s, str(tmp_path), chain[1]["export"]), "closed_orders"),
        (lambda: train(cfg_for("model.text_encoder=/no/such/model"), 1, s, str(tmp_path)), "does not exist"),
    ]
    for fn, words in cases:
        t = time.time()
        with pytest.raises(UserError, match=words):
            fn()
        assert time.time() - t < 10


def test_closed_orders_put_each_answer_under_every_letter_with_the_same_choices():
    from med3dvlm.data.samples import rotate_choices, task_rows

    q = {"question": "Which organ?", "choice_a": "Liver", "choice_b": "Spleen", "choice_c": "Kidney",
         "choice_d": "Pancreas", "answer_choice": "C", "answer": "Kidney", "yes_no": False, "split": "train"}
    rotated = [rotate_choices(q, k) for k in range(4)]
    assert rotated[0] == q and [r["answer_choice"] for r in rotated] == ["C", "D", "A", "B"]
    for r in rotated:  # the answer's text under its letter; the same four texts, in cyclic order
        assert r["choice_" + r["answer_choice"].lower()] == "Kidney"
        assert {r["choice_" + l] for l in "abcd"} == {"Liver", "Spleen", "Kidney", "Pancreas"}
    three = {**q, "choice_d": "", "answer_choice": "A", "answer": "Liver"}  # a missing choice stays missing
    assert [rotate_choices(three, k)["answer_choice"] for k in range(3)] == ["A", "B", "C"]
    assert rotate_choices(three, 1)["choice_d"] == ""
    row = {"volume": None, "volume_id": "v", "report": "r", "qa": [q]}
    closed = [s for s in task_rows(row, ("train",), closed_orders=4) if s["task"] == "closed"]
    assert [s["answer"] for s in closed] == [" C. Kidney", " D. Kidney", " A. Kidney", " B. Kidney"]
    assert len(task_rows(row, ("train",))) == 3  # by default as given: report, closed, open


def test_expand_tasks_gives_each_task_its_own_volume_as_task_rows_does():
    """The columnar expansion the feed uses equals `task_rows` volume by volume: every task, in order, beside the
    volume it was asked of (a volume with no questions still gives its report)."""
    import numpy as np

    from med3dvlm.data.samples import expand_tasks, task_rows

    q = {"question": "Which organ?", "choice_a": "Liver", "choice_b": "Spleen", "choice_c": "", "choice_d": "",
         "answer_choice": "B", "answer": "Spleen", "yes_no": False, "split": "train"}
    yn = {**q, "question": "Is there a lesion?", "answer": "Yes", "yes_no": True}
    batch = {"volume_id": np.array(["a", "b"], dtype=object), "report": np.array(["ra", "rb"], dtype=object),
             "qa": np.array([[q, yn], None], dtype=object), "volume": np.stack([np.zeros((2, 3, 3), np.uint8),
                                                                               np.ones((2, 3, 3), np.uint8)])}
    out = expand_tasks(batch, ("train", "yn_train"), closed_orders=2)
    rows = [t for i in range(2) for t in task_rows({k: batch[k][i] for k in batch}, ("train", "yn_train"),
                                                   closed_orders=2)]
    assert len(rows) == 6 and len(out["prompt"]) == 6  # a: report, 2 closed, open, yes/no; b: report
    for i, r in enumerate(rows):
        assert [out[k][i] for k in ("volume_id", "prompt", "answer", "task")] == [r[k] for k in
                                                                                ("volume_id", "prompt", "answer", "task")]
        assert (out["volume"][i] == r["volume"]).all() and out["volume"].dtype == np.uint8


def test_progress_lines_every_n_steps_no_sooner_than_the_gap_and_at_each_epoch_end(capsys, monkeypatch):
    from med3dvlm.train import metrics as loop

    clock = iter(range(0, 1000, 2))  # each step takes 2 s
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    p = loop.Progress(3, start=0, total=20, steps_per_epoch=10, every=1, gap=5)
    for step in range(20):
        p.step({"step": step, "epoch": step // 10, "loss": 1.0, "lr": 1e-3, "samples_per_s": 8.0, "data_wait_s": 0.0,
                "compute_s": 1.0})
    done = [int(line.split()[4].split("/")[0]) for line in capsys.readouterr().out.splitlines()]
    assert done == [3, 6, 9, 10, 13, 16, 19, 20]  # 6 s apart (every step due, 5 s gap), and both epoch ends


def test_ray_data_in_workers_keeps_its_info_lines_off_the_terminal(ray_session):
    """Every epoch of a streamed stage printed Ray Data's "execution finished" line and every stage its "Progress
    bars disabled" notice (from the split coordinator, a worker): at the default log level a worker's Ray Data
    console handler passes warnings only, and its log file still gets everything."""

    @ray_session.remote
    def run() -> tuple:
        import contextlib
        import io
        import logging

        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            ray.data.range(10).map_batches(lambda b: b).take_all()
        return buf.getvalue(), sorted(type(h).__name__ for h in logging.getLogger("ray.data").handlers)

    printed, handlers = ray_session.get(run.remote())
    assert printed == "" and {"PlainRayHandler", "SessionFileHandler"} <= set(handlers)  # (and one per dataset)


@pytest.mark.parametrize("bf16,bf16_cpu,expect", [(True, False, torch.float32), (True, True, torch.bfloat16),
                                                   (False, True, torch.float32)])
def test_cpu_training_runs_bf16_only_when_asked(bf16, bf16_cpu, expect):
    from med3dvlm.train.engine import autocast

    cfg = load_config("tiny", [f"train.bf16={bf16}", f"train.bf16_cpu={bf16_cpu}"])
    conv = torch.nn.Conv3d(1, 2, 3)
    with autocast(cfg, torch.device("cpu")):
        assert conv(torch.rand(1, 1, 4, 4, 4)).dtype == expect
