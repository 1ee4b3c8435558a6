"""torchrun data parallelism on CPU (gloo), 2 processes on 127.0.0.1, started as a user starts them."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from MemorizingSAMLib.checkpoints import load_model
from MemorizingSAMLib.datasets import prepare_dataset
from MemorizingSAMLib.evaluation.runner import strip_timings
from MemorizingSAMLib.memory_bank import MemoryBank

TORCHRUN = Path(sys.executable).parent / "torchrun"
# torchrun gives each of its processes one intra-op thread; the one-process runs get the same, so that any
# difference comes from the data parallelism and not from a different summation order inside the kernels.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def one(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "MemorizingSAMLib.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def two(*args, script=None, env=None, timeout=600):
    entry = [str(script)] if script else ["-m", "MemorizingSAMLib.cli"]
    return subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *entry, *map(str, args)],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp("d"), sources=("phantom",), phantom_seeds=(0, 1, 2))


@pytest.fixture(scope="module")
def student(data, tmp_path_factory):
    """A small memory-capable model for build-memory and evaluate."""
    out = tmp_path_factory.mktemp("m")
    r = one("train", "--config", "memsam_tiny_student", "--data", data, "--steps", "1", "--batch", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    return out / "train_last.pt"


def _train(runner, data, out, steps, extra=()):
    return runner(
        "train", "--config", "memsam_tiny_student", "--data", data, "--steps", steps, "--batch", "2",
        "--max-clicks", "2", "--lr", "1e-3", "--checkpoint-every", "1", "--log-every", "1", "--out", out, *extra,
    )  # fmt: skip


def _same_weights(a: Path, b: Path) -> None:
    """Equal up to the all-reduce's summation order: under AdamW every parameter moves by ~lr per step whatever
    its gradient, so runs on different samples differ almost everywhere by ~1e-3; here at most 0.1 % of the
    values may differ by more than 1e-6."""
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    diffs = torch.cat([(sa[k] - sb[k]).abs().flatten() for k in sa])
    assert (diffs > 1e-6).float().mean() < 1e-3 and diffs.max() < 1e-2, float(diffs.max())


def test_two_ranks_train_as_one_process_on_the_same_samples_and_resume_with_one(data, tmp_path):
    r = _train(one, data, tmp_path / "one", 3)
    assert r.returncode == 0, r.stderr
    r = _train(two, data, tmp_path / "two", 3)
    assert r.returncode == 0, r.stderr
    log = [json.loads(x) for x in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3] and {x["processes"] for x in log} == {2}  # rank 0 alone logs
    _same_weights(tmp_path / "one" / "train_last.pt", tmp_path / "two" / "train_last.pt")
    # a different seed draws other samples: the check above would see it
    r = _train(one, data, tmp_path / "other", 3, ("--seed", "1"))
    with pytest.raises(AssertionError):
        _same_weights(tmp_path / "one" / "train_last.pt", tmp_path / "other" / "train_last.pt")

    # 2 ranks stop at step 2; one process continues to step 3 and ends where the one-process run ended
    r = _train(two, data, tmp_path / "mixed", 2)
    assert r.returncode == 0, r.stderr
    r = _train(one, data, tmp_path / "mixed", 3)
    assert r.returncode == 0 and "resuming train at step 2" in r.stderr, r.stderr
    _same_weights(tmp_path / "one" / "train_last.pt", tmp_path / "mixed" / "train_last.pt")


def test_sharded_build_memory_and_evaluate_equal_one_process(data, student, tmp_path):
    common = ("--model", student, "--data", data, "--split", "all")
    assert one("build-memory", *common, "--out", tmp_path / "one.msam").returncode == 0
    r = two("build-memory", *common, "--out", tmp_path / "two.msam")
    assert r.returncode == 0, r.stderr
    model = load_model(student)
    a, b = MemoryBank.load(tmp_path / "one.msam", model), MemoryBank.load(tmp_path / "two.msam", model)
    assert len(a) > 3 and a.entries == b.entries
    for name in ("descriptors", "keys", "values", "foreground"):
        assert np.array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name))), name

    ev = ("evaluate", "--model", student, "--data", data, "--split", "all", "--clicks", "3")
    assert one(*ev, "--out", tmp_path / "e1").returncode == 0
    r = two(*ev, "--out", tmp_path / "e2")
    assert r.returncode == 0, r.stderr
    name = next(p.name for p in (tmp_path / "e1").glob("eval_*.json"))
    r1, r2 = (json.loads((tmp_path / d / name).read_text()) for d in ("e1", "e2"))
    assert r1["overall"]["targets"] > 3 and r2["timing"]["processes"] == 2
    s1, s2 = strip_timings(r1), strip_timings(r2)
    s1.pop("data"), s2.pop("data")
    assert s1 == s2


@pytest.mark.parametrize("mode", ["crash", "hang"])
def test_a_failing_rank_stops_the_job_with_its_error(data, tmp_path, mode):
    t0 = time.monotonic()
    r = two(
        *("train", "--config", "memsam_tiny_student", "--data", data, "--steps", "50", "--batch", "2"),
        *("--dist-timeout", "15", "--out", tmp_path / "run"),
        script=Path(__file__).with_name("rank_failure.py"),
        env={"MEMSAM_TEST_BREAK": mode},
        timeout=300,
    )
    assert r.returncode != 0
    assert time.monotonic() - t0 < 150
    if mode == "crash":
        assert "rank 1 could not read its training data" in r.stderr
    else:  # rank 0 gives up waiting for rank 1 in the gradient all-reduce, and says so
        assert "timed out" in r.stderr.lower() or "timeout" in r.stderr.lower(), r.stderr[-2000:]


def test_distill_and_finetune_memory_run_on_two_ranks_and_resume(data, tmp_path):
    """The other two training commands under torchrun: rank 0 writes the run, which one process continues."""
    teacher = tmp_path / "t"
    r = one(
        "train", "--config", "memsam_small_teacher", "--data", data, "--steps", "1", "--batch", "1", "--out", teacher
    )
    assert r.returncode == 0, r.stderr
    distill = ("distill", "--teacher", teacher / "train_last.pt", "--data", data, "--batch", "2", "--log-every", "1")
    r = two(*distill, "--steps", "2", "--finetune-steps", "1", "--checkpoint-every", "1", "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    log = [json.loads(x) for x in (tmp_path / "s" / "distill_log.jsonl").read_text().splitlines()]
    assert [(x["step"], x["processes"]) for x in log] == [(1, 2), (2, 2)]
    r = one(*distill, "--steps", "3", "--finetune-steps", "1", "--out", tmp_path / "s")
    assert r.returncode == 0 and "resuming distill at step 2" in r.stderr, r.stderr
    assert load_model(tmp_path / "s" / "student.pt").cfg.name == "memsam_tiny_student"

    tune = ("finetune-memory", "--model", tmp_path / "s" / "student.pt", "--data", data, "--sources", "phantom")
    r = two(
        *tune, "--steps", "2", "--batch", "2", "--log-every", "1", "--checkpoint-every", "1", "--out", tmp_path / "m"
    )
    assert r.returncode == 0, r.stderr
    assert load_model(tmp_path / "m" / "model.pt").cfg.name == "memsam_tiny_memory"
    log = [json.loads(x) for x in (tmp_path / "m" / "memory_log.jsonl").read_text().splitlines()]
    assert {x["processes"] for x in log} == {2}
